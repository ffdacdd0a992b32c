"""The persisted chunk-map file header (``<blob_id>.chunk_map``; upstream ``persist_map.rs``).

The file is this 4096-byte header followed by one bit per chunk, most significant bit first.
:class:`storage.cache.state.IndexedChunkMap` reads and writes it.
"""

from __future__ import annotations

from storage.errors import MetaFormatError
from storage.structs import Struct

CHUNK_MAP_MAGIC = 0x424D4150
CHUNK_MAP_MAGIC2 = 0x434D4150
#: ``all_ready`` value once every chunk is ready
CHUNK_MAP_ALL_READY = 0x4D4D4150
CHUNK_MAP_VERSION = 1
CHUNK_MAP_HEADER_SIZE = 4096


class ChunkMapHeader(Struct):
    """4096-byte header of a persisted chunk map."""

    FIELDS = (
        ("magic", "u32"),  #: ``CHUNK_MAP_MAGIC``
        ("version", "u32"),  #: ``CHUNK_MAP_VERSION``
        ("magic2", "u32"),  #: ``CHUNK_MAP_MAGIC2``
        ("all_ready", "u32"),  #: ``CHUNK_MAP_ALL_READY`` once every chunk is ready, else 0
        ("reserved", "4080s"),
    )

    @classmethod
    def new(cls, *, all_ready: bool = False) -> "ChunkMapHeader":
        return cls(magic=CHUNK_MAP_MAGIC, version=CHUNK_MAP_VERSION, magic2=CHUNK_MAP_MAGIC2,
                   all_ready=CHUNK_MAP_ALL_READY if all_ready else 0)

    def validate(self) -> None:
        if self.magic != CHUNK_MAP_MAGIC:
            raise MetaFormatError(f"chunk map: bad magic {self.magic:#x}")
        if self.magic2 != CHUNK_MAP_MAGIC2:
            raise MetaFormatError(f"chunk map: bad magic2 {self.magic2:#x}")
        if self.version != CHUNK_MAP_VERSION:
            raise MetaFormatError(f"chunk map: unsupported version {self.version}")
        if self.all_ready not in (0, CHUNK_MAP_ALL_READY):
            raise MetaFormatError(f"chunk map: bad all_ready {self.all_ready:#x}")
