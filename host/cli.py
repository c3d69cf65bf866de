"""The ``layotto`` command line: ``host``, ``ps``, ``logs``, ``image``."""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import sys
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


def admin_get(run_dir: Path, path: str) -> tuple[int, Any]:
    """GET from the node host's admin socket."""
    conn = _UnixConnection(str(run_dir / "admin.sock"))
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, json.loads(response.read() or b"null")
    finally:
        conn.close()


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
    """Print the node host's tasks: by tenant namespace, pod and container name (CRI's
    names; a container outside a pod by its id), or every field as JSON."""
    _status, rows = admin_get(run_dir, "/tasks")
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
    status, body = admin_get(run_dir, f"/logs/{name}")
    if status != 200:
        print(f"layotto logs: {body.get('error', status)}", file=sys.stderr)
        return 1
    for line in body:
        print(line)
    return 0


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
    except (FileNotFoundError, ConnectionRefusedError) as exc:
        print(
            f"layotto: no node host at {args.run_dir} ({exc}); is containerd running a layotto task?",
            file=sys.stderr,
        )
        return 1
    return 0
