"""The node operator's policy: what the pods of each namespace may ask of the node host.

Pod authors are not trusted, so every ``layotto.io/*`` request a pod makes (capabilities,
instances, timeout, memory, subscriptions, ...) is checked against this policy before its
container is created (``host/admission.py`` applies it); without a policy file
:data:`DEFAULT_POLICY` applies. A request beyond the policy is a :class:`PolicyError` that
names the rule, for example ``policy: namespace 'shop' may not request capability secrets
(rule default.capabilities of /etc/layotto/policy.yaml allows ...)``.

The file's format, its defaults and how a namespace's entry overrides ``default``: see
docs/security.md ("The operator policy").
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from layotto.host.errors import ComponentDenied, PolicyError

DEFAULT_POLICY_PATH = Path("/etc/layotto/policy.yaml")
BUILT_IN = "the built-in default policy"

# The capabilities a pod may request unless the operator says otherwise: everything but
# secrets, which a namespace gets only when the operator grants it.
DEFAULT_CAPABILITIES = frozenset(
    {"log", "time", "random", "state", "invoke", "pubsub", "configuration", "lock", "sequencer"}
)

_QUANTITY = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(Ki|Mi|Gi|Ti|K|M|G|T|k)?\s*$")
_UNITS = {
    None: 1,
    "k": 10**3,
    "K": 10**3,
    "M": 10**6,
    "G": 10**9,
    "T": 10**12,
    "Ki": 1 << 10,
    "Mi": 1 << 20,
    "Gi": 1 << 30,
    "Ti": 1 << 40,
}


def parse_bytes(value: object, where: str) -> int:
    """A byte count: an integer, or a Kubernetes quantity such as ``128Mi`` or ``1G``."""
    if isinstance(value, bool):
        raise PolicyError(f"{where}: {value!r} is not a byte count")
    if isinstance(value, int):
        return value
    match = _QUANTITY.match(str(value))
    if not match:
        raise PolicyError(f"{where}: {value!r} is not a byte count (for example 134217728 or 128Mi)")
    return int(float(match.group(1)) * _UNITS[match.group(2)])


@dataclass(frozen=True)
class Limits:
    """Caps on what one container may ask for."""

    instances: int = 64
    timeout: float = 300.0
    queue_limit: int = 4096
    subscriptions: int = 32
    memory: int = 1 << 30
    default_memory: int = 128 << 20


@dataclass(frozen=True)
class NamespaceRules:
    """What the pods of one namespace may request."""

    capabilities: frozenset[str] = DEFAULT_CAPABILITIES
    components: frozenset[str] = frozenset({"*"})
    invoke_namespaces: frozenset[str] = frozenset()
    limits: Limits = field(default_factory=Limits)
    rule: str = "default"  # where these rules come from, for error messages

    def allows_component(self, kind: str, name: str) -> bool:
        allowed = self.components
        return "*" in allowed or name in allowed or f"{kind}/{name}" in allowed or f"{kind}/*" in allowed


@dataclass(frozen=True)
class Policy:
    """The operator's policy for every namespace on the node."""

    default: NamespaceRules = field(default_factory=NamespaceRules)
    namespaces: Mapping[str, NamespaceRules] = field(default_factory=dict)
    runtime_api: Mapping[str, Any] = field(default_factory=dict)
    source: str = BUILT_IN

    def rules(self, namespace: str) -> NamespaceRules:
        return self.namespaces.get(namespace, self.default)

    def where(self, rules: NamespaceRules, key: str) -> str:
        """``rule <path> of <file>``: the policy entry an error message names."""
        return f"rule {rules.rule}.{key} of {self.source}"

    def may_invoke(self, caller_namespace: str, target_namespace: str) -> bool:
        if caller_namespace == target_namespace:
            return True
        allowed = self.rules(caller_namespace).invoke_namespaces
        return "*" in allowed or target_namespace in allowed


DEFAULT_POLICY = Policy()

_RULE_KEYS = {"capabilities", "components", "invokeNamespaces", "limits"}
_LIMIT_KEYS = {
    "instances": ("instances", int),
    "timeoutSeconds": ("timeout", float),
    "queueLimit": ("queue_limit", int),
    "subscriptions": ("subscriptions", int),
    "memory": ("memory", None),
    "defaultMemory": ("default_memory", None),
}


def _names(value: object, where: str) -> frozenset[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise PolicyError(f"{where} must be a list of names")
    return frozenset(v.strip() for v in value if v.strip())


def _rules(doc: object, base: NamespaceRules, rule: str, known: frozenset[str]) -> NamespaceRules:
    if doc is None:
        return replace(base, rule=rule)
    if not isinstance(doc, dict):
        raise PolicyError(f"{rule} must be a mapping")
    unknown = set(doc) - _RULE_KEYS
    if unknown:
        raise PolicyError(
            f"{rule}: unknown keys {', '.join(sorted(unknown))} (known: {', '.join(sorted(_RULE_KEYS))})"
        )
    rules = replace(base, rule=rule)
    if "capabilities" in doc:
        capabilities = _names(doc["capabilities"], f"{rule}.capabilities")
        if "all" in capabilities:
            capabilities = known
        bad = capabilities - known
        if bad:
            raise PolicyError(f"{rule}.capabilities: unknown capabilities {', '.join(sorted(bad))}")
        rules = replace(rules, capabilities=capabilities)
    if "components" in doc:
        rules = replace(rules, components=_names(doc["components"], f"{rule}.components"))
    if "invokeNamespaces" in doc:
        rules = replace(rules, invoke_namespaces=_names(doc["invokeNamespaces"], f"{rule}.invokeNamespaces"))
    if "limits" in doc:
        limits_doc = doc["limits"] or {}
        if not isinstance(limits_doc, dict):
            raise PolicyError(f"{rule}.limits must be a mapping")
        unknown = set(limits_doc) - set(_LIMIT_KEYS)
        if unknown:
            raise PolicyError(f"{rule}.limits: unknown keys {', '.join(sorted(unknown))}")
        values: dict[str, Any] = {}
        for key, raw in limits_doc.items():
            attr, kind = _LIMIT_KEYS[key]
            where = f"{rule}.limits.{key}"
            try:
                value = parse_bytes(raw, where) if kind is None else kind(raw)
            except (TypeError, ValueError) as exc:
                raise PolicyError(f"{where}: {raw!r} is not a number") from exc
            if value <= 0:
                raise PolicyError(f"{where} must be positive")
            values[attr] = value
        rules = replace(rules, limits=replace(rules.limits, **values))
    return rules


def parse_policy(doc: object, source: str, known_capabilities: frozenset[str]) -> Policy:
    """A policy from its parsed YAML document."""
    if doc is None:
        doc = {}
    if not isinstance(doc, dict):
        raise PolicyError(f"{source}: the policy must be a mapping")
    unknown = set(doc) - {"default", "namespaces", "runtimeApi"}
    if unknown:
        raise PolicyError(f"{source}: unknown keys {', '.join(sorted(unknown))}")
    try:
        default = _rules(doc.get("default"), NamespaceRules(), "default", known_capabilities)
        namespaces_doc = doc.get("namespaces") or {}
        if not isinstance(namespaces_doc, dict):
            raise PolicyError("namespaces must be a mapping of namespace names")
        namespaces = {
            str(name): _rules(rules, default, f"namespaces.{name}", known_capabilities)
            for name, rules in namespaces_doc.items()
        }
    except PolicyError as exc:
        raise PolicyError(f"{source}: {exc}") from None
    runtime_api = doc.get("runtimeApi") or {}
    if not isinstance(runtime_api, dict):
        raise PolicyError(f"{source}: runtimeApi must be a mapping")
    return Policy(default, namespaces, runtime_api, source)


def load_policy(path: Path | None, known_capabilities: frozenset[str]) -> Policy:
    """The policy in ``path``; None: :data:`DEFAULT_POLICY_PATH` if it exists, else the
    built-in default."""
    if path is None:
        if not DEFAULT_POLICY_PATH.exists():
            return DEFAULT_POLICY
        path = DEFAULT_POLICY_PATH
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise PolicyError(f"cannot read the policy file {path}: {exc}") from exc
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise PolicyError(f"{path} is not valid YAML: {exc}") from exc
    return parse_policy(doc, str(path), known_capabilities)


class ComponentView:
    """The node's components as one namespace's pods may see them: a component the policy
    does not grant is as unknown as one that is not configured."""

    def __init__(self, components: Any, rules: NamespaceRules, namespace: str) -> None:
        self._components = components
        self._rules = rules
        self._namespace = namespace

    def _get(self, kind: str, name: str) -> Any:
        resolved = self._components.resolve(kind, name)
        if not self._rules.allows_component(kind, resolved):
            raise ComponentDenied(
                f"policy: namespace {self._namespace!r} may not use {kind} component {resolved!r}"
            )
        return getattr(self._components, kind)(name)

    def names(self, kind: str) -> list[str]:
        return [n for n in self._components.names(kind) if self._rules.allows_component(kind, n)]

    def metadata(self, kind: str, name: str = "") -> dict[str, object]:
        return self._components.metadata(kind, name)

    def state(self, name: str = "") -> Any:
        return self._get("state", name)

    def pubsub(self, name: str = "") -> Any:
        return self._get("pubsub", name)

    def configuration(self, name: str = "") -> Any:
        return self._get("configuration", name)

    def lock(self, name: str = "") -> Any:
        return self._get("lock", name)

    def sequencer(self, name: str = "") -> Any:
        return self._get("sequencer", name)

    def secrets(self, name: str = "") -> Any:
        return self._get("secrets", name)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._components, name)
