#!/usr/bin/env python3
# -*- test-case-name: tests.test_tls -*-
"""
The mutual-TLS benchmark: our sidecar's mTLS listener against Envoy configured for
the same mutual TLS (C{DownstreamTlsContext} with C{require_client_certificate}, XFCC
C{SANITIZE_SET} with the URI, an RBAC rule allowing the one client id), both in front
of the same nginx, in one session, with the same certificates (ECDSA P-256, made by
L{sidecar.certs}) and the same load client.

    python3 bench/tls_bench.py [--handshakes 2000] [--requests 20000] [--rounds 3]
    python3 bench/tls_bench.py --only ours,envoy --base-tree /work/main   # before/after

wrk can't present client certificates, so the load client is this script: worker
processes using Python's C{ssl} module (OpenSSL), each with a fixed number of
operations, all on the load CPU while the proxy runs alone on another.  Three figures
per peer, each the median of C{--rounds}:

  - B{new connections}: connect, full TLS 1.3 handshake with client certificate (the
    client does not resume), one C{GET /small} with C{Connection: close}, close.
    Reported as connections per second (bounded by the load client too) and the
    proxy's CPU microseconds per connection;
  - B{resumed connections}: the same, but each client process offers the session
    ticket of its previous connection (TLS 1.3 PSK resumption, as a mesh peer's
    sidecar does per destination); the share of connections the peer resumed is
    reported.  Both peers get the same client;
  - B{established connection}: each worker keeps one mTLS connection and sends
    C{GET /small} requests one after another.  Reported as requests per second and the
    proxy's CPU microseconds per request (from C{/proc/PID/stat}, all threads).

Every process this script starts is ended by its PID; traffic goes to 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing
import os
import shutil
import socket
import ssl
import statistics
import sys
import tempfile
import time
from pathlib import Path
import re
import subprocess
from typing import Any, Dict, List, Optional, Sequence, Tuple

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.measure import cpuTicksFromStat
from bench.peers import envoyCommand, envoyConfig, findEnvoy, nginxCommand, nginxConfig, writeUpstreamFiles
from bench.processes import Child, freeLoopbackPort, pinned
from sidecar.certs import makeCA, makeWorkload

FRONTEND_ID = "spiffe://cluster.local/ns/default/sa/frontend"
TICKS = os.sysconf("SC_CLK_TCK")
REQUEST = b"GET /small HTTP/1.1\r\nHost: localhost\r\n\r\n"
CLOSING_REQUEST = b"GET /small HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"


# -- certificates and peers ----------------------------------------------------------


def writeCertificates(directory: Path) -> Dict[str, Path]:
    """
    The mesh CA, the proxy's certificate (C{backend}) and the client's (C{frontend}).
    """
    now = datetime.datetime.now(datetime.timezone.utc)
    ca = makeCA("cluster.local", now)
    paths = {"ca": directory / "ca.crt"}
    paths["ca"].write_bytes(ca.certificatePEM())
    for name in ("backend", "frontend"):
        issued = makeWorkload(ca, "cluster.local", "default", name, now)
        paths[name + ".crt"] = directory / f"{name}.crt"
        paths[name + ".key"] = directory / f"{name}.key"
        paths[name + ".crt"].write_bytes(issued.certificatePEM())
        paths[name + ".key"].write_bytes(issued.keyPEM())
    return paths


def oursArgv(port: int, upstream: int, certs: Dict[str, Path]) -> List[str]:
    """
    Our sidecar with only the mutual-TLS listener, no access log, no admin or health port.
    """
    return [
        sys.executable, "-m", "twisted", "--log-format", "text", "sidecar",
        "--listen", "none", "--tls-listen", f"tcp:{port}:interface=127.0.0.1",
        "--upstream", f"127.0.0.1:{upstream}", "--access-log", "none", "--admin", "none",
        "--health", "none", "--tls-cert", str(certs["backend.crt"]), "--tls-key", str(certs["backend.key"]),
        "--tls-ca", str(certs["ca"]), "--tls-allow", FRONTEND_ID,
    ]


def envoyMutualTLSConfig(port: int, admin: int, upstream: int, certs: Dict[str, Path]) -> dict:
    """
    The benchmark's Envoy configuration (L{bench.peers.envoyConfig}) made to do what
    our mTLS listener does: require and verify a client certificate, TLS 1.2-1.3,
    ALPN http/1.1, replace XFCC with By/Hash/URI, allow only the client's SPIFFE id.
    """
    config = envoyConfig(port, admin, upstream)
    listener = config["static_resources"]["listeners"][0]
    chain = listener["filter_chains"][0]
    chain["transport_socket"] = {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
            "require_client_certificate": True,
            "common_tls_context": {
                "tls_params": {"tls_minimum_protocol_version": "TLSv1_2", "tls_maximum_protocol_version": "TLSv1_3"},
                "alpn_protocols": ["http/1.1"],
                "tls_certificates": [{
                    "certificate_chain": {"filename": str(certs["backend.crt"])},
                    "private_key": {"filename": str(certs["backend.key"])},
                }],
                "validation_context": {"trusted_ca": {"filename": str(certs["ca"])}},
            },
        },
    }
    manager = chain["filters"][0]["typed_config"]
    manager["forward_client_cert_details"] = "SANITIZE_SET"
    manager["set_current_client_cert_details"] = {"uri": True}
    manager["http_filters"].insert(0, {
        "name": "envoy.filters.http.rbac",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC",
            "rules": {
                "action": "ALLOW",
                "policies": {"frontend": {
                    "permissions": [{"any": True}],
                    "principals": [{"authenticated": {"principal_name": {"exact": FRONTEND_ID}}}],
                }},
            },
        },
    })
    return config


# -- the load client -----------------------------------------------------------------


def clientContext(certs: Dict[str, str]) -> ssl.SSLContext:
    """
    The load client's TLS: verify the server against the CA (name C{localhost}),
    present C{frontend}'s certificate, offer ALPN http/1.1.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(certs["ca"])
    context.load_cert_chain(certs["frontend.crt"], certs["frontend.key"])
    context.set_alpn_protocols(["http/1.1"])
    return context


def readResponse(sock: Any, buffer: bytes) -> Tuple[int, bytes]:
    """
    Read one response with a C{Content-Length} body; return its status and what was
    read past it.
    """
    while b"\r\n\r\n" not in buffer:
        data = sock.recv(65536)
        if not data:
            raise ConnectionError("closed before the response head")
        buffer += data
    head, _, rest = buffer.partition(b"\r\n\r\n")
    status = int(head[9:12])
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(rest) < length:
        data = sock.recv(65536)
        if not data:
            raise ConnectionError("closed in the response body")
        rest += data
    return status, rest[length:]


def _connect(context: Optional[ssl.SSLContext], port: int) -> Any:
    raw = socket.create_connection(("127.0.0.1", port))
    raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if context is None:
        return raw
    return context.wrap_socket(raw, server_hostname="localhost")


def handshakeWorker(args: Tuple[Optional[Dict[str, str]], int, int]) -> int:
    """
    C{count} new connections, one request each; return how many failed.  Without
    C{certs}, plain TCP.
    """
    certs, port, count = args
    context = None if certs is None else clientContext(certs)
    failures = 0
    for _ in range(count):
        try:
            with _connect(context, port) as sock:
                sock.sendall(CLOSING_REQUEST)
                status, _ = readResponse(sock, b"")
                if status != 200:
                    failures += 1
        except (OSError, ValueError):
            failures += 1
    return failures


def resumingWorker(args: Tuple[Optional[Dict[str, str]], int, int]) -> Tuple[int, int]:
    """
    C{count} new connections, one request each, each offering the session of the
    previous one; return how many failed and how many the server resumed.
    """
    certs, port, count = args
    assert certs is not None
    context = clientContext(certs)
    failures = resumed = 0
    session = None
    for _ in range(count):
        try:
            raw = socket.create_connection(("127.0.0.1", port))
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with context.wrap_socket(raw, server_hostname="localhost", session=session) as sock:
                sock.sendall(CLOSING_REQUEST)
                status, _ = readResponse(sock, b"")
                if status != 200:
                    failures += 1
                resumed += sock.session_reused
                session = sock.session
        except (OSError, ValueError):
            failures += 1
            session = None
    return failures, resumed


def keepAliveWorker(args: Tuple[Optional[Dict[str, str]], int, int]) -> int:
    """
    C{count} requests over one connection; return how many failed.  Without C{certs},
    plain TCP.
    """
    certs, port, count = args
    context = None if certs is None else clientContext(certs)
    failures = 0
    with _connect(context, port) as sock:
        buffer = b""
        for _ in range(count):
            sock.sendall(REQUEST)
            status, buffer = readResponse(sock, buffer)
            if status != 200:
                failures += 1
    return failures


def cpuSeconds(pid: int) -> float:
    """
    User plus system CPU seconds of process C{pid}, all threads.
    """
    return cpuTicksFromStat(Path(f"/proc/{pid}/stat").read_text()) / TICKS


def measure(pool: Any, worker: Any, certs: Optional[Dict[str, str]], port: int, total: int, workers: int,
            pid: int) -> Dict[str, float]:
    """
    Run C{total} operations split over C{workers} processes; the proxy's CPU and the
    wall time around them.
    """
    share = [total // workers + (1 if i < total % workers else 0) for i in range(workers)]
    cpu0, t0 = cpuSeconds(pid), time.perf_counter()
    answers = pool.map(worker, [(certs, port, n) for n in share])
    wall, cpu = time.perf_counter() - t0, cpuSeconds(pid) - cpu0
    failures = sum(a[0] if isinstance(a, tuple) else a for a in answers)
    result = {"count": total, "failures": failures, "seconds": wall, "perSecond": total / wall,
              "cpuMicroseconds": cpu * 1e6 / total, "cpuShare": cpu / wall}
    if answers and isinstance(answers[0], tuple):
        result["resumedShare"] = sum(a[1] for a in answers) / total
    return result


def waitServing(port: int, certs: Optional[Dict[str, str]], child: Child, timeout: float = 30.0) -> None:
    """
    Poll with real mTLS requests until the peer answers 200.
    """
    deadline = time.monotonic() + timeout
    problem = "no attempt"
    while time.monotonic() < deadline:
        if not child.running():
            raise RuntimeError(f"{child.name} exited:\n{child.logTail()}")
        try:
            if handshakeWorker((certs, port, 1)) == 0:
                return
            problem = "not 200"
        except OSError as e:
            problem = str(e)
        time.sleep(0.2)
    raise RuntimeError(f"{child.name} not serving after {timeout:g} s ({problem}):\n{child.logTail()}")


#: The figures measured, by name, with what their ratio is called.
KINDS = {
    "newConnections": "CPU per new connection (full handshake)",
    "resumed": "CPU per new connection (client resumes)",
    "keepAlive": "CPU per request on an established connection",
}


def _kindsOf(certs: Optional[Dict[str, str]]) -> Tuple[str, ...]:
    """
    The figures that apply to a peer: resumption only with TLS.
    """
    return tuple(KINDS) if certs is not None else ("newConnections", "keepAlive")


def _workload(kind: str, options: Any) -> Tuple[Any, int]:
    """
    The client worker and the operation count of figure C{kind}.
    """
    if kind == "newConnections":
        return handshakeWorker, options.handshakes
    if kind == "resumed":
        return resumingWorker, options.handshakes
    return keepAliveWorker, options.requests


def _describe(kind: str, figures: Dict[str, float]) -> str:
    """
    One figure of one peer, for the console.
    """
    if kind == "keepAlive":
        text = (f"established: {figures['perSecond']:6.0f} req/s, {figures['cpuMicroseconds']:6.1f} µs CPU/request "
                f"(proxy CPU {figures['cpuShare']:4.0%})")
    else:
        text = (f"{'resumed' if kind == 'resumed' else 'new'} connections: {figures['perSecond']:5.0f}/s, "
                f"{figures['cpuMicroseconds']:6.0f} µs CPU each (proxy CPU {figures['cpuShare']:4.0%})")
        if "resumedShare" in figures:
            text += f", {figures['resumedShare']:.0%} resumed"
    if figures["failures"]:
        text += f", {figures['failures']:.0f} failed"
    return text


#: The peers: how each is started and whether its clients use mutual TLS.
PEERS = ("ours", "envoy", "ours-plain", "envoy-plain", "base")


def startPeer(name: str, directory: Path, upstream: int, certs: Dict[str, Path], cpu: Optional[int],
              baseTree: Optional[Path] = None, wrapper: Sequence[str] = ()) -> Tuple[Child, int]:
    """
    Start peer C{name} pinned to C{cpu}; return it and its port.  C{base} is C{ours}
    run from the checkout C{baseTree}; a sidecar's command is prefixed with
    C{wrapper} (valgrind, for L{countInstructions}).

    @raise LookupError: when Envoy is not installed.
    """
    port = freeLoopbackPort()
    root = Path(__file__).resolve().parent.parent
    if name == "base":
        if baseTree is None:
            raise LookupError("no --base-tree given")
        root = baseTree.resolve()
    if name.startswith("ours") or name == "base":
        argv = oursArgv(port, upstream, certs)
        if name == "ours-plain":
            argv = argv[:argv.index("--tls-cert")]
            argv[argv.index("--listen") + 1] = f"tcp:{port}:interface=127.0.0.1"
            del argv[argv.index("--tls-listen"):argv.index("--tls-listen") + 2]
        env = dict(os.environ)
        env["PYTHONPATH"] = str(root) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        return Child(name, pinned([*wrapper, *argv], cpu), directory / f"{name}.log", env, root), port
    envoyPath, found = findEnvoy()
    if envoyPath is None:
        raise LookupError(found)
    config = directory / f"{name}.json"
    admin = freeLoopbackPort()
    body = envoyMutualTLSConfig(port, admin, upstream, certs) if name == "envoy" else envoyConfig(port, admin, upstream)
    config.write_text(json.dumps(body, indent=2))
    argv = envoyCommand(envoyPath, config, ("--base-id", str(port)))
    return Child(name, pinned(argv, cpu), directory / f"{name}.log"), port


#: How many operations of each figure are counted under callgrind (C{--callgrind}).
CALLGRIND_OPERATIONS = {"newConnections": 300, "resumed": 300, "keepAlive": 3000}


def callgrindTotal(path: Path) -> int:
    """
    The instructions counted in one callgrind dump (its C{totals:} line).
    """
    match = re.search(r"^totals: (\d+)", path.read_text(errors="replace"), re.M)
    return int(match.group(1)) if match else 0


def countInstructions(child: Child, port: int, certs: Optional[Dict[str, str]], kind: str, count: int,
                      directory: Path) -> float:
    """
    User-space instructions per operation of figure C{kind} in the sidecar C{child}
    (started under C{valgrind --tool=callgrind --instr-atstart=no}): counting is
    switched on for C{count} operations of one client, then off, and the dump read.
    Deterministic within a percent or so, where the CPU figures move by ten on a
    shared machine; it does not see the kernel's share.
    """
    worker, _ = _workload(kind, argparse.Namespace(handshakes=0, requests=0))
    worker((certs, port, 20))
    before = set(directory.glob(f"callgrind.{child.name}.*"))
    subprocess.run(["callgrind_control", "-i", "on", str(child.pid)], check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    answer = worker((certs, port, count))
    subprocess.run(["callgrind_control", "-i", "off", str(child.pid)], check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    subprocess.run(["callgrind_control", "-d", str(child.pid)], check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    failures = answer[0] if isinstance(answer, tuple) else answer
    if failures:
        raise RuntimeError(f"{child.name}: {failures} of {count} {kind} operations failed under callgrind")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        dumps = set(directory.glob(f"callgrind.{child.name}.*")) - before
        total = sum(callgrindTotal(path) for path in dumps)
        if total:
            for path in dumps:
                path.unlink()
            return total / count
        time.sleep(0.5)
    raise RuntimeError(f"{child.name}: no callgrind dump")


def callgrindMain(options: Any, names: List[str], kinds: List[str]) -> int:
    """
    C{--callgrind}: instructions per operation of our sidecar (and C{base}, and
    C{ours-plain}), each in turn under callgrind, with nginx behind.
    """
    directory = Path(tempfile.mkdtemp(prefix="sidecar-tls-callgrind-"))
    children: List[Child] = []
    results: Dict[str, Dict[str, float]] = {}
    try:
        certPaths = writeCertificates(directory)
        certs = {k: str(v) for k, v in certPaths.items()}
        upstream = freeLoopbackPort()
        (directory / "nginx.conf").write_text(nginxConfig(directory, upstream, None))
        writeUpstreamFiles(directory)
        children.append(Child("nginx", nginxCommand(directory, directory / "nginx.conf"), directory / "nginx.log"))
        for name in names:
            if not (name.startswith("ours") or name == "base"):
                continue
            wrapper = ("valgrind", "--tool=callgrind", "--instr-atstart=no",
                       f"--callgrind-out-file={directory}/callgrind.{name}.%p")
            child, port = startPeer(name, directory, upstream, certPaths, None, options.base_tree, wrapper)
            children.append(child)
            clientCerts = None if name.endswith("-plain") else certs
            waitServing(port, clientCerts, child, timeout=300)
            results[name] = {}
            for kind in kinds:
                if kind in _kindsOf(clientCerts):
                    results[name][kind] = countInstructions(child, port, clientCerts, kind,
                                                            CALLGRIND_OPERATIONS[kind], directory)
            print(f"{name:12s} " + " | ".join(f"{kind} {count / 1000:8.1f}K instructions"
                                              for kind, count in results[name].items()), flush=True)
            child.stop()
    finally:
        for child in reversed(children):
            child.stop()
        shutil.rmtree(directory, ignore_errors=True)
    if "base" in results and "ours" in results:
        for kind in results["ours"]:
            if kind in results["base"]:
                print(f"ours / base, instructions per {KINDS[kind][8:]}: "
                      f"{results['ours'][kind] / results['base'][kind]:.3f}")
    if options.json:
        Path(options.json).write_text(json.dumps({"instructions": results}, indent=2))
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="Mutual-TLS benchmark: ours against Envoy.")
    parser.add_argument("--handshakes", type=int, default=2000, help="new connections per round (default 2000)")
    parser.add_argument("--requests", type=int, default=20000, help="keep-alive requests per round (default 20000)")
    parser.add_argument("--workers", type=int, default=4, help="load client processes (default 4)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds, peers interleaved in each; medians reported")
    parser.add_argument("--only", default=",".join(PEERS), help=f"peers, comma-separated (default {','.join(PEERS)})")
    parser.add_argument("--base-tree", type=Path, default=None,
                        help="another checkout whose sidecar runs as the peer 'base' (a before/after in one session)")
    parser.add_argument("--kinds", default=",".join(KINDS),
                        help=f"figures, comma-separated (default {','.join(KINDS)})")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--callgrind", action="store_true",
                        help="count our sidecar's user-space instructions per operation under callgrind instead "
                             "(peers ours, base, ours-plain; deterministic where CPU time is noisy)")
    options = parser.parse_args(argv)
    kinds = [k.strip() for k in options.kinds.split(",") if k.strip()]
    for kind in kinds:
        if kind not in KINDS:
            parser.error(f"--kinds: unknown figure {kind!r} (one of {', '.join(KINDS)})")
    names = [n.strip() for n in options.only.split(",") if n.strip()]
    if options.base_tree is not None and "base" not in names:
        names.append("base")
    for name in names:
        if name not in PEERS:
            parser.error(f"--only: unknown peer {name!r} (one of {', '.join(PEERS)})")

    if options.callgrind:
        return callgrindMain(options, names, kinds)

    usable = sorted(os.sched_getaffinity(0))
    loadCpu, proxyCpu = (usable[0], usable[1]) if len(usable) >= 2 else (None, None)
    directory = Path(tempfile.mkdtemp(prefix="sidecar-tls-bench-"))
    children: List[Child] = []
    results: Dict[str, Any] = {
        "when": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpus": f"load client and nginx on CPU {loadCpu}, the proxies on CPU {proxyCpu} (one measured at a time)",
        "handshakes": options.handshakes, "requests": options.requests, "workers": options.workers,
        "clientResumes": "only in the 'resumed' figure (each client process offers its previous session)",
        "peers": {},
    }
    try:
        certPaths = writeCertificates(directory)
        certs = {k: str(v) for k, v in certPaths.items()}
        upstream = freeLoopbackPort()
        (directory / "nginx.conf").write_text(nginxConfig(directory, upstream, None))
        writeUpstreamFiles(directory)
        children.append(Child("nginx", pinned(nginxCommand(directory, directory / "nginx.conf"), loadCpu),
                              directory / "nginx.log"))
        if loadCpu is not None:
            os.sched_setaffinity(0, {loadCpu})
        peers: Dict[str, Tuple[Child, int, Optional[Dict[str, str]]]] = {}
        for name in names:
            try:
                child, port = startPeer(name, directory, upstream, certPaths, proxyCpu, options.base_tree)
            except LookupError as e:
                print(f"{name} skipped: {e}")
                continue
            children.append(child)
            peers[name] = (child, port, None if name.endswith("-plain") else certs)
        rounds: Dict[str, List[Dict[str, Any]]] = {name: [] for name in peers}
        with multiprocessing.get_context("fork").Pool(options.workers) as pool:
            for name, (child, port, clientCerts) in peers.items():
                waitServing(port, clientCerts, child)
                for kind in kinds:
                    if kind in _kindsOf(clientCerts):
                        worker, total = _workload(kind, options)
                        measure(pool, worker, clientCerts, port, min(total // 10, 200), options.workers, child.pid)
            for _ in range(options.rounds):
                for name, (child, port, clientCerts) in peers.items():
                    figures = {}
                    for kind in kinds:
                        if kind in _kindsOf(clientCerts):
                            worker, total = _workload(kind, options)
                            figures[kind] = measure(pool, worker, clientCerts, port, total, options.workers, child.pid)
                    rounds[name].append(figures)
        for name in peers:
            fields = ("perSecond", "cpuMicroseconds", "cpuShare", "failures", "resumedShare")
            summary = {kind: {field: statistics.median(r[kind][field] for r in rounds[name])
                              for field in fields if field in rounds[name][0][kind]}
                       for kind in rounds[name][0]}
            results["peers"][name] = {"rounds": rounds[name], "median": summary}
            print(f"{name:12s} " + " | ".join(_describe(kind, figures) for kind, figures in summary.items()),
                  flush=True)
    finally:
        for child in reversed(children):
            child.stop()
        shutil.rmtree(directory, ignore_errors=True)
    found = results["peers"]
    for ours, envoy in (("ours", "envoy"), ("base", "envoy"), ("ours-plain", "envoy-plain")):
        if ours in found and envoy in found:
            for kind, label in KINDS.items():
                if kind not in found[ours]["median"] or kind not in found[envoy]["median"]:
                    continue
                ratio = (found[ours]["median"][kind]["cpuMicroseconds"]
                         / found[envoy]["median"][kind]["cpuMicroseconds"])
                print(f"{ours} / {envoy}, {label}: {ratio:.2f}")
                results[f"ratio_{ours}_{kind}"] = ratio
    print(results["cpus"])
    if options.json:
        Path(options.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
