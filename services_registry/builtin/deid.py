"""De-identification: a copy of each series under the PS3.15 Annex E Basic Profile.

Enable it with a key (any long random string, the same on every worker, kept secret)::

    export DCMFLOW_DEID_KEY=$(openssl rand -hex 32)
    dcmflow services enable deid                      # files land in the job's session
    dcmflow services enable deid -p forward_to=RESEARCH   # and are sent to that peer

Every instance is written to ``$DATA/<output>/<new SeriesInstanceUID>/<new SOPInstanceUID>.dcm``
as a PS3.10 file (new file meta, the original transfer syntax, pixel data byte for byte).
The attribute actions are PS3.15 Table E.1-1's, from dicom-anonymizer's table; UIDs become
an HMAC-SHA256 of the original under ``DCMFLOW_DEID_KEY``, so a study's series, re-runs and
references inside sequences all agree on the new UIDs (see :mod:`._deid_profile`).

Pixel data is not cleaned (that is the profile's Clean Pixel Data Option, not done here), so an
instance whose Burned In Annotation (0028,0301) is ``YES`` has identifying text in its pixels:
it is left out of the copy and counted, unless ``-p burned_in=keep`` says you take care of it.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from services_registry import Service
from services_registry.builtin._series import data_dir, series_folder

if TYPE_CHECKING:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import UID

    from services_registry.builtin._deid_profile import Deidentifier

# pydicom, pydantic and the profile table are imported by the worker: the callback runs in a
# child process per series, which imports this module and should start in milliseconds.

__all__ = ["service", "deid", "accept_every_series", "DeidKeyMissing", "deid_key", "deidentify_file", "Written", "KEY_VARIABLE"]

KEY_VARIABLE = "DCMFLOW_DEID_KEY"
DEFAULT_OUTPUT = "deid"

service = Service("deid", description="De-identified copy of each series (PS3.15 Basic Profile, keyed-hash UIDs), optionally forwarded")


class DeidKeyMissing(RuntimeError):
    """``DCMFLOW_DEID_KEY`` is unset or empty: without it no UID can be hashed."""


@functools.cache
def _key_settings() -> Any:
    """The settings class of dcmflow's ``deid_key``, read in the job's own process (it inherits
    the flow's environment); made on first use."""
    from pydantic import SecretStr
    from pydantic_settings import BaseSettings, SettingsConfigDict

    class KeySettings(BaseSettings):
        model_config = SettingsConfigDict(env_prefix="DCMFLOW_", extra="ignore")

        deid_key: SecretStr | None = None

    return KeySettings


def deid_key() -> bytes:
    """The UID hashing key from ``DCMFLOW_DEID_KEY``.

    Raises
    ------
    DeidKeyMissing
        The variable is unset or empty.
    """
    key = _key_settings()().deid_key
    if key is None or not key.get_secret_value():
        raise DeidKeyMissing(f"{KEY_VARIABLE} is not set: the deid job needs the key its new UIDs are hashed with")
    return key.get_secret_value().encode()


def _transfer_syntax(ds: Dataset) -> UID:
    """The transfer syntax the file was read with: its file meta's, else the encoding pydicom found."""
    from pydicom.uid import UID, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    meta = getattr(ds, "file_meta", None)
    uid = meta.get("TransferSyntaxUID") if meta is not None else None
    if uid:
        return UID(uid)
    implicit, little = ds.original_encoding
    if implicit:
        return ImplicitVRLittleEndian
    return ExplicitVRLittleEndian if little is not False else ExplicitVRBigEndian


def _file_meta(ds: Dataset, transfer_syntax: UID) -> FileMetaDataset:
    """A new PS3.10 §7.1 file meta: nothing of the original's (source AE, private info) is kept."""
    from pydicom.dataset import FileMetaDataset

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = transfer_syntax
    return meta


@dataclass(frozen=True)
class Written:
    """One de-identified instance: its file and its new study and series UIDs."""

    path: Path
    study_uid: str
    series_uid: str


def deidentify_file(path: Path, out: Path, deidentifier: Deidentifier, *, keep_burned_in: bool = False) -> Written | None:
    """De-identify one PS3.10 file into ``out/<new series UID>/<new SOP UID>.dcm``; ``None``
    when it was left out because its pixels carry burned-in annotation (and ``keep_burned_in``
    is false).

    Raises
    ------
    ValueError
        The file cannot be read, or has no SOP Instance UID, SOP Class UID or Series Instance UID.
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    from services_registry.builtin._deid_profile import mark_deidentified

    try:
        ds = pydicom.dcmread(path)
    except (InvalidDicomError, OSError, ValueError, EOFError) as exc:
        raise ValueError(f"{path.name} cannot be read as DICOM: {exc}") from None
    missing = [k for k in ("SOPInstanceUID", "SOPClassUID", "SeriesInstanceUID") if not ds.get(k)]
    if missing:
        raise ValueError(f"{path.name} has no {', '.join(missing)}: not an instance that can be de-identified")
    if not keep_burned_in and str(ds.get("BurnedInAnnotation") or "").strip().upper() == "YES":
        return None
    transfer_syntax = _transfer_syntax(ds)
    deidentifier.apply(ds)
    mark_deidentified(ds)
    ds.file_meta = _file_meta(ds, transfer_syntax)
    target = out / str(ds.SeriesInstanceUID) / f"{ds.SOPInstanceUID}.dcm"
    target.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(target, enforce_file_format=True)
    return Written(target, str(ds.get("StudyInstanceUID", "")), str(ds.SeriesInstanceUID))


def _output_folder(params: dict[str, Any]) -> Path:
    """``$DATA/<output>`` resolved and created; an output outside ``$DATA``, or inside ``dicom/``
    (the input, which is not stored as session files), is refused."""
    name = str(params.get("output") or DEFAULT_OUTPUT)
    root = data_dir().resolve()
    target = (root / name).resolve()
    if Path(name).is_absolute() or target == root or not target.is_relative_to(root) or target.is_relative_to(root / "dicom"):
        raise ValueError(f"deid: output {name!r} is not a folder under $DATA outside dicom/")
    target.mkdir(parents=True, exist_ok=True)
    return target


def _dicom_files(folder: Path) -> Iterator[Path]:
    """Files of ``folder`` with the PS3.10 ``DICM`` prefix, in name order."""
    for path in sorted(p for p in folder.iterdir() if p.is_file()):
        with path.open("rb") as fh:
            if fh.read(132)[128:] == b"DICM":
                yield path


@service.job(
    name="deid",
    timeout="10m",
    sort_position=30,
    params={"output": DEFAULT_OUTPUT, "forward_to": None, "burned_in": "exclude"},
    description="De-identified copy (PS3.15 Basic Profile, keyed-hash UIDs); forward_to sends it to a peer",
)
def deid(jobName: str, headers: dict[str, Any], params: dict[str, Any], added_params: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
    """Write the de-identified series under ``$DATA/<output>``; return what was written.

    Returns
    -------
    dict
        ``instances``, the new ``study_uids`` and ``series_uids`` (one each for a series
        folder), the ``output`` folders relative to ``$DATA``, ``profile``, what was done
        (``actions``), ``burned_in_excluded`` (instances left out: Burned In Annotation YES;
        ``burned_in=keep`` writes them), and ``storage`` when ``forward_to`` names a peer and
        something was written.

    Raises
    ------
    DeidKeyMissing
        ``DCMFLOW_DEID_KEY`` is not set.
    FileNotFoundError
        The series folder is missing or holds no DICOM file.
    ValueError
        ``output`` is not a folder under ``$DATA``, ``burned_in`` is neither ``exclude`` nor
        ``keep``, or an instance lacks the UIDs every instance has.
    """
    from services_registry.builtin._deid_profile import PROFILE_NAME, PROFILE_TABLE, Deidentifier

    params = params or {}
    deidentifier = Deidentifier(deid_key())
    out = _output_folder(params)
    folder = series_folder(headers)
    if not folder.is_dir():
        raise FileNotFoundError(f"series folder {headers['dcmpath']} does not exist under $DATA")
    files = list(_dicom_files(folder))
    if not files:
        raise FileNotFoundError(f"no DICOM files in {headers['dcmpath']}")

    policy = str(params.get("burned_in") or "exclude")
    if policy not in ("exclude", "keep"):
        raise ValueError(f"deid: burned_in must be 'exclude' or 'keep', not {policy!r}")
    copies = [deidentify_file(path, out, deidentifier, keep_burned_in=policy == "keep") for path in files]
    written = [w for w in copies if w is not None]
    excluded = len(copies) - len(written)
    studies = sorted({w.study_uid for w in written})
    series = sorted({w.series_uid for w in written})
    folders = [(out / uid).relative_to(data_dir().resolve()).as_posix() for uid in series]
    print(f"deid: {len(written)} instances of {headers['dcmpath']} -> {', '.join(folders)} ({PROFILE_NAME})")
    if excluded:
        print(f"deid: left out {excluded} of {len(copies)} instances: Burned In Annotation YES (identifying text in "
              "the pixels, which this profile does not clean; -p burned_in=keep writes them)")
    result: dict[str, Any] = {
        "instances": len(written),
        "study_uids": studies,
        "series_uids": series,
        "output": folders,
        "profile": PROFILE_NAME,
        "profile_table": PROFILE_TABLE,
        "actions": dict(deidentifier.counts),
        "burned_in_excluded": excluded,
    }
    peer = params.get("forward_to")
    if peer and folders:
        result["storage"] = [{"type": "dicom", "path": folder, "destination": str(peer)} for folder in folders]
    return result


@deid.callback
def accept_every_series(jobName: str, headers: dict[str, Any], params: dict[str, Any], added_params: dict[str, Any], **kwargs: Any) -> bool:
    """Every series is de-identified: the profile applies to any IOD."""
    return True
