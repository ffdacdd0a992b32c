"""The RAFS filesystem served over FUSE (pyfuse3): one mount, one or more image instances."""

from rafs.fs.ops import RafsFs
from rafs.fs.instance import BlobFiles, Instance

__all__ = ["RafsFs", "Instance", "BlobFiles"]
