"""Regenerate the Python stubs for the vendored .proto files.

Run from anywhere: ``python -m protos.generate``.  The stubs are committed;
``tests/test_protos.py`` fails when a ``.proto`` file and its committed stub
disagree, so run this after editing or re-vendoring a proto.
"""

from __future__ import annotations

import pathlib
import sys

#: The vendored files, relative to the repository root (imports use the same form).
PROTO_FILES = (
    "protos/containerd/api/types/mount.proto",
    "protos/containerd/api/services/snapshots/v1/snapshots.proto",
    "protos/cri/api.proto",
)

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent


def protoc_args(out_dir: pathlib.Path, extra: list[str] | None = None) -> list[str]:
    import grpc_tools

    include = pathlib.Path(grpc_tools.__file__).parent / "_proto"
    return [
        "grpc_tools.protoc",
        f"-I{REPO_ROOT}",
        f"-I{include}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *(extra or []),
        *PROTO_FILES,
    ]


def generate(out_dir: pathlib.Path = REPO_ROOT) -> None:
    from grpc_tools import protoc

    rc = protoc.main(protoc_args(out_dir))
    if rc != 0:
        raise SystemExit(f"protoc failed with exit code {rc}")


if __name__ == "__main__":
    generate(pathlib.Path(sys.argv[1]) if len(sys.argv) > 1 else REPO_ROOT)
    print("generated stubs for:", *PROTO_FILES, sep="\n  ")
