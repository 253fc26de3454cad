"""Selection rules of the series-summary example."""


def accepted_modality(headers, modalities):
    """The series' modality if it is one of ``modalities``, else None."""
    modality = str(headers.get("Modality", "")).upper()
    return modality if modality in {m.upper() for m in modalities} else None
