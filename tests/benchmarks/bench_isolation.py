"""What kernel isolation costs: the ``sandbox`` profile against ``none``, in one run.

Starts gateways (``python -m gateway serve``, each on a free loopback port with a temporary data
directory of its own) with ``--sandbox none`` (the baseline) and ``--sandbox sandbox``, and measures:

1. cold kernel start: ``POST /v1/sessions`` with ``--pool-size 0``, the two gateways' creates
   interleaved one by one (each session deleted right after it was created, the next create a pause
   later); p50 of each and the difference (target: sandbox adds < 100 ms);
2. the round trip of a trivial ``1+1`` step (``POST /v1/sessions/{id}/execute``) in one session on
   each of those two gateways, interleaved in blocks; the ratio of the p50s (target: < 1.10);
3. the warm pool under sandbox: a gateway of each profile with the default ``--pool-size`` (2); once
   the pool has filled, ``POST /v1/sessions`` a pause apart (so that the pool refills), interleaved
   between the two gateways; p50 of each, and whether a pooled kernel served every create (no kernel
   start logged during it). It should take tens of milliseconds, not a cold start.

It prints a markdown report (ready for docs/performance.md) or, with ``--json``, one JSON object
with every figure. Every gateway it starts is stopped (SIGTERM, waited for) before it exits, also on
error; the exit status is 1 if a gateway did not exit cleanly, left a kernel running, logged an
error, or a session did not run under the profile asked for.

    python tests/benchmarks/bench_isolation.py [--quick] [--json]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
# the gateway process, API client and statistics of the main benchmark
from bench_gateway import (
    LOG_RECORD, ApiClient, GatewayServer, gateway_shutdown, gateway_source, interleaved, latency_row, repeat, summarize,
    target,
)

BASELINE, ISOLATED = "none", "sandbox"
PROFILES = (BASELINE, ISOLATED)
POOL_SIZE = 2  # the gateway's default --pool-size
KERNEL_STARTED = re.compile(r"^\S+ \S+ INFO gateway\.kernels: kernel (\S+) started \(", re.MULTILINE)
IDENTITY = "import os, socket; (os.getuid(), socket.gethostname())"
COLD_TARGET_MS = 100.0
STEP_TARGET_RATIO = 1.10
POOL_TARGET_MS = 100.0  # "tens of milliseconds": well below a cold start


@dataclass(frozen=True)
class Plan:
    """How much one run does."""

    mode: str
    cold_creates: int   # timed cold creates per profile (plus one untimed first create each)
    cold_gap: float     # seconds between a delete and the next create (the deleted kernel's exit settles)
    steps: int          # timed `1+1` steps per profile
    warmup: int         # untimed steps per profile before timing
    block: int          # interleaving block of steps
    pool_creates: int   # timed creates per profile with the warm pool
    pool_gap: float     # seconds before each of them (and until the pool is full again)
    pool_fill: float    # seconds waited at least, after the pool gateways started, before the first

    @classmethod
    def for_mode(cls, quick: bool) -> "Plan":
        if quick:
            return cls("quick", cold_creates=5, cold_gap=1.5, steps=50, warmup=10, block=20,
                       pool_creates=4, pool_gap=1.5, pool_fill=5.0)
        return cls("full", cold_creates=15, cold_gap=1.5, steps=300, warmup=20, block=20,
                   pool_creates=10, pool_gap=1.5, pool_fill=5.0)


# the gateways -----------------------------------------------------------------------------------


def start_gateway(stack: contextlib.ExitStack, workdir: Path, name: str, profile: str,
                  pool_size: int | None, shutdowns: list[dict[str, Any]]) -> GatewayServer:
    """A gateway with ``--sandbox profile`` (and ``--pool-size`` unless None: the default), in its own data
    directory under ``workdir``; stopped (SIGTERM, waited for) when ``stack`` closes, its shutdown figures
    appended to ``shutdowns``."""
    args = ["--sandbox", profile] + ([] if pool_size is None else ["--pool-size", str(pool_size)])
    server = GatewayServer(workdir, name, tuple(args))

    def stop() -> None:
        figures = gateway_shutdown(server)
        # The gateway's own ERROR records count as problems; what its kernels print to the same stderr is
        # reported apart (ipykernel may log "KeyboardInterrupt caught in kernel." when a kernel is shut down
        # right after it started, as the cold creates here do).
        figures["gateway_log_errors"] = server.log_lines(" ERROR ", records_only=True)[:20]
        figures["kernel_error_lines"] = [line for line in server.log_problems() if not LOG_RECORD.match(line)][:20]
        shutdowns.append(figures)

    stack.callback(stop)
    return server


def kernels_started(server: GatewayServer) -> list[str]:
    """Labels of the kernels the gateway logged as started and answering, in order."""
    return KERNEL_STARTED.findall(server.stderr_path.read_text(errors="replace"))


def wait_for_pool(server: GatewayServer, taken: int, timeout: float = 60.0) -> float:
    """Wait until the pool holds ``POOL_SIZE`` ready kernels: every create took one started kernel (a pooled
    one or its own cold one), so the pool holds the started kernels less the ``taken`` ones. Seconds waited."""
    start = time.perf_counter()
    while time.perf_counter() - start < timeout and len(kernels_started(server)) - taken < POOL_SIZE:
        time.sleep(0.05)
    return time.perf_counter() - start


def note_kernels(server: GatewayServer) -> None:
    """Remember the gateway's kernel processes (bwrap and the kernel under it, for sandbox), so that its
    shutdown check finds any left running."""
    server.kernel_pids.update(p.pid for p in server.kernel_processes())


def create_timed(api: ApiClient) -> tuple[str, float, dict[str, Any]]:
    """``POST /v1/sessions``: (session id, milliseconds, the session's view)."""
    start = time.perf_counter()
    view = api.call("POST", "/v1/sessions", {}, expect=201)
    return str(view["id"]), (time.perf_counter() - start) * 1000, view


def profile_of(view: dict[str, Any]) -> str:
    return str((view.get("isolation") or {}).get("profile", BASELINE))


# the measurements -------------------------------------------------------------------------------


def measure_cold(servers: dict[str, GatewayServer], apis: dict[str, ApiClient], plan: Plan,
                 progress: Callable[[str], None]) -> dict[str, Any]:
    """Cold creates (``--pool-size 0``), one gateway then the other (the order alternating each round),
    each session deleted at once and the next create ``plan.cold_gap`` seconds later."""
    samples: dict[str, list[float]] = {p: [] for p in PROFILES}
    deletes: dict[str, list[float]] = {p: [] for p in PROFILES}
    first: dict[str, float] = {}
    profiles_seen: dict[str, set[str]] = {p: set() for p in PROFILES}
    for round_ in range(plan.cold_creates + 1):
        order = PROFILES if round_ % 2 == 0 else PROFILES[::-1]
        for profile in order:
            time.sleep(plan.cold_gap)
            session_id, ms, view = create_timed(apis[profile])
            profiles_seen[profile].add(profile_of(view))
            note_kernels(servers[profile])
            start = time.perf_counter()
            apis[profile].delete_session(session_id)
            delete_ms = (time.perf_counter() - start) * 1000
            if round_ == 0:  # the first create of a gateway is not timed
                first[profile] = round(ms, 1)
            else:
                samples[profile].append(ms)
                deletes[profile].append(delete_ms)
        if round_:
            progress(f"  cold creates: {round_}/{plan.cold_creates}")
    out: dict[str, Any] = {p: {"create": summarize(samples[p]), "delete": summarize(deletes[p]),
                               "first_create_untimed_ms": first[p], "profiles_reported": sorted(profiles_seen[p])}
                           for p in PROFILES}
    out["difference_p50_ms"] = round(out[ISOLATED]["create"]["p50_ms"] - out[BASELINE]["create"]["p50_ms"], 2)
    # each round's two creates ran back to back: the median of their differences is less sensitive to load
    # that comes and goes during the run than the difference of the two p50s
    out["paired_difference_median_ms"] = round(statistics.median(
        s - b for s, b in zip(samples[ISOLATED], samples[BASELINE])), 2)
    out["gap_s"] = plan.cold_gap
    return out


def measure_steps(servers: dict[str, GatewayServer], apis: dict[str, ApiClient], plan: Plan) -> dict[str, Any]:
    """``1+1`` in one session on each gateway, ``plan.steps`` each, interleaved in blocks of ``plan.block``."""
    sessions: dict[str, str] = {}
    try:
        identity: dict[str, Any] = {}
        for profile in PROFILES:
            session_id, _, view = create_timed(apis[profile])
            sessions[profile] = session_id
            result = apis[profile].execute(session_id, IDENTITY)["result"]
            identity[profile] = {"profile_reported": profile_of(view), "kernel_uid_and_hostname": result}
        for server in servers.values():
            note_kernels(server)
        runners = {p: apis[p].stepper(sessions[p]) for p in PROFILES}
        for run in runners.values():
            repeat(run, plan.warmup)
        samples = interleaved(runners, plan.steps, plan.block)
    finally:
        for profile, session_id in sessions.items():
            with contextlib.suppress(Exception):
                apis[profile].delete_session(session_id)
    out: dict[str, Any] = {p: summarize(samples[p]) for p in PROFILES}
    out["ratio_p50"] = round(out[ISOLATED]["p50_ms"] / out[BASELINE]["p50_ms"], 3)
    out["difference_p50_ms"] = round(out[ISOLATED]["p50_ms"] - out[BASELINE]["p50_ms"], 3)
    out["ratio_mean"] = round(out[ISOLATED]["mean_ms"] / out[BASELINE]["mean_ms"], 3)
    out["identity"] = identity
    out["block"] = plan.block
    out["warmup"] = plan.warmup
    return out


def measure_pool(servers: dict[str, GatewayServer], apis: dict[str, ApiClient], plan: Plan,
                 progress: Callable[[str], None]) -> dict[str, Any]:
    """Creates with the warm pool: first at least ``plan.pool_fill`` seconds and until both pools are full;
    then rounds of one create on each gateway (the order alternating), each ``plan.pool_gap`` seconds after
    the previous one and once its pool is full again; each session is deleted at once. A create was served
    by a pooled kernel when the gateway logged no kernel start during it."""
    start = time.perf_counter()
    filled: dict[str, float | None] = {p: None for p in PROFILES}
    while None in filled.values() and time.perf_counter() - start < 60:
        for profile in PROFILES:
            if filled[profile] is None and len(kernels_started(servers[profile])) >= POOL_SIZE:
                filled[profile] = round(time.perf_counter() - start, 2)
        time.sleep(0.05)
    time.sleep(max(0.0, plan.pool_fill - (time.perf_counter() - start)))
    taken = {p: 0 for p in PROFILES}
    samples: dict[str, list[float]] = {p: [] for p in PROFILES}
    waits: dict[str, list[float]] = {p: [] for p in PROFILES}
    from_pool = {p: 0 for p in PROFILES}
    profiles_seen: dict[str, set[str]] = {p: set() for p in PROFILES}
    for round_ in range(plan.pool_creates):
        order = PROFILES if round_ % 2 == 0 else PROFILES[::-1]
        for profile in order:
            server = servers[profile]
            time.sleep(plan.pool_gap)
            waits[profile].append(plan.pool_gap + wait_for_pool(server, taken[profile]))
            before = len(kernels_started(server))
            session_id, ms, view = create_timed(apis[profile])
            started_during = len(kernels_started(server)) - before
            taken[profile] += 1
            samples[profile].append(ms)
            from_pool[profile] += started_during == 0
            profiles_seen[profile].add(profile_of(view))
            note_kernels(server)
            apis[profile].delete_session(session_id)
        progress(f"  warm-pool creates: {round_ + 1}/{plan.pool_creates}")
    return {"pool_size": POOL_SIZE, "gap_s": plan.pool_gap,
            **{p: {"create": summarize(samples[p]), "served_by_pool": from_pool[p],
                   "pool_full_after_start_s": filled[p],
                   "waited_s": {"p50": round(sorted(waits[p])[len(waits[p]) // 2], 2), "max": round(max(waits[p]), 2)},
                   "profiles_reported": sorted(profiles_seen[p])} for p in PROFILES}}


# the run ----------------------------------------------------------------------------------------


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine() -> dict[str, Any]:
    return {"cores": os.cpu_count(), "cpu_model": cpu_model(), "platform": platform.platform(),
            "python": platform.python_version(), "memory_total_bytes": psutil.virtual_memory().total,
            "gateway_source": gateway_source()}


def run(plan: Plan, workdir: Path, progress: Callable[[str], None]) -> dict[str, Any]:
    """Every measurement; every gateway stopped before returning (also on error)."""
    results: dict[str, Any] = {}
    shutdowns: list[dict[str, Any]] = []
    results["shutdowns"] = shutdowns
    with contextlib.ExitStack() as stack:
        progress("cold start and steps: starting a gateway of each profile with --pool-size 0")
        servers = {p: start_gateway(stack, workdir, f"{p}-nopool", p, 0, shutdowns) for p in PROFILES}
        apis = {p: ApiClient(servers[p].host, servers[p].port) for p in PROFILES}
        for api in apis.values():
            stack.callback(api.close)
        load = round(os.getloadavg()[0], 2)
        results["cold_start"] = measure_cold(servers, apis, plan, progress)
        results["cold_start"]["load_average_1m_before"] = load
        progress(f"`1+1` steps: {plan.steps} per profile, blocks of {plan.block}")
        load = round(os.getloadavg()[0], 2)
        results["step"] = measure_steps(servers, apis, plan)
        results["step"]["load_average_1m_before"] = load
    with contextlib.ExitStack() as stack:
        progress(f"warm pool: starting a gateway of each profile with the default pool size ({POOL_SIZE})")
        servers = {p: start_gateway(stack, workdir, f"{p}-pool", p, None, shutdowns) for p in PROFILES}
        apis = {p: ApiClient(servers[p].host, servers[p].port) for p in PROFILES}
        for api in apis.values():
            stack.callback(api.close)
        load = round(os.getloadavg()[0], 2)
        results["warm_pool"] = measure_pool(servers, apis, plan, progress)
        results["warm_pool"]["load_average_1m_before"] = load
    return results


def problems_of(results: dict[str, Any]) -> list[str]:
    """What went wrong, in words (empty when nothing did); not performance targets."""
    problems = []
    for s in results.get("shutdowns", []):
        if s["exit_code"] != 0:
            problems.append(f"gateway {s['gateway']} exited with {s['exit_code']}")
        if s["kernels_left_running"]:
            problems.append(f"gateway {s['gateway']} left kernels running: {s['kernels_left_running']}")
        if s["gateway_log_errors"]:
            problems.append(f"{len(s['gateway_log_errors'])} ERROR records in the log of {s['gateway']}: "
                            f"{s['gateway_log_errors'][:3]}")
    for part in ("cold_start", "warm_pool"):
        for profile in PROFILES:
            seen = results.get(part, {}).get(profile, {}).get("profiles_reported")
            if seen is not None and seen != [profile]:
                problems.append(f"{part}: sessions of the {profile} gateway reported profile(s) {seen}")
    for profile, identity in results.get("step", {}).get("identity", {}).items():
        if identity["profile_reported"] != profile:
            problems.append(f"step: the {profile} session reported profile {identity['profile_reported']}")
    return problems


def render(report: dict[str, Any]) -> str:
    """The markdown report."""
    m, r, plan = report["machine"], report["results"], report["plan"]
    cold, step, pool = r["cold_start"], r["step"], r["warm_pool"]
    source = m["gateway_source"]
    changed = f", {len(source['changed'])} files of gateway/ and kernels/ changed since" if source["changed"] else ""
    lines = [
        f"### Kernel isolation, `{ISOLATED}` against `{BASELINE}` ({plan['mode']} mode)",
        "",
        f"Date: {report['date']}; machine: {m['cores']} cores ({m['cpu_model']}), {m['memory_total_bytes'] / 2**30:.0f} GiB, "
        f"{m['platform']}, Python {m['python']}; gateway commit {source['commit']}{changed}; load average "
        f"{report['load_before']} at the start; {report['wall_seconds']:.0f} s in all.",
        "",
        "| measurement | n | p50 (ms) | p99 (ms) | mean (ms) |",
        "|---|---:|---:|---:|---:|",
    ]
    for profile in PROFILES:
        lines.append(latency_row(f"`POST /v1/sessions`, cold (`--pool-size 0`), `--sandbox {profile}`",
                                 cold[profile]["create"]))
    for profile in PROFILES:
        lines.append(latency_row(f"`1+1` through `POST /v1/sessions/{{id}}/execute`, `--sandbox {profile}`", step[profile]))
    for profile in PROFILES:
        lines.append(latency_row(f"`POST /v1/sessions`, warm pool (`--pool-size {pool['pool_size']}`), "
                                 f"`--sandbox {profile}` ({pool[profile]['served_by_pool']} of "
                                 f"{pool[profile]['create']['n']} from the pool)", pool[profile]["create"]))
    pool_ok = (pool[ISOLATED]["create"]["p50_ms"] < POOL_TARGET_MS
               and pool[ISOLATED]["served_by_pool"] == pool[ISOLATED]["create"]["n"])
    shutdown_ok = all(s["exit_code"] == 0 and not s["kernels_left_running"] and not s["gateway_log_errors"]
                      for s in r["shutdowns"])
    ident = step["identity"]
    lines += [
        "",
        "| comparison | value | target |",
        "|---|---|---|",
        f"| cold kernel start, sandbox - none, p50 | **{cold['difference_p50_ms']:+.1f} ms** "
        f"({cold[ISOLATED]['create']['p50_ms']:.1f} vs {cold[BASELINE]['create']['p50_ms']:.1f} ms; median of the "
        f"{cold[ISOLATED]['create']['n']} paired differences {cold['paired_difference_median_ms']:+.1f} ms) "
        f"| < {COLD_TARGET_MS:.0f} ms: {target(cold['difference_p50_ms'] < COLD_TARGET_MS)} |",
        f"| `1+1` step, sandbox / none, p50 | **{step['ratio_p50']:.3f}x** ({step['difference_p50_ms']:+.2f} ms; "
        f"mean ratio {step['ratio_mean']:.3f}x) | < {STEP_TARGET_RATIO:.2f}x: {target(step['ratio_p50'] < STEP_TARGET_RATIO)} |",
        f"| create with the warm pool under sandbox, p50 (none for comparison) | "
        f"**{pool[ISOLATED]['create']['p50_ms']:.1f} ms** ({pool[BASELINE]['create']['p50_ms']:.1f} ms); "
        f"{pool[ISOLATED]['served_by_pool']} of {pool[ISOLATED]['create']['n']} from the pool | tens of ms, every "
        f"create from the pool: {target(pool_ok)} |",
        "| gateways stopped (SIGTERM) | " + "; ".join(
            f"{s['gateway']}: exit {s['exit_code']} in {s['stop_seconds']} s, {len(s['kernels_left_running'])} kernels "
            f"left, {len(s['gateway_log_errors'])} ERROR records ({len(s['kernel_error_lines'])} error lines from "
            f"kernels)" for s in r["shutdowns"]) + f" | exit 0, nothing left, no ERROR record: {target(shutdown_ok)} |",
        "",
        f"The kernels ran as (uid, hostname): none {ident[BASELINE]['kernel_uid_and_hostname']}, "
        f"sandbox {ident[ISOLATED]['kernel_uid_and_hostname']}. First (untimed) cold create: none "
        f"{cold[BASELINE]['first_create_untimed_ms']:.0f} ms, sandbox {cold[ISOLATED]['first_create_untimed_ms']:.0f} ms; "
        f"delete after a cold create, p50: none {cold[BASELINE]['delete']['p50_ms']:.0f} ms, sandbox "
        f"{cold[ISOLATED]['delete']['p50_ms']:.0f} ms. Load average as each part started: cold "
        f"{cold['load_average_1m_before']}, steps {step['load_average_1m_before']}, pool {pool['load_average_1m_before']}.",
        "",
        f"Method: two gateways at a time, one per profile, each with its own data directory. Cold creates alternate "
        f"between them one by one (the order swapped each round), each session deleted at once and the next create "
        f"{cold['gap_s']:g} s later; the first create of each gateway is not timed. Steps: one session per gateway, "
        f"{step['warmup']} untimed steps each, then blocks of {step['block']} alternating. Warm pool: gateways with the "
        f"default pool size, the first create once at least {plan['pool_fill']:g} s passed and the pool was full "
        f"(full {pool[BASELINE]['pool_full_after_start_s']:g} s after both gateways had announced their address for "
        f"none, {pool[ISOLATED]['pool_full_after_start_s']:g} s for sandbox), then each create {pool['gap_s']:g} s after the previous one and once the pool logged its "
        f"{pool['pool_size']} kernels started again, alternating between the gateways; a create counts as served by "
        f"the pool when no kernel start was logged during it. All over one keep-alive connection per gateway.",
    ]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a short run (smaller n) to check everything works")
    parser.add_argument("--json", action="store_true", help="print one JSON object with every figure instead of markdown")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    plan = Plan.for_mode(args.quick)

    def progress(message: str) -> None:
        print(f"[bench] {message}", file=sys.stderr, flush=True)

    started = datetime.datetime.now(datetime.timezone.utc)
    load_before = round(os.getloadavg()[0], 2)
    info = machine()
    progress(f"{info['cores']} cores ({info['cpu_model']}), {started:%Y-%m-%d %H:%M UTC}, {plan.mode} mode, "
             f"load {load_before}")
    with tempfile.TemporaryDirectory(prefix="bench-isolation-") as tmp:
        results = run(plan, Path(tmp), progress)
    report = {"date": started.strftime("%Y-%m-%d %H:%M UTC"), "load_before": load_before, "machine": info,
              "plan": asdict(plan),
              "wall_seconds": round((datetime.datetime.now(datetime.timezone.utc) - started).total_seconds(), 1),
              "results": results}
    problems = problems_of(results)
    report["problems"] = problems
    cold, step, pool = results["cold_start"], results["step"], results["warm_pool"]
    report["targets"] = {
        "cold_start_difference_ms_below_100": cold["difference_p50_ms"] < COLD_TARGET_MS,
        "step_ratio_below_1_10": step["ratio_p50"] < STEP_TARGET_RATIO,
        "sandbox_warm_pool_tens_of_ms": (pool[ISOLATED]["create"]["p50_ms"] < POOL_TARGET_MS
                                         and pool[ISOLATED]["served_by_pool"] == pool[ISOLATED]["create"]["n"]),
    }
    print(json.dumps(report, indent=2) if args.json else render(report))
    for problem in problems:
        progress(f"problem: {problem}")
    return 0 if not problems else 1


if __name__ == "__main__":
    sys.exit(main())
