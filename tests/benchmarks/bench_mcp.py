"""What the MCP face costs per step: ``1+1`` through the ``execute`` tool at ``/mcp`` (the ``mcp``
package's client, protocol 2026-07-28, one connection) against the same step over the agent
API (``POST /v1/sessions/{id}/execute``, one keep-alive connection), in one session of one
gateway, interleaved in blocks so that a noisy machine affects both sides alike.

    python tests/benchmarks/bench_mcp.py [--steps N] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import httpx
import httpx2
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_gateway import TOKEN, GatewayServer, summarize  # noqa: E402

BLOCK = 20


async def measure(server: GatewayServer, steps: int) -> dict[str, object]:
    base = f"http://{server.host}:{server.port}"
    headers = {"Authorization": f"Bearer {TOKEN}"}
    samples: dict[str, list[float]] = {"http": [], "mcp": []}
    async with httpx.AsyncClient(base_url=base, headers=headers, timeout=60) as http, \
            Client(streamable_http_client(f"{base}/mcp", http_client=httpx2.AsyncClient(headers=headers,
                                                                                          timeout=60))) as mcp:
        session = (await http.post("/v1/sessions", json={})).json()["id"]

        async def over_http() -> None:
            answer = (await http.post(f"/v1/sessions/{session}/execute", json={"code": "1+1"})).json()
            assert answer["result"] == "2", answer

        async def over_mcp() -> None:
            answer = await mcp.call_tool("execute", {"session_id": session, "code": "1+1"})
            assert answer.structured_content and answer.structured_content["result"] == "2", answer

        for warm in (over_http, over_mcp):
            for _ in range(5):
                await warm()
        while any(len(found) < steps for found in samples.values()):
            for name, run in (("http", over_http), ("mcp", over_mcp)):
                for _ in range(min(BLOCK, steps - len(samples[name]))):
                    start = time.perf_counter()
                    await run()
                    samples[name].append((time.perf_counter() - start) * 1000)
        await http.delete(f"/v1/sessions/{session}")
    figures = {name: summarize(found) for name, found in samples.items()}
    return {"steps": steps, **figures,
            "p50_ratio": round(figures["mcp"]["p50_ms"] / figures["http"]["p50_ms"], 2)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of markdown")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="agw-bench-mcp-") as workdir:
        server = GatewayServer(Path(workdir), args=("--pool-size", "0"))
        try:
            result = asyncio.run(measure(server, args.steps))
        finally:
            server.stop()
    result["machine"] = f"{platform.machine()}, {platform.python_version()}"
    result["date"] = datetime.date.today().isoformat()
    if args.json:
        print(json.dumps(result))
    else:
        http_p50, mcp_p50 = result["http"]["p50_ms"], result["mcp"]["p50_ms"]  # type: ignore[index]
        print(f"| `1+1`, {args.steps} each | HTTP p50 {http_p50} ms | MCP p50 {mcp_p50} ms | "
              f"ratio {result['p50_ratio']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
