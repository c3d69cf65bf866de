"""Every benchmark in sequence (``make bench``): ``python -m tests.bench [--only a,b] [--quick]``.

Runs coldstart, density, startrate, invoke and scale, then any other benchmark module in
this package (alphabetically), one after the other, each with its own private containerd
(stopped at its end, also on failure). Each one's numbers go to ``<json-dir>/<name>.json``
(default build/bench); a one-line verdict per benchmark against its targets ends the run.
Missing a target is informational; the exit status is non-zero only when a benchmark could
not run or failed (1), or when asked for an unknown benchmark (2). ``--quick`` runs every
benchmark small (a smoke test, not a measurement).
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
ORDER = ("coldstart", "density", "startrate", "invoke", "scale")


def discover() -> list[str]:
    """ORDER first, then any other benchmark module in this package (alphabetically)."""
    here = Path(__file__).resolve().parent
    extra = sorted(p.stem for p in here.glob("*.py") if not p.stem.startswith("_") and p.stem not in ORDER)
    return [*ORDER, *extra]


QUICK = {
    "abi": ["--duration", "2", "--micro-seconds", "0.2"],
    "coldstart": ["--runs", "5", "--shim-runs", "5"],
    "density": ["--n", "20", "--runc-n", "4"],
    "fairness": ["--duration", "2", "--ctr-runs", "3"],
    "startrate": ["--n", "24"],
    "invoke": ["--duration", "2", "--micro-seconds", "0.2"],
    "podnet": ["--pods", "20", "--hostnet-pods", "5", "--duration", "2"],
    "loop": ["--duration", "2", "--micro-seconds", "0.2"],
    "scale": ["--max", "100", "--probe-seconds", "1"],
    "soak": ["--cycles", "20"],
}


def verdict(name: str, path: Path) -> str:
    """One line from a benchmark's JSON: PASS/MISS per target."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return "no results"
    if name == "coldstart":
        return f"median ratio layotto/runc {data['ratio_median']:.2f} (<= 0.5): {_pm(data['pass'])}"
    if name == "density":
        per = data["per_container"]
        ratio = data["ratio_vs_runc"]
        return (
            f"fn-hello {per['fn_idle']['rss'] / 1024:.1f} KiB, {ratio['fn_idle']['rss']:.0f}x runc; "
            f"sleeper {per['sleeper_idle']['rss'] / 1024:.1f} KiB, {ratio['sleeper_idle']['rss']:.0f}x "
            f"(<= 64 KiB, >= 200x): {_pm(data['pass'])}"
        )
    if name == "startrate":
        ratios = ", ".join(f"{k} {v:.2f}x" for k, v in data["ratio_vs_runc"].items())
        return f"rate vs runc {ratios} (>= 4x): {_pm(data['pass'])}"
    if name == "invoke":
        parts = []
        for mode in ("reuse", "fresh"):
            r = data["http"][mode]
            parts.append(
                f"{mode} {r['rps']:,.0f} req/s p99 {r['percentiles_ms'].get('99', float('nan')):.2f} ms"
            )
        return "; ".join(parts) + f": {_pm(data['pass'])}"
    if name == "scale":
        if not data["steps"]:
            return "no steps"
        last = data["steps"][-1]
        return (
            f"N={last['n']:,}: {last['start']['rate_per_s']:.0f} starts/s, "
            f"{last['per_function']['rss'] / 1024:.1f} KiB/fn, sweep p99 {last['sweep']['p99_ms']:.2f} ms"
            + (f"; stopped: {data['stopped']}" if data.get("stopped") else "")
        )
    if name == "soak":
        b, a = data["before"], data["after"]
        failed = sum(data["failures"].values())
        return (
            f"{2 * data['cycles']} cycles, {data['cycles_per_s']:.1f}/s: {failed} failed, "
            f"{data['output_lost']} lost, hosts {data['host_processes_seen']['max']}, host fds "
            f"{b['host_fds']}->{a['host_fds']}, threads {b['host_threads']}->{a['host_threads']}, mounts "
            f"{b['mounts']}->{a['mounts']}, "
            f"RSS {b['host_rss'] / 2**20:.1f}->{a['host_rss'] / 2**20:.1f} MiB: " + _pm(data["pass"])
        )
    if name == "fairness":
        v, a, n = data["verdicts"], data["cores_test"], data["neighbour"]
        return (
            f"c8/c1 {a['ratio']:.2f}x: {_pm(v['cores'])}; neighbour p99 "
            f"{n['loaded']['percentiles_ms'].get('99', float('nan')):.1f} ms: {_pm(v['neighbour_p99'])}, "
            f"{n['rps_fraction'] * 100:.0f}% req/s: {_pm(v['neighbour_rps'])}, ctr run "
            f"{n['ctr_run']['ratio']:.1f}x: {_pm(v['neighbour_ctr_run'])}; 250m used "
            f"{data['limit']['task_cpu_cores']:.2f} cores: {_pm(v['limit'])}; shares 4:1 gave "
            f"{data['shares']['cpu_ratio']:.2f}:1"
        )
    if name == "loop":
        parts = []
        for key in ("hello", "noop", "work"):
            if key in data:
                run, cpu = data[key], data[key]["cpu"]
                parts.append(
                    f"{run['label']} ({run['mode']}) {cpu['loop_us_per_request']:.1f} µs loop CPU/request, "
                    f"ceiling {cpu['loop_ceiling_rps'] or 0:,.0f} req/s"
                )
        return "; ".join(parts)
    if name == "podnet":
        listener = data["per_pod"]["listener"]
        return (
            f"pod IP {data['throughput']['pod_ip']['rps']:,.0f} req/s = {data['rps_ratio']:.2f}x the node "
            f"ingress; {data['pods']} pods: listener {listener['fds']:.1f} fds, "
            f"{listener['rss'] / 1024:.0f} KiB; fds after removal {data['after_removal']['fds']} "
            f"(baseline {data['baseline']['fds']}): {_pm(data['pass'])}"
        )
    if "pass" in data:
        return _pm(bool(data["pass"]))
    return "done"


def _pm(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m tests.bench",
        description="Run every layotto benchmark in sequence: " + ", ".join(discover()) + ".",
    )
    parser.add_argument(
        "--only",
        type=lambda s: [x for x in s.split(",") if x],
        default=None,
        help="comma-separated subset, run in the usual order (all)",
    )
    parser.add_argument(
        "--json-dir",
        type=Path,
        default=REPO_ROOT / "build" / "bench",
        help="where <name>.json go (build/bench)",
    )
    parser.add_argument("--quick", action="store_true", help="small sizes everywhere: a smoke test")
    parser.add_argument("--scale-max", type=int, default=None, help="scale's --max (1000; try 10000)")
    parser.add_argument("--quiet", action="store_true", help="no progress on stderr")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    names = discover()
    only = names if args.only is None else args.only
    unknown = [name for name in only if name not in names]
    if unknown:
        print(f"unknown benchmarks {unknown}: choose from {', '.join(names)}", file=sys.stderr)
        return 2
    selected = [name for name in names if name in only]
    statuses: dict[str, tuple[int, float]] = {}
    for name in selected:
        module = importlib.import_module(f"tests.bench.{name}")
        if not callable(getattr(module, "main", None)):
            continue  # a helper module, not a benchmark
        bench_args = list(QUICK.get(name, [])) if args.quick else []
        if name == "scale" and args.scale_max is not None:
            bench_args += ["--max", str(args.scale_max)]
        json_path = args.json_dir / f"{name}.json"
        json_path.unlink(missing_ok=True)
        bench_args += ["--json", str(json_path)]
        if args.quiet and name in ORDER:
            bench_args.append("--quiet")
        print(f"\n===== {name} {' '.join(bench_args)}", flush=True)
        began = time.monotonic()
        try:
            status = module.main(bench_args)
        except SystemExit as e:  # argparse errors
            status = e.code if isinstance(e.code, int) else 1
        except Exception as e:  # one benchmark's crash must not stop the others
            print(f"{name}: crashed: {type(e).__name__}: {e}", file=sys.stderr)
            status = 1
        statuses[name] = (status, time.monotonic() - began)
        sys.stdout.flush()
    print("\n===== summary")
    for name, (status, seconds) in statuses.items():
        outcome = verdict(name, args.json_dir / f"{name}.json") if status == 0 else f"FAILED (exit {status})"
        print(f"  {name:<10} {seconds:6.0f} s  {outcome}")
    return 1 if any(status for status, _ in statuses.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
