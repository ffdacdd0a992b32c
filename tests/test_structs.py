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


def test_packer_is_positional_in_declared_order():
    s = Sample(magic=7, kind=2, pad=b"xyz", size=1 << 40, name=b"abcdefgh")
    p = Sample.packer("magic", "kind", "pad", "size", "name")
    assert p.pack(7, 2, b"xyz", 1 << 40, b"abcdefgh") == s.pack()
    buf = bytearray(30)
    p.pack_into(buf, 6, 7, 2, b"xyz", 1 << 40, b"abcdefgh")
    assert Sample.parse(buf, 6) == s
    with pytest.raises(TypeError, match="declared order"):
        Sample.packer("kind", "magic", "pad", "size", "name")
    with pytest.raises(TypeError):
        Sample.packer("magic", "kind", "pad", "size")
