"""The RAFS filesystem served over FUSE (pyfuse3): one mount, one or more image instances.

The names below load on first use: ``rafs.fs.takeover`` (the fd keeper) and the daemon manager
import this package without needing the filesystem itself.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rafs.fs.instance import BlobFiles, Instance
    from rafs.fs.ops import RafsFs

__all__ = ["RafsFs", "Instance", "BlobFiles"]
_HOME = {"RafsFs": "rafs.fs.ops", "Instance": "rafs.fs.instance", "BlobFiles": "rafs.fs.instance"}


def __getattr__(name: str) -> Any:
    module = _HOME.get(name)
    if module is None:
        raise AttributeError(f"module 'rafs.fs' has no attribute {name!r}")
    import importlib  # noqa: PLC0415

    return getattr(importlib.import_module(module), name)
