#!/usr/bin/env python3
# -*- test-case-name: tests.test_h2 -*-
"""
The HTTP/2 benchmark: our sidecar against Envoy (one worker), both speaking h2c on
both sides, in front of the same nginx (h2c, one worker), with the same load client
(h2load), in one session:

    python3 bench/h2_bench.py [--calls 20000] [--gets 20000] [--big-mib 256] [--rounds 3]
                              [--base-tree /work/main]

All peers run at once; each round measures every peer in turn (interleaved), so a
shift in the machine's load hits every peer alike.  C{--base-tree} adds the sidecar
of another checkout as peer C{base}: a before/after of a change in one session;
C{--peers envoy,ours,ours-h2} adds our sidecar on its pure-Python codec (h2).

Three figures per peer, each the median of C{--rounds}:

  - B{gRPC unary}: C{POST /helloworld.Greeter/SayHello} with one 5-byte message,
    C{content-type: application/grpc}, C{te: trailers}; nginx answers one message and
    C{grpc-status: 0} in trailers.  10 streams at a time on one connection.  The proxy's
    CPU microseconds per call, and calls per second;
  - B{small GET at 100 streams}: C{GET /small} (13 bytes), 100 streams at a time on one
    connection.  CPU microseconds per request, requests per second;
  - B{one large response}: C{GET /big} (C{--big-mib} MiB) on one stream.  MB/s and the
    proxy's CPU seconds per GiB.

CPU is the proxy process's user plus system time from C{/proc/PID/stat} (all its
threads).  Every process started here is ended by its PID; traffic stays on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.measure import cpuTicksFromStat
from bench.peers import envoyCommand, findEnvoy
from bench.processes import Child, freeLoopbackPort

TICKS = os.sysconf("SC_CLK_TCK")
GRPC_REQUEST = b"\0\0\0\0\x05world"
GRPC_ANSWER = b"\0\0\0\0\x05hello"


def nginxH2Config(prefix: Path, port: int) -> str:
    """
    nginx as an h2c service: C{/small}, C{/big}, and any C{/helloworld.Greeter/}
    method answered with one gRPC message and C{grpc-status: 0} in trailers.
    """
    return f"""\
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    sendfile on;
    tcp_nodelay on;
    keepalive_requests 100000000;
    keepalive_timeout 300s;
    http2_max_concurrent_streams 1000;
    client_body_temp_path {prefix}/client_body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    server {{
        listen 127.0.0.1:{port} http2;
        root {prefix}/www;
        location = /small {{ default_type text/plain; return 200 "hello, world\\n"; }}
        location /helloworld.Greeter/ {{ rewrite ^ /grpc last; }}
        location = /grpc {{
            default_type application/grpc;
            error_page 405 =200 $uri;
            add_trailer grpc-status 0 always;
        }}
        location = /big {{ }}
    }}
}}
"""


def envoyH2Config(listenPort: int, adminPort: int, upstreamPort: int) -> dict:
    """
    Envoy with h2c on both sides: the connection manager with C{codec_type: AUTO} and
    only the router, a static cluster speaking HTTP/2 to nginx.
    """
    def loopback(port: int) -> dict:
        return {"socket_address": {"address": "127.0.0.1", "port_value": port}}

    manager = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "ingress",
        "codec_type": "AUTO",
        "route_config": {"name": "local", "virtual_hosts": [{
            "name": "service", "domains": ["*"],
            "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "service", "timeout": "60s"}}]}]},
        "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}],
    }
    return {
        "admin": {"address": loopback(adminPort)},
        "static_resources": {
            "listeners": [{"name": "ingress", "address": loopback(listenPort), "filter_chains": [{"filters": [{
                "name": "envoy.filters.network.http_connection_manager", "typed_config": manager}]}]}],
            "clusters": [{
                "name": "service", "type": "STATIC", "connect_timeout": "1s",
                "typed_extension_protocol_options": {
                    "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                        "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                        "explicit_http_config": {"http2_protocol_options": {}}}},
                "load_assignment": {"cluster_name": "service", "endpoints": [
                    {"lb_endpoints": [{"endpoint": {"address": loopback(upstreamPort)}}]}]},
            }],
        },
    }


def oursArgv(port: int, upstream: int) -> List[str]:
    """
    Our sidecar: no access log, no admin or health listener, HTTP/2 to the service for
    HTTP/2 clients (the default C{--upstream-protocol auto}).
    """
    return [sys.executable, "-m", "twisted", "--log-format", "text", "sidecar",
            "--listen", f"tcp:{port}:interface=127.0.0.1", "--upstream", f"127.0.0.1:{upstream}",
            "--access-log", "none", "--admin", "none", "--health", "none"]


def h2load(url: str, requests: int, streams: int, data: Optional[Path] = None,
           headers: Tuple[str, ...] = ()) -> Tuple[float, str]:
    """
    Run h2load on one connection; return its wall time and output.

    @raise RuntimeError: when a request failed.
    """
    argv = ["h2load", "-n", str(requests), "-c", "1", "-m", str(streams), "-T", "60"]
    if data is not None:
        argv += ["-d", str(data)]
    for header in headers:
        argv += ["-H", header]
    argv.append(url)
    start = time.monotonic()
    out = subprocess.run(argv, capture_output=True, text=True, timeout=300).stdout
    wall = time.monotonic() - start
    if f"{requests} succeeded" not in out:
        raise RuntimeError(f"h2load: not every request succeeded:\n{out}")
    return wall, out


def cpu(child: Child) -> float:
    """
    The process's CPU seconds so far.
    """
    return cpuTicksFromStat(Path(f"/proc/{child.pid}/stat").read_text()) / TICKS


def waitServing(port: int, child: Child, timeout: float = 30.0) -> None:
    """
    Wait until one HTTP/2 request through C{port} succeeds.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not child.running():
            raise RuntimeError(f"{child.name} exited:\n{child.logTail()}")
        result = subprocess.run(["h2load", "-n", "1", "-c", "1", f"http://127.0.0.1:{port}/small"],
                                capture_output=True, text=True)
        if "1 succeeded" in result.stdout:
            return
        time.sleep(0.2)
    raise RuntimeError(f"{child.name} did not serve in {timeout} s:\n{child.logTail()}")


def measurePeer(child: Child, port: int, args: Any, directory: Path) -> Dict[str, float]:
    """
    The three figures for the peer on C{port}, one round.
    """
    grpcBody = directory / "grpc-request"
    grpcBody.write_bytes(GRPC_REQUEST)
    base = f"http://127.0.0.1:{port}"
    out: Dict[str, float] = {}
    before = cpu(child)
    wall, _ = h2load(f"{base}/helloworld.Greeter/SayHello", args.calls, 10, grpcBody,
                     ("content-type: application/grpc", "te: trailers"))
    used = cpu(child) - before
    out["grpc_us_per_call"] = used / args.calls * 1e6
    out["grpc_calls_per_s"] = args.calls / wall
    before = cpu(child)
    wall, _ = h2load(f"{base}/small", args.gets, 100)
    used = cpu(child) - before
    out["get100_us_per_request"] = used / args.gets * 1e6
    out["get100_requests_per_s"] = args.gets / wall
    before = cpu(child)
    wall, text = h2load(f"{base}/big", 1, 1)
    used = cpu(child) - before
    size = args.big_mib * 1024 * 1024
    match = re.search(r"traffic: .*?\((\d+)\) total", text)
    if match is None or int(match.group(1)) < size:
        raise RuntimeError(f"the large response was cut short:\n{text}")
    out["big_MB_per_s"] = size / wall / 1e6
    out["big_cpu_s_per_GiB"] = used / (size / 2 ** 30)
    return out


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=20000, help="gRPC unary calls per round")
    parser.add_argument("--gets", type=int, default=20000, help="small GETs per round (100 streams)")
    parser.add_argument("--big-mib", type=int, default=256, help="size of the large response, MiB")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--peers", default="envoy,ours",
                        help="comma-separated: envoy, ours (its default codec, libnghttp2), ours-h2 (--h2-codec h2)")
    parser.add_argument("--base-tree", default="",
                        help="also measure the sidecar of this checkout (peer 'base'), e.g. main's")
    parser.add_argument("--json", action="store_true", help="print the medians as JSON")
    args = parser.parse_args(argv)
    for program in ("nginx", "h2load"):
        if shutil.which(program) is None:
            print(f"h2_bench: needs {program}", file=sys.stderr)
            return 2
    directory = Path(tempfile.mkdtemp(prefix="h2bench-"))
    www = directory / "www"
    www.mkdir()
    (www / "grpc").write_bytes(GRPC_ANSWER)
    with open(www / "big", "wb") as f:
        f.truncate(args.big_mib * 1024 * 1024)
    for name in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (directory / name).mkdir()
    os.chmod(directory, 0o755)
    for path in [www, *www.iterdir()]:
        os.chmod(path, 0o755 if path.is_dir() else 0o644)
    children: List[Child] = []
    results: Dict[str, Dict[str, float]] = {}
    try:
        nginxPort = freeLoopbackPort()
        (directory / "nginx.conf").write_text(nginxH2Config(directory, nginxPort))
        nginx = Child("nginx", ["nginx", "-p", str(directory), "-c", str(directory / "nginx.conf"),
                                "-g", "daemon off;"], directory / "nginx.log")
        children.append(nginx)
        time.sleep(0.5)
        # Every peer is started first; then each round measures every peer in turn, so
        # a change in the machine's load hits all of them alike.
        running: List[Tuple[str, Child, int]] = []
        names = args.peers.split(",")
        if args.base_tree:
            names.append("base")
        for name in names:
            port = freeLoopbackPort()
            if name == "envoy":
                envoy, how = findEnvoy()
                if envoy is None:
                    print(f"h2_bench: skipping Envoy: {how}", file=sys.stderr)
                    continue
                config = directory / "envoy.json"
                config.write_text(json.dumps(envoyH2Config(port, freeLoopbackPort(), nginxPort)))
                child = Child("envoy", envoyCommand(envoy, config, []), directory / "envoy.log")
            elif name == "base":
                tree = Path(args.base_tree).resolve()
                child = Child("base", oursArgv(port, nginxPort), directory / "base.log",
                              dict(os.environ, PYTHONPATH=str(tree)), tree)
            elif name == "ours-h2":
                child = Child(name, oursArgv(port, nginxPort) + ["--h2-codec", "h2"], directory / "ours-h2.log")
            else:
                child = Child("ours", oursArgv(port, nginxPort), directory / "ours.log")
            children.append(child)
            waitServing(port, child)
            h2load(f"http://127.0.0.1:{port}/small", 2000, 100)  # warm up
            running.append((name, child, port))
        rounds: Dict[str, List[Dict[str, float]]] = {name: [] for name, _, _ in running}
        for _ in range(args.rounds):
            for name, child, port in running:
                rounds[name].append(measurePeer(child, port, args, directory))
        for name, measured in rounds.items():
            results[name] = {key: statistics.median(r[key] for r in measured) for key in measured[0]}
    finally:
        for child in reversed(children):
            child.stop()
        shutil.rmtree(directory, ignore_errors=True)
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    keys = ["grpc_us_per_call", "grpc_calls_per_s", "get100_us_per_request", "get100_requests_per_s",
            "big_MB_per_s", "big_cpu_s_per_GiB"]
    names = list(results)
    versus = [n for n in ("ours", "ours-h2", "base") if n in results and "envoy" in results]
    print(f"{'figure':<24}" + "".join(f"{n:>12}" for n in names) + "".join(f"{n + '/envoy':>14}" for n in versus))
    for key in keys:
        row = f"{key:<24}" + "".join(f"{results[n][key]:>12.1f}" for n in names)
        row += "".join(f"{results[n][key] / results['envoy'][key]:>13.2f}x" for n in versus)
        print(row)
    print(f"load average at the end: {os.getloadavg()[0]:.2f} (medians of {args.rounds} interleaved rounds)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
