#!/usr/bin/env python3
# -*- test-case-name: bench.test_bench -*-
"""
The opaque-TCP throughput benchmark: one long stream (1 GiB by default) through our
sidecar on a declared opaque port (C{--opaque-ports}) and through Envoy's C{tcp_proxy}
(one worker), to the same sink, interleaved round after round, with the stream straight
to the sink (C{direct}) as the upper bound.

    python3 bench/tcp_bench.py [--bytes 1073741824] [--rounds 3] [--json out.json]

The sender is this script: C{socket.sendfile} from a file in the page cache (no copy
to user space), repeated until C{--bytes} are sent, then a FIN.  The sink is a child
process (this script with C{--sink}): C{recv_into} one preallocated buffer until the
FIN, then it answers with the byte count (and, with C{--verify}, the stream's
SHA-256) and closes.  The time runs from the connect until that answer, so every byte
has gone through.  Sender and sink share the load CPU, the proxy runs alone on the
other; C{direct} shows what the sender and sink can do without a proxy, so that a
proxy's figure well below it is the proxy's own limit.

Per peer, the median over rounds of: MB/s (10^6 bytes per second), the proxy's CPU
microseconds per MB (C{utime + stime} of its PID from C{/proc}, all threads) and its CPU
share of one core.  Every process is ended by its PID; traffic goes to 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import shlex
import shutil
import socket
import statistics
import struct
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from attrs import frozen

from bench.peers import envoyCommand, envoyTcpConfig, findEnvoy, oursCommand
from bench.processes import Child, freeLoopbackPort, pinned

REPOSITORY_ROOT = Path(__file__).resolve().parent.parent
TICKS_PER_SECOND = os.sysconf("SC_CLK_TCK")

#: The default stream: 1 GiB.
DEFAULT_BYTES = 1 << 30

#: The file the sender sends again and again (kept in the page cache).
CHUNK_BYTES = 16 << 20

#: The sink's receive buffer.
SINK_BUFFER_BYTES = 1 << 20

#: The sink's answer: the byte count, then 32 bytes of SHA-256 (zeros without --verify).
ANSWER = struct.Struct("!Q32s")

#: The peers, in running order within a round.
PEERS = ("direct", "envoy", "ours")

#: Longest a transfer or a readiness wait may take, in seconds.
TRANSFER_TIMEOUT_SECONDS = 300.0
READY_TIMEOUT_SECONDS = 30.0


# -- the sink (a child process) ---------------------------------------------------------


def serveSink(port: int, verify: bool) -> None:
    """
    Accept connections on 127.0.0.1:C{port} one at a time; read each to its FIN into
    one preallocated buffer; answer with L{ANSWER} and close.

    @param port: where to listen.
    @param verify: whether to hash what arrives (slower; for byte-exact checks).
    """
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", port))
    listener.listen(16)
    buffer = bytearray(SINK_BUFFER_BYTES)
    view = memoryview(buffer)
    while True:
        connection, _ = listener.accept()
        with connection:
            digest = hashlib.sha256() if verify else None
            total = 0
            recvInto = connection.recv_into
            while True:
                n = recvInto(buffer)
                if not n:
                    break
                total += n
                if digest is not None:
                    digest.update(view[:n])
            connection.sendall(ANSWER.pack(total, digest.digest() if digest else bytes(32)))


# -- the sender ---------------------------------------------------------------------------


def writeChunk(path: Path, size: int = CHUNK_BYTES) -> None:
    """
    Write the file the sender sends: C{size} bytes of a repeating non-zero pattern (so
    that a byte out of place changes the hash).
    """
    pattern = bytes(range(251)) * (size // 251 + 1)
    path.write_bytes(pattern[:size])


def expectedDigest(path: Path, total: int) -> bytes:
    """
    The SHA-256 of C{total} bytes of the file sent over and over.
    """
    chunk = path.read_bytes()
    digest = hashlib.sha256()
    left = total
    while left:
        part = chunk[: min(left, len(chunk))]
        digest.update(part)
        left -= len(part)
    return digest.digest()


@frozen
class Transfer:
    """
    One stream's outcome.

    @ivar seconds: from the connect until the sink's answer.
    @ivar received: the bytes the sink counted.
    @ivar digest: what the sink hashed (zeros when not verifying).
    """

    seconds: float
    received: int
    digest: bytes


def transfer(port: int, chunkPath: Path, total: int, timeout: float = TRANSFER_TIMEOUT_SECONDS) -> Transfer:
    """
    Send C{total} bytes to 127.0.0.1:C{port} with C{sendfile}, then a FIN, and wait for
    the sink's answer.

    @raise OSError: on a connection failure or timeout, or a short answer.
    """
    began = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock, open(chunkPath, "rb") as chunk:
        size = os.fstat(chunk.fileno()).st_size
        left = total
        while left:
            left -= sock.sendfile(chunk, 0, min(left, size))
        sock.shutdown(socket.SHUT_WR)
        answer = b""
        while len(answer) < ANSWER.size:
            data = sock.recv(ANSWER.size - len(answer))
            if not data:
                raise OSError(f"the stream ended after {len(answer)} bytes of the sink's answer")
            answer += data
    seconds = time.perf_counter() - began
    received, digest = ANSWER.unpack(answer)
    return Transfer(seconds, received, digest)


# -- figures ------------------------------------------------------------------------------


@frozen
class Figure:
    """
    One peer's stream in one round.

    @ivar megabytesPerSecond: 10^6 bytes per second.
    @ivar cpuMicrosecondsPerMegabyte: the proxy's CPU per 10^6 bytes (L{None} for direct).
    @ivar cpuShare: the proxy's CPU time over the wall time (1.0 = one core busy).
    """

    peer: str
    bytes: int
    seconds: float
    megabytesPerSecond: float
    cpuMicrosecondsPerMegabyte: Optional[float]
    cpuShare: Optional[float]


def figureFrom(peer: str, total: int, seconds: float, ticks: Optional[int],
               ticksPerSecond: int = TICKS_PER_SECOND) -> Figure:
    """
    Turn one transfer's size, time and the proxy's CPU ticks into a L{Figure}.
    """
    megabytes = total / 1e6
    if ticks is None:
        return Figure(peer, total, seconds, megabytes / seconds, None, None)
    cpu = ticks / ticksPerSecond
    return Figure(peer, total, seconds, megabytes / seconds, cpu * 1e6 / megabytes, cpu / seconds)


def medianFigure(figures: Sequence[Figure]) -> Figure:
    """
    The median of each number over rounds.
    """

    def median(values: List[Optional[float]]) -> Optional[float]:
        known = [v for v in values if v is not None]
        return statistics.median(known) if known else None

    return Figure(
        figures[0].peer,
        figures[0].bytes,
        statistics.median(f.seconds for f in figures),
        statistics.median(f.megabytesPerSecond for f in figures),
        median([f.cpuMicrosecondsPerMegabyte for f in figures]),
        median([f.cpuShare for f in figures]),
    )


def renderReport(medians: Dict[str, Figure], rounds: int, total: int, notes: Sequence[str]) -> str:
    """
    The markdown table of the medians and the ratios of ours to Envoy.
    """

    def number(value: Optional[float], fmt: str) -> str:
        return "-" if value is None else format(value, fmt)

    lines = [
        "## opaque TCP throughput",
        "",
        f"{total / (1 << 20):g} MiB per stream, {rounds} round(s) interleaved, medians; {'; '.join(notes)}.",
        "",
        "| peer | MB/s | proxy CPU µs/MB | proxy CPU % |",
        "| --- | ---: | ---: | ---: |",
    ]
    for name, figure in medians.items():
        share = None if figure.cpuShare is None else figure.cpuShare * 100
        lines.append(f"| {name} | {figure.megabytesPerSecond:,.0f} |"
                     f" {number(figure.cpuMicrosecondsPerMegabyte, ',.0f')} | {number(share, '.0f')} |")
    envoy = medians.get("envoy")
    for name, figure in medians.items():
        if not name.startswith("ours") or envoy is None:
            continue
        speed = figure.megabytesPerSecond / envoy.megabytesPerSecond
        verdict = "met" if speed >= 0.8 else "not met"
        lines += ["", f"{name} ÷ envoy, MB/s: {speed:.2f} (target ≥ 0.8: {verdict})"]
        if figure.cpuMicrosecondsPerMegabyte and envoy.cpuMicrosecondsPerMegabyte:
            cost = figure.cpuMicrosecondsPerMegabyte / envoy.cpuMicrosecondsPerMegabyte
            lines.append(f"{name} ÷ envoy, CPU per MB: {cost:.2f}")
    return "\n".join(lines) + "\n"


# -- the session --------------------------------------------------------------------------


class Session:
    """
    The sink, the proxies (started once, each alone on the proxy CPU while measured),
    and the rounds.

    @ivar ports: the port the sender connects to, per peer.
    @ivar children: the processes started, by peer name (and C{sink}).
    @ivar figures: every round's figure, per peer.
    """

    def __init__(self, directory: Path, peers: Sequence[str], variants: Dict[str, List[str]],
                 roots: Dict[str, Path], verify: bool = False) -> None:
        usable = sorted(os.sched_getaffinity(0))
        self.loadCpu, self.proxyCpu = (usable[0], usable[1]) if len(usable) >= 2 else (None, None)
        self.layout = (f"sender and sink on CPU {self.loadCpu}, the proxy alone on CPU {self.proxyCpu}"
                       if self.loadCpu is not None else "fewer than two CPUs: nothing pinned")
        self.directory = directory.resolve()
        self.peers = list(peers)
        self.variants = variants
        self.roots = roots
        self.verify = verify
        self.children: Dict[str, Child] = {}
        self.ports: Dict[str, int] = {}
        self.figures: Dict[str, List[Figure]] = {}
        self.chunk = directory / "chunk"
        self.sinkPort = 0

    def start(self) -> None:
        """
        Write the chunk, start the sink and every proxy, and check each passes a stream
        byte for byte.

        @raise RuntimeError: when something does not start or passes the wrong bytes.
        """
        writeChunk(self.chunk)
        self.sinkPort = freeLoopbackPort()
        argv = [sys.executable, str(Path(__file__).resolve()), "--sink", str(self.sinkPort)]
        if self.verify:
            argv.append("--verify")
        self.children["sink"] = Child("sink", pinned(argv, self.loadCpu), self.directory / "sink.log")
        self.ports["direct"] = self.sinkPort
        self._waitServing("direct")
        for name in self.peers:
            if name == "direct":
                continue
            port = freeLoopbackPort()
            environment = None
            if name == "envoy":
                envoyPath, found = findEnvoy()
                if envoyPath is None:
                    raise RuntimeError(f"envoy: {found}")
                config = self.directory / "envoy.json"
                config.write_text(json.dumps(envoyTcpConfig(port, freeLoopbackPort(), self.sinkPort), indent=2))
                argv = envoyCommand(envoyPath, config, ("--base-id", str(port)))
            else:
                root = self.roots.get(name, REPOSITORY_ROOT)
                argv = oursCommand(sys.executable, port, self.sinkPort,
                                   ["--opaque-ports", str(port), *self.variants.get(name, [])])
                paths = [str(root), os.environ.get("PYTHONPATH", "")]
                environment = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, paths)))
            # python -m puts the current directory first on sys.path: run in the checkout.
            self.children[name] = Child(name, pinned(argv, self.proxyCpu), self.directory / f"{name}.log",
                                        environment, self.roots.get(name, REPOSITORY_ROOT))
            self.ports[name] = port
            self._waitServing(name)

    def _waitServing(self, name: str) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_SECONDS
        probe = 1 << 20
        problem = "no attempt"
        while time.monotonic() < deadline:
            child = self.children.get(name if name != "direct" else "sink")
            if child is not None and not child.running():
                raise RuntimeError(f"{name} exited:\n{child.logTail()}")
            try:
                outcome = transfer(self.ports[name], self.chunk, probe, timeout=5.0)
            except OSError as error:
                problem = str(error)
                time.sleep(0.1)
                continue
            if outcome.received != probe:
                raise RuntimeError(f"{name} passed {outcome.received} bytes of {probe}")
            return
        command = "" if child is None else f"\n    command: {shlex.join(child.argv)}\n{child.logTail()}"
        raise RuntimeError(f"{name} not passing a stream after {READY_TIMEOUT_SECONDS:g} s ({problem}){command}")

    def measure(self, name: str, total: int) -> Figure:
        """
        Stream C{total} bytes through one peer, check the count (and the hash when
        verifying), and record the figure.

        @raise RuntimeError: when the sink did not get exactly what was sent.
        """
        child = None if name == "direct" else self.children[name]
        before = child.cpuTicks() if child is not None else None
        outcome = transfer(self.ports[name], self.chunk, total)
        ticks = child.cpuTicks() - before if child is not None and before is not None else None
        if outcome.received != total:
            raise RuntimeError(f"{name}: the sink got {outcome.received} bytes of {total}")
        if self.verify and outcome.digest != expectedDigest(self.chunk, total):
            raise RuntimeError(f"{name}: the sink got {total} bytes, but not the bytes sent")
        figure = figureFrom(name, total, outcome.seconds, ticks)
        self.figures.setdefault(name, []).append(figure)
        return figure

    def run(self, total: int, rounds: int, warmup: int, say=lambda text: None) -> Dict[str, Figure]:
        """
        A warm-up stream through each peer, then C{rounds} rounds of every peer in
        turn (A B A B); the medians.
        """
        for name in self.peers:
            if warmup:
                transfer(self.ports[name], self.chunk, warmup)
        for number in range(1, rounds + 1):
            for name in self.peers:
                figure = self.measure(name, total)
                cpu = ("" if figure.cpuMicrosecondsPerMegabyte is None else
                       f", {figure.cpuMicrosecondsPerMegabyte:,.0f} CPU µs/MB ({figure.cpuShare:.0%} of a core)")
                say(f"[round {number}/{rounds}] {name}: {figure.megabytesPerSecond:,.0f} MB/s{cpu}")
        return {name: medianFigure(self.figures[name]) for name in self.peers}

    def stop(self) -> None:
        """
        Stop every process started, newest first, by PID.
        """
        for name in reversed(list(self.children)):
            self.children.pop(name).stop()


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="Opaque TCP throughput: the sidecar against Envoy's tcp_proxy.")
    parser.add_argument("--bytes", type=int, default=DEFAULT_BYTES, help="bytes per stream (default 1 GiB)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds, peers interleaved in each (default 3)")
    parser.add_argument("--warmup", type=int, default=64 << 20, help="bytes of one unmeasured stream per peer")
    parser.add_argument("--only", default=",".join(PEERS), help=f"peers (default {','.join(PEERS)})")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=ARGS",
                        help="add peer ours-NAME: ours with ARGS appended (repeatable)")
    parser.add_argument("--root", action="append", default=[], metavar="NAME=DIR",
                        help="add peer ours-NAME: ours imported from another checkout DIR (e.g. a"
                             " git worktree of an older commit), to price a change in one session")
    parser.add_argument("--verify", action="store_true", help="the sink hashes the stream; check every byte")
    parser.add_argument("--json", default=None, help="also write every figure here")
    parser.add_argument("--sink", type=int, default=None, help=argparse.SUPPRESS)
    options = parser.parse_args(argv)
    if options.sink is not None:
        serveSink(options.sink, options.verify)
        return 0
    if options.bytes < 1 or options.rounds < 1:
        parser.error("--bytes and --rounds must be at least 1")
    peers = [name.strip() for name in options.only.split(",") if name.strip()]
    for name in peers:
        if name not in PEERS:
            parser.error(f"--only: unknown peer {name!r} (one of {', '.join(PEERS)})")
    variants: Dict[str, List[str]] = {}
    roots: Dict[str, Path] = {}
    for text in options.variant:
        name, equals, arguments = text.partition("=")
        if not equals or not name.strip():
            parser.error(f"--variant {text!r} must look like NAME='--flag value'")
        variants[f"ours-{name.strip()}"] = shlex.split(arguments)
    for text in options.root:
        name, equals, directory = text.partition("=")
        if not equals or not (Path(directory) / "sidecar" / "tap.py").exists():
            parser.error(f"--root {text!r} must look like NAME=DIR with DIR a checkout of the sidecar")
        roots[f"ours-{name.strip()}"] = Path(directory).resolve()
    peers += [name for name in [*variants, *roots] if name not in peers]

    directory = Path(tempfile.mkdtemp(prefix="sidecar-tcp-bench-"))
    session = Session(directory, peers, variants, roots, options.verify)
    loadBefore = os.getloadavg()
    try:
        if session.loadCpu is not None:
            os.sched_setaffinity(0, {session.loadCpu})
        session.start()
        medians = session.run(options.bytes, options.rounds, options.warmup,
                              say=lambda text: print(text, file=sys.stderr, flush=True))
    except RuntimeError as error:
        print(f"tcp_bench: {error}", file=sys.stderr)
        return 1
    finally:
        session.stop()
        shutil.rmtree(directory, ignore_errors=True)
    loadAfter = os.getloadavg()
    notes = [session.layout,
             f"load average {loadBefore[0]:.1f} before, {loadAfter[0]:.1f} after on {os.cpu_count()} CPUs"]
    print(renderReport(medians, options.rounds, options.bytes, notes))
    if options.json:
        Path(options.json).write_text(json.dumps({
            "when": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "notes": notes,
            "bytes": options.bytes,
            "rounds": {name: [_asdict(f) for f in figures]
                       for name, figures in session.figures.items()},
            "medians": {name: _asdict(figure) for name, figure in medians.items()},
        }, indent=2))
    return 0


def _asdict(figure: Figure) -> dict:
    import attrs

    return attrs.asdict(figure)


if __name__ == "__main__":
    sys.exit(main())
