"""Tests of DataKey and the "mongoveil:CLASS" alt names."""

from __future__ import annotations

import uuid

import pytest

from proxy.crypto.data_key import DataKey, class_alt_name

KEY_ID = uuid.UUID("00000000-0000-4000-8000-000000000001")
MATERIAL = bytes(range(96))


def test_class_name_from_alt_name() -> None:
    key = DataKey(KEY_ID, MATERIAL, ("other", "mongoveil:identity"))

    assert key.class_name == "identity"


def test_class_name_first_match() -> None:
    key = DataKey(KEY_ID, MATERIAL, ("mongoveil:billing", "mongoveil:identity"))

    assert key.class_name == "billing"


@pytest.mark.parametrize(
    "alt_names",
    [(), ("identity",), ("mongoveil:",), ("MONGOVEIL:identity",)],
    ids=["none", "no prefix", "empty name", "other case"],
)
def test_class_name_none(alt_names: tuple[str, ...]) -> None:
    assert DataKey(KEY_ID, MATERIAL, alt_names).class_name is None


def test_alt_names_become_tuple() -> None:
    key = DataKey(KEY_ID, MATERIAL, ["mongoveil:identity"])  # type: ignore[arg-type]

    assert key.alt_names == ("mongoveil:identity",)


def test_repr_hides_material() -> None:
    text = repr(DataKey(KEY_ID, MATERIAL, ("mongoveil:identity",)))

    assert str(KEY_ID) in text
    assert "mongoveil:identity" in text
    assert repr(MATERIAL) not in text
    assert MATERIAL.hex() not in text


def test_str_hides_material() -> None:
    assert repr(MATERIAL) not in str(DataKey(KEY_ID, MATERIAL))


@pytest.mark.parametrize("size", [0, 64, 95, 97])
def test_material_wrong_size(size: int) -> None:
    with pytest.raises(ValueError, match=f"got {size}"):
        DataKey(KEY_ID, bytes(size))


def test_frozen() -> None:
    key = DataKey(KEY_ID, MATERIAL)

    with pytest.raises(AttributeError):
        key.material = bytes(96)  # type: ignore[misc]


def test_class_alt_name() -> None:
    assert class_alt_name("identity") == "mongoveil:identity"


def test_class_alt_name_roundtrip() -> None:
    key = DataKey(KEY_ID, MATERIAL, (class_alt_name("clinical"),))

    assert key.class_name == "clinical"


def test_class_alt_name_empty() -> None:
    with pytest.raises(ValueError, match="empty"):
        class_alt_name("")
