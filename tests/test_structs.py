from __future__ import annotations

import pytest

from storage.structs import Struct, StructTooShort


class Sample(Struct):
    FIELDS = (("magic", "u32"), ("kind", "u8"), ("pad", "3s"), ("size", "u64"), ("name", "8s"))


def test_size_and_roundtrip():
    assert len(Sample) == Sample.SIZE == 24
    s = Sample(magic=0xE0F5E1E2, kind=2, size=1 << 40, name=b"abc\0\0\0\0\0")
    raw = s.pack()
    assert len(raw) == 24
    back = Sample.parse(raw)
    assert back == s and back.magic == 0xE0F5E1E2 and back.name.rstrip(b"\0") == b"abc"
    assert Sample.parse_array(raw * 3, 0, 3) == [s, s, s]


def test_defaults_and_errors():
    assert Sample().pack() == bytes(24)
    with pytest.raises(TypeError):
        Sample(bogus=1)
    with pytest.raises(StructTooShort):
        Sample.parse(b"\0" * 23)
    with pytest.raises(StructTooShort):
        Sample.parse_array(b"\0" * 47, 0, 2)
    assert Sample(kind=1).replace(kind=3).kind == 3
