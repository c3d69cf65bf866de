"""The subscription and delivery loop every pub/sub backend shares.

A backend (``SqlitePubSub``, ``RedisPubSub``) says how to keep messages: how a group is
opened, how its next message is claimed, how an attempt, a retry and a finished message
are recorded, how a subscription's leftovers are released. :class:`DeliveryLoop` owns the
rest, the same for every backend: the subscription limit (``maxSubscriptions``), one
delivery thread per subscription, at most ``max_attempts`` deliveries of a message with
``retry_delay`` seconds between them (RETRY or an exception from the handler delivers it
again, DROP and SUCCESS finish it), and cancelling (also from inside a handler).
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from layotto.host.components import ComponentError, Delivery, Handler, Message
from layotto.host.components.base import call_handler, with_attempt

log = logging.getLogger("layotto.components")

# What a backend's claim returns: its reference to the message (a row, a stream entry),
# the attempts made so far, and the message.
Claim = tuple[Any, int, Message]


@dataclass(eq=False)
class Subscription:
    """One ``subscribe`` call: a handler reading ``topic`` as a member of ``group``."""

    topic: str
    group: str
    durable: bool
    handler: Handler
    max_attempts: int
    consumer: str = field(default_factory=lambda: uuid.uuid4().hex)
    stop: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None
    unfinished: Any = None  # the message a cancel interrupted between two attempts


class DeliveryLoop:
    """Subscriptions and their delivery threads; a backend subclasses it and fills in the
    hooks below (``_claim``, ``_finish`` and ``_release`` at least)."""

    name: str
    group_prefix = "~"  # the name of a subscription's own group: prefix + a random id
    error_pause = 1.0  # seconds a subscription waits after its backend failed

    def _init_loop(self, *, retry_delay: float, max_subscriptions: int) -> None:
        self._retry_delay = retry_delay
        self._max_subscriptions = max_subscriptions
        self._subs: set[Subscription] = set()
        self._subs_lock = threading.Lock()
        self._closed = False

    # --- what a backend provides ----------------------------------------------------------

    def _open_group(self, sub: Subscription) -> None:
        """Create ``sub``'s group if it does not exist (under the subscription lock)."""

    def _claim(self, sub: Subscription) -> Claim | None:
        """The group's next message for ``sub``, or None when there is none yet."""
        raise NotImplementedError

    def _idle(self, sub: Subscription, mark: object) -> None:
        """Wait for new messages after an empty claim (``mark`` is ``_mark()``'s value
        from before that claim)."""

    def _mark(self) -> object:
        """Taken before each claim; a backend that is woken by ``publish`` uses it to
        notice a publish that happened during the claim."""
        return None

    def _attempt(self, sub: Subscription, ref: Any, attempts: int) -> None:
        """Record that delivery number ``attempts`` starts (before the handler runs)."""

    def _retry(self, sub: Subscription, ref: Any) -> None:
        """The message goes back to the handler after a RETRY."""

    def _finish(self, sub: Subscription, ref: Any) -> None:
        """The message is done for the group (delivered, dropped or out of attempts)."""
        raise NotImplementedError

    def _release(self, sub: Subscription) -> None:
        """``sub`` ended: forget its own group, or hand its unfinished message back."""
        raise NotImplementedError

    def _wake(self) -> None:
        """Wake the subscriptions waiting in ``_idle``."""

    # --- the loop -------------------------------------------------------------------------

    def subscribe(
        self, topic: str, handler: Handler, *, max_attempts: int = 3, group: str = ""
    ) -> Callable[[], None]:
        if not topic:
            raise ValueError("topic must not be empty")
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1, not {max_attempts}")
        own_group = f"{self.group_prefix}{uuid.uuid4().hex}"
        sub = Subscription(topic, group or own_group, bool(group), handler, max_attempts)
        with self._subs_lock:
            if self._closed:
                raise ComponentError(f"pubsub {self.name!r} is closed")
            if len(self._subs) >= self._max_subscriptions:
                raise ComponentError(
                    f"pubsub {self.name!r} has {len(self._subs)} subscriptions, its limit "
                    "(metadata maxSubscriptions; each is a delivery thread)"
                )
            self._open_group(sub)
            sub.thread = threading.Thread(
                target=self._run, args=(sub,), name=f"pubsub-{self.name}-{topic}", daemon=True
            )
            self._subs.add(sub)
            sub.thread.start()
        return lambda: self._cancel(sub)

    def _has_subscription(self, topic: str, group: str) -> bool:
        return any(s.topic == topic and s.group == group for s in self._subs)

    def _cancel(self, sub: Subscription) -> None:
        sub.stop.set()
        self._wake()
        if sub.thread is not None and sub.thread is not threading.current_thread():
            sub.thread.join()

    def _run(self, sub: Subscription) -> None:
        try:
            while not sub.stop.is_set():
                mark = self._mark()
                try:
                    claimed = self._claim(sub)
                except ComponentError:
                    log.exception("pubsub %s: cannot read topic %s", self.name, sub.topic)
                    sub.stop.wait(self.error_pause)
                    continue
                if claimed is None:
                    self._idle(sub, mark)
                else:
                    self._deliver(sub, *claimed)
        finally:
            with self._subs_lock:
                self._subs.discard(sub)
            self._release(sub)

    def _deliver(self, sub: Subscription, ref: Any, attempts: int, message: Message) -> None:
        while True:
            attempts += 1
            self._attempt(sub, ref, attempts)
            result = call_handler(sub.handler, with_attempt(message, attempts), self.name)
            if result is Delivery.RETRY and attempts < sub.max_attempts:
                if sub.stop.wait(self._retry_delay):
                    sub.unfinished = ref  # cancelled: _release hands it back to the group
                    return
                self._retry(sub, ref)
                continue
            if result is Delivery.RETRY:
                log.warning(
                    "pubsub %s: dropping message %s on %s after %d attempts",
                    self.name,
                    message.id,
                    sub.topic,
                    attempts,
                )
            self._finish(sub, ref)
            return

    def _close_subscriptions(self) -> None:
        """Refuse new subscriptions and end every running one."""
        with self._subs_lock:
            self._closed = True
            subs = list(self._subs)
        for sub in subs:
            self._cancel(sub)
