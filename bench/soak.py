# -*- test-case-name: tests.test_soak -*-
"""
A bounded soak: mixed traffic through a real C{twistd sidecar} in front of nginx (files, a
body-reading POST location) and a WebSocket echo service behind nginx, for C{--seconds}.

Traffic, all at once: keep-alive small GETs, pipelined GETs, large downloads (tens of
MiB) read to the end, slow readers, downloads and uploads aborted mid-body, whole
uploads, WebSocket echo sessions.  It reports requests, errors, and the proxy's RSS and
open fds before the traffic, after a warm-up and at the end (after the clients have
gone), and fails (exit 1) when an exchange went wrong, when the proxy holds more fds at
the end than before the traffic, or when its RSS grew by more than C{--rss-mib} after the
warm-up.

    python bench/soak.py --seconds 300 [--json report.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parent.parent
WS_PEER = ROOT / "tests" / "peers" / "ws_peer.py"
ECHO_MODULE = Path("/usr/lib/nginx/modules/ngx_http_echo_module.so")
BIG = 24 * 1024 * 1024
SMALL = b"small body\n"


def freePort() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def nginxConfig(prefix: Path, port: int, wsPort: int) -> str:
    """
    The service: C{/small}, C{/big} (a file), C{/post} (reads the whole body first when
    the echo module is there), C{/ws} proxied to the WebSocket echo peer.
    """
    if ECHO_MODULE.exists():
        load, post = f"load_module {ECHO_MODULE};", "echo_read_request_body;\n            echo_exec /done;"
    else:
        load, post = "", 'return 200 "done\\n";'
    return f"""\
{load}
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log crit;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    keepalive_requests 1000000;
    client_body_temp_path {prefix}/client_body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        root {prefix}/www;
        client_max_body_size 64m;
        client_body_buffer_size 128k;
        location = /small {{ default_type text/plain; return 200 "{SMALL.decode().strip()}\\n"; }}
        location = /big {{ }}
        location = /post {{ {post} }}
        location = /done {{ internal; default_type text/plain; return 200 "done\\n"; }}
        location = /ws {{
            proxy_pass http://127.0.0.1:{wsPort};
            proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection "upgrade";
            proxy_read_timeout 60s;
        }}
    }}
}}
"""


class ProcStat:
    """
    The proxy's RSS (KiB) and open fds, from /proc.
    """

    def __init__(self, pid: int) -> None:
        self.pid = pid

    def rssKiB(self) -> int:
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        raise ValueError("no VmRSS")

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))


async def readHead(reader: asyncio.StreamReader) -> tuple[int, dict]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split(b" ")[1])
    headers = {}
    for line in lines[1:]:
        if b":" in line:
            k, v = line.split(b":", 1)
            headers[k.strip().lower()] = v.strip()
    return status, headers


async def readBody(reader: asyncio.StreamReader, headers: dict, delay: float = 0.0) -> int:
    """
    Read a body framed by Content-Length or chunked, counting its bytes.
    """
    total = 0
    if b"content-length" in headers:
        left = int(headers[b"content-length"])
        while left:
            data = await reader.read(min(left, 65536))
            if not data:
                raise EOFError("closed mid-body")
            left -= len(data)
            total += len(data)
            if delay:
                await asyncio.sleep(delay)
        return total
    if headers.get(b"transfer-encoding", b"").lower() == b"chunked":
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                await reader.readuntil(b"\r\n")
                return total
            await reader.readexactly(size + 2)
            total += size
    raise ValueError(f"unframed response {headers}")


class Soak:
    """
    The traffic, its counters and its deadline.
    """

    def __init__(self, port: int, seconds: float) -> None:
        self.port = port
        self.deadline = time.monotonic() + seconds
        self.counts: Counter = Counter()
        self.errors: Counter = Counter()
        self.samples: list = []

    def running(self) -> bool:
        return time.monotonic() < self.deadline

    async def open(self) -> tuple:
        return await asyncio.wait_for(asyncio.open_connection("127.0.0.1", self.port), 10)

    async def loop(self, name: str, body: Any) -> None:
        while self.running():
            try:
                await asyncio.wait_for(body(), 60)
                self.counts[name] += 1
            except Exception as e:  # every failure is counted and named
                self.errors[f"{name}: {type(e).__name__}: {str(e)[:80]}"] += 1
                await asyncio.sleep(0.05)

    async def smallGets(self) -> None:
        reader, writer = await self.open()
        try:
            for _ in range(50):
                writer.write(b"GET /small HTTP/1.1\r\nHost: svc\r\n\r\n")
                status, headers = await readHead(reader)
                size = await readBody(reader, headers)
                if status != 200 or size != len(SMALL):
                    raise ValueError(f"small: {status} {size}")
                self.counts["small-request"] += 1
        finally:
            writer.close()

    async def pipelined(self) -> None:
        reader, writer = await self.open()
        try:
            writer.write(b"GET /small HTTP/1.1\r\nHost: svc\r\n\r\n" * 10)
            for _ in range(10):
                status, headers = await readHead(reader)
                if status != 200 or await readBody(reader, headers) != len(SMALL):
                    raise ValueError("pipelined answer")
                self.counts["pipelined-request"] += 1
        finally:
            writer.close()

    async def bigDownload(self) -> None:
        reader, writer = await self.open()
        try:
            writer.write(b"GET /big HTTP/1.1\r\nHost: svc\r\n\r\n")
            status, headers = await readHead(reader)
            size = await readBody(reader, headers)
            if status != 200 or size != BIG:
                raise ValueError(f"big: {status} {size}")
            self.counts["bytes-downloaded"] += size
        finally:
            writer.close()

    async def slowReader(self) -> None:
        reader, writer = await self.open()
        try:
            writer.write(b"GET /big HTTP/1.1\r\nHost: svc\r\n\r\n")
            status, headers = await readHead(reader)
            got = 0
            until = time.monotonic() + 2.0
            while time.monotonic() < until:
                got += len(await reader.read(16384))
                await asyncio.sleep(0.05)
            if status != 200 or not got:
                raise ValueError(f"slow reader: {status} {got}")
        finally:
            writer.transport.abort()

    async def abortedDownload(self) -> None:
        reader, writer = await self.open()
        writer.write(b"GET /big HTTP/1.1\r\nHost: svc\r\n\r\n")
        status, headers = await readHead(reader)
        await reader.readexactly(1 << 20)
        writer.transport.abort()
        if status != 200:
            raise ValueError(f"aborted download: {status}")

    async def abortedUpload(self) -> None:
        await asyncio.sleep(0.02)
        reader, writer = await self.open()
        writer.write(b"POST /post HTTP/1.1\r\nHost: svc\r\nContent-Length: 10485760\r\n\r\n")
        chunk = b"u" * 65536
        for _ in range(16):
            writer.write(chunk)
            await writer.drain()
        writer.transport.abort()

    async def upload(self) -> None:
        reader, writer = await self.open()
        try:
            size = 4 << 20
            writer.write(b"POST /post HTTP/1.1\r\nHost: svc\r\nContent-Length: %d\r\n\r\n" % size)
            chunk = b"p" * 65536
            for _ in range(size // len(chunk)):
                writer.write(chunk)
                await writer.drain()
            status, headers = await readHead(reader)
            await readBody(reader, headers)
            if status != 200:
                raise ValueError(f"upload: {status}")
            self.counts["bytes-uploaded"] += size
        finally:
            writer.close()

    async def websocket(self) -> None:
        from websockets.asyncio.client import connect

        async with connect(f"ws://127.0.0.1:{self.port}/ws", max_size=None, open_timeout=10,
                           close_timeout=5) as ws:
            for message in ("hello", b"\x00binary" * 100, "x" * 70000):
                await ws.send(message)
                back = await asyncio.wait_for(ws.recv(), 10)
                if back != message:
                    raise ValueError("websocket echo differs")

    async def run(self, stat: ProcStat, warmup: float, fdSlack: int) -> dict:
        kinds = [("small", self.smallGets)] * 4 + [
            ("pipelined", self.pipelined), ("big", self.bigDownload), ("slow-reader", self.slowReader),
            ("aborted-download", self.abortedDownload), ("aborted-upload", self.abortedUpload),
            ("upload", self.upload), ("websocket", self.websocket)]
        idle = {"rss_kib": stat.rssKiB(), "fds": stat.fds()}
        tasks = [asyncio.create_task(self.loop(name, body)) for name, body in kinds]
        await asyncio.sleep(warmup)
        start = {"rss_kib": stat.rssKiB(), "fds": stat.fds(), "idle_rss_kib": idle["rss_kib"],
                 "idle_fds": idle["fds"]}
        while self.running():
            await asyncio.sleep(min(5.0, max(0.1, self.deadline - time.monotonic())))
            self.samples.append({"t": round(time.monotonic(), 1), "rss_kib": stat.rssKiB(), "fds": stat.fds()})
        await asyncio.gather(*tasks)
        # Let the proxy notice every close and let its idle pooled upstream connections
        # expire (--upstream-idle-timeout, 4 s): a leaked fd never comes back, so wait up
        # to 15 s for the count to return to where it was before the traffic.
        settled = time.monotonic()
        while time.monotonic() - settled < 15.0 and stat.fds() > idle["fds"] + fdSlack:
            await asyncio.sleep(0.5)
        await asyncio.sleep(0.5)
        end = {"rss_kib": stat.rssKiB(), "fds": stat.fds(), "settled_s": round(time.monotonic() - settled, 1)}
        return {"start": start, "end": end}


def soak(seconds: float, rssMiB: float, fdSlack: int, warmup: float) -> dict:
    """
    Start the peers, run the traffic, stop the peers; return the report.
    """
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    if not os.path.exists(nginx):
        raise SystemExit("soak: needs nginx (apt-get install nginx-light)")
    processes: list = []
    with tempfile.TemporaryDirectory(prefix="sidecar-soak-") as directory:
        prefix = Path(directory)
        prefix.chmod(0o755)
        www = prefix / "www"
        www.mkdir(mode=0o755)
        (www / "big").write_bytes((bytes(range(256)) * 4096) * (BIG // (256 * 4096)))
        (www / "big").chmod(0o644)
        try:
            ws = subprocess.Popen([sys.executable, str(WS_PEER), "server"], stdout=subprocess.PIPE,
                                  stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
            processes.append(ws)
            wsPort = int(ws.stdout.readline())
            upstreamPort, port = freePort(), freePort()
            (prefix / "nginx.conf").write_text(nginxConfig(prefix, upstreamPort, wsPort))
            processes.append(subprocess.Popen(
                [nginx, "-p", str(prefix), "-c", str(prefix / "nginx.conf"), "-e", str(prefix / "error.log"),
                 "-g", "daemon off;"], stdin=subprocess.DEVNULL))
            env = dict(os.environ)
            env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
            log = open(prefix / "sidecar.log", "wb")
            sidecar = subprocess.Popen(
                [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "-n", "--pidfile=",
                 "--logfile", str(prefix / "twistd.log"), "sidecar",
                 "--listen", f"tcp:{port}:interface=127.0.0.1", "--upstream", f"127.0.0.1:{upstreamPort}",
                 "--access-log", str(prefix / "access.log"), "--admin", "none", "--health", "none"],
                env=env, stdout=log, stderr=log, stdin=subprocess.DEVNULL)
            processes.append(sidecar)
            waitForPort(port, sidecar, prefix / "twistd.log")
            waitForPort(upstreamPort, processes[1], prefix / "error.log")
            traffic = Soak(port, seconds)
            started = time.monotonic()
            measured = asyncio.run(traffic.run(ProcStat(sidecar.pid), warmup, fdSlack))
            alive = sidecar.poll() is None
        finally:
            for process in reversed(processes):
                if process.poll() is None:
                    process.send_signal(signal.SIGTERM)
            for process in processes:
                try:
                    process.wait(10)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
        with open(prefix / "access.log", "rb") as f:
            logged = sum(1 for _ in f)
    # Every HTTP request and WebSocket session started (a keep-alive or pipelined batch
    # counts its requests, not itself).
    requests = sum(v for k, v in traffic.counts.items()
                   if not k.startswith("bytes") and k not in ("small", "pipelined"))
    report = {
        "seconds": round(time.monotonic() - started, 1),
        "requests": requests,
        "access_log_lines": logged,
        "counts": dict(traffic.counts),
        "errors": dict(traffic.errors),
        "proxy_alive": alive,
        **measured,
        "samples": traffic.samples,
    }
    problems = []
    if not alive:
        problems.append("the proxy exited")
    if traffic.errors:
        problems.append(f"{sum(traffic.errors.values())} exchanges went wrong")
    if measured["end"]["fds"] > measured["start"]["idle_fds"] + fdSlack:
        problems.append(f"fds leak: {measured['start']['idle_fds']} before the traffic, "
                        f"{measured['end']['fds']} after it")
    growth = (measured["end"]["rss_kib"] - measured["start"]["rss_kib"]) / 1024
    if growth > rssMiB:
        problems.append(f"RSS grew by {growth:.0f} MiB (bound {rssMiB:.0f})")
    if not report["requests"]:
        problems.append("no request completed")
    report["problems"] = problems
    return report


def waitForPort(port: int, process: subprocess.Popen, log: Path, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            text = log.read_text()[-2000:] if log.exists() else ""
            raise SystemExit(f"soak: a peer exited at start-up: {text}")
        try:
            socket.create_connection(("127.0.0.1", port), 0.5).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise SystemExit(f"soak: nothing listens on {port} after {timeout} s")
            time.sleep(0.1)


def main(argv: Optional[list] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=float(os.environ.get("SOAK_SECONDS", "300")))
    parser.add_argument("--rss-mib", type=float, default=float(os.environ.get("SOAK_RSS_MIB", "64")),
                        help="how much the proxy's RSS may grow after the warm-up")
    parser.add_argument("--fd-slack", type=int, default=4, help="how many more fds the proxy may hold at the end")
    parser.add_argument("--warmup", type=float, default=None, help="seconds before the start figures")
    parser.add_argument("--json", help="write the report here too")
    args = parser.parse_args(argv)
    warmup = args.warmup if args.warmup is not None else min(10.0, args.seconds / 4)
    report = soak(args.seconds, args.rss_mib, args.fd_slack, warmup)
    summary = {k: v for k, v in report.items() if k != "samples"}
    print(json.dumps(summary, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    if report["problems"]:
        print("soak FAILED: " + "; ".join(report["problems"]))
        return 1
    print(f"soak ok: {report['requests']} requests in {report['seconds']} s, RSS "
          f"{report['start']['idle_rss_kib'] // 1024} idle, {report['start']['rss_kib'] // 1024} after the "
          f"warm-up, {report['end']['rss_kib'] // 1024} MiB at the end; fds {report['start']['idle_fds']} idle, "
          f"{report['start']['fds']} under load, {report['end']['fds']} at the end")
    return 0


if __name__ == "__main__":
    sys.exit(main())
