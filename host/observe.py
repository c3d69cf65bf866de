"""Observability: the Prometheus metrics endpoint and the admin socket behind
``layotto ps`` and ``layotto logs``.

Counters live as plain integers on each function (no per-request cost beyond an add);
a prometheus_client collector turns them into metrics when scraped.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from layotto.host.function import LATENCY_BUCKETS
from layotto.host.function_registry import FunctionRegistry

log = logging.getLogger(__name__)

DEFAULT_METRICS_PORT = 34903  # Layotto's actuator/metrics port


class HostCollector:
    """Prometheus collector over the live functions and the module cache."""

    def __init__(self, functions: FunctionRegistry, engine_stats: Callable[[], dict[str, int]]) -> None:
        self.functions = functions
        self.engine_stats = engine_stats

    def collect(self) -> Iterator[Any]:
        invocations = CounterMetricFamily(
            "layotto_function_invocations", "Requests served by a function", labels=["function", "code"]
        )
        latency = HistogramMetricFamily(
            "layotto_function_latency_seconds", "Time from routing to response", labels=["function"]
        )
        instances = GaugeMetricFamily(
            "layotto_function_instances", "Live instances per function", labels=["function"]
        )
        replaced = CounterMetricFamily(
            "layotto_function_instances_replaced",
            "Instances thrown away after a trap or deadline",
            labels=["function"],
        )
        for fn in self.functions.all():
            for code, count in sorted(fn.stats.codes.items()):
                invocations.add_metric([fn.id, str(code)], count)
            cumulative, buckets = 0, []
            for bound, count in zip((*LATENCY_BUCKETS, float("inf")), fn.stats.buckets, strict=True):
                cumulative += count
                buckets.append(("+Inf" if bound == float("inf") else repr(bound), cumulative))
            latency.add_metric([fn.id], buckets, fn.stats.latency_sum)
            instances.add_metric([fn.id], fn.instances)
            replaced.add_metric([fn.id], fn.stats.replaced)
        yield from (invocations, latency, instances, replaced)
        stats = self.engine_stats()
        cache = CounterMetricFamily(
            "layotto_module_cache", "Module loads by where they came from", labels=["result"]
        )
        cache.add_metric(["hit_memory"], stats.get("memory_hits", 0))
        cache.add_metric(["hit_disk"], stats.get("disk_hits", 0))
        cache.add_metric(["miss"], stats.get("compiles", 0))
        yield cache
        yield GaugeMetricFamily(
            "layotto_functions", "Functions registered with the ingress", value=len(self.functions)
        )


def start_metrics(port: int, host: str, collector: HostCollector) -> int:
    """Serve /metrics on its own thread; returns the bound port."""
    registry = CollectorRegistry()
    registry.register(collector)
    server, _thread = start_http_server(port, addr=host, registry=registry)
    return server.server_port


class AdminServer:
    """JSON over HTTP/1.0 on a unix socket: ``GET /tasks``, ``GET /logs/<id>``."""

    def __init__(
        self, path: Path, tasks: Callable[[], list[dict[str, Any]]], logs: Callable[[str], list[str] | None]
    ):
        self.path = path
        self.tasks = tasks
        self.logs = logs
        self._server: asyncio.base_events.Server | None = None

    async def start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        self._server = await asyncio.start_unix_server(self._handle, path=str(self.path))
        os.chmod(self.path, 0o600)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), 5)
            while (await asyncio.wait_for(reader.readline(), 5)) not in (b"\r\n", b"\n", b""):
                pass
            parts = line.decode(errors="replace").split()
            path = parts[1] if len(parts) > 1 else "/"
            status, body = 200, None
            if path == "/tasks":
                body = self.tasks()
            elif path.startswith("/logs/"):
                body = self.logs(path[len("/logs/") :])
                if body is None:
                    status, body = 404, {"error": f"no task or function named {path[6:]!r}"}
            else:
                status, body = 404, {"error": f"unknown path {path}"}
            data = json.dumps(body).encode()
            writer.write(
                b"HTTP/1.0 %d OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n"
                % (status, len(data))
                + data
            )
            await writer.drain()
        except Exception as exc:  # never let a bad client hurt the host
            log.debug("admin: %s", exc)
        finally:
            writer.close()
