#!/usr/bin/env python3
# -*- test-case-name: bench.test_bench -*-
"""
The project's benchmark: the same nginx upstream behind no proxy, the stock
twisted.web proxy, Envoy and our two front doors, loaded by the same wrk in one
session, with the ratios between them.

    python3 bench/run.py [--duration 6] [--only envoy,ours-fast] [--json out.json]

See C{bench/README.md} for what each column means and how to read the ratios.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Mapping, Sequence

if __package__ in (None, ""):
    # Run as a script (python3 bench/run.py): make the bench package importable.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import attrs

from bench.measure import WORKLOADS, Measurement, measurementFrom, medianOf
from bench.peers import (
    flagsKnownBy,
    BUILTIN_PEER_NAMES,
    ECHO_MODULE,
    Peer,
    builtinPeers,
    envoyCommand,
    findEnvoy,
    haproxyConfig,
    nginxProxyConfig,
    nginxCommand,
    nginxConfig,
    oursCommand,
    stockCommand,
    variantPeer,
    writeEnvoyConfig,
    writeUpstreamFiles,
)
from bench.processes import (
    Child,
    WrkFailed,
    checkEveryWorkload,
    freeLoopbackPort,
    pinned,
    runWrk,
    waitUntilServing,
)
from bench.report import (
    TARGETS,
    evaluate,
    renderRatios,
    renderSkipped,
    renderTable,
    variantTargets,
)

BENCH_DIRECTORY = Path(__file__).resolve().parent
REPOSITORY_ROOT = BENCH_DIRECTORY.parent

#: Programs the benchmark cannot run without.
REQUIRED_PROGRAMS = ("wrk", "nginx", "taskset")


class PeerUnavailable(Exception):
    """
    A peer could not be started or did not serve correctly; the run goes on without it.
    """


def commaList(text: str) -> list[str]:
    """
    Split C{"a,b , c"} into C{["a", "b", "c"]}.

    @param text: the option's value.
    @return: the names, without blanks.
    """
    return [part.strip() for part in text.split(",") if part.strip()]


def parseArguments(argv: Sequence[str]) -> argparse.Namespace:
    """
    Read and check the command line; variants become peers in C{options.peers}.

    @param argv: the arguments, without the program name.
    @return: the options.
    """
    parser = argparse.ArgumentParser(
        description=(
            "Benchmark: no proxy, stock twisted.web proxy, Envoy and the sidecar's two"
            " front doors in front of the same nginx, loaded by wrk."
        ),
        epilog="Example: python3 bench/run.py --duration 3 --only direct,envoy,ours-fast",
    )
    parser.add_argument(
        "--duration", type=int, default=6, help="seconds of load per cell (default 6)"
    )
    parser.add_argument(
        "--warmup",
        type=int,
        default=1,
        help="seconds of unmeasured load before each cell; 0 for none (default 1)",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run every peer this many times, interleaved; report medians (default 1)",
    )
    parser.add_argument(
        "--only",
        type=commaList,
        default=None,
        metavar="PEER[,PEER]",
        help="run only these of the built-in peers (default: all): "
        + ", ".join(BUILTIN_PEER_NAMES)
        + "; variants always run",
    )
    parser.add_argument(
        "--workloads",
        type=commaList,
        default=list(WORKLOADS),
        metavar="NAME[,NAME]",
        help="workloads to run (default: " + ",".join(WORKLOADS) + ")",
    )
    parser.add_argument(
        "--connections",
        type=lambda text: [int(part) for part in commaList(text)],
        default=[16],
        metavar="N[,N]",
        help="wrk connections, -c (default 16); several (e.g. 16,256,1000) make a sweep:"
        " every workload at the first, the --sweep-workloads at the others",
    )
    parser.add_argument(
        "--sweep-workloads",
        type=commaList,
        default=["small"],
        metavar="NAME[,NAME]",
        help="workloads run at the connection counts after the first (default: small)",
    )
    parser.add_argument(
        "--chart",
        type=Path,
        default=None,
        metavar="FILE.png",
        help="also draw the results as a PNG chart (needs matplotlib)",
    )
    parser.add_argument("--threads", type=int, default=1, help="wrk threads, -t (default 1)")
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME=ARGS",
        help="add peer ours-NAME: ours-fast with ARGS appended (repeatable), e.g."
        " --variant metrics-on='--admin tcp:0'",
    )
    parser.add_argument(
        "--baseline",
        type=Path,
        default=None,
        metavar="DIR",
        help="add peer ours-base: the fast door of the sidecar in another checkout DIR"
        " (e.g. a git worktree of the commit before a change), in the same session",
    )
    parser.add_argument(
        "--extra-args",
        action="append",
        default=[],
        metavar="PEER:ARGS",
        help="append ARGS to PEER's command line (repeatable); PEER 'ours' means every"
        " peer of ours, e.g. --extra-args 'ours:--max-connections 100'",
    )
    parser.add_argument(
        "--ready-timeout",
        type=float,
        default=30.0,
        help="seconds a peer gets to serve its first correct answer (default 30)",
    )
    parser.add_argument(
        "--no-check",
        action="store_true",
        help="measure a peer even if its answers to the probe requests are wrong"
        " (wrk's error column still counts failures under load)",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write results here")
    parser.add_argument(
        "--keep-temp",
        action="store_true",
        help="keep the temporary directory (configs and every process's log)",
    )
    parser.add_argument("--verbose", action="store_true", help="print wrk's own output")
    options = parser.parse_args(argv)

    for name in ("duration", "rounds", "threads"):
        if getattr(options, name) < 1:
            parser.error(f"--{name} must be at least 1")
    if not options.connections or min(options.connections) < 1:
        parser.error("--connections must be at least 1")
    if options.warmup < 0:
        parser.error("--warmup must not be negative")
    if min(options.connections) < options.threads:
        parser.error("--connections must be at least --threads (wrk needs one per thread)")
    unknown = [name for name in options.workloads if name not in WORKLOADS]
    if unknown or not options.workloads:
        parser.error(
            f"unknown workload(s) {', '.join(unknown) or '(none given)'};"
            f" choose from {', '.join(WORKLOADS)}"
        )

    peers = builtinPeers()
    for text in options.variant:
        name, equals, arguments = text.partition("=")
        if not equals:
            parser.error(f"--variant {text!r} must look like NAME='--flag value'")
        try:
            peers.append(variantPeer(name.strip(), shlex.split(arguments)))
        except ValueError as error:
            parser.error(str(error))
        if sum(peer.name == f"ours-{name.strip()}" for peer in peers) > 1:
            parser.error(f"--variant {name.strip()!r} given twice")

    if options.baseline is not None:
        if not (options.baseline / "sidecar" / "tap.py").exists():
            parser.error(f"--baseline {options.baseline}: no sidecar/tap.py there")
        peers.append(Peer("ours-base", "ours", (), f"sidecar from {options.baseline}",
                          str(options.baseline.resolve())))

    names = [peer.name for peer in peers]
    for text in options.extra_args:
        target, colon, arguments = text.partition(":")
        target = target.strip()
        if not colon or (target not in names and target != "ours"):
            parser.error(
                f"--extra-args {text!r} must look like PEER:'--flag value' with PEER one"
                f" of ours, {', '.join(names)}"
            )
        extra = shlex.split(arguments)
        peers = [
            peer.withMoreArguments(extra)
            if peer.name == target or (target == "ours" and peer.kind == "ours")
            else peer
            for peer in peers
        ]

    if options.only is not None:
        unknown = [name for name in options.only if name not in names]
        if unknown or not options.only:
            parser.error(
                f"unknown peer(s) {', '.join(unknown) or '(none given)'};"
                f" choose from {', '.join(names)}"
            )
        # A variant is declared to be run: --only chooses among the other peers.
        peers = [
            peer
            for peer in peers
            if peer.name in options.only or peer.name not in BUILTIN_PEER_NAMES
        ]
    options.peers = peers
    return options


def chooseCpus() -> tuple[int | None, int | None, str]:
    """
    Pick a CPU for the load side (wrk, nginx, this script) and one for the proxy.

    @return: the load CPU, the proxy CPU (both L{None} when fewer than two are usable)
        and the layout in words.
    """
    usable = sorted(os.sched_getaffinity(0))
    if len(usable) < 2:
        return None, None, "fewer than two CPUs usable: nothing pinned"
    load, proxy = usable[0], usable[1]
    return load, proxy, f"wrk and nginx on CPU {load}, the proxy alone on CPU {proxy}"


def commandVersion(argv: Sequence[str]) -> str:
    """
    The first line a program prints about its version, for the record.

    @param argv: the command that prints it.
    @return: the line, or C{"unknown"}.
    """
    try:
        completed = subprocess.run(
            list(argv), capture_output=True, text=True, timeout=20, stdin=subprocess.DEVNULL
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    lines = (completed.stdout + completed.stderr).strip().splitlines()
    return lines[0].strip() if lines else "unknown"


class Session:
    """
    One run of the benchmark: the upstream, then each peer in turn, alone on its CPU.

    @ivar options: the parsed command line.
    @ivar directory: the temporary directory for configs and logs.
    @ivar rounds: every measurement, keyed by C{(peer, workload)}, one per round.
    @ivar skipped: why each peer that could not run did not.
    @ivar notes: remarks for the report (pinning, upstream behaviour).
    """

    def __init__(self, options: argparse.Namespace, directory: Path) -> None:
        self.options = options
        self.directory = directory
        self.loadCpu, self.proxyCpu, layout = chooseCpus()
        self.notes: list[str] = [layout]
        self.rounds: dict[tuple[str, str], list[Measurement]] = {}
        self.skipped: dict[str, str] = {}
        self.upstreamPort = 0
        self._children: list[Child] = []
        self._upstream: Child | None = None
        self.ticksPerSecond = os.sysconf("SC_CLK_TCK")
        self.envoyPath, self.envoySource = findEnvoy()

    def say(self, message: str) -> None:
        """
        Report progress on standard error; the results go to standard output.
        """
        print(message, file=sys.stderr, flush=True)

    def start(
        self,
        name: str,
        argv: Sequence[str],
        cpu: int | None,
        environment: Mapping[str, str] | None = None,
    ) -> Child:
        """
        Start a process of ours, pinned, and remember it so that it is stopped.

        @param name: the log file's stem and the name in messages.
        @param argv: the command.
        @param cpu: the CPU to pin it to.
        @param environment: its environment; ours when L{None}.
        @return: the child.
        """
        # In the temporary directory: C{python -m} puts the current directory first on
        # the path, which would shadow the checkout a peer of ours runs from.
        child = Child(name, pinned(argv, cpu), self.directory / f"{name}.log", environment,
                      workingDirectory=self.directory)
        self._children.append(child)
        return child

    def stop(self, child: Child) -> None:
        """
        Stop one process of ours by its PID.
        """
        if child in self._children:
            self._children.remove(child)
        child.stop()

    def stopAll(self) -> None:
        """
        Stop every process of ours still running, newest first.
        """
        while self._children:
            self.stop(self._children[-1])

    def startUpstream(self) -> None:
        """
        Start nginx on the load CPU and wait for it to serve every workload.

        @raise PeerUnavailable: when it does not.
        """
        writeUpstreamFiles(self.directory)
        echo = ECHO_MODULE if ECHO_MODULE.exists() else None
        if echo is None:
            self.notes.append(
                "nginx echo module missing (apt-get install libnginx-mod-http-echo):"
                " POST /post answers without reading the body first"
            )
        else:
            self.notes.append("nginx reads each 64 KiB POST body in full before answering")
        self.upstreamPort = freeLoopbackPort()
        config = self.directory / "nginx.conf"
        config.write_text(nginxConfig(self.directory, self.upstreamPort, echo))
        child = self.start("nginx", nginxCommand(self.directory, config), self.loadCpu)
        self._upstream = child
        problem = waitUntilServing(
            self.upstreamPort, WORKLOADS["small"], child, self.options.ready_timeout
        ) or checkEveryWorkload(self.upstreamPort, list(WORKLOADS.values()))
        if problem is not None:
            raise PeerUnavailable(f"nginx: {problem}\n{child.logTail()}")

    def loadTicks(self) -> int | None:
        """
        The CPU time so far of the load side: the upstream nginx (master and worker)
        and the children this script has waited for (wrk, once each run ends), in
        clock ticks.
        """
        import resource

        upstream = self._upstream
        try:
            nginx = upstream.cpuTicks() if upstream is not None else 0
        except OSError:
            return None
        waited = resource.getrusage(resource.RUSAGE_CHILDREN)
        return nginx + round((waited.ru_utime + waited.ru_stime) * self.ticksPerSecond)

    def peerCpu(self, peer: Peer) -> int | None:
        """
        The CPU a peer runs on: the proxy's, except for our C{--workers N} with N above
        1, which runs unpinned (its workers share the load CPU with wrk and nginx).
        """
        arguments = list(peer.arguments)
        if "--workers" in arguments:
            index = len(arguments) - 1 - arguments[::-1].index("--workers")
            value = arguments[index + 1] if index + 1 < len(arguments) else "1"
            if value != "1":
                note = f"{peer.name} runs unpinned: its workers share CPU {self.loadCpu} with wrk and nginx"
                if note not in self.notes:
                    self.notes.append(note)
                return None
        return self.proxyCpu

    def startPeer(self, peer: Peer) -> tuple[int, Child | None]:
        """
        Start one peer on the proxy CPU and wait until it proxies every workload right.

        @param peer: the peer.
        @return: the port wrk should load and the peer's process (L{None} for C{direct}).
        @raise PeerUnavailable: when it cannot start or does not serve correctly.
        """
        if peer.kind == "direct":
            return self.upstreamPort, None
        port = freeLoopbackPort()
        environment = None
        hint = ""
        if peer.kind == "stock":
            argv = stockCommand(
                sys.executable,
                BENCH_DIRECTORY / "stock_proxy.py",
                port,
                self.upstreamPort,
                peer.arguments,
            )
        elif peer.kind == "nginx":
            prefix = self.directory / peer.name
            prefix.mkdir(exist_ok=True)
            config = prefix / "nginx.conf"
            config.write_text(nginxProxyConfig(prefix, port, self.upstreamPort))
            argv = nginxCommand(prefix, config) + list(peer.arguments)
        elif peer.kind == "haproxy":
            if shutil.which("haproxy") is None:
                raise PeerUnavailable("no haproxy binary: apt-get install haproxy")
            config = self.directory / "haproxy.cfg"
            config.write_text(haproxyConfig(port, self.upstreamPort))
            argv = ["haproxy", "-db", "-f", str(config), *peer.arguments]
        elif peer.kind == "envoy":
            if self.envoyPath is None:
                raise PeerUnavailable(self.envoySource)
            config = self.directory / "envoy.json"
            writeEnvoyConfig(config, port, freeLoopbackPort(), self.upstreamPort)
            argv = envoyCommand(self.envoyPath, config, peer.arguments)
        elif peer.kind == "ours":
            argv = oursCommand(sys.executable, port, self.upstreamPort, peer.arguments)
            if peer.root is not None:
                argv = flagsKnownBy(peer.root, argv)
            paths = [peer.root or str(REPOSITORY_ROOT), os.environ.get("PYTHONPATH", "")]
            environment = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, paths)))
            if not (REPOSITORY_ROOT / "sidecar" / "tap.py").exists():
                hint = " (sidecar/tap.py does not exist yet in this checkout)"
        else:
            raise PeerUnavailable(f"unknown kind of peer {peer.kind!r}")
        try:
            child = self.start(peer.name, argv, self.peerCpu(peer), environment=environment)
        except OSError as error:
            raise PeerUnavailable(f"could not start {argv[0]}: {error}") from error
        problem = waitUntilServing(port, WORKLOADS["small"], child, self.options.ready_timeout)
        if problem is None and not self.options.no_check:
            problem = checkEveryWorkload(
                port, [WORKLOADS[name] for name in self.options.workloads]
            )
        if problem is not None:
            tail = child.logTail()
            self.stop(child)
            raise PeerUnavailable(
                f"{problem}{hint}\n    command: {shlex.join(argv)}\n{tail}"
            )
        return port, child

    def measurePeer(self, peer: Peer, roundNumber: int) -> None:
        """
        Start a peer, load it with each workload, stop it; a peer that fails is skipped
        for the rest of the session, with the reason.

        @param peer: the peer.
        @param roundNumber: which round this is, from 1, for messages.
        """
        options = self.options
        prefix = f"[round {roundNumber}/{options.rounds}] {peer.name}"
        try:
            port, child = self.startPeer(peer)
        except PeerUnavailable as reason:
            self.skipped[peer.name] = str(reason)
            self.say(f"{prefix}: skipped: {reason}")
            return
        try:
            for name in options.workloads:
                workload = WORKLOADS[name]
                load = (options.connections, options.threads, self.loadCpu)
                if options.warmup:
                    runWrk(port, workload, options.warmup, *load)
                before = child.cpuTicks() if child is not None else None
                loadBefore = self.loadTicks()
                began = time.monotonic()
                summary, output = runWrk(port, workload, options.duration, *load)
                after = child.cpuTicks() if child is not None else None
                loadAfter = self.loadTicks()
                window = time.monotonic() - began
                if options.verbose:
                    self.say(output.rstrip())
                ticks = None if before is None or after is None else after - before
                cell = measurementFrom(
                    peer.name, name, summary, ticks, self.ticksPerSecond, window,
                    None if loadBefore is None or loadAfter is None else loadAfter - loadBefore,
                )
                self.rounds.setdefault((peer.name, name), []).append(cell)
                cpu = (
                    ""
                    if cell.cpuMicrosecondsPerRequest is None
                    else f", {cell.cpuMicrosecondsPerRequest:.1f} CPU µs/req"
                )
                self.say(
                    f"{prefix} {name}: {cell.requestsPerSecond:,.0f} req/s,"
                    f" p99 {cell.p99Milliseconds:.2f} ms{cpu}, {cell.errors} errors"
                )
                if child is not None and not child.running():
                    raise PeerUnavailable(
                        f"exited with status {child.process.returncode} under load\n"
                        f"{child.logTail()}"
                    )
        except (PeerUnavailable, WrkFailed, OSError) as reason:
            self.skipped[peer.name] = f"failed during {prefix}: {reason}"
            self.say(f"{prefix}: stopped: {reason}")
        finally:
            if child is not None:
                self.stop(child)

    def run(self) -> None:
        """
        Start the upstream, then run every peer, round after round.

        @raise PeerUnavailable: when the upstream cannot run.
        """
        self.say(f"logs and configs in {self.directory}")
        self.startUpstream()
        self.say(f"nginx serving on 127.0.0.1:{self.upstreamPort}; {self.notes[0]}")
        for roundNumber in range(1, self.options.rounds + 1):
            for peer in self.options.peers:
                if peer.name not in self.skipped:
                    self.measurePeer(peer, roundNumber)

    def results(self) -> dict[tuple[str, str], Measurement]:
        """
        One figure per cell: the median over rounds, of peers that completed them all.
        """
        return {
            key: medianOf(cells)
            for key, cells in self.rounds.items()
            if key[0] not in self.skipped
        }

    def environmentFacts(self) -> dict[str, object]:
        """
        What the run ran on, for the JSON record.
        """
        import twisted

        try:
            commit = subprocess.run(
                ["git", "-C", str(REPOSITORY_ROOT), "rev-parse", "--short", "HEAD"],
                capture_output=True, text=True, timeout=10,
            ).stdout.strip() or None
        except (OSError, subprocess.TimeoutExpired):
            commit = None
        return {
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "commit": commit,
            "python": platform.python_version(),
            "twisted": twisted.__version__,
            "nginx": commandVersion(["nginx", "-v"]),
            "wrk": commandVersion(["wrk", "-v"]),
            "envoy": commandVersion([self.envoyPath, "--version"]) if self.envoyPath else None,
            "envoyFoundBy": self.envoySource,
            "kernel": platform.release(),
            "cpus": os.cpu_count(),
            "loadAverage": os.getloadavg(),
            "notes": self.notes,
        }


def renderReport(session: Session, results: dict[tuple[str, str], Measurement]) -> tuple[str, list]:
    """
    The whole markdown report and the evaluated ratios.

    @param session: the finished session.
    @param results: its figures.
    @return: the markdown and the ratio outcomes.
    """
    options = session.options
    peerNames = [peer.name for peer in options.peers]
    variants = [peer.name for peer in options.peers if peer.name not in BUILTIN_PEER_NAMES]
    # Ratios between peers or workloads left out by --only / --workloads are not shown;
    # those of a peer that failed are, as n/a with the reason.
    targets = [
        target
        for target in TARGETS
        if target.numeratorPeer in peerNames
        and target.denominatorPeer in peerNames
        and target.workload in options.workloads
    ]
    if "ours-fast" in peerNames:
        targets += variantTargets(variants, options.workloads)
    outcomes = [evaluate(target, results) for target in targets]
    parts = [
        "## sidecar benchmark",
        "",
        f"wrk -t{options.threads} -c{options.connections} keep-alive,"
        f" {options.duration} s per cell after {options.warmup} s warm-up,"
        f" {options.rounds} round(s){' (medians)' if options.rounds > 1 else ''};"
        f" {'; '.join(session.notes)}.",
        "",
        renderTable(results, peerNames, options.workloads),
        "",
        "CPU µs/req: the proxy process's user+system CPU time over the run"
        " (/proc/<pid>/stat) ÷ requests completed; lower is better, and it is the"
        " figure to trust on a noisy machine. MB/s: response bytes (headers included)"
        " per second, 10^6 bytes.",
        "",
        "### Ratios (same session)",
        "",
        renderRatios(outcomes)
        if outcomes
        else "No ratio: the peers and workloads chosen pair up in none of them.",
    ]
    skipped = renderSkipped(session.skipped)
    if skipped:
        parts += ["", "### Not measured", "", skipped]
    return "\n".join(parts) + "\n", outcomes


def main(argv: Sequence[str] | None = None) -> int:
    """
    Run the benchmark and print the report.

    @param argv: the arguments, without the program name; C{sys.argv[1:]} when L{None}.
    @return: 0 when the run completed (whatever the verdicts), 1 when it could not run.
    """
    options = parseArguments(sys.argv[1:] if argv is None else argv)
    missing = [program for program in REQUIRED_PROGRAMS if shutil.which(program) is None]
    if missing:
        print(
            f"bench: {', '.join(missing)} not found; on Debian: apt-get install -y wrk"
            " nginx-light util-linux",
            file=sys.stderr,
        )
        return 1

    def stopOnTerm(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stopOnTerm)

    sessions = []
    cpus = os.sched_getaffinity(0)
    for index, connections in enumerate(options.connections):
        # Each session chooses its CPUs from all of them (the last one narrowed ours).
        os.sched_setaffinity(0, cpus)
        part = argparse.Namespace(**vars(options))
        part.connections = connections
        if index:
            part.workloads = [name for name in options.workloads if name in options.sweep_workloads]
            if not part.workloads:
                continue
        directory = Path(tempfile.mkdtemp(prefix="sidecar-bench-"))
        session = Session(part, directory)
        if session.loadCpu is not None:
            # This script mostly waits for wrk; keep it off the proxy's CPU too.
            os.sched_setaffinity(0, {session.loadCpu})
        try:
            session.run()
        except PeerUnavailable as reason:
            print(f"bench: the upstream could not run: {reason}", file=sys.stderr)
            return 1
        finally:
            session.stopAll()
            if not options.keep_temp:
                shutil.rmtree(directory, ignore_errors=True)
        results = session.results()
        report, outcomes = renderReport(session, results)
        print(report)
        sessions.append((session, results, outcomes))

    if options.chart is not None:
        from bench.chart import drawChart

        options.chart.parent.mkdir(parents=True, exist_ok=True)
        drawChart(options.chart, [(session.options.connections, results) for session, results, _ in sessions],
                  [peer.name for peer in options.peers], sessions[0][0].environmentFacts() if sessions else {})
        print(f"chart written to {options.chart}", file=sys.stderr)
    if options.json is not None:
        document = {
            "sessions": [
                {
                    "environment": session.environmentFacts(),
                    "options": {
                        "duration": session.options.duration,
                        "warmup": session.options.warmup,
                        "rounds": session.options.rounds,
                        "connections": session.options.connections,
                        "threads": session.options.threads,
                        "workloads": session.options.workloads,
                        "peers": [attrs.asdict(peer) for peer in session.options.peers],
                    },
                    "results": [attrs.asdict(cell) for cell in results.values()],
                    "rounds": [attrs.asdict(cell) for cells in session.rounds.values() for cell in cells],
                    "ratios": [
                        {
                            "ratio": outcome.target.label,
                            "value": outcome.value,
                            "target": outcome.target.goal,
                            "verdict": outcome.verdict,
                        }
                        for outcome in outcomes
                    ],
                    "skipped": session.skipped,
                }
                for session, results, outcomes in sessions
            ],
        }
        options.json.parent.mkdir(parents=True, exist_ok=True)
        options.json.write_text(json.dumps(document, indent=2, ensure_ascii=False) + "\n")
        print(f"results written to {options.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
