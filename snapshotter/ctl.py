"""``nydusctl``: pull and run images through containerd the way CRI/nerdctl do, and query a
nydusd daemon's API.

    nydusctl --address /run/containerd/containerd.sock pull IMAGE
    nydusctl --address ... run [--snapshotter nydus] IMAGE [CMD...]
    nydusctl --api-sock /run/nydus/xxx/api.sock info|metrics

``pull`` goes through containerd's CRI ImageService (``runtime.v1.ImageService/PullImage``), the
``client.Pull(..., WithPullUnpack)`` path that hands ``containerd.io/snapshot/*`` and ``cri.*``
labels to the snapshotter (``ctr image pull`` passes none, so nydus layers could not be lazy).
Exit codes: 0 ok, 1 the operation failed, 2 usage error.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from typing import Any, Sequence

from snapshotter.errors import SnapshotterError

DEFAULT_ADDRESS = "/run/containerd/containerd.sock"
CRI_NAMESPACE = "k8s.io"


class CtlError(SnapshotterError):
    """A ``nydusctl`` operation failed (containerd, CRI or the daemon API answered an error)."""


# ---------------------------------------------------------------------------------------------
# CRI ImageService client
# ---------------------------------------------------------------------------------------------
class CriImageClient:
    """Thin client of CRI ``runtime.v1.ImageService`` on containerd's gRPC socket."""

    def __init__(self, address: str, timeout: float = 300.0) -> None:
        import grpc

        from protos.cri import api_pb2, api_pb2_grpc

        self._grpc = grpc
        self._pb = api_pb2
        self.address = address
        self.timeout = timeout
        self._channel = grpc.insecure_channel("unix://" + os.path.abspath(address))
        self._stub = api_pb2_grpc.ImageServiceStub(self._channel)

    def _call(self, what: str, fn: Any, req: Any) -> Any:
        try:
            return fn(req, timeout=self.timeout)
        except self._grpc.RpcError as e:  # type: ignore[attr-defined]
            code = e.code().name if hasattr(e, "code") else "UNKNOWN"
            detail = e.details() if hasattr(e, "details") else str(e)
            raise CtlError(f"{what}: {code}: {detail}") from None

    def pull_image(self, ref: str, *, username: str | None = None,
                   password: str | None = None, annotations: dict[str, str] | None = None) -> str:
        """Pull (and unpack with the CRI snapshotter); returns the image id (``sha256:...``)."""
        auth = None
        if username is not None:
            auth = self._pb.AuthConfig(username=username, password=password or "")
        req = self._pb.PullImageRequest(
            image=self._pb.ImageSpec(image=ref, annotations=annotations or {}), auth=auth)
        return str(self._call(f"pull {ref}", self._stub.PullImage, req).image_ref)

    def image_status(self, ref: str) -> Any | None:
        """The CRI ``Image`` record, or None if containerd does not have it."""
        req = self._pb.ImageStatusRequest(image=self._pb.ImageSpec(image=ref))
        resp = self._call(f"status of {ref}", self._stub.ImageStatus, req)
        return resp.image if resp.HasField("image") and resp.image.id else None

    def list_images(self) -> list[Any]:
        return list(self._call("list images", self._stub.ListImages,
                               self._pb.ListImagesRequest()).images)

    def remove_image(self, ref: str) -> None:
        req = self._pb.RemoveImageRequest(image=self._pb.ImageSpec(image=ref))
        self._call(f"remove {ref}", self._stub.RemoveImage, req)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "CriImageClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
