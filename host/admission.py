"""A container's ``layotto.io/*`` annotations, parsed once and checked against the policy.

Annotations come from the pod author, who is not trusted: every value is parsed strictly
(a bad number is an error naming the annotation, never a silent default) and capped by the
operator's policy (:mod:`layotto.host.policy`). The node runtime calls :func:`admit` when
containerd creates the container (:mod:`layotto.host.workloads`); a refusal fails the
container's creation with the message, so ``kubectl describe pod`` / ``ctr run`` show
which rule was hit.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass

from layotto.host.abi_host import KNOWN_CAPABILITIES, SPEC, parse_capabilities
from layotto.host.policy import NamespaceRules, Policy, PolicyError

FUNCTION_ID = "layotto.io/function-id"
INSTANCES = "layotto.io/instances"
INSTANCE_MODE = "layotto.io/instance-mode"  # "reuse" (default) or "fresh"
TIMEOUT = "layotto.io/timeout"  # seconds per request
QUEUE_LIMIT = "layotto.io/queue-limit"  # requests waiting for a busy function before 503
CAPABILITIES = "layotto.io/capabilities"  # e.g. "state,invoke"; default log,time,random
APP_ID = "layotto.io/app-id"  # the application that owns the function's state keys
SUBSCRIPTIONS = "layotto.io/subscriptions"  # "<pubsub>/<topic>,..."
CONFIG_SUBSCRIPTIONS = "layotto.io/config-subscriptions"  # "<store>/<key>+<key>,..."

DEFAULT_TIMEOUT = 10.0
DEFAULT_QUEUE_LIMIT = 1024


@dataclass(frozen=True)
class Admission:
    """What a container may have, decided once at Create."""

    namespace: str
    rules: NamespaceRules
    capabilities: frozenset[str]
    memory_limit: int
    pool_size: int
    fresh: bool
    timeout: float
    queue_limit: int
    subscriptions: tuple[tuple[str, str], ...]  # (pubsub, topic)
    config_subscriptions: tuple[tuple[str, tuple[str, ...]], ...]  # (store, keys)


def _number(annotations: Mapping[str, str], key: str, kind: type, default: float) -> float:
    raw = annotations.get(key)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = kind(raw.strip())
    except ValueError:
        raise PolicyError(f"annotation {key}: {raw[:64]!r} is not a valid {kind.__name__}") from None
    if not math.isfinite(value) or value < 0:
        raise PolicyError(f"annotation {key}: {raw[:64]!r} must be a finite number ≥ 0")
    return value


@dataclass(frozen=True)
class _Caps:
    policy: Policy
    rules: NamespaceRules
    namespace: str

    def check(self, what: str, value: float, cap: float, key: str, unit: str = "") -> None:
        if value > cap:
            where = self.policy.where(self.rules, key)
            raise PolicyError(
                f"policy: namespace {self.namespace!r} may not ask for {what} {_show(value)}{unit} "
                f"(at most {_show(cap)}{unit}; {where})"
            )


def _show(value: float) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _subscriptions(annotations: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    found = []
    for item in filter(None, (x.strip() for x in annotations.get(SUBSCRIPTIONS, "").split(","))):
        pubsub, _, topic = item.partition("/")
        if not topic:
            raise PolicyError(f"annotation {SUBSCRIPTIONS}: bad entry {item[:64]!r} (want <pubsub>/<topic>)")
        found.append((pubsub, topic))
    return tuple(found)


def _config_subscriptions(annotations: Mapping[str, str]) -> tuple[tuple[str, tuple[str, ...]], ...]:
    found = []
    for item in filter(None, (x.strip() for x in annotations.get(CONFIG_SUBSCRIPTIONS, "").split(","))):
        store, _, keys = item.partition("/")
        found.append((store, tuple(k for k in keys.split("+") if k)))
    return tuple(found)


def admit(
    annotations: Mapping[str, str], memory_limit: int | None, namespace: str, policy: Policy
) -> Admission:
    """The container's settings, or :class:`PolicyError` naming the annotation or rule."""
    rules = policy.rules(namespace)
    limits = rules.limits
    try:
        capabilities = parse_capabilities(annotations.get(CAPABILITIES))
    except ValueError as exc:
        raise PolicyError(f"annotation {CAPABILITIES}: {exc}") from None
    # The always-granted ones (log, time, random) need no rule.
    beyond = capabilities - rules.capabilities - frozenset(SPEC.default_capabilities)
    if beyond:
        allowed = ", ".join(sorted(rules.capabilities | frozenset(SPEC.default_capabilities)))
        raise PolicyError(
            f"policy: namespace {namespace!r} may not request capabilit{'y' if len(beyond) == 1 else 'ies'} "
            f"{', '.join(sorted(beyond))} ({policy.where(rules, 'capabilities')} allows {allowed})"
        )
    assert capabilities <= KNOWN_CAPABILITIES
    caps = _Caps(policy, rules, namespace)
    memory = memory_limit or limits.default_memory
    caps.check("a memory limit of", memory, limits.memory, "limits.memory", " bytes")
    pool = int(_number(annotations, INSTANCES, int, 0))
    caps.check(INSTANCES, pool, limits.instances, "limits.instances")
    if pool == 0:
        pool = min(os.cpu_count() or 1, limits.instances)
    timeout = _number(annotations, TIMEOUT, float, DEFAULT_TIMEOUT)
    if timeout == 0:
        raise PolicyError(f"annotation {TIMEOUT}: must be more than 0 seconds")
    caps.check(TIMEOUT, timeout, limits.timeout, "limits.timeoutSeconds", "s")
    queue_limit = int(_number(annotations, QUEUE_LIMIT, int, min(DEFAULT_QUEUE_LIMIT, limits.queue_limit)))
    caps.check(QUEUE_LIMIT, queue_limit, limits.queue_limit, "limits.queueLimit")
    mode = annotations.get(INSTANCE_MODE, "reuse").strip() or "reuse"
    if mode not in ("reuse", "fresh"):
        raise PolicyError(f"annotation {INSTANCE_MODE}: {mode[:32]!r} is neither 'reuse' nor 'fresh'")
    subscriptions = _subscriptions(annotations)
    config_subscriptions = _config_subscriptions(annotations)
    count = len(subscriptions) + len(config_subscriptions)
    caps.check("subscriptions:", count, limits.subscriptions, "limits.subscriptions")
    for pubsub, _topic in subscriptions:
        if pubsub and not rules.allows_component("pubsub", pubsub):
            raise PolicyError(
                f"policy: namespace {namespace!r} may not use pubsub component {pubsub!r} "
                f"({policy.where(rules, 'components')})"
            )
    for store, _keys in config_subscriptions:
        if store and not rules.allows_component("configuration", store):
            raise PolicyError(
                f"policy: namespace {namespace!r} may not use configuration component {store!r} "
                f"({policy.where(rules, 'components')})"
            )
    return Admission(
        namespace=namespace,
        rules=rules,
        capabilities=capabilities,
        memory_limit=memory,
        pool_size=pool,
        fresh=mode == "fresh",
        timeout=timeout,
        queue_limit=queue_limit,
        subscriptions=subscriptions,
        config_subscriptions=config_subscriptions,
    )
