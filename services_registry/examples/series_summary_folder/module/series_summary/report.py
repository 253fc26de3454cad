"""Markdown rendering of a series summary."""


def render_markdown(summary):
    """A short markdown report of one series summary."""
    return (
        f"# Series {summary['seriesId']}\n\n"
        f"| field | value |\n|---|---|\n"
        f"| modality | {summary['modality']} |\n"
        f"| description | {summary['description']} |\n"
        f"| instances | {summary['instances']} |\n"
    )
