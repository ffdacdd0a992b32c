"""``BlobCompressionContextHeader``: the 4096-byte header after a blob's CI array.

In a blob it sits at ``ci_offset + ci_compressed_size``; in a ``.blob.meta`` cache file at
``round_up_4k(ci_uncompressed_size)``.  ``validate()`` checks both magics and the features.
"""

from __future__ import annotations

from storage.errors import MetaFormatError
from storage.structs import Struct

BLOB_CCT_MAGIC = 0xB10BB10B
BLOB_CCT_HEADER_SIZE = 4096
#: feature bits 0x1000..0x8000 are illegal on disk
BLOB_FEATURE_INCOMPAT_MASK = 0xFFFF & ~0x0FFF
#: bit only used in memory by upstream
_V5_NO_EXT_BLOB_TABLE = 0x8000_0000


class BlobCompressionContextHeader(Struct):
    """The blob meta header (``storage/src/meta/mod.rs``)."""

    FIELDS = (
        ("s_magic", "u32"),
        ("s_features", "u32"),
        ("s_ci_compressor", "u32"),
        ("s_ci_entries", "u32"),
        ("s_ci_offset", "u64"),
        ("s_ci_compressed_size", "u64"),
        ("s_ci_uncompressed_size", "u64"),
        ("s_ci_zran_offset", "u64"),
        ("s_ci_zran_size", "u64"),
        ("s_ci_zran_count", "u32"),
        ("s_reserved", "4032s"),
        ("s_magic2", "u32"),
    )

    @classmethod
    def new(cls, **values: int) -> "BlobCompressionContextHeader":
        """A header with both magics set."""
        return cls(s_magic=BLOB_CCT_MAGIC, s_magic2=BLOB_CCT_MAGIC, **values)

    def validate(self) -> None:
        if self.s_magic != BLOB_CCT_MAGIC:
            raise MetaFormatError(f"blob meta header: s_magic {self.s_magic:#x} != {BLOB_CCT_MAGIC:#x}")
        if self.s_magic2 != BLOB_CCT_MAGIC:
            raise MetaFormatError(f"blob meta header: s_magic2 {self.s_magic2:#x} != {BLOB_CCT_MAGIC:#x}")
        if self.s_features & (BLOB_FEATURE_INCOMPAT_MASK | _V5_NO_EXT_BLOB_TABLE):
            raise MetaFormatError(f"blob meta header: s_features {self.s_features:#x} has illegal bits")
        if self.s_ci_compressor > 3:
            raise MetaFormatError(f"blob meta header: s_ci_compressor {self.s_ci_compressor} unknown")
        if self.s_ci_compressed_size > self.s_ci_uncompressed_size and self.s_ci_compressor != 0:
            # allowed only for tiny incompressible arrays stored raw (compressor then is NONE)
            raise MetaFormatError(
                f"blob meta header: s_ci_compressed_size {self.s_ci_compressed_size} > "
                f"s_ci_uncompressed_size {self.s_ci_uncompressed_size}"
            )
