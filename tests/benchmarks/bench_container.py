"""What the container profile costs against ``sandbox``, in one run, on a podman engine of its own.

1. cold create: ``POST /v1/sessions`` with ``--pool-size 0`` on one gateway (``--sandbox sandbox
   --container-engine ...``), the request alternating between the server's profile and
   ``{"sandbox": "container"}``, each session deleted at once;
2. ``1+1`` (``POST .../execute``) in one session of each profile, interleaved in blocks: the ratio
   of the p50s;
3. pause and resume of a session holding a little state (``x = list(range(10_000))``), the two
   profiles alternating;
4. create from the warm pool: a gateway per profile with ``--pool-size 2``, creates a pause apart
   (so the pool refills), alternating between the two.

Needs root, podman and runc, and the python3 environment; builds its kernel image when the
engine lacks it. Prints a markdown report (or JSON with ``--json``).

    python tests/benchmarks/bench_container.py [--quick] [--json]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from bench_gateway import ApiClient, GatewayServer, interleaved, summarize  # noqa: E402

from tests.conftest import REPO, container_engine_problem, podman_service  # noqa: E402

PROFILES = ("sandbox", "container")


def timed(call: Callable[[], Any]) -> float:
    started = time.perf_counter()
    call()
    return (time.perf_counter() - started) * 1000


def create_body(profile: str) -> dict[str, Any]:
    return {} if profile == "sandbox" else {"sandbox": "container"}


def measure_one_gateway(api: ApiClient, creates: int, steps: int, pauses: int) -> dict[str, Any]:
    cold: dict[str, list[float]] = {p: [] for p in PROFILES}
    for round_ in range(creates + 1):
        for profile in PROFILES if round_ % 2 == 0 else PROFILES[::-1]:
            time.sleep(1.0)
            started = time.perf_counter()
            view = api.call("POST", "/v1/sessions", create_body(profile), expect=201)
            ms = (time.perf_counter() - started) * 1000
            assert view["isolation"]["profile"] == profile, view["isolation"]
            api.delete_session(view["id"])
            if round_:  # the first of each is not timed
                cold[profile].append(ms)
    sessions = {p: api.call("POST", "/v1/sessions", create_body(p), expect=201)["id"] for p in PROFILES}
    try:
        runners = {p: api.stepper(sessions[p]) for p in PROFILES}
        for run in runners.values():
            for _ in range(20):
                run()
        step = interleaved(runners, steps, 20)
        pause: dict[str, list[float]] = {p: [] for p in PROFILES}
        resume: dict[str, list[float]] = {p: [] for p in PROFILES}
        for profile in PROFILES:
            api.execute(sessions[profile], "x = list(range(10_000))")
        for round_ in range(pauses):
            for profile in PROFILES if round_ % 2 == 0 else PROFILES[::-1]:
                sid = sessions[profile]
                pause[profile].append(timed(lambda: api.call("POST", f"/v1/sessions/{sid}/pause", {})))
                resume[profile].append(timed(lambda: api.call("POST", f"/v1/sessions/{sid}/resume", {})))
                assert api.execute(sid, "len(x)")["result"] == "10000"
    finally:
        for sid in sessions.values():
            with contextlib.suppress(Exception):
                api.delete_session(sid)
    out: dict[str, Any] = {p: {"cold_create": summarize(cold[p]), "step": summarize(step[p]),
                               "pause": summarize(pause[p]), "resume": summarize(resume[p])} for p in PROFILES}
    out["step_ratio_p50"] = round(out["container"]["step"]["p50_ms"] / out["sandbox"]["step"]["p50_ms"], 3)
    out["cold_create_paired_difference_ms"] = round(statistics.median(
        c - s for c, s in zip(cold["container"], cold["sandbox"])), 1)
    return out


def measure_pools(apis: dict[str, ApiClient], creates: int) -> dict[str, Any]:
    samples: dict[str, list[float]] = {p: [] for p in PROFILES}
    time.sleep(15)  # both pools fill
    for round_ in range(creates):
        for profile in PROFILES if round_ % 2 == 0 else PROFILES[::-1]:
            time.sleep(4.0)  # the taken kernel is replaced
            started = time.perf_counter()
            view = apis[profile].call("POST", "/v1/sessions", {}, expect=201)
            samples[profile].append((time.perf_counter() - started) * 1000)
            assert view["isolation"]["profile"] == profile
            apis[profile].delete_session(view["id"])
    return {p: summarize(samples[p]) for p in PROFILES}


def report(figures: dict[str, Any]) -> str:
    one, pools = figures["one_gateway"], figures["pools"]
    lines = [f"### Container profile against sandbox ({figures['date']}, {figures['machine']}, {figures['engine']})",
             "", "| | sandbox p50 | container p50 |", "|---|---|---|"]
    for what, key in (("cold create (pool 0)", "cold_create"), ("`1+1` round trip", "step"),
                      ("pause (state saved, kernel stopped)", "pause"), ("resume (new kernel, state loaded)", "resume")):
        lines.append(f"| {what} | {one['sandbox'][key]['p50_ms']:.1f} ms | {one['container'][key]['p50_ms']:.1f} ms |")
    lines.append(f"| create from the warm pool (pool 2) | {pools['sandbox']['p50_ms']:.1f} ms | "
                 f"{pools['container']['p50_ms']:.1f} ms |")
    lines += ["", f"`1+1` ratio container/sandbox: {one['step_ratio_p50']}; cold create, median of paired "
              f"differences: {one['cold_create_paired_difference_ms']} ms; n: {one['sandbox']['cold_create']['n']} "
              f"cold creates, {one['sandbox']['step']['n']} steps, {one['sandbox']['pause']['n']} pauses and "
              f"{pools['sandbox']['n']} pool creates per profile."]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    problem = container_engine_problem()
    if problem:
        print(f"bench_container: {problem}", file=sys.stderr)
        return 2
    creates, steps, pauses, pool_creates = (4, 60, 3, 3) if args.quick else (12, 300, 8, 8)
    workdir = Path(tempfile.mkdtemp(prefix="agw-bench-container-", dir="/tmp"))
    workdir.chmod(0o711)
    with podman_service(workdir) as (url, _service), contextlib.ExitStack() as stack:
        subprocess.run([sys.executable, "-m", "gateway", "image", "build", "python3", "--container-engine", url,
                        "--envs-dir", str(REPO / "gateway-envs")], check=True, cwd=REPO, stdout=subprocess.DEVNULL)
        engine = ("--container-engine", url)
        both = GatewayServer(workdir, "both", ("--sandbox", "sandbox", "--pool-size", "0", *engine))
        stack.callback(both.stop)
        one = measure_one_gateway(ApiClient(both.host, both.port), creates, steps, pauses)
        both.stop()
        pooled = {p: GatewayServer(workdir, f"pool-{p}", ("--sandbox", p, "--pool-size", "2", *engine)) for p in PROFILES}
        for server in pooled.values():
            stack.callback(server.stop)
        pools = measure_pools({p: ApiClient(s.host, s.port) for p, s in pooled.items()}, pool_creates)
        from gateway.containers import Engine

        figures = {"date": datetime.date.today().isoformat(), "machine": f"{platform.machine()}, "
                   f"{len(__import__('os').sched_getaffinity(0))} cores", "engine": Engine(url).describe().split(" at ")[0],
                   "one_gateway": one, "pools": pools}
    print(json.dumps(figures, indent=2) if args.json else report(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
