"""Publishing task events to containerd, in order, over its ttrpc Events service."""

from __future__ import annotations

import asyncio
import logging
import time

from google.protobuf import any_pb2, timestamp_pb2
from google.protobuf.message import Message

from layotto.shim.protocol import forward_pb2
from layotto.shim.ttrpc import Client, TtrpcError

log = logging.getLogger(__name__)

EVENTS_SERVICE = "containerd.services.events.ttrpc.v1.Events"
FORWARD_TIMEOUT = 5.0
ATTEMPTS = 5


def timestamp(seconds: float | None = None) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    now = time.time() if seconds is None else seconds
    ts.seconds = int(now)
    ts.nanos = int((now - int(now)) * 1e9)
    return ts


def bare_any(message: Message) -> any_pb2.Any:
    """An Any with containerd's bare type URL (no ``type.googleapis.com/`` prefix)."""
    return any_pb2.Any(type_url=message.DESCRIPTOR.full_name, value=message.SerializeToString())


class Publisher:
    """A single ordered queue of events, forwarded to containerd's ttrpc socket."""

    def __init__(self, address: str | None) -> None:
        self.address = address.removeprefix("unix://") if address else None
        self._queue: asyncio.Queue[forward_pb2.Envelope] = asyncio.Queue()
        self._client: Client | None = None
        self._worker: asyncio.Task[None] | None = None
        self.sent = 0

    def start(self) -> None:
        if self.address and self._worker is None:
            self._worker = asyncio.create_task(self._run())

    def publish(self, namespace: str, topic: str, event: Message) -> None:
        if not self.address:
            return
        envelope = forward_pb2.Envelope(
            timestamp=timestamp(), namespace=namespace, topic=topic, event=bare_any(event)
        )
        self._queue.put_nowait(envelope)

    async def drain(self, timeout: float = 5.0) -> None:
        """Wait until every queued event has been handed to containerd (or given up on)."""
        if self._worker is None:
            return
        try:
            await asyncio.wait_for(self._queue.join(), timeout)
        except TimeoutError:
            log.warning("%d events still queued", self._queue.qsize())

    async def close(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
        if self._client is not None:
            await self._client.close()

    async def _run(self) -> None:
        while True:
            envelope = await self._queue.get()
            try:
                await self._forward(envelope)
            finally:
                self._queue.task_done()

    async def _forward(self, envelope: forward_pb2.Envelope) -> None:
        request = forward_pb2.ForwardRequest(envelope=envelope)
        for attempt in range(1, ATTEMPTS + 1):
            try:
                if self._client is None or self._client.closed:
                    assert self.address is not None
                    self._client = await Client.connect(self.address)
                await self._client.call(EVENTS_SERVICE, "Forward", request, timeout=FORWARD_TIMEOUT)
                self.sent += 1
                return
            except (OSError, ConnectionError, TtrpcError) as exc:
                log.warning("forwarding %s (attempt %d): %s", envelope.topic, attempt, exc)
                if self._client is not None:
                    await self._client.close()
                    self._client = None
                await asyncio.sleep(0.05 * attempt)
        log.error("dropped event %s for %s after %d attempts", envelope.topic, envelope.namespace, ATTEMPTS)
