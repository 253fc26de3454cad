"""Things every command needs: settings loaded with a one-line error on bad values."""

from __future__ import annotations

from pydantic import ValidationError

from dcmflow.cli._output import fail
from dcmflow.settings import Settings

__all__ = ["load_settings"]


def load_settings() -> Settings:
    """Build :class:`Settings` from the environment, or exit with one line naming the variable."""
    try:
        return Settings()
    except ValidationError as exc:
        problems = "; ".join(
            f"DCMFLOW_{str(err['loc'][0]).upper()}: {err['msg']}" for err in exc.errors() if err.get("loc")
        )
        fail(f"bad configuration: {problems}")
