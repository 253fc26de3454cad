"""dcmflow: receive DICOM, keep it safely, run processing services on every series.

The command line lives in :mod:`dcmflow.cli`; configuration in :mod:`dcmflow.settings`.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("dcmflow")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
