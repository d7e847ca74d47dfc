"""Table sizes are checked in one place, whoever reads them: metadata.json, loader, model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from ctrscale.data import schema
from ctrscale.data.schema import validate_table_sizes
from ctrscale.errors import DataError

SIZES = {name: 10 + i for i, name in enumerate(schema.SPARSE_FEATURES)}


def test_valid_sizes_come_back_as_ints_in_feature_order() -> None:
    shuffled = {name: np.int64(SIZES[name]) for name in reversed(schema.SPARSE_FEATURES)}
    sizes = validate_table_sizes(shuffled, "here")
    assert list(sizes) == list(schema.SPARSE_FEATURES)
    assert sizes == SIZES and all(type(size) is int for size in sizes.values())


@pytest.mark.parametrize(
    ("sizes", "problem"),
    [
        (None, "no table_sizes"),
        ([1, 2], "table_sizes is a list"),
        ({k: v for k, v in SIZES.items() if k != "C7"}, "no size for C7"),
        (SIZES | {"C27": 3}, "unknown features C27"),
        (SIZES | {"C3": 0, "C5": "9", "C8": 2.0, "C9": True}, "invalid sizes C3=0, C5='9', C8=2.0"),
    ],
)
def test_every_bad_entry_is_named_with_the_source_and_what_was_expected(sizes, problem) -> None:
    with pytest.raises(DataError) as error:
        validate_table_sizes(sizes, "somewhere")
    message = str(error.value)
    assert message.startswith("somewhere: ") and problem in message
    assert "expected a positive integer size for each of C1..C26" in message


def test_metadata_names_its_file(tmp_path: Path) -> None:
    (tmp_path / schema.METADATA_FILE).write_text(json.dumps({"table_sizes": SIZES | {"C2": -1}}))
    with pytest.raises(DataError, match=rf"{tmp_path / schema.METADATA_FILE}: .*C2=-1"):
        schema.read_metadata(tmp_path)
