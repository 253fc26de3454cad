"""UID, name and key validation (storage/keys.py): nothing from the wire becomes a path."""

from __future__ import annotations

import pytest

from storage.errors import InvalidKeyError
from storage.keys import (
    instance_key,
    instance_version_key,
    is_valid_name,
    is_valid_uid,
    series_prefix,
    study_prefix,
    validate_key,
    validate_name,
    validate_uid,
)

VALID_UIDS = [
    "1",
    "0",
    "1.2.840.10008.1.2.1",
    "1.2.826.0.1.3680043.8.498.83447212180852971447013722242362653104",  # 64 chars
    "1.2.3.0004",  # leading zeros in a component: non-conformant, still safe (see keys.py)
]

INVALID_UIDS = [
    "",
    "../1.2",
    "1.2/3",
    "1.2.3.",
    ".1.2.3",
    "1..2",
    "1.2.3 ",
    " 1.2.3",
    "1.2.3\n",
    "1.2.3\x00",
    "1." + "2" * 63,  # 65 characters
    "１.２",  # full-width digits: str.isdigit() is True, the grammar says 0-9 only
    "١.٢",  # Arabic-Indic digits
    "1.2a",
    "1,2",
    "1.2.3/../../etc",
]


def test_64_and_65_characters() -> None:
    assert len(VALID_UIDS[3]) == 64
    assert is_valid_uid(VALID_UIDS[3])
    assert len(INVALID_UIDS[10]) == 65
    assert not is_valid_uid(INVALID_UIDS[10])


@pytest.mark.parametrize("uid", VALID_UIDS)
def test_valid_uids(uid: str) -> None:
    assert is_valid_uid(uid)
    assert validate_uid(uid) == uid


@pytest.mark.parametrize("uid", INVALID_UIDS)
def test_invalid_uids(uid: str) -> None:
    assert not is_valid_uid(uid)
    with pytest.raises(InvalidKeyError, match="SOP Instance UID"):
        validate_uid(uid, "SOP Instance UID")


@pytest.mark.parametrize("value", [None, 1.2, 12, b"1.2", ["1.2"]])
def test_non_strings_are_not_uids(value: object) -> None:
    assert not is_valid_uid(value)
    with pytest.raises(InvalidKeyError):
        validate_uid(value)


def test_invalid_key_error_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        validate_uid("x")


@pytest.mark.parametrize("name", ["part-0000.tar", "index.json.zst", "a", "A_b-c.d", "0" * 128])
def test_valid_names(name: str) -> None:
    assert is_valid_name(name)
    assert validate_name(name) == name


@pytest.mark.parametrize("name", ["", ".", "..", ".hidden", ".tmp-123", "a/b", "a b", "é", "0" * 129, "a\\b", "a:b"])
def test_invalid_names(name: str) -> None:
    assert not is_valid_name(name)
    with pytest.raises(InvalidKeyError):
        validate_name(name)


@pytest.mark.parametrize(
    "key",
    ["instances/1.2/1.2.3/1.2.3.4.dcm", "archives/1/2/index.json.zst", "a", "a/b/c"],
)
def test_valid_keys(key: str) -> None:
    assert validate_key(key) == key


@pytest.mark.parametrize(
    "key",
    [
        "",
        "/a",
        "a/",
        "a//b",
        "a/../b",
        "../a",
        "a/..",
        "a/./b",
        "./a",
        "a/.tmp-x",
        "a\\..\\b",
        "a/b c",
        "a/" + "b" * 1100,
        None,
        b"a/b",
    ],
)
def test_invalid_keys(key: object) -> None:
    with pytest.raises(InvalidKeyError):
        validate_key(key)


def test_instance_key_layout() -> None:
    assert study_prefix("1.2") == "instances/1.2/"
    assert series_prefix("1.2", "1.2.3") == "instances/1.2/1.2.3/"
    key = instance_key("1.2", "1.2.3", "1.2.3.4")
    assert key == "instances/1.2/1.2.3/1.2.3.4.dcm"
    assert validate_key(key) == key


def test_instance_version_key_layout() -> None:
    key = instance_version_key("1.2", "1.2.3", "1.2.3.4", "ab" * 32)
    assert key == f"instances/1.2/1.2.3/1.2.3.4.versions/{'ab' * 32}.dcm"
    assert validate_key(key) == key


@pytest.mark.parametrize(
    ("study", "series", "sop"),
    [("../1", "1.2", "1.2.3"), ("1", "1.2/3", "1.2.3"), ("1", "1.2", ".."), ("1", "1.2", "")],
)
def test_key_builders_refuse_bad_uids(study: str, series: str, sop: str) -> None:
    with pytest.raises(InvalidKeyError):
        instance_key(study, series, sop)


def test_version_key_refuses_bad_hash() -> None:
    with pytest.raises(InvalidKeyError):
        instance_version_key("1.2", "1.2.3", "1.2.3.4", "../x")
