"""The ``layotto`` command line: ``host``, ``ps``, ``logs``, ``drain``, ``image``.

``ps``, ``logs`` and ``drain`` talk to the admin socket of every live node host of a
containerd: one per layotto version (``<run dir>/<version>/admin.sock``), several while
a node is being upgraded."""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

from layotto.host import daemon


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str) -> None:
        super().__init__("localhost", timeout=10)
        self.path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(10)
        sock.connect(self.path)
        self.sock = sock


def admin_get(run_dir: Path, path: str, method: str = "GET") -> tuple[int, Any]:
    """GET from (or POST to) the admin socket of the node host whose directory is ``run_dir``."""
    conn = _UnixConnection(str(run_dir / "admin.sock"))
    try:
        conn.request(method, path)
        response = conn.getresponse()
        return response.status, json.loads(response.read() or b"null")
    finally:
        conn.close()


def host_dirs(run_dir: Path) -> list[Path]:
    """The directories of the hosts under ``run_dir`` (``<run_dir>/<version>/`` with an
    admin socket); ``run_dir`` itself when it has none
    (it is one host's directory)."""
    try:
        found = [d for d in run_dir.iterdir() if not d.is_symlink() and (d / "admin.sock").exists()]
    except OSError:
        found = []
    return sorted(found) or [run_dir]


def _each_host(run_dir: Path, path: str) -> list[tuple[Path, int, Any]]:
    """``path`` from every live host: (its directory, status, body). A directory whose host
    is gone is skipped; when none answers, the last error is raised."""
    answers, error = [], None
    for where in host_dirs(run_dir):
        try:
            status, body = admin_get(where, path)
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            error = exc
            continue
        answers.append((where, status, body))
    if not answers and error is not None:
        raise error
    return answers


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    return str(n)


def _names(row: dict[str, Any]) -> tuple[str, str]:
    """A task's POD and CONTAINER columns: CRI's pod and container names (``-`` for a pod's
    sandbox, which has no container name); a container outside a pod by its id."""
    pod, container = row.get("pod") or "", row.get("container") or ""
    if not pod:
        return "-", container or row["id"]
    return pod, container or "-"


def ps(run_dir: Path, as_json: bool = False) -> int:
    """Print the tasks of every node host: by tenant namespace, pod and container name
    (CRI's names; a container outside a pod by its id) and the layotto version of the host
    that serves it, or every field as JSON."""
    rows = [row for _where, _status, body in _each_host(run_dir, "/tasks") for row in body or ()]
    if as_json:
        print(json.dumps(rows, indent=2))
        return 0
    header = (
        "NAMESPACE",
        "POD",
        "CONTAINER",
        "KIND",
        "STATE",
        "FUNCTION",
        "VERSION",
        "IMAGE/MODULE",
        "MEMORY",
        "CPU",
        "CALLS",
        "ERRORS",
    )
    table = [header]
    for r in sorted(rows, key=lambda r: (r["namespace"], *_names(r), r["id"])):
        table.append(
            (
                r["namespace"],
                *_names(r),
                r["kind"],
                r["state"] if r["exit_status"] is None else f"{r['state']} ({r['exit_status']})",
                r.get("function_id", "-"),
                r.get("version", "-"),
                r["image"] or r["module"] or "-",
                _size(int(r["memory"])),
                f"{r['cpu_seconds']:.2f}s",
                str(r.get("invocations", "-")),
                str(r.get("errors", "-")),
            )
        )
    widths = [max(len(str(row[i])) for row in table) for i in range(len(header))]
    for row in table:
        print("  ".join(str(cell).ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    return 0


def logs(run_dir: Path, name: str) -> int:
    answers = _each_host(run_dir, f"/logs/{name}")
    for _where, status, body in answers:
        if status == 200:
            for line in body:
                print(line)
            return 0
    _where, status, body = answers[-1]
    print(f"layotto logs: {body.get('error', status)}", file=sys.stderr)
    return 1


def drain(run_dir: Path, version: str | None, grace: float, wait: float) -> int:
    """Stop the tasks of a node host as Kubernetes would (SIGTERM, ``grace`` seconds, then
    SIGKILL), each exit reported to containerd, then the host: the host of ``version``, else
    every host that is not the current one. Waits up to ``wait`` seconds more for each to exit."""
    hosts = _each_host(run_dir, "/host")
    if version is not None:
        targets = [(w, b) for w, s, b in hosts if s == 200 and b.get("version") == version]
        if not targets:
            live = ", ".join(sorted(b.get("version", "?") for _w, s, b in hosts if s == 200)) or "none"
            print(f"layotto drain: no live host of version {version} (live: {live})", file=sys.stderr)
            return 1
    else:
        targets = [(w, b) for w, s, b in hosts if s == 200 and not b.get("current")]
        if not targets:
            print("layotto drain: nothing to drain: only the current host runs (--version drains it)")
            return 0
    failed = 0
    for where, host in targets:
        status, body = admin_get(where, f"/drain?grace={grace}", method="POST")
        if status != 202:
            print(f"layotto drain: {host['version']}: {body.get('error', status)}", file=sys.stderr)
            failed += 1
            continue
        pid = int(body["pid"])
        print(
            f"draining the layotto {body['version']} host (pid {pid}): {len(body['tasks'])} task(s), "
            f"SIGTERM then SIGKILL after {grace:g}s"
        )
        if _wait_gone(pid, grace + wait):
            print(f"the layotto {body['version']} host exited")
        else:
            print(f"layotto drain: the {body['version']} host (pid {pid}) is still running", file=sys.stderr)
            failed += 1
    return 1 if failed else 0


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rpartition(")")[2].split()[0] in ("Z", "X"):
                    return True
        except FileNotFoundError:
            return True
        time.sleep(0.1)
    return False


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"{text} seconds: must be 0 or more")
    return value


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "image":
        from layotto.images import builder

        return builder.main(argv[1:])
    parser = argparse.ArgumentParser(prog="layotto", description="Layotto WebAssembly node host.")
    sub = parser.add_subparsers(dest="command", required=True)
    host = sub.add_parser("host", help="run the node host in the foreground")
    daemon.add_arguments(host)
    default_run = Path(os.environ.get("LAYOTTO_RUN_DIR", daemon.DEFAULT_RUN_DIR))
    p_ps = sub.add_parser("ps", help="list the node host's tasks and functions")
    p_ps.add_argument("--run-dir", type=Path, default=default_run)
    p_ps.add_argument("--json", action="store_true")
    p_logs = sub.add_parser("logs", help="recent output of a task or function")
    p_logs.add_argument("name", help="task id, namespace/id, or function id")
    p_logs.add_argument("--run-dir", type=Path, default=default_run)
    p_drain = sub.add_parser(
        "drain", help="stop an old node host's tasks (SIGTERM, grace, SIGKILL), then the host"
    )
    p_drain.add_argument("--version", help="the host to drain (default: every host but the current one)")
    p_drain.add_argument("--grace", type=_seconds, default=30.0, help="seconds between SIGTERM and SIGKILL")
    p_drain.add_argument(
        "--wait", type=_seconds, default=30.0, help="seconds to wait for the host after that"
    )
    p_drain.add_argument("--run-dir", type=Path, default=default_run)
    sub.add_parser("image", help="build and push function images (layotto image build --help)")
    args = parser.parse_args(argv)
    try:
        if args.command == "host":
            daemon.run(args)
            return 0
        if args.command == "ps":
            return ps(args.run_dir, args.json)
        if args.command == "logs":
            return logs(args.run_dir, args.name)
        if args.command == "drain":
            return drain(args.run_dir, args.version, args.grace, args.wait)
    except (FileNotFoundError, ConnectionRefusedError) as exc:
        print(
            f"layotto: no node host at {args.run_dir} ({exc}); is containerd running a layotto task?",
            file=sys.stderr,
        )
        return 1
    return 0
