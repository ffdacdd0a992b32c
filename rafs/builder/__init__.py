"""The RAFS v6 builder: ``nydus-image create`` and ``merge``.

* :mod:`rafs.builder.source` — directory / tar / OCI layer (tar, tar+gzip, tar+zstd) walkers.
* :mod:`rafs.builder.tree` — the tree model, whiteouts and overlay merge.
* :mod:`rafs.builder.blob` — chunking, de-duplication, the data-blob writer.
* :mod:`rafs.builder.bootstrap` — the v6 bootstrap writer.
* :mod:`rafs.builder.loader` — read a bootstrap back into a tree (merge, chunk dict).
* :mod:`rafs.builder.merge` — per-layer bootstraps -> one image bootstrap.
* :mod:`rafs.builder.cli` — ``register(subparsers)`` for ``nydus-image``.
"""

from rafs.builder.build import BuildOptions, BuildResult, build
from rafs.builder.source import LayerLimits

__all__ = ["BuildOptions", "BuildResult", "LayerLimits", "build", "merge"]


def merge(*args, **kwargs):
    """See :func:`rafs.builder.merge.merge`."""
    from rafs.builder.merge import merge as _merge

    return _merge(*args, **kwargs)
