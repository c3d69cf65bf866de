"""Modules shipped as OCI wasm layers, read from containerd's content store.

An OCI wasm artifact (config ``application/vnd.wasm.config.v0+json``, one
``application/wasm`` layer) has no filesystem to mount: the module is a blob in
containerd's content store. The host asks containerd over its gRPC API which image the
container came from, resolves the image's manifest and streams the wasm layer.
Only the module bytes are read; compiled code is never taken from an image.
"""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass
from typing import Any

from layotto.host.errors import ModuleError
from layotto.shim.protocol import containers_pb2, content_pb2, images_pb2

WASM_LAYER_TYPES = frozenset(
    {
        "application/wasm",
        "application/vnd.wasm.content.layer.v1+wasm",
        "application/vnd.bytecodealliance.wasm.component.layer.v0+wasm",
    }
)
INDEX_TYPES = frozenset(
    {
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
    }
)
MAX_MANIFEST_BYTES = 4 << 20
NAMESPACE_HEADER = "containerd-namespace"


@dataclass(frozen=True)
class WasmLayer:
    image: str
    digest: str
    size: int
    media_type: str


class ContainerdContent:
    """A small client for containerd's Containers, Images and Content services."""

    def __init__(self, address: str) -> None:
        self.address = address.removeprefix("unix://")
        self._channel: Any = None
        self._lock = threading.Lock()

    def _unary(self, path: str, request: Any, response_type: Any, namespace: str) -> Any:
        call = self._chan().unary_unary(
            path,
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=response_type.FromString,
        )
        return call(request, metadata=((NAMESPACE_HEADER, namespace),), timeout=10)

    def _chan(self) -> Any:
        with self._lock:
            if self._channel is None:
                import grpc  # only hosts that meet a wasm-layer image pay for grpc

                self._channel = grpc.insecure_channel(f"unix://{self.address}")
            return self._channel

    def image_of_container(self, namespace: str, container_id: str) -> str:
        response = self._unary(
            "/containerd.services.containers.v1.Containers/Get",
            containers_pb2.GetContainerRequest(id=container_id),
            containers_pb2.GetContainerResponse,
            namespace,
        )
        return response.container.image

    def read(self, namespace: str, digest: str, limit: int) -> bytes:
        """A whole blob, checked against its digest."""
        call = self._chan().unary_stream(
            "/containerd.services.content.v1.Content/Read",
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=content_pb2.ReadContentResponse.FromString,
        )
        data = bytearray()
        for chunk in call(
            content_pb2.ReadContentRequest(digest=digest),
            metadata=((NAMESPACE_HEADER, namespace),),
            timeout=60,
        ):
            data += chunk.data
            if len(data) > limit:
                raise ModuleError(f"blob {digest} is larger than {limit} bytes")
        algorithm, _, expected = digest.partition(":")
        if algorithm == "sha256" and hashlib.sha256(data).hexdigest() != expected:
            raise ModuleError(f"blob {digest} does not match its digest")
        return bytes(data)

    def wasm_layers(self, namespace: str, image: str) -> list[WasmLayer]:
        """The wasm layers of ``image`` (an empty list for an ordinary image)."""
        target = self._unary(
            "/containerd.services.images.v1.Images/Get",
            images_pb2.GetImageRequest(name=image),
            images_pb2.GetImageResponse,
            namespace,
        ).image.target
        media_type, digest = target.media_type, target.digest
        for _ in range(4):  # an index may point at a manifest (or, rarely, another index)
            document = json.loads(self.read(namespace, digest, MAX_MANIFEST_BYTES))
            media_type = document.get("mediaType") or media_type
            if media_type not in INDEX_TYPES and "manifests" not in document:
                break
            manifests = document.get("manifests") or []
            if not manifests:
                return []
            chosen = next((m for m in manifests if _is_wasm_platform(m.get("platform") or {})), manifests[0])
            media_type, digest = chosen.get("mediaType", ""), chosen["digest"]
        return [
            WasmLayer(image, layer["digest"], int(layer.get("size", 0)), layer["mediaType"])
            for layer in document.get("layers") or []
            if layer.get("mediaType") in WASM_LAYER_TYPES
        ]

    def close(self) -> None:
        with self._lock:
            if self._channel is not None:
                self._channel.close()
                self._channel = None


def _is_wasm_platform(platform: dict[str, str]) -> bool:
    return platform.get("architecture") == "wasm" or platform.get("os", "").startswith("wasi")
