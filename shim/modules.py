"""Where a container's module is: the file its args name in the rootfs (read from the
snapshot's layers without mounting, for a function module), else the wasm layer of its image
in containerd's content store. The module is compiled by the node host, through the seam."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from layotto.host.errors import ModuleError
from layotto.host.workload import (
    CRI_IMAGE_NAME,
    ContainerSpec,
    Module,
    ModuleSource,
    WorkloadError,
    WorkloadHost,
)
from layotto.shim import bundle as oci
from layotto.shim.content import ContainerdContent
from layotto.shim.ttrpc import Code, TtrpcError

log = logging.getLogger(__name__)

WASM_IMAGE_ANNOTATION = "layotto.io/wasm-image"  # for `ctr run --rootfs`, which records no image


class ModuleFinder:
    """Finds a container's module and has the host compile it."""

    def __init__(self, host: WorkloadHost, content: ContainerdContent | None = None) -> None:
        self.host = host
        self.content = content

    async def function_in_layers(
        self, spec: ContainerSpec, bundle_spec: oci.BundleSpec, mounts: list[oci.Mount]
    ) -> Module | None:
        """A function module read from the rootfs's layers, or None: not found plainly there,
        a command module (it gets its filesystem), a pod sandbox, a host without an ingress,
        or any error (the mounted path then reports it)."""
        if spec.sandbox:
            return None
        try:
            ref = await asyncio.to_thread(oci.locate_module_in_layers, bundle_spec, mounts)
            if ref is None or ref.entry != "_start":
                return None
            source = ModuleSource(ref.image_path, ref.image_path, ref.entry, path=ref.host_path)
            module = await asyncio.to_thread(self.host.load_module, source)
        except (WorkloadError, ModuleError, OSError):
            return None
        return module if module.function else None

    async def locate(self, bundle_spec: oci.BundleSpec, rootfs: Path, namespace: str, task_id: str) -> Module:
        """The container's module: the file its args name in the rootfs, else the wasm layer
        of its image. Raises TtrpcError or InvalidSpec."""
        try:
            try:
                ref = await asyncio.to_thread(oci.locate_module, bundle_spec, rootfs)
            except ModuleError as missing:
                # No module file in the rootfs: the image may carry it as an OCI wasm layer.
                found = await self._from_content(bundle_spec, namespace, task_id)
                if found is None:
                    raise missing from None
                return found
        except ModuleError as exc:
            raise TtrpcError(Code.INVALID_ARGUMENT, str(exc)) from exc
        except OSError as exc:
            raise TtrpcError(Code.INVALID_ARGUMENT, f"reading the module: {exc}") from exc
        source = ModuleSource(ref.image_path, ref.image_path, ref.entry, path=ref.host_path)
        return await asyncio.to_thread(self.host.load_module, source)

    async def _from_content(self, bundle_spec: oci.BundleSpec, namespace: str, task_id: str) -> Module | None:
        """The module from the image's wasm layer, or None for an image without one."""
        if self.content is None:
            return None
        # The container's own image; layotto.io/wasm-image only for a container that has
        # none (`ctr run --rootfs`): never another image's module for an image's container.
        annotations = bundle_spec.annotations
        image = annotations.get(CRI_IMAGE_NAME)
        try:
            if not image:
                image = await asyncio.to_thread(self.content.image_of_container, namespace, task_id)
            if not image:
                image = annotations.get(WASM_IMAGE_ANNOTATION)
            if not image:
                return None
            layers = await asyncio.to_thread(self.content.wasm_layers, namespace, image)
            if not layers:
                return None
            if len(layers) > 1:
                raise ModuleError(
                    f"image {image} has {len(layers)} wasm layers; the layotto runtime runs one module"
                )
            layer = layers[0]
            limit = self.host.max_module_bytes
            wasm = await asyncio.to_thread(self.content.read, namespace, layer.digest, limit)
        except ModuleError:
            raise
        except Exception as exc:  # grpc errors: containerd unreachable, image unknown, ...
            log.info("no wasm layers for %s/%s: %s", namespace, task_id, exc)
            return None
        args = bundle_spec.process.args
        entry = "_start"
        if args and args[0].startswith("#"):
            entry = args[0][1:] or "_start"
        source = ModuleSource(f"{image} (layer {layer.digest[:19]})", image, entry, data=wasm)
        return await asyncio.to_thread(self.host.load_module, source)
