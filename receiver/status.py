"""DIMSE status codes the receiver answers with.

Sources: PS3.7 Annex C (status type encoding: 0x0000 Success, 0xA7xx/0xA9xx/0xCxxx Failure,
0xB000/0xB007/0xB006 Warning) and PS3.4 Annex B.2.3 (Storage Service Class statuses),
Table B.2-1 "C-STORE Status". Codes are plain ``int`` constants because that is what a
pynetdicom intervention handler returns (``pynetdicom/service_class.py`` turns the int into
the C-STORE-RSP Status element).

The receiver uses only a handful of them:

* :data:`SUCCESS` once the raw bytes are durable in the spool;
* :data:`OUT_OF_RESOURCES` when the spool disk is below its watermark or a write fails;
* :data:`DATA_SET_DOES_NOT_MATCH_SOP_CLASS` when the UIDs the dataset must carry are missing,
  are not UIDs, or disagree with the request;
* :data:`CANNOT_UNDERSTAND` when the dataset does not parse at all.
"""

from __future__ import annotations

__all__ = [
    "SUCCESS",
    "OUT_OF_RESOURCES",
    "DATA_SET_DOES_NOT_MATCH_SOP_CLASS",
    "CANNOT_UNDERSTAND",
    "PROCESSING_FAILURE",
    "SOP_CLASS_NOT_SUPPORTED",
    "COERCION_OF_DATA_ELEMENTS",
    "ELEMENTS_DISCARDED",
    "DATA_SET_DOES_NOT_MATCH_SOP_CLASS_WARNING",
    "is_success",
    "is_failure",
]

SUCCESS = 0x0000
"""PS3.7 C.1.1 / PS3.4 Table B.2-1: the instance was stored (for us: durably spooled)."""

OUT_OF_RESOURCES = 0xA700
"""PS3.4 Table B.2-1 "Refused: Out of Resources" (0xA7xx); we send 0xA700."""

DATA_SET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
"""PS3.4 Table B.2-1 "Error: Data Set does not match SOP Class" (0xA9xx); we send 0xA900."""

CANNOT_UNDERSTAND = 0xC000
"""PS3.4 Table B.2-1 "Error: Cannot understand" (0xCxxx); we send 0xC000."""

PROCESSING_FAILURE = 0x0110
"""PS3.7 C.4.2 "Processing failure": a general failure not covered by a specific code."""

SOP_CLASS_NOT_SUPPORTED = 0x0122
"""PS3.7 C.5.8 "Refused: SOP Class not supported"."""

COERCION_OF_DATA_ELEMENTS = 0xB000
"""PS3.4 Table B.2-1 warning "Coercion of Data Elements" (not used: we store as received)."""

ELEMENTS_DISCARDED = 0xB006
"""PS3.4 Table B.2-1 warning "Elements Discarded" (not used: we store as received)."""

DATA_SET_DOES_NOT_MATCH_SOP_CLASS_WARNING = 0xB007
"""PS3.4 Table B.2-1 warning "Data Set does not match SOP Class" (not used)."""


def is_success(status: int) -> bool:
    """True for the Success status (PS3.7 C.1.1)."""
    return status == SUCCESS


def is_failure(status: int) -> bool:
    """True for Failure statuses: 0xA000-0xAFFF, 0xC000-0xCFFF and the 0x01xx/0x02xx codes (PS3.7 C)."""
    return (0xA000 <= status <= 0xAFFF) or (0xC000 <= status <= 0xCFFF) or (0x0100 <= status <= 0x02FF)
