"""Blob-side on-disk formats (everything after the chunk data of a nydus data blob).

* :mod:`storage.meta.chunk_info` — chunk-info (CI) entries, v1 (16 B) and v2 (24 B):
  ``BlobChunk`` records, ``decode_ci_array`` / ``encode_ci_array``.
* :mod:`storage.meta.header` — ``BlobCompressionContextHeader`` (4096 B, magic 0xB10BB10B).
* :mod:`storage.meta.toc` — ``TocEntry`` (128 B), reverse-tar GNU headers (``tar_header``,
  ``walk_sections``) and TOC parsing/extraction.
* :mod:`storage.meta.blob_meta` — ``BlobMeta`` (header + decoded CI table): load it from a
  blob (``load_from_blob``) or from a ``<blob_id>.blob.meta`` cache file
  (``load_blob_meta_file``), write a cache file (``write_blob_meta_file``).

All structs are declared with :class:`storage.structs.Struct`; every malformed input raises
:class:`storage.errors.MetaFormatError`.
"""

from storage.meta.blob_meta import (
    BlobMeta,
    encode_blob_meta_file,
    load_blob_meta_file,
    load_from_blob,
    load_from_ci_bytes,
    write_blob_meta_file,
)
from storage.meta.chunk_info import BlobChunk, CiFlags, decode_ci_array, encode_ci_array
from storage.meta.header import BLOB_CCT_MAGIC, BlobCompressionContextHeader
from storage.meta.toc import TarSection, TocEntry, parse_toc, tar_header, walk_sections

__all__ = [
    "BLOB_CCT_MAGIC",
    "BlobChunk",
    "BlobCompressionContextHeader",
    "BlobMeta",
    "CiFlags",
    "TarSection",
    "TocEntry",
    "decode_ci_array",
    "encode_blob_meta_file",
    "encode_ci_array",
    "load_blob_meta_file",
    "load_from_blob",
    "load_from_ci_bytes",
    "parse_toc",
    "tar_header",
    "walk_sections",
    "write_blob_meta_file",
]
