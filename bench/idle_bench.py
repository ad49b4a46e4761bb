#!/usr/bin/env python3
# -*- test-case-name: bench.test_bench -*-
"""
Memory per idle client connection, ours against Envoy (issue 12: at most 0.5x Envoy's).

Each peer stands in front of the same nginx, as in C{bench/run.py}.  For each peer, in
turn: start it, read its RSS, open C{--connections} client connections (in batches, each
sending one C{GET /small} and reading the whole answer, then staying open and silent),
wait for the RSS to settle, read it again, close every connection, stop the peer.  The
figure is the RSS growth divided by the connections: what an idle keep-alive client
costs the proxy, its buffers, protocol objects and registry included.

    python3 bench/idle_bench.py [--connections 10000] [--rounds 3] [--only envoy,ours]
    python3 bench/idle_bench.py --baseline /tmp/before     # adds ours-base, another checkout

The open-file limit of this process is raised to its hard limit (the peers inherit
it); the run stops with a sentence when that is too low for the connections asked.
Every connection goes to 127.0.0.1, every wait is bounded, and every process started
is stopped by its PID.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import selectors
import shutil
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.measure import SMALL_BODY, WORKLOADS
from bench.peers import (
    envoyCommand,
    findEnvoy,
    nginxCommand,
    nginxConfig,
    oursCommand,
    writeEnvoyConfig,
    writeUpstreamFiles,
)
from bench.processes import Child, freeLoopbackPort, waitUntilServing

REPOSITORY_ROOT = Path(__file__).resolve().parent.parent

#: The request each connection sends once, and the end of the answer it waits for.
REQUEST = b"GET /small HTTP/1.1\r\nHost: bench\r\n\r\n"

#: Connections opened at a time (within any listen backlog).
BATCH = 500

#: Seconds one batch may take to be answered.
BATCH_TIMEOUT = 30.0


def rssKiBFromStatus(text: str) -> int:
    """
    The resident set size in the text of C{/proc/<pid>/status}, in KiB.

    @raise ValueError: when the text has no C{VmRSS} line.
    """
    for line in text.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise ValueError("no VmRSS line")


def bytesPerConnection(beforeKiB: int, afterKiB: int, connections: int) -> float:
    """
    The RSS growth per connection, in bytes.
    """
    return (afterKiB - beforeKiB) * 1024 / connections


def filesNeeded(connections: int) -> int:
    """
    The open-file limit the run needs: a client socket here and a server socket in the
    proxy per connection, and room for the rest.
    """
    return connections + 256


def openIdle(port: int, count: int) -> list[socket.socket]:
    """
    Open C{count} connections to 127.0.0.1:C{port}, send one small GET on each and read
    its whole answer; return them open.

    @raise ConnectionError: when a connection closes or answers wrongly.
    @raise TimeoutError: when a batch is not answered in time.
    """
    opened: list[socket.socket] = []
    try:
        while len(opened) < count:
            batch = [socket.create_connection(("127.0.0.1", port), timeout=10)
                     for _ in range(min(BATCH, count - len(opened)))]
            opened.extend(batch)
            selector = selectors.DefaultSelector()
            answers: dict[socket.socket, bytes] = {}
            for sock in batch:
                sock.sendall(REQUEST)
                sock.setblocking(False)
                selector.register(sock, selectors.EVENT_READ)
                answers[sock] = b""
            deadline = time.monotonic() + BATCH_TIMEOUT
            waiting = len(batch)
            while waiting:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"{waiting} of {len(batch)} connections not answered in {BATCH_TIMEOUT:g} s")
                for key, _ in selector.select(left):
                    sock = key.fileobj
                    data = sock.recv(65536)
                    if not data:
                        raise ConnectionError(f"closed after {answers[sock]!r}")
                    answers[sock] += data
                    if answers[sock].endswith(SMALL_BODY):
                        if not answers[sock].startswith(b"HTTP/1.1 200"):
                            raise ConnectionError(f"answered {answers[sock][:40]!r}")
                        selector.unregister(sock)
                        waiting -= 1
            selector.close()
    except BaseException:
        closeAll(opened)
        raise
    return opened


def closeAll(sockets: Sequence[socket.socket]) -> None:
    """
    Close every socket.
    """
    for sock in sockets:
        sock.close()


def rssKiB(pid: int) -> int:
    """
    The RSS of process C{pid}, in KiB.
    """
    return rssKiBFromStatus(Path(f"/proc/{pid}/status").read_text())


def settledRss(pid: int, seconds: float = 2.0) -> int:
    """
    The RSS of C{pid} once it stops moving (two readings 0.5 s apart within 1 %), or
    the last reading after C{seconds}.
    """
    last = rssKiB(pid)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(0.5)
        now = rssKiB(pid)
        if abs(now - last) <= last / 100:
            return now
        last = now
    return last


def measure(name: str, argv: list[str], port: int, connections: int, directory: Path,
            environment: dict | None) -> dict:
    """
    Start one peer, open the idle connections, read its RSS before and after, stop it.
    """
    child = Child(name, argv, directory / f"{name}.log", environment, workingDirectory=directory)
    try:
        problem = waitUntilServing(port, WORKLOADS["small"], child, 30.0)
        if problem is not None:
            raise RuntimeError(f"{name}: {problem}\n{child.logTail()}")
        # Warm up: one batch opened and closed, so that the pools and the allocator's
        # first arenas exist before the reading.
        closeAll(openIdle(port, min(BATCH, connections)))
        time.sleep(0.5)
        before = settledRss(child.process.pid)
        began = time.monotonic()
        sockets = openIdle(port, connections)
        try:
            opened = time.monotonic() - began
            after = settledRss(child.process.pid)
            if not child.running():
                raise RuntimeError(f"{name} exited\n{child.logTail()}")
        finally:
            closeAll(sockets)
    finally:
        child.stop()
    return {"peer": name, "connections": connections, "rss_before_kib": before, "rss_after_kib": after,
            "bytes_per_connection": bytesPerConnection(before, after, connections),
            "open_seconds": round(opened, 2)}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Memory per idle client connection, ours against Envoy.")
    parser.add_argument("--connections", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=3, help="rounds of every peer, interleaved; medians")
    parser.add_argument("--only", default="envoy,ours", help="peers among envoy, ours (default both)")
    parser.add_argument("--baseline", type=Path, default=None, metavar="DIR",
                        help="add ours-base: the sidecar of another checkout")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    options = parser.parse_args(argv)
    if options.connections < 1 or options.rounds < 1:
        parser.error("--connections and --rounds must be at least 1")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = filesNeeded(options.connections)
    if hard != resource.RLIM_INFINITY and hard < needed:
        print(f"idle_bench: {options.connections} connections need an open-file limit of {needed}, "
              f"and the hard limit is {hard} (raise it, or ask fewer --connections)", file=sys.stderr)
        return 1
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if shutil.which("nginx") is None:
        print("idle_bench: nginx not found; on Debian: apt-get install -y nginx-light", file=sys.stderr)
        return 1
    envoyPath, envoySource = findEnvoy()
    names = [name.strip() for name in options.only.split(",") if name.strip()]
    if "envoy" in names and envoyPath is None:
        print(f"idle_bench: no Envoy ({envoySource}); measuring without it", file=sys.stderr)
        names.remove("envoy")
    peers = list(names) + (["ours-base"] if options.baseline is not None else [])

    directory = Path(tempfile.mkdtemp(prefix="sidecar-idle-"))
    writeUpstreamFiles(directory)
    upstreamPort = freeLoopbackPort()
    (directory / "nginx.conf").write_text(nginxConfig(directory, upstreamPort, None))
    nginx = Child("nginx", nginxCommand(directory, directory / "nginx.conf"), directory / "nginx.log",
                  workingDirectory=directory)
    results: dict[str, list[dict]] = {peer: [] for peer in peers}
    try:
        problem = waitUntilServing(upstreamPort, WORKLOADS["small"], nginx, 30.0)
        if problem is not None:
            print(f"idle_bench: nginx: {problem}", file=sys.stderr)
            return 1
        for roundNumber in range(1, options.rounds + 1):
            for peer in peers:
                port = freeLoopbackPort()
                environment = None
                if peer == "envoy":
                    config = directory / "envoy.json"
                    writeEnvoyConfig(config, port, freeLoopbackPort(), upstreamPort)
                    argv = envoyCommand(envoyPath, config, [])
                else:
                    root = options.baseline if peer == "ours-base" else REPOSITORY_ROOT
                    argv = oursCommand(sys.executable, port, upstreamPort, [])
                    environment = dict(os.environ, PYTHONPATH=str(Path(root).resolve()))
                figure = measure(peer, argv, port, options.connections, directory, environment)
                results[peer].append(figure)
                print(f"[round {roundNumber}/{options.rounds}] {peer}: RSS {figure['rss_before_kib'] / 1024:.1f} -> "
                      f"{figure['rss_after_kib'] / 1024:.1f} MiB with {options.connections} idle connections: "
                      f"{figure['bytes_per_connection']:,.0f} bytes each", file=sys.stderr, flush=True)
    finally:
        nginx.stop()
        shutil.rmtree(directory, ignore_errors=True)

    medians = {peer: statistics.median(f["bytes_per_connection"] for f in figures)
               for peer, figures in results.items()}
    print(f"## Memory per idle connection ({options.connections} connections, "
          f"median of {options.rounds} round(s))\n")
    print("| peer | bytes per idle connection | RSS with them, MiB |")
    print("| --- | ---: | ---: |")
    for peer, figures in results.items():
        rss = statistics.median(f["rss_after_kib"] for f in figures) / 1024
        print(f"| {peer} | {medians[peer]:,.0f} | {rss:.1f} |")
    if "envoy" in medians and medians["envoy"] > 0:
        print()
        for peer in medians:
            if peer.startswith("ours"):
                ratio = medians[peer] / medians["envoy"]
                print(f"{peer} / envoy: {ratio:.2f}x (target at most 0.5x: {'met' if ratio <= 0.5 else 'not met'})")
    if options.json is not None:
        options.json.parent.mkdir(parents=True, exist_ok=True)
        options.json.write_text(json.dumps({"rounds": results, "medians": medians}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
