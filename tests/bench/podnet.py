"""Pod networking benchmark: a function on its pod IP against the node ingress, and what each
pod's own listener costs the node host.

``python -m tests.bench.podnet [--pods N] [--hostnet-pods M] [--duration S] [--json PATH]``:

1. starts a private containerd with the CRI plugin and a bridge CNI network of its own
   (tests/containerd_env.py; a subnet large enough for N pods), imports fn-hello;
2. **throughput**: one fn-hello pod with its own network namespace; ``wrk -t1 -c32`` against
   its pod IP (no ``id`` header) and against the node-wide ingress on loopback (``id``
   header), same function, one after the other in one run, each after a 2 s warm-up;
3. **cost per pod**: N pods with a network namespace each (RunPodSandbox through CNI, then
   CreateContainer + StartContainer of fn-hello; 4 parallel clients), then M host-network
   pods the same way; per pod: the node host's descriptors, RSS and threads (growth over
   the baseline, divided by the pods), and the StartContainer latency (which includes
   opening the listener in the pod's namespace) against that of host-network pods. Each
   pod's IP is asked once right after its start (must answer ``Hello, ...``);
4. removes every pod (StopPodSandbox + RemovePodSandbox) and reads the host again: its
   descriptors must be back at the baseline.

Targets (informational): the pod IP within 20 % of the node ingress's requests/s; a pod's
listener at most 2 descriptors and 64 KiB of host RSS; nothing left after removal.
RunPodSandbox (CNI: a veth pair, an address, the bridge) is containerd's and CNI's cost,
reported but not ours. 1,000 CNI pods take a few minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from layotto.images.builder import build_image
from tests.bench.coldstart import BenchError
from tests.bench.invoke import run_wrk
from tests.bench.startrate import (
    ensure_modules,
    machine_info,
    positive,
    preflight,
    proc_memory,
    source_info,
    write_json,
)
from tests.conftest import find_host_process
from tests.containerd_env import CNI_PLUGIN_DIR, Containerd, default_snapshotter
from tests.cri_client import CriClient, Pod, cri

IMAGE = "docker.io/library/layotto-bench-podnet:latest"
NAMESPACE = "k8s.io"
NAME = "podnet"
EXPECTED = f"Hello, {NAME}!\n".encode()
TARGET_RPS_FRACTION = 0.8
TARGET_FDS = 2.0
TARGET_RSS = 64 * 1024


def new_containerd(pods: int) -> Containerd:
    c = Containerd(
        path_prepend=[Path(sys.executable).parent],
        cri=True,
        snapshotter=default_snapshotter(),
        log_level="warn",
    )
    # Room for every pod (and the bridge, the network and broadcast addresses).
    c.cni_prefix = min(24, 32 - max(8, (pods + 8).bit_length()))
    return c


def import_images(c: Containerd) -> None:
    out = c.base / "images"
    out.mkdir(exist_ok=True)
    build_image(out / "pause.tar", {"/pause": b"pause\n"}, name=c.sandbox_image, cmd=["/pause"])
    wasm = ensure_modules("fn-hello")["fn-hello"]
    build_image(out / "fn.tar", {"/fn-hello.wasm": wasm}, name=IMAGE, cmd=["/fn-hello.wasm"])
    with CriClient(c.address) as client:
        for archive, image in (("pause.tar", c.sandbox_image), ("fn.tar", IMAGE)):
            c.import_image(out / archive, namespace=NAMESPACE)
            client.wait_image(image)


def pod_ip(client: CriClient, pod_id: str) -> str:
    try:
        return client.pod_ipv4(client.sandbox_info(pod_id))
    except LookupError as exc:
        raise BenchError(f"pod {pod_id}: {exc}") from exc


def start_pod(client: CriClient, log_root: Path, n: int, *, network: bool) -> dict[str, Any]:
    """One pod with one fn-hello function; its timings and IP."""
    name = f"{'net' if network else 'host'}-{n}"
    uid = str(uuid.uuid4())
    log_dir = log_root / f"default_{name}_{uid}"
    log_dir.mkdir(parents=True)
    config = CriClient.pod_config(
        name, "default", uid, log_dir, annotations={"layotto.io/function-id": f"fn-{name}"}
    )
    container = CriClient.container_config("fn", IMAGE)
    if network:
        config.linux.security_context.namespace_options.network = cri.POD
        container.linux.security_context.namespace_options.network = cri.POD
    t0 = time.perf_counter()
    pod_id = client.run_pod_sandbox(config, "layotto")
    t1 = time.perf_counter()
    cid = client.create_container_raw(pod_id, container, config)
    t2 = time.perf_counter()
    client.start_container(cid)
    t3 = time.perf_counter()
    ip = pod_ip(client, pod_id) if network else ""
    if ip:
        # Asked right away: the node's ARP table holds 1,024 neighbours (gc_thresh3), so
        # asking 1,000 fresh pod IPs in one burst at the end would overflow it.
        ask(ip, 2045)
    return {
        "pod": Pod(pod_id, config),
        "ip": ip,
        "run_pod_s": t1 - t0,
        "create_s": t2 - t1,
        "start_s": t3 - t2,
        "first_request_s": time.perf_counter() - t3,
    }


def ask(ip: str, port: int, function_id: str | None = None) -> None:
    import http.client

    conn = http.client.HTTPConnection(ip, port, timeout=10)
    try:
        conn.request("GET", f"/?name={NAME}", headers={"id": function_id} if function_id else {})
        response = conn.getresponse()
        body = response.read()
    finally:
        conn.close()
    if response.status != 200 or body != EXPECTED:
        raise BenchError(f"{ip}:{port} (id {function_id}) answered {response.status} {body[:200]!r}")


def host_reading(pid: int) -> dict[str, int]:
    memory = proc_memory(pid)
    return {"rss": memory["rss"], "fds": memory["fds"], "threads": memory["threads"]}


def summary(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {
        "median_ms": statistics.median(ordered) * 1000,
        "p90_ms": ordered[int(0.9 * (len(ordered) - 1))] * 1000,
        "max_ms": ordered[-1] * 1000,
    }


def fleet(
    c: Containerd, client: CriClient, count: int, *, network: bool, workers: int
) -> list[dict[str, Any]]:
    phase(f"starting {count} {'CNI' if network else 'host-network'} pods")
    log_root = c.base / "pods"
    done: list[dict[str, Any]] = []
    lock = threading.Lock()
    began = time.monotonic()

    def one(n: int) -> None:
        result = start_pod(client, log_root, n, network=network)
        with lock:
            done.append(result)
            if sys.stderr.isatty():
                print(f"\r  {len(done)}/{count} pods", end="", file=sys.stderr, flush=True)

    with ThreadPoolExecutor(workers) as pool:
        for future in [pool.submit(one, n) for n in range(count)]:
            future.result()
    if sys.stderr.isatty():
        print(file=sys.stderr)
    seconds = time.monotonic() - began
    for r in done:
        r["rate_per_s"] = count / seconds
    return done


def phase(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


def remove_all(client: CriClient, pods: list[dict[str, Any]], workers: int) -> float:
    phase(f"removing {len(pods)} pods")
    began = time.monotonic()
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(lambda r: client.remove_pod(r["pod"].id), pods))
    return time.monotonic() - began


def measure(c: Containerd, args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {"machine": machine_info(), "source": source_info(), "subnet": c.cni_subnet}
    client = CriClient(c.address, timeout=120)
    try:
        # 2. throughput, one function, both ways in.
        (probe,) = fleet(c, client, 1, network=True, workers=1)
        host = find_host_process(c)
        if host is None:
            raise BenchError("no node host runs")
        pid = host.pid
        node_port = c.host_port("http")
        fid = probe["pod"].config.annotations["layotto.io/function-id"]
        ask(probe["ip"], 2045)
        ask("127.0.0.1", node_port, fid)
        ways = {
            "pod_ip": (f"http://{probe['ip']}:2045/?name={NAME}", None),
            "node_ingress": (f"http://127.0.0.1:{node_port}/?name={NAME}", fid),
        }
        throughput = {}
        for way, (url, function_id) in ways.items():
            kw = {"function_id": function_id, "connections": 32, "threads": 1, "pid": pid}
            run_wrk(url, duration=2, **kw)
            result = run_wrk(url, duration=args.duration, **kw)
            result.pop("output", None)
            throughput[way] = result
        results["throughput"] = throughput
        results["rps_ratio"] = throughput["pod_ip"]["rps"] / throughput["node_ingress"]["rps"]
        remove_all(client, [probe], 1)

        # 3. cost per pod.
        base = host_reading(pid)
        results["baseline"] = base
        net = fleet(c, client, args.pods, network=True, workers=args.workers)
        after_net = host_reading(pid)
        hostnet = fleet(c, client, args.hostnet_pods, network=False, workers=args.workers)
        after_host = host_reading(pid)
        per_net = {k: (after_net[k] - base[k]) / args.pods for k in base}
        per_host = {k: (after_host[k] - after_net[k]) / args.hostnet_pods for k in base}
        results["per_pod"] = {
            "network": per_net,
            "host_network": per_host,
            "listener": {k: per_net[k] - per_host[k] for k in base},
        }
        results["latency"] = {
            kind: {
                "run_pod": summary([r["run_pod_s"] for r in rs]),
                "start_container": summary([r["start_s"] for r in rs]),
                "pods_per_s": rs[0]["rate_per_s"],
            }
            for kind, rs in (("network", net), ("host_network", hostnet))
        }
        results["latency"]["network"]["first_request"] = summary([r["first_request_s"] for r in net])
        results["remove_seconds"] = remove_all(client, net + hostnet, args.workers)
        gone = time.monotonic() + 10
        while host_reading(pid)["fds"] > base["fds"] and time.monotonic() < gone:
            time.sleep(0.1)  # (descriptors of the last connections are closing)
        results["after_removal"] = host_reading(pid)
    finally:
        client.close()
    results["pods"] = args.pods
    results["hostnet_pods"] = args.hostnet_pods
    listener = results["per_pod"]["listener"]
    results["pass"] = (
        results["rps_ratio"] >= TARGET_RPS_FRACTION
        and listener["fds"] <= TARGET_FDS
        and per_net["rss"] - per_host["rss"] <= TARGET_RSS
        and results["after_removal"]["fds"] <= results["baseline"]["fds"]
    )
    return results


def report(r: dict[str, Any]) -> str:
    t = r["throughput"]
    lines = ["pod IP against the node ingress, fn-hello, wrk -t1 -c32:"]
    for way in ("pod_ip", "node_ingress"):
        x = t[way]
        lines.append(
            f"  {way:<13} {x['rps']:>9,.0f} req/s  p99 {x['percentiles_ms'].get('99', float('nan')):.2f} ms"
            f"  host {x.get('server_cpu_us_per_request', float('nan')):.1f} µs/request"
        )
    lines.append(f"  ratio {r['rps_ratio']:.2f} (>= {TARGET_RPS_FRACTION})")
    lines.append(f"per pod ({r['pods']} CNI pods, {r['hostnet_pods']} host-network pods), node host growth:")
    for kind, x in r["per_pod"].items():
        lines.append(
            f"  {kind:<13} fds {x['fds']:.2f}  RSS {x['rss'] / 1024:.1f} KiB  threads {x['threads']:.2f}"
        )
    for kind, x in r["latency"].items():
        lines.append(
            f"  {kind:<13} RunPodSandbox median {x['run_pod']['median_ms']:.1f} ms, StartContainer median "
            f"{x['start_container']['median_ms']:.1f} ms p90 {x['start_container']['p90_ms']:.1f} ms, "
            f"{x['pods_per_s']:.1f} pods/s"
        )
    b, a = r["baseline"], r["after_removal"]
    lines.append(
        f"after removing every pod ({r['remove_seconds']:.1f} s): host fds {b['fds']} -> {a['fds']}, "
        f"RSS {b['rss'] / 2**20:.1f} -> {a['rss'] / 2**20:.1f} MiB"
    )
    lines.append("verdict: " + ("PASS" if r["pass"] else "MISS"))
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.podnet", description=__doc__.split("\n")[0])
    parser.add_argument("--pods", type=positive, default=1000, help="pods with a network namespace (1000)")
    parser.add_argument("--hostnet-pods", type=positive, default=200, help="host-network pods (200)")
    parser.add_argument("--duration", type=positive, default=10, help="seconds of each wrk run (10)")
    parser.add_argument("--workers", type=positive, default=4, help="parallel CRI clients (4)")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    if args.pods > 1000:
        parser.error("--pods: at most 1000 (a Linux bridge takes 1024 ports)")
    return args


NEIGH = Path("/proc/sys/net/ipv4/neigh/default")


@contextlib.contextmanager
def neighbour_room(pods: int) -> Iterator[None]:
    """Room in the node's ARP table for every pod (and stale entries of earlier runs) while
    the benchmark runs, as a node meant for that many pods is configured: Linux's default
    (gc_thresh3 = 1024 neighbours) refuses new pod IPs past it with "No route to host".
    The previous values are put back afterwards."""
    wanted = {"gc_thresh1": 2 * pods, "gc_thresh2": 4 * pods, "gc_thresh3": 8 * pods}
    saved: dict[str, str] = {}
    try:
        for name, value in wanted.items():
            path = NEIGH / name
            saved[name] = path.read_text().strip()
            if int(saved[name]) < value:
                path.write_text(str(value))
        yield
    finally:
        for name, value in reversed(saved.items()):
            with contextlib.suppress(OSError):
                (NEIGH / name).write_text(value)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    missing = preflight()
    if missing:
        print(f"podnet: {missing}", file=sys.stderr)
        return 1
    if not (CNI_PLUGIN_DIR / "bridge").exists():
        print(f"podnet: {CNI_PLUGIN_DIR}/bridge is missing (containernetworking-plugins)", file=sys.stderr)
        return 1
    c = new_containerd(args.pods)
    try:
        with neighbour_room(args.pods):
            c.start()
            import_images(c)
            results = measure(c, args)
    except BenchError as exc:
        print(f"podnet: {exc}", file=sys.stderr)
        return 1
    finally:
        c.stop()
    print(report(results))
    write_json(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
