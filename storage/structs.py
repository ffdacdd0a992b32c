"""A small declarative mechanism for little-endian on-disk structs.

Every on-disk struct in this project (``rafs/layout/``, ``storage/meta/``) is declared once
with :class:`Struct`, and both the readers and the builder go through the same declaration::

    class TocEntry(Struct):
        \"\"\"128-byte entry of ``rafs.blob.toc``.\"\"\"
        FIELDS = (
            ("flags", "u32"),
            ("reserved1", "u32"),
            ("name", "16s"),
            ("uncompressed_digest", "32s"),
            ("compressed_offset", "u64"),
            ("compressed_size", "u64"),
            ("uncompressed_size", "u64"),
            ("reserved2", "48s"),
        )

    entry = TocEntry.parse(buf, offset)        # -> instance; len(TocEntry) == TocEntry.SIZE == 128
    entry.compressed_offset
    entry.pack()                               # -> bytes, round-trips
    TocEntry(flags=1, name=b"image.boot")      # omitted fields default to 0 / zero bytes
    TocEntry.packer("flags", ..., "reserved2").pack_into(buf, off, *values)  # hot loops, order checked

Field types: ``u8 u16 u32 u64 i8 i16 i32 i64`` and ``Ns`` (N raw bytes).  Structs are packed
(no implicit padding): declare reserved/padding bytes explicitly so ``SIZE`` equals the on-disk
size.  ``validate()`` is a hook a subclass overrides to raise its package's format error naming
the bad field and value; ``parse`` does not call it (callers decide when to validate).
This module is the only place in the project that calls :mod:`struct` directly.
"""

from __future__ import annotations

import struct
import sys
from typing import Any, ClassVar

_CODES = {"u8": "B", "u16": "H", "u32": "I", "u64": "Q", "i8": "b", "i16": "h", "i32": "i", "i64": "q"}


#: columns come from strided memoryview casts (native order) where that order is little-endian
_COLUMNS_BY_CAST = sys.byteorder == "little"


class StructTooShort(ValueError):
    """The buffer ends before the struct does."""


class _StructMeta(type):
    def __len__(cls) -> int:  # len(TocEntry) == 128
        return cls.SIZE  # type: ignore[attr-defined]


class Struct(metaclass=_StructMeta):
    FIELDS: ClassVar[tuple[tuple[str, str], ...]] = ()
    SIZE: ClassVar[int] = 0
    _codec: ClassVar[struct.Struct]
    _names: ClassVar[tuple[str, ...]]
    _defaults: ClassVar[tuple[Any, ...]]
    _columns: ClassVar[dict[str, tuple[int, str]]]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        fmt = "<"
        defaults = []
        columns = {}  # numeric field -> (byte offset in the struct, struct code)
        for name, ftype in cls.FIELDS:
            if ftype in _CODES:
                columns[name] = (struct.calcsize(fmt), _CODES[ftype])
                fmt += _CODES[ftype]
                defaults.append(0)
            elif ftype.endswith("s") and ftype[:-1].isdigit():
                fmt += ftype
                defaults.append(bytes(int(ftype[:-1])))
            else:
                raise TypeError(f"{cls.__name__}.{name}: unknown field type {ftype!r}")
        cls._codec = struct.Struct(fmt)
        cls.SIZE = cls._codec.size
        cls._names = tuple(name for name, _ in cls.FIELDS)
        cls._defaults = tuple(defaults)
        cls._columns = columns

    __slots__ = ("__dict__",)

    def __init__(self, **values: Any) -> None:
        for name, default in zip(self._names, self._defaults):
            setattr(self, name, values.pop(name, default))
        if values:
            raise TypeError(f"{type(self).__name__}: unknown fields {sorted(values)}")

    @classmethod
    def parse(cls, buf: bytes | bytearray | memoryview, offset: int = 0):
        """Decode one struct at ``offset`` of ``buf``; raises :class:`StructTooShort`."""
        if offset < 0 or offset + cls.SIZE > len(buf):
            raise StructTooShort(
                f"{cls.__name__}: need {cls.SIZE} bytes at offset {offset}, buffer has {len(buf)}"
            )
        obj = cls.__new__(cls)
        obj.__dict__.update(zip(cls._names, cls._codec.unpack_from(buf, offset)))
        return obj

    @classmethod
    def parse_array(cls, buf: bytes | bytearray | memoryview, offset: int, count: int) -> list:
        """Decode ``count`` consecutive structs starting at ``offset``."""
        if count < 0 or offset < 0 or offset + count * cls.SIZE > len(buf):
            raise StructTooShort(
                f"{cls.__name__}[{count}]: need {count * cls.SIZE} bytes at offset {offset}, "
                f"buffer has {len(buf)}"
            )
        names = cls._names
        out = []
        for values in cls._codec.iter_unpack(bytes(buf[offset : offset + count * cls.SIZE])):
            obj = cls.__new__(cls)
            obj.__dict__.update(zip(names, values))
            out.append(obj)
        return out

    @classmethod
    def parse_columns(cls, buf: bytes | bytearray | memoryview, offset: int, count: int,
                      *names: str) -> list[list[int]]:
        """The numeric fields ``names`` of ``count`` consecutive structs starting at ``offset``,
        one list per field in table order: a large table read without an object per row (a
        strided view of each field where the machine is little-endian, else one unpack per row)."""
        if count < 0 or offset < 0 or offset + count * cls.SIZE > len(buf):
            raise StructTooShort(
                f"{cls.__name__}[{count}]: need {count * cls.SIZE} bytes at offset {offset}, "
                f"buffer has {len(buf)}"
            )
        data = bytes(buf[offset : offset + count * cls.SIZE])
        out = []
        for name in names:
            try:
                at, code = cls._columns[name]
            except KeyError:
                raise TypeError(f"{cls.__name__}: {name!r} is not a numeric field") from None
            width = struct.calcsize(code)
            if _COLUMNS_BY_CAST and at % width == 0 and cls.SIZE % width == 0:
                out.append(memoryview(data).cast(code)[at // width :: cls.SIZE // width].tolist())
            else:
                one = struct.Struct(f"<{at}x{code}{cls.SIZE - at - width}x")
                out.append([v for (v,) in one.iter_unpack(data)])
        return out

    @classmethod
    def packer(cls, *names: str) -> struct.Struct:
        """The compiled codec, for positional packing in hot loops: ``packer(...).pack(*values)``
        and ``.pack_into(buf, offset, *values)`` take the values in the order ``names``, which
        must be the declared field order (checked here, so a reordered declaration fails at
        the caller's import instead of writing fields into each other)."""
        if names != cls._names:
            raise TypeError(f"{cls.__name__}: packer fields {names} are not the declared order {cls._names}")
        return cls._codec

    def pack(self) -> bytes:
        return self._codec.pack(*(getattr(self, name) for name in self._names))

    def pack_into(self, buf: bytearray | memoryview, offset: int) -> None:
        self._codec.pack_into(buf, offset, *(getattr(self, name) for name in self._names))

    def validate(self) -> None:
        """Override to check field values; raise the package's format error naming the field."""

    def replace(self, **values: Any):
        new = type(self).__new__(type(self))
        new.__dict__.update(self.__dict__)
        for name, value in values.items():
            if name not in self._names:
                raise TypeError(f"{type(self).__name__}: unknown field {name!r}")
            setattr(new, name, value)
        return new

    def as_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self._names}

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and self.as_dict() == other.as_dict()  # type: ignore[union-attr]

    def __repr__(self) -> str:
        inner = ", ".join(f"{k}={v!r}" for k, v in self.as_dict().items() if v not in (0, b""))
        return f"{type(self).__name__}({inner})"


class Scalar:
    """Helpers to read/write single little-endian integers and arrays through the same codecs."""

    U16 = struct.Struct("<H")
    U32 = struct.Struct("<I")
    U64 = struct.Struct("<Q")

    @staticmethod
    def u32_array(buf: bytes | memoryview, offset: int, count: int) -> tuple[int, ...]:
        if offset < 0 or count < 0 or offset + 4 * count > len(buf):
            raise StructTooShort(f"u32[{count}] at offset {offset}: buffer has {len(buf)}")
        return struct.unpack_from(f"<{count}I", buf, offset)

    @staticmethod
    def pack_u32_array(values) -> bytes:
        values = list(values)
        return struct.pack(f"<{len(values)}I", *values)
