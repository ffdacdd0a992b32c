"""The committed stubs match the vendored .proto files (regenerate: python -m protos.generate)."""

from __future__ import annotations

import importlib
import pathlib

import pytest

from protos import generate

grpc_tools = pytest.importorskip("grpc_tools", reason="grpcio-tools not installed")


def _module_for(proto: str) -> str:
    return proto.removesuffix(".proto").replace("/", ".") + "_pb2"


def _strip_json_names(msgs):
    """protoc fills json_name in descriptor sets but not in Python stubs; ignore it."""
    for msg in msgs:
        for field in msg.field:
            field.ClearField("json_name")
        _strip_json_names(msg.nested_type)


def test_stubs_match_protos(tmp_path: pathlib.Path):
    from google.protobuf import descriptor_pb2
    from grpc_tools import protoc

    out = tmp_path / "descriptors.pb"
    args = generate.protoc_args(tmp_path, [f"--descriptor_set_out={out}"])
    assert protoc.main(args) == 0
    fresh = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())
    by_name = {f.name: f for f in fresh.file}
    for proto in generate.PROTO_FILES:
        committed = descriptor_pb2.FileDescriptorProto.FromString(
            importlib.import_module(_module_for(proto)).DESCRIPTOR.serialized_pb
        )
        _strip_json_names(by_name[proto].message_type)
        assert committed == by_name[proto], f"{proto}: stub is stale; run python -m protos.generate"


def test_grpc_service_names():
    from protos.containerd.api.services.snapshots.v1 import snapshots_pb2
    from protos.cri import api_pb2

    assert snapshots_pb2.DESCRIPTOR.services_by_name["Snapshots"].full_name == (
        "containerd.services.snapshots.v1.Snapshots"
    )
    assert api_pb2.DESCRIPTOR.services_by_name["ImageService"].full_name == "runtime.v1.ImageService"
