"""What the egress proxy costs: an HTTPS request to a loopback server made directly, through the
proxy's tunnel (a host without credentials), and through its TLS interception (a host with
credentials: the kernel's TLS ended by the proxy, the host's verified, the token added), in one
process, interleaved in blocks so that a noisy machine affects all three alike.

Two figures each: a small request (a new connection and TLS handshake every time, as pip makes
for an index page) and a download of ``--megabytes`` MiB.

    python tests/benchmarks/bench_egress.py [--requests N] [--megabytes M] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import platform
import ssl
import statistics
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
from gateway.egress import Policy, Proxy  # noqa: E402
from gateway.egress_tls import Authority, kernel_bundle  # noqa: E402
from tests.test_egress_tls import make_ca, server_files  # noqa: E402

BLOCK = 10
TOKEN = "bench-token"


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    body = b""

    def log_message(self, *args: Any) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        body = self.body if self.path == "/large" else b"ok\n"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)


def serve(chain: Path) -> ThreadingHTTPServer:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(chain)
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


async def fetch(how: str, proxy: Proxy, port: int, path: str, context: ssl.SSLContext) -> int:
    """One HTTPS GET, ``direct`` or through the proxy's socket; returns the bytes received."""
    if how == "direct":
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context,
                                                       server_hostname="127.0.0.1")
    else:
        reader, writer = await asyncio.open_unix_connection(str(proxy.socket_path))
        writer.write(f"CONNECT 127.0.0.1:{port} HTTP/1.1\r\n\r\n".encode())
        await reader.readuntil(b"\r\n\r\n")
        await writer.start_tls(context, server_hostname="127.0.0.1")
    writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n".encode())
    received = len(await reader.read())
    writer.close()
    return received


async def measure(requests: int, megabytes: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as directory:
        base = Path(directory)
        ca = make_ca("bench CA")
        trust = base / "trust.pem"
        from cryptography.hazmat.primitives import serialization

        trust.write_bytes(ca[1].public_bytes(serialization.Encoding.PEM))
        Handler.body = b"x" * (megabytes << 20)
        plain, intercepted = serve(server_files(base, ca, "plain")), serve(server_files(base, ca, "creds"))
        authority = Authority(base / "ca", str(trust))
        runtime = base / "runtime"
        runtime.mkdir()
        ports = {"direct": plain.server_address[1], "tunnel": plain.server_address[1],
                 "intercepted": intercepted.server_address[1]}
        proxy = Proxy(runtime, Policy.parse([f"127.0.0.1:{p}" for p in set(ports.values())]),
                      {f"127.0.0.1:{ports['intercepted']}": {"Authorization": f"Bearer {TOKEN}"}},
                      sink=lambda connection: None, authority=authority, bundle=kernel_bundle(str(trust), authority))
        await proxy.start()
        context = ssl.create_default_context(cadata=kernel_bundle(str(trust), authority).decode())
        small: dict[str, list[float]] = {how: [] for how in ports}
        large: dict[str, list[float]] = {how: [] for how in ports}
        try:
            for how in ports:  # warm: the leaf certificate made, the code paths loaded
                await fetch(how, proxy, ports[how], "/small", context)
            for _ in range(0, requests, BLOCK):
                for how in ports:
                    for _ in range(BLOCK):
                        started = time.perf_counter()
                        await fetch(how, proxy, ports[how], "/small", context)
                        small[how].append((time.perf_counter() - started) * 1000)
            for _ in range(3):
                for how in ports:
                    started = time.perf_counter()
                    size = await fetch(how, proxy, ports[how], "/large", context)
                    assert size > megabytes << 20
                    large[how].append(time.perf_counter() - started)
        finally:
            proxy.close()
            plain.shutdown()
            intercepted.shutdown()
    p50 = {how: statistics.median(values) for how, values in small.items()}
    throughput = {how: megabytes / statistics.median(values) for how, values in large.items()}
    return {"requests": requests, "megabytes": megabytes, "small_p50_ms": p50, "download_mib_s": throughput,
            "machine": f"{platform.node()} ({platform.machine()}, {platform.python_version()})",
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


def report(result: dict[str, Any]) -> str:
    p50, rate = result["small_p50_ms"], result["download_mib_s"]
    lines = [f"HTTPS through the egress proxy ({result['date']}, {result['machine']}; {result['requests']} small "
             f"requests each, interleaved in blocks of {BLOCK}; a {result['megabytes']} MiB download 3 times each)", "",
             "| | small request p50 | ratio to direct | download | ratio to direct |", "|---|---|---|---|---|"]
    for how in ("direct", "tunnel", "intercepted"):
        lines.append(f"| {how} | {p50[how]:.2f} ms | {p50[how] / p50['direct']:.2f} | {rate[how]:.0f} MiB/s | "
                     f"{rate[how] / rate['direct']:.2f} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--megabytes", type=int, default=64)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    result = asyncio.run(measure(args.requests, args.megabytes))
    print(json.dumps(result, indent=2) if args.json else report(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
