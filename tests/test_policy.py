"""The operator policy (host/policy.py), the admission of annotations (host/admission.py)
and the host log's rate limit and rotation (host/hostlog.py)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from layotto.host.abi_host import KNOWN_CAPABILITIES
from layotto.host.admission import admit
from layotto.host.components.registry import UnknownComponent, load_components
from layotto.host.hostlog import RateLimit
from layotto.host.policy import DEFAULT_POLICY, ComponentView, PolicyError, parse_bytes, parse_policy


def policy(text: str):
    return parse_policy(yaml.safe_load(textwrap.dedent(text)), "policy.yaml", KNOWN_CAPABILITIES)


def test_a_namespace_inherits_what_it_does_not_name():
    p = policy(
        """
        default:
          limits: {instances: 4, memory: 64Mi}
        namespaces:
          pay:
            capabilities: [state, secrets]
            limits: {instances: 2}
        """
    )
    pay = p.rules("pay")
    assert pay.capabilities == {"state", "secrets"}
    assert (pay.limits.instances, pay.limits.memory) == (2, 64 << 20)
    assert p.rules("other").limits.instances == 4
    assert p.rules("other").capabilities == DEFAULT_POLICY.default.capabilities


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("default: {capabilities: [state, root]}", "default.capabilities: unknown capabilities root"),
        ("default: {limits: {memory: lots}}", "default.limits.memory: 'lots' is not a byte count"),
        ("default: {limits: {instances: 0}}", "default.limits.instances must be positive"),
        ("default: {limit: {}}", "default: unknown keys limit"),
        ("namespaces: {a: {components: state}}", "namespaces.a.components must be a list of names"),
        ("admins: []", "unknown keys admins"),
    ],
)
def test_a_malformed_policy_is_refused_naming_the_entry(text: str, message: str):
    with pytest.raises(PolicyError) as err:
        policy(text)
    assert message in str(err.value)
    assert str(err.value).startswith("policy.yaml: ")


def test_quantities():
    assert parse_bytes("128Mi", "x") == 128 << 20
    assert parse_bytes("1G", "x") == 10**9
    assert parse_bytes(4096, "x") == 4096
    with pytest.raises(PolicyError):
        parse_bytes(True, "x")


def test_admission_defaults_and_caps():
    a = admit({}, None, "ns", DEFAULT_POLICY)
    assert a.memory_limit == 128 << 20
    assert a.capabilities == {"log", "time", "random"}
    assert 1 <= a.pool_size <= DEFAULT_POLICY.default.limits.instances
    with pytest.raises(PolicyError, match="may not request capability secrets"):
        admit({"layotto.io/capabilities": "secrets"}, None, "ns", DEFAULT_POLICY)
    with pytest.raises(PolicyError, match="'fast' is neither 'reuse' nor 'fresh'"):
        admit({"layotto.io/instance-mode": "fast"}, None, "ns", DEFAULT_POLICY)
    with pytest.raises(PolicyError, match=r"timeout: 'inf' must be a finite number"):
        admit({"layotto.io/timeout": "inf"}, None, "ns", DEFAULT_POLICY)


def test_a_component_view_hides_what_the_policy_does_not_grant(tmp_path: Path):
    p = policy("namespaces: {locked: {components: [state/state_demo]}}")
    with load_components(None, tmp_path) as components:
        view = ComponentView(components, p.rules("locked"), "locked")
        assert view.state("") is components.state("")
        with pytest.raises(
            UnknownComponent, match="namespace 'locked' may not use pubsub component 'pub_subs_demo'"
        ):
            view.pubsub("")
        assert view.names("pubsub") == []
        everything = ComponentView(components, p.rules("open"), "open")
        assert everything.pubsub("") is components.pubsub("")


def test_the_rate_limit_lets_a_burst_through_then_counts_what_it_drops(monkeypatch: pytest.MonkeyPatch):
    now = [100.0]
    monkeypatch.setattr("layotto.host.hostlog.time.monotonic", lambda: now[0])
    limit = RateLimit(burst=5, window=60)

    def record(fid: str) -> logging.LogRecord:
        return logging.LogRecord("layotto", logging.WARNING, __file__, 1, "function %s: trap", (fid,), None)

    passed = [limit.filter(record("noisy")) for _ in range(50)]
    assert passed.count(True) == 5
    assert limit.filter(record("quiet"))  # another function is not silenced by the noisy one
    now[0] += 61
    first = record("noisy")
    assert limit.filter(first)
    assert "(45 similar messages suppressed)" in first.getMessage()


def test_the_host_log_is_rotated_and_stderr_follows(tmp_path: Path):
    """In a child (the handler moves fds 1 and 2): past max_bytes the log rotates, and what
    is then written to fd 2 lands in the new host.log."""
    log_file = tmp_path / "host.log"
    script = f"""
import logging, os, sys
from pathlib import Path
from layotto.host.hostlog import configure
configure(logging.INFO, Path({str(log_file)!r}), max_bytes=4096)
for i in range(200):
    logging.getLogger("t").info("line %d %s", i, "x" * 40)
os.write(2, b"native stderr after rotation\\n")
"""
    with open(log_file, "ab") as out:
        subprocess.run([sys.executable, "-c", script], stderr=out, stdout=out, check=True, timeout=60)
    assert (tmp_path / "host.log.1").exists()
    assert log_file.stat().st_size < 8192
    assert "native stderr after rotation" in log_file.read_text()
    assert oct(os.stat(log_file).st_mode & 0o777) == oct(0o600)
