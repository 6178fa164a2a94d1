"""Fuzzing the safetensors header parser: a malformed header is an ``InvalidArtifact`` (a 422),
never another exception (a 500); and any file it accepts, the safetensors library loads alike."""

from __future__ import annotations

import json
import math
import struct
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from controlplane.services.validation import read_safetensors_header
from lorafaas.errors import InvalidArtifact

pytestmark = pytest.mark.unit

WIDTH = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2}
junk = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True),
    st.text(max_size=6),
    st.lists(st.integers(-3, 9), max_size=4),
    st.lists(st.floats(0, 64), max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)
dtypes = st.one_of(st.sampled_from([*WIDTH, "I32", "U8", "BOOL", "f32", ""]), junk)
shapes = st.one_of(st.lists(st.integers(0, 6), max_size=3), junk)


@st.composite
def headers(draw: st.DrawFn) -> tuple[bytes, int]:
    """A header (as bytes) and how many data bytes follow it: mostly well-formed, with faults mixed in."""
    n = draw(st.integers(0, 3))
    header: dict = {}
    position = 0
    for i in range(n):
        dtype, shape = draw(dtypes), draw(shapes)
        entry: dict = {"dtype": dtype, "shape": shape}
        known = isinstance(dtype, str) and dtype in WIDTH and isinstance(shape, list)
        known = known and all(type(d) is int and d >= 0 for d in shape)
        size = math.prod(shape) * WIDTH[dtype] if known else 4
        entry["data_offsets"] = draw(st.one_of(st.just([position, position + size]), junk))
        position += size
        for key in draw(st.lists(st.sampled_from(["dtype", "shape", "data_offsets"]), max_size=1)):
            del entry[key]
        header[draw(st.sampled_from([f"t{i}", "__metadata__"]))] = draw(st.one_of(st.just(entry), junk))
    if draw(st.booleans()):
        header["__metadata__"] = draw(st.one_of(st.dictionaries(st.text(max_size=3), st.text(max_size=3)), junk))
    raw = json.dumps(header).encode() if draw(st.integers(0, 9)) else draw(st.binary(max_size=40))
    return raw, position + draw(st.sampled_from([0, 0, 0, -1, 1, 7]))


def _write(path: Path, raw: bytes, data_bytes: int, header_len: int | None) -> None:
    length = len(raw) if header_len is None else header_len
    path.write_bytes(struct.pack("<Q", length) + raw + bytes(max(0, data_bytes)))


@settings(max_examples=200, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(headers(), st.one_of(st.none(), st.integers(0, 2**64 - 1)))
def test_malformed_headers_are_invalid_artifacts(header: tuple[bytes, int], header_len: int | None) -> None:
    from safetensors.torch import load_file

    raw, data_bytes = header
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "adapter_model.safetensors"
        _write(path, raw, data_bytes, header_len)
        try:
            tensors = read_safetensors_header(path)
        except InvalidArtifact as e:
            assert e.message.startswith("adapter_model.safetensors:")
            return
        loaded = load_file(str(path))  # what the worker does: it must agree
        assert {t.name: list(t.shape) for t in tensors} == {k: list(v.shape) for k, v in loaded.items()}


@pytest.mark.parametrize(
    ("entry", "field"),
    [
        ({"dtype": "F32", "shape": [2, 2], "data_offsets": [0.0, 16.0]}, "data_offsets"),
        ({"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 8, 16]}, "data_offsets"),
        ({"dtype": "F32", "shape": [2, 2], "data_offsets": "0-16"}, "data_offsets"),
        ({"dtype": "F32", "shape": [2, 2], "data_offsets": [True, 16]}, "data_offsets"),
        ({"dtype": "F32", "shape": "2x2", "data_offsets": [0, 16]}, "shape"),
        ({"dtype": "F32", "shape": [2, -2], "data_offsets": [0, 16]}, "shape"),
        ({"dtype": ["F32"], "shape": [2, 2], "data_offsets": [0, 16]}, "dtype"),
        ({"dtype": "I32", "shape": [2, 2], "data_offsets": [0, 16]}, "dtype"),
        ({"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 12]}, "data_offsets"),
    ],
)
def test_each_malformed_field_is_named(entry: dict, field: str, tmp_path: Path) -> None:
    path = tmp_path / "adapter_model.safetensors"
    _write(path, json.dumps({"w": entry}).encode(), 16, None)
    with pytest.raises(InvalidArtifact) as info:
        read_safetensors_header(path)
    assert info.value.details["field"] == field
    assert f"tensor w: {field}" in info.value.message
