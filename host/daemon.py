"""The node host process: one per containerd, serving the Task API for every container."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import logging
import os
import signal
import socket
from pathlib import Path

from layotto.host.abi_host import KNOWN_CAPABILITIES, HostInvoker
from layotto.host.components.registry import Components, load_components
from layotto.host.engine import DEFAULT_CACHE_LIMIT
from layotto.host.function_registry import FunctionRegistry
from layotto.host.grpc_api import DEFAULT_ADDRESS, RuntimeApiServer, load_identities
from layotto.host.hostlog import DEFAULT_MAX_BYTES
from layotto.host.hostlog import configure as configure_logging
from layotto.host.ingress import DEFAULT_BODY_LIMIT, DEFAULT_PORT, Ingress, IngressLimits
from layotto.host.observe import DEFAULT_METRICS_PORT, AdminServer, HostCollector, MetricsEndpoint
from layotto.host.podnet import PodNetworks
from layotto.host.policy import DEFAULT_POLICY_PATH, load_policy
from layotto.host.remote_invoke import DEFAULT_CLUSTER_DOMAIN, build_remote
from layotto.host.runtime import HostContext, NodeRuntime
from layotto.host.upgrade import INGRESS_SOCKET, HostHooks, HostRole, retire_hosts
from layotto.shim.bootstrap import VERSION
from layotto.shim.content import ContainerdContent
from layotto.shim.events import Publisher
from layotto.shim.paths import HostPaths, check_version, host_dirs, make_current
from layotto.shim.protocol import task_pb2
from layotto.shim.task_service import NAMESPACE_KEY, SERVICE_NAMES, TaskService
from layotto.shim.ttrpc import Code, Context, Method, Server, TtrpcError

log = logging.getLogger("layotto.host")

DEFAULT_RUN_DIR = Path("/run/containerd/layotto")
DEFAULT_STATE_DIR = Path("/var/lib/containerd/layotto")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--run-dir",
        type=Path,
        default=DEFAULT_RUN_DIR,
        help="the hosts' run directory (<run-dir>/<version>/)",
    )
    parser.add_argument(
        "--host-version",
        type=check_version,
        default=VERSION,
        help="the layotto version this host serves: the shim that starts it passes its own",
    )
    parser.add_argument("--state-dir", type=Path, default=DEFAULT_STATE_DIR, help="compiled-module cache")
    parser.add_argument(
        "--containerd-ttrpc",
        default=os.environ.get("TTRPC_ADDRESS", "/run/containerd/containerd.sock.ttrpc"),
        help="containerd's ttrpc socket, where task events are published",
    )
    parser.add_argument(
        "--containerd-address",
        default=os.environ.get("GRPC_ADDRESS", "/run/containerd/containerd.sock"),
        help="containerd's gRPC socket, to read modules shipped as OCI wasm layers",
    )
    ingress = IngressLimits()
    # (flag, environment variable, type, default, help): each flag's default is its variable.
    settings: list[tuple[str, str, type, object, str]] = [
        ("--http-host", "LAYOTTO_HTTP_HOST", str, "0.0.0.0", "address of the functions' HTTP ingress"),
        ("--http-port", "LAYOTTO_HTTP_PORT", int, DEFAULT_PORT, "port of the HTTP ingress (0: any, -1: off)"),
        ("--metrics-port", "LAYOTTO_METRICS_PORT", int, DEFAULT_METRICS_PORT, "port of /metrics (-1: off)"),
        (
            "--metrics-host",
            "LAYOTTO_METRICS_HOST",
            str,
            "127.0.0.1",
            "address of /metrics (it names every tenant's functions)",
        ),
        (
            "--log-max-bytes",
            "LAYOTTO_LOG_MAX_BYTES",
            int,
            DEFAULT_MAX_BYTES,
            "host.log is rotated past this size (0: never)",
        ),
        (
            "--cache-limit",
            "LAYOTTO_CACHE_LIMIT",
            int,
            DEFAULT_CACHE_LIMIT,
            "bytes of compiled modules kept on disk",
        ),
        ("--body-limit", "LAYOTTO_BODY_LIMIT", int, DEFAULT_BODY_LIMIT, "largest request body (bytes)"),
        (
            "--header-timeout",
            "LAYOTTO_HEADER_TIMEOUT",
            float,
            ingress.header_timeout,
            "seconds a request's head may take (408 after)",
        ),
        (
            "--idle-timeout",
            "LAYOTTO_IDLE_TIMEOUT",
            float,
            ingress.idle_timeout,
            "seconds an idle keep-alive connection stays open",
        ),
        (
            "--max-connections",
            "LAYOTTO_MAX_CONNECTIONS",
            int,
            ingress.max_connections,
            "open ingress connections (0: RLIMIT_NOFILE less a reserve)",
        ),
        (
            "--max-connections-per-ip",
            "LAYOTTO_MAX_CONNECTIONS_PER_IP",
            int,
            ingress.max_connections_per_ip,
            "open ingress connections from one address (0: no cap)",
        ),
        (
            "--invoke-dns-server",
            "LAYOTTO_INVOKE_DNS_SERVER",
            str,
            "",
            "DNS server (ip[:port] or 'system') for calls to functions on other nodes",
        ),
        (
            "--cluster-domain",
            "LAYOTTO_CLUSTER_DOMAIN",
            str,
            DEFAULT_CLUSTER_DOMAIN,
            "cluster domain of <id>.<namespace>.svc names",
        ),
        (
            "--invoke-resolver-file",
            "LAYOTTO_INVOKE_RESOLVER_FILE",
            str,
            "",
            "YAML map namespace -> id -> host:port of functions on other nodes",
        ),
        (
            "--invoke-port",
            "LAYOTTO_INVOKE_PORT",
            int,
            DEFAULT_PORT,
            "port of a function's Service for calls across nodes",
        ),
        (
            "--body-budget",
            "LAYOTTO_BODY_BUDGET",
            int,
            ingress.body_budget,
            "request-body bytes buffered across all connections (503 past it)",
        ),
    ]
    for flag, variable, kind, default, text in settings:
        value = os.environ.get(variable)
        parser.add_argument(
            flag, type=kind, default=kind(value) if value else default, help=f"{text} [{variable}]"
        )
    parser.add_argument(
        "--policy",
        type=Path,
        default=os.environ.get("LAYOTTO_POLICY") or None,
        help=f"the operator's policy file (default: {DEFAULT_POLICY_PATH} if it exists, else built in)",
    )
    parser.add_argument(
        "--components",
        type=Path,
        default=os.environ.get("LAYOTTO_COMPONENTS") or None,
        help="YAML file naming the node's components (default: embedded SQLite ones)",
    )
    parser.add_argument(
        "--app",
        action="append",
        default=[a for a in os.environ.get("LAYOTTO_APPS", "").split(",") if a],
        metavar="ID=URL",
        help="a non-wasm application functions may invoke by id (repeatable)",
    )
    parser.add_argument(
        "--grpc-address",
        default=os.environ.get("LAYOTTO_GRPC_ADDRESS", ""),
        help=(
            "host:port where the gRPC Runtime API also listens, besides its unix socket (default: "
            f"the policy's runtimeApi.tcp, else none; Layotto's is {DEFAULT_ADDRESS}; '-': API off)"
        ),
    )
    parser.add_argument("--listen-fd", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--debug", action="store_true")


def _listener(args: argparse.Namespace, paths: HostPaths) -> socket.socket:
    if args.listen_fd is not None:
        return socket.socket(fileno=args.listen_fd)
    paths.run_dir.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        paths.socket.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(paths.socket))
    os.chmod(paths.socket, 0o600)
    sock.listen(512)
    paths.pid_file.write_text(f"{os.getpid()}\n")
    return sock


def _unix_listener(path: Path) -> socket.socket:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    os.chmod(path, 0o600)
    sock.listen(512)
    return sock


def _others(paths: HostPaths) -> list[Path]:
    return [d for d in host_dirs(paths.root) if d.name != paths.version]


def _hooks(
    paths: HostPaths, service: TaskService, metrics: MetricsEndpoint | None, components: Components
) -> HostHooks:
    """How the upgrade role reaches the task table, the Task API's Kill, the run
    directory and the metrics endpoint."""

    def active() -> list[tuple[str, str, asyncio.Future[None]]]:
        return [(t.namespace, t.id, t.exited) for t in service.tasks.values() if not t.exited.done()]

    async def kill(namespace: str, task_id: str, sig: int) -> None:
        # Through the Task API, as `ctr task kill`: the exit is published with its status.
        ctx = Context("containerd.task.v2.Task", "Kill", {NAMESPACE_KEY: [namespace]})
        await service.kill(task_pb2.KillRequest(id=task_id, signal=sig), ctx)

    def release() -> None:
        # The embedded pub/sub has one owner at a time (it recovers what a previous owner
        # left): it moves to the new host; the other components are shared safely.
        for spec in components.specs:
            if spec.kind == "pubsub" and spec.type == "sqlite":
                components.pubsub(spec.name).close()

    def metrics_on() -> None:
        if metrics is not None:
            (paths.run_dir / "metrics.port").write_text(f"{metrics.start()}\n")

    return HostHooks(
        active=active,
        signal=kill,
        make_current=lambda: make_current(paths),
        others=lambda: _others(paths),
        metrics_on=metrics_on,
        metrics_off=metrics.stop if metrics is not None else lambda: None,
        release=release,
    )


def _creating_makes_current(methods: dict[str, Method], role: HostRole) -> dict[str, Method]:
    """A container created in a retired host (its version was installed again: a roll
    back) makes it the current host again; a draining host takes no new container."""
    create = methods["Create"]

    async def handler(request: task_pb2.CreateTaskRequest, ctx: Context) -> object:
        if role.draining:
            raise TtrpcError(Code.FAILED_PRECONDITION, f"the layotto {role.version} node host is draining")
        if role.retired:
            await role.resume()
        return await create.handler(request, ctx)

    return {**methods, "Create": Method(create.request_type, handler)}


def _raise_fd_limit() -> None:
    """Every container holds a ttrpc connection to the host: allow as many descriptors
    as the system lets this process have."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _private(path: Path) -> None:
    """``path`` (a directory of the host's) readable by root only."""
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o700)


async def serve(args: argparse.Namespace) -> None:
    os.umask(0o077)  # every file the host writes (databases, ports, sockets) is root's only
    _raise_fd_limit()
    policy = load_policy(args.policy, KNOWN_CAPABILITIES)
    log.info("policy: %s", policy.source)
    paths = HostPaths(args.run_dir, args.host_version)
    _private(args.state_dir)
    sock = _listener(args, paths)
    # Before anything is opened: the host of another version still running retires, lets go
    # of what one host only may hold, and hands this one the node's port (upgrades).
    make_current(paths)
    handed, retired = await asyncio.to_thread(retire_hosts, _others(paths), paths.version)
    publisher = Publisher(args.containerd_ttrpc)
    publisher.start()
    content = ContainerdContent(args.containerd_address) if args.containerd_address else None
    functions = FunctionRegistry()
    apps = dict(item.split("=", 1) for item in args.app if "=" in item)
    components = load_components(args.components, args.state_dir)
    remote = build_remote(
        args.invoke_dns_server, args.cluster_domain, args.invoke_resolver_file, args.invoke_port
    )
    invoker = HostInvoker(functions, apps, may_invoke=policy.may_invoke, remote=remote)
    pods = PodNetworks()  # each function pod's own listener, in its network namespace
    context = HostContext(
        components=components, invoker=invoker, functions=functions, policy=policy, pods=pods
    )
    # Command modules run as fibers on a few scheduler threads unless LAYOTTO_FIBERS=0
    # (a thread each); read here, once, and handed to the runtime.
    fibers = os.environ.get("LAYOTTO_FIBERS", "1") != "0"
    runtime = NodeRuntime(args.state_dir, args.cache_limit, context=context, fibers=fibers)
    log.info("components: %s", ", ".join(f"{s.kind}/{s.name} ({s.type})" for s in components.specs))
    runtime_api: RuntimeApiServer | None = None
    if args.grpc_address != "-":
        identities = load_identities(list(policy.runtime_api.get("apps") or []))
        runtime_api = RuntimeApiServer(components, invoker, identities=identities)
        api_socket = paths.run_dir / "runtime.sock"
        tcp = args.grpc_address or str(policy.runtime_api.get("tcp") or "") or None
        group = str(policy.runtime_api.get("socketGroup") or "") or None
        try:
            grpc_port = runtime_api.start(api_socket, tcp, socket_group=group)
        except OSError as exc:
            log.error("%s; the gRPC Runtime API serves the unix socket only", exc)
            grpc_port = runtime_api.start(api_socket, None, socket_group=group)
        if grpc_port:
            (paths.run_dir / "grpc.port").write_text(f"{grpc_port}\n")
        log.info("gRPC Runtime API on %s%s", api_socket, f" and port {grpc_port}" if grpc_port else "")
    service = TaskService(runtime, publisher, content)
    limits = IngressLimits(
        header_timeout=args.header_timeout,
        idle_timeout=args.idle_timeout,
        max_connections=args.max_connections,
        max_connections_per_ip=args.max_connections_per_ip,
        body_budget=args.body_budget,
    )
    ingress = Ingress(functions, body_limit=args.body_limit, limits=limits)
    pods.attach_server(ingress)
    stop = asyncio.Event()
    metrics = MetricsEndpoint(
        args.metrics_port, args.metrics_host, HostCollector(functions, lambda: runtime.engine.stats)
    )
    role = HostRole(
        paths.version,
        paths.run_dir,
        ingress,
        stop,
        _hooks(paths, service, metrics if args.metrics_port >= 0 else None, components),
        http_host=args.http_host,
        http_port=args.http_port,
    )
    role.took_over(retired)
    try:
        port = await role.listen(handed)
        if port is not None:
            (paths.run_dir / "http.port").write_text(f"{port}\n")
            log.info("HTTP ingress on %s:%d", args.http_host, port)
    except OSError as exc:
        log.error("HTTP ingress disabled: cannot listen on %s:%d: %s", args.http_host, args.http_port, exc)
    await ingress.adopt(_unix_listener(paths.run_dir / INGRESS_SOCKET))  # requests other hosts forward
    if args.metrics_port >= 0:
        try:
            role.hooks.metrics_on()
            log.info("metrics on %s:%d/metrics", args.metrics_host, metrics.start())
        except OSError as exc:
            log.error(
                "metrics disabled: cannot listen on %s:%d: %s", args.metrics_host, args.metrics_port, exc
            )

    def logs(name: str) -> list[str] | None:  # a task's, else a function's by its function id
        found = service.logs(name)
        return found if found is not None else runtime.function_logs(name)

    def tasks() -> list[dict[str, object]]:
        return [{**row, "version": paths.version} for row in service.describe()]

    admin = AdminServer(
        paths.run_dir / "admin.sock",
        tasks,
        logs,
        host=role.describe,
        actions={"/retire": role.retire, "/drain": role.drain},
    )
    await admin.start()
    server = Server()
    for name in SERVICE_NAMES:
        server.register(name, _creating_makes_current(service.methods(), role))
    await server.start(sock)
    # Everything built so far (modules, wasmtime, protobuf) lives as long as the host:
    # keep it out of the garbage collector's full passes, which would otherwise scan it.
    gc.freeze()
    log.info("layotto %s node host %d serving %s", paths.version, os.getpid(), paths.address)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down")
    metrics.stop()
    await ingress.close()
    # Every task's exit (143 for those still running) is published and answered to Wait,
    # and reaches containerd, before the connections close: containerd's cleanup after
    # the host's end (the shim's `delete`) comes after, and reports the same exits.
    await service.close()
    await publisher.drain(2.0)
    await server.close(grace=2.0)
    await admin.close()
    if runtime_api is not None:
        await asyncio.to_thread(runtime_api.stop)
    components.close()
    await publisher.drain(2.0)
    await publisher.close()
    with contextlib.suppress(OSError):
        if paths.pid_file.read_text().strip() == str(os.getpid()):
            paths.pid_file.unlink()
            paths.socket.unlink()
    log.info("stopped")
    # Everything the host owns is cleaned up. A module thread still blocked in a host call
    # (a read nobody will ever answer) must not keep the process alive: asyncio.run would
    # wait for its executor threads forever.
    logging.shutdown()
    os._exit(0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="layotto host", description="Run the layotto node host.")
    add_arguments(parser)
    args = parser.parse_args(argv)
    run(args)
    return 0


def run(args: argparse.Namespace) -> None:
    configure_logging(
        logging.DEBUG if args.debug else logging.INFO,
        HostPaths(args.run_dir, args.host_version).log_file,
        args.log_max_bytes,
    )
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency; asyncio works too
        asyncio.run(serve(args))
    else:
        uvloop.run(serve(args))
