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
import socket
import urllib.parse
from collections.abc import Awaitable, Callable, Iterator
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
        cpu = CounterMetricFamily(
            "layotto_function_cpu_seconds",
            "CPU time of a function's calls, inline and on workers",
            labels=["function"],
        )
        throttled = CounterMetricFamily(
            "layotto_function_cpu_throttled_periods",
            "CPU periods in which the function's CPU limit held it back",
            labels=["function"],
        )
        queued = GaugeMetricFamily(
            "layotto_function_queued",
            "Calls waiting in the function's queue for a worker",
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
            cpu.add_metric([fn.id], fn.cpu_seconds)
            throttled.add_metric([fn.id], fn.share.throttled)
            queued.add_metric([fn.id], len(fn.share.queue))
        yield from (invocations, latency, instances, replaced, cpu, throttled, queued)
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


class MetricsEndpoint:
    """/metrics on its own thread; stopped when a newer host takes the node over."""

    def __init__(self, port: int, host: str, collector: HostCollector) -> None:
        self.port = port
        self.host = host
        self.collector = collector
        self._server: Any = None

    def start(self) -> int:
        """Listen (again); returns the bound port."""
        if self._server is None:
            registry = CollectorRegistry()
            registry.register(self.collector)
            self._server, _thread = start_http_server(self.port, addr=self.host, registry=registry)
        return int(self._server.server_port)

    def stop(self) -> None:
        """Stop listening, so that a newer host can bind the port."""
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()


Action = Callable[[dict[str, str]], Awaitable[tuple[int, Any, socket.socket | None]]]
"""A POST of the admin socket: the query's parameters in; the status, the JSON body and a
socket to pass along with the answer (SCM_RIGHTS), or None, out."""


class AdminServer:
    """JSON over HTTP/1.0 on a unix socket: ``GET /tasks``, ``GET /logs/<id>``, ``GET
    /host``, and the ``POST`` actions it is given (``/retire``, ``/drain``)."""

    def __init__(
        self,
        path: Path,
        tasks: Callable[[], list[dict[str, Any]]],
        logs: Callable[[str], list[str] | None],
        *,
        host: Callable[[], dict[str, Any]] | None = None,
        actions: dict[str, Action] | None = None,
    ):
        self.path = path
        self.tasks = tasks
        self.logs = logs
        self.host = host
        self.actions = actions or {}
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
            method = parts[0] if parts else "GET"
            target = parts[1] if len(parts) > 1 else "/"
            path, _, query = target.partition("?")
            status, body, passed = 200, None, None
            if method == "POST":
                action = self.actions.get(path)
                if action is None:
                    status, body = 404, {"error": f"unknown action {path}"}
                else:
                    status, body, passed = await action(dict(urllib.parse.parse_qsl(query)))
            elif path == "/tasks":
                body = self.tasks()
            elif path == "/host" and self.host is not None:
                body = self.host()
            elif path.startswith("/logs/"):
                body = self.logs(path[len("/logs/") :])
                if body is None:
                    status, body = 404, {"error": f"no task or function named {path[6:]!r}"}
            else:
                status, body = 404, {"error": f"unknown path {path}"}
            data = json.dumps(body).encode()
            answer = (
                b"HTTP/1.0 %d OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n"
                % (status, len(data))
                + data
            )
            if passed is None:
                writer.write(answer)
                await writer.drain()
            else:
                _send_with_socket(writer, answer, passed)
        except Exception as exc:  # never let a bad client hurt the host
            log.debug("admin: %s", exc)
        finally:
            writer.close()


def _send_with_socket(writer: asyncio.StreamWriter, data: bytes, passed: socket.socket) -> None:
    """Write ``data`` with ``passed`` attached (SCM_RIGHTS), then close our copy of it.
    Nothing else was written on the connection, so the small answer goes out at once."""
    conn = socket.socket(fileno=os.dup(writer.get_extra_info("socket").fileno()))
    conn.settimeout(5)  # (polls: the descriptor stays non-blocking for the event loop)
    try:
        sent = socket.send_fds(conn, [data], [passed.fileno()])
        conn.sendall(data[sent:])
    finally:
        conn.close()
        passed.close()
