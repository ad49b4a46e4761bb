# -*- test-case-name: bench.test_bench -*-
"""
Tests for the benchmark's plain logic: wrk summaries, CPU ticks, figures, ratios,
configurations and the command line. No process is started and no socket opened,
except by L{TcpThroughputTests}, the short form of C{bench/tcp_bench.py} (a 32 MiB
stream through our sidecar and Envoy's C{tcp_proxy}, every byte checked).

Run from the repository root: C{python3 -m twisted.trial bench}.
"""

from __future__ import annotations

import json
from pathlib import Path

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from bench import processes, run, tcp_bench
from bench.measure import (
    WORKLOADS,
    Measurement,
    WrkSummary,
    answerProblem,
    cpuTicksFromStat,
    parentPidFromStat,
    reapedChildTicksFromStat,
    measurementFrom,
    medianOf,
    parseWrkOutput,
)
from bench.peers import (
    envoyConfig,
    flagsKnownBy,
    nginxConfig,
    oursCommand,
    variantPeer,
)
from bench.report import TARGETS, Target, evaluate, renderRatios, renderTable

WRK_OUTPUT = """\
Running 3s test @ http://127.0.0.1:8080/small
  1 threads and 16 connections
  Latency Distribution
     50%  180.00us
     99%  300.00us
  200000 requests in 3.00s, 30.00MB read
BENCH-JSON {"requests": 200000, "duration_us": 3000000, "bytes": 31457280, \
"connect_errors": 0, "read_errors": 1, "write_errors": 0, "status_errors": 2, \
"timeouts": 3, "p50_us": 180.0, "p99_us": 300.5}
Requests/sec:  66666.67
"""


def cell(
    peer: str,
    workload: str,
    cpu: float | None = 10.0,
    megabytes: float = 1.0,
    errors: int = 0,
    requests: int = 1000,
) -> Measurement:
    """
    A measurement with the given figures and plausible others.
    """
    return Measurement(
        peer=peer,
        workload=workload,
        requests=requests,
        errors=errors,
        requestsPerSecond=100.0,
        p50Milliseconds=1.0,
        p99Milliseconds=2.0,
        megabytesPerSecond=megabytes,
        cpuMicrosecondsPerRequest=cpu,
        cpuPercent=None if cpu is None else 50.0,
    )


class InstructionCountTests(SynchronousTestCase):
    """
    L{bench.instructions} reads callgrind's output.
    """

    def test_totals(self) -> None:
        """
        The count is the C{totals:} line (the C{summary:} line of a dump made while
        counting was off is 0); a file without one counts nothing.
        """
        from bench.instructions import instructionsFromOutput

        self.assertEqual(instructionsFromOutput("events: Ir\nsummary: 0\ntotals: 253143957\n"), 253143957)
        self.assertEqual(instructionsFromOutput("events: Ir\n"), 0)


class WrkSummaryTests(SynchronousTestCase):
    """
    Reading what C{bench/wrk.lua} prints.
    """

    def test_parsesTheSummaryLine(self) -> None:
        """
        The marked line gives exact counts and percentiles; wrk's other text is ignored.
        """
        summary = parseWrkOutput(WRK_OUTPUT)
        self.assertEqual(summary.requests, 200000)
        self.assertEqual(summary.durationMicroseconds, 3000000)
        self.assertEqual(summary.bytesRead, 31457280)
        self.assertEqual(summary.p99Microseconds, 300.5)
        self.assertEqual(summary.errors, 6)

    def test_noSummaryLine(self) -> None:
        """
        Output without the marked line (wrk run without the script) is an error.
        """
        self.assertRaises(ValueError, parseWrkOutput, "Requests/sec: 10\n")


class CpuTicksTests(SynchronousTestCase):
    """
    Reading C{/proc/<pid>/stat}.
    """

    def test_userPlusSystem(self) -> None:
        """
        utime (field 14) and stime (field 15) are added, even when the command name
        holds spaces and parentheses.
        """
        fields = ["S"] + [str(n) for n in range(4, 14)] + ["700", "42"] + ["0"] * 30
        stat = "1234 (python3 (a) b) " + " ".join(fields) + "\n"
        self.assertEqual(cpuTicksFromStat(stat), 742)

    def test_parentAndReapedChildren(self) -> None:
        """
        The parent pid (field 4) and the waited-for children's cutime + cstime (fields
        16 and 17), for the workers of C{--workers}.
        """
        fields = ["S", "77"] + [str(n) for n in range(5, 14)] + ["700", "42", "5", "6"] + ["0"] * 30
        stat = "1234 (python3 (a) b) " + " ".join(fields) + "\n"
        self.assertEqual((parentPidFromStat(stat), reapedChildTicksFromStat(stat)), (77, 11))


class MeasurementTests(SynchronousTestCase):
    """
    Turning wrk summaries and CPU ticks into figures.
    """

    def summary(self, requests: int = 1000) -> WrkSummary:
        return WrkSummary(requests, 2_000_000, 4_000_000, 0, 0, 0, 0, 0, 150.0, 900.0)

    def test_figures(self) -> None:
        """
        Rates are per second of wrk's run, CPU per request is ticks turned into
        microseconds over the requests, CPU percent is over the reading window.
        """
        measured = measurementFrom("envoy", "small", self.summary(), 50, 100, 2.0)
        self.assertEqual(measured.requestsPerSecond, 500.0)
        self.assertEqual(measured.megabytesPerSecond, 2.0)
        self.assertEqual(measured.p50Milliseconds, 0.15)
        self.assertEqual(measured.cpuMicrosecondsPerRequest, 500.0)
        self.assertEqual(measured.cpuPercent, 25.0)
        self.assertIsNone(measured.loadCpuPercent)
        loaded = measurementFrom("envoy", "small", self.summary(), 50, 100, 2.0, loadTicks=180)
        self.assertEqual(loaded.loadCpuPercent, 90.0)

    def test_noProxyNoCpu(self) -> None:
        """
        Without a proxy process there is no CPU figure.
        """
        measured = measurementFrom("direct", "small", self.summary(), None, 100, 2.0)
        self.assertIsNone(measured.cpuMicrosecondsPerRequest)
        self.assertIsNone(measured.cpuPercent)

    def test_medianOfRounds(self) -> None:
        """
        Several rounds give the median of each figure and the sum of the counts; a
        missing CPU figure in any round makes the median missing.
        """
        rounds = [cell("envoy", "small", cpu) for cpu in (30.0, 10.0, 20.0)]
        summary = medianOf(rounds)
        self.assertEqual(summary.cpuMicrosecondsPerRequest, 20.0)
        self.assertEqual(summary.requests, 3000)
        self.assertEqual(summary.rounds, 3)
        missing = medianOf([cell("x", "small", 1.0), cell("x", "small", None)])
        self.assertIsNone(missing.cpuMicrosecondsPerRequest)


class AnswerTests(SynchronousTestCase):
    """
    Checking a peer's answer to a probe.
    """

    def test_rightAnswer(self) -> None:
        """
        The upstream's own answers pass.
        """
        self.assertIsNone(answerProblem(WORKLOADS["small"], 200, b"hello, world\n"))
        self.assertIsNone(answerProblem(WORKLOADS["1m"], 200, b"x" * 1048576))
        self.assertIsNone(answerProblem(WORKLOADS["post"], 200, b"ok\n"))

    def test_wrongAnswers(self) -> None:
        """
        A wrong status, a short body or different bytes are reported in words.
        """
        self.assertIn("502", answerProblem(WORKLOADS["small"], 502, b"") or "")
        self.assertIn("1000 body bytes", answerProblem(WORKLOADS["1m"], 200, b"x" * 1000) or "")
        self.assertIsNotNone(answerProblem(WORKLOADS["small"], 200, b"goodbye world"))


class RatioTests(SynchronousTestCase):
    """
    Ratios between peers of one session, and their verdicts.
    """

    def test_metAndNotMet(self) -> None:
        """
        A C{<=} bound is met at or below it; a C{>=} bound at or above it.
        """
        cells = {
            ("ours-fast", "small"): cell("ours-fast", "small", cpu=15.0),
            ("envoy", "small"): cell("envoy", "small", cpu=10.0),
            ("ours-fast", "1m"): cell("ours-fast", "1m", megabytes=70.0),
            ("envoy", "1m"): cell("envoy", "1m", megabytes=100.0),
        }
        cpu = evaluate(Target("ours-fast", "envoy", "small", "cpuMicrosecondsPerRequest", "<=", 1.5), cells)
        self.assertEqual((cpu.value, cpu.verdict), (1.5, "met"))
        self.assertEqual(evaluate(TARGETS[0], cells).verdict, "not met")
        throughput = evaluate(Target("ours-fast", "envoy", "1m", "megabytesPerSecond", ">=", 0.8), cells)
        self.assertEqual(throughput.verdict, "not met")
        self.assertAlmostEqual(throughput.value or 0, 0.7)

    def test_missingPeer(self) -> None:
        """
        A ratio whose peer did not run is n/a, naming the peer.
        """
        outcome = evaluate(TARGETS[0], {("envoy", "small"): cell("envoy", "small")})
        self.assertEqual(outcome.verdict, "n/a: ours-fast small not run")
        self.assertIsNone(outcome.value)

    def test_errorsMakeRatioUnusable(self) -> None:
        """
        A cell with more than 1% errors is not used for a ratio.
        """
        cells = {
            ("ours-fast", "small"): cell("ours-fast", "small", errors=50),
            ("envoy", "small"): cell("envoy", "small"),
        }
        self.assertIn("errors", evaluate(TARGETS[0], cells).verdict)

    def test_informational(self) -> None:
        """
        A ratio without a bound is computed and marked as information.
        """
        target = Target("ours-metrics-on", "ours-fast", "small", "cpuMicrosecondsPerRequest")
        cells = {
            ("ours-metrics-on", "small"): cell("ours-metrics-on", "small", cpu=12.0),
            ("ours-fast", "small"): cell("ours-fast", "small", cpu=10.0),
        }
        outcome = evaluate(target, cells)
        self.assertEqual(outcome.verdict, "info")
        self.assertIn("ours-metrics-on CPU/req ÷ ours-fast CPU/req", renderRatios([outcome]))

    def test_tableRows(self) -> None:
        """
        The table has one row per measured cell, in peer order, with n/a for a missing
        CPU figure.
        """
        cells = {
            ("direct", "small"): cell("direct", "small", cpu=None),
            ("envoy", "small"): cell("envoy", "small", cpu=31.04),
        }
        table = renderTable(cells, ["direct", "envoy", "stock"], ["small"]).splitlines()
        self.assertEqual(len(table), 4)
        self.assertIn("| direct | GET 13 B |", table[2])
        self.assertIn("| n/a |", table[2])
        self.assertIn("| 31.0 |", table[3])


class ConfigurationTests(SynchronousTestCase):
    """
    The upstream's and Envoy's configurations and our command line.
    """

    def test_nginxReadsPostBodies(self) -> None:
        """
        With the echo module, nginx reads a POST body in full before answering; without
        it, it answers at once. Either way: one worker, no access log, loopback only.
        """
        withEcho = nginxConfig(Path("/tmp/x"), 8080, Path("/m.so"))
        self.assertIn("load_module /m.so;", withEcho)
        self.assertIn("echo_read_request_body;", withEcho)
        self.assertIn("listen 127.0.0.1:8080", withEcho)
        self.assertIn("worker_processes 1;", withEcho)
        self.assertIn("access_log off;", withEcho)
        without = nginxConfig(Path("/tmp/x"), 8080, None)
        self.assertNotIn("echo_read_request_body", without)
        self.assertIn('return 200 "ok\\n";', without)

    def test_envoyConfig(self) -> None:
        """
        Envoy listens and administers on loopback and routes everything to the upstream.
        """
        config = json.loads(json.dumps(envoyConfig(10000, 10001, 8080)))
        listener = config["static_resources"]["listeners"][0]
        self.assertEqual(listener["address"]["socket_address"]["port_value"], 10000)
        self.assertEqual(config["admin"]["address"]["socket_address"]["address"], "127.0.0.1")
        endpoint = config["static_resources"]["clusters"][0]["load_assignment"]["endpoints"][0]
        self.assertEqual(
            endpoint["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]["port_value"],
            8080,
        )
        self.assertNotIn("access_log", json.dumps(config))

    def test_oursCommand(self) -> None:
        """
        Our proxy runs under C{python -m twisted sidecar} with the access log and admin
        off, and the peer's own flags come last so that they override.
        """
        argv = oursCommand("python", 9000, 8080, ["--admin", "tcp:0"])
        self.assertEqual(argv[:3], ["python", "-m", "twisted"])
        self.assertIn("sidecar", argv)
        self.assertIn("tcp:9000:interface=127.0.0.1", argv)
        self.assertIn("127.0.0.1:8080", argv)
        self.assertEqual(argv[-2:], ["--admin", "tcp:0"])

    def test_flagsKnownByBaseline(self) -> None:
        """
        A baseline checkout that predates a default flag (C{--health}) is run without
        it; the flags it declares, and the peer's own, stay.
        """
        root = Path(self.mktemp())
        (root / "sidecar").mkdir(parents=True)
        (root / "sidecar" / "tap.py").write_text('["access-log", None, "-", ""],\n["admin", None, "15000", ""],\n')
        argv = oursCommand("python", 9000, 8080, ["--max-connections", "5"])
        kept = flagsKnownBy(str(root), argv)
        at = argv.index("--health")
        self.assertEqual(kept, argv[:at] + argv[at + 2:])
        self.assertEqual(kept[-6:], ["--access-log", "none", "--admin", "none", "--max-connections", "5"])
        self.assertEqual(flagsKnownBy(str(Path(__file__).resolve().parent.parent), argv), argv)

    def test_pinned(self) -> None:
        """
        A pinned command runs under C{taskset -c CPU}; an unpinned one as it is.
        """
        self.assertEqual(processes.pinned(["wrk"], 0), ["taskset", "-c", "0", "wrk"])
        self.assertEqual(processes.pinned(["wrk"], None), ["wrk"])


class CommandLineTests(SynchronousTestCase):
    """
    The benchmark's own options.
    """

    def test_variantsAndExtraArguments(self) -> None:
        """
        A variant becomes peer C{ours-NAME} with its flags; C{--extra-args ours:...}
        reaches every peer of ours and no other.
        """
        options = run.parseArguments(
            ["--variant", "metrics-on=--admin tcp:0", "--extra-args", "ours:--x 1"]
        )
        byName = {peer.name: peer for peer in options.peers}
        self.assertEqual(byName["ours-metrics-on"].arguments, ("--admin", "tcp:0", "--x", "1"))
        self.assertEqual(byName["ours-web"].arguments, ("--engine", "web", "--x", "1"))
        self.assertEqual(byName["envoy"].arguments, ())

    def test_only(self) -> None:
        """
        C{--only} keeps the named built-in peers, in running order.
        """
        options = run.parseArguments(["--only", "ours-fast,direct"])
        self.assertEqual([peer.name for peer in options.peers], ["direct", "ours-fast"])

    def test_onlyKeepsVariants(self) -> None:
        """
        A declared variant runs whatever C{--only} says about the built-in peers.
        """
        options = run.parseArguments(["--only", "ours-fast", "--variant", "m=--admin tcp:0"])
        self.assertEqual([peer.name for peer in options.peers], ["ours-fast", "ours-m"])

    def test_baseline(self) -> None:
        """
        C{--baseline DIR} adds peer C{ours-base}, which runs the sidecar found in DIR;
        a folder without one is refused.
        """
        root = Path(__file__).resolve().parent.parent
        options = run.parseArguments(["--only", "envoy", "--baseline", str(root)])
        self.assertEqual([(peer.name, peer.root) for peer in options.peers],
                         [("envoy", None), ("ours-base", str(root))])
        self.assertRaises(SystemExit, run.parseArguments, ["--baseline", str(root / "bench")])

    def test_sweep(self) -> None:
        """
        C{--connections 16,256,1000} is a sweep; the built-in peers include nginx and
        HAProxy as proxies and our workers.
        """
        options = run.parseArguments(["--connections", "16,256,1000", "--sweep-workloads", "small,post"])
        self.assertEqual((options.connections, options.sweep_workloads), ([16, 256, 1000], ["small", "post"]))
        names = [peer.name for peer in options.peers]
        for name in ("nginx", "haproxy", "ours-workers"):
            self.assertIn(name, names)
        workers = {peer.name: peer for peer in options.peers}["ours-workers"]
        self.assertEqual(workers.arguments, ("--workers", "auto"))

    def test_badInput(self) -> None:
        """
        Unknown peers or workloads, malformed variants and colliding names are refused.
        """
        for argv in (
            ["--only", "lighttpd"],
            ["--workloads", "huge"],
            ["--variant", "no-equals-sign"],
            ["--variant", "fast=--x"],
            ["--extra-args", "lighttpd:--x"],
            ["--connections", "16,0"],
            ["--duration", "0"],
        ):
            self.assertRaises(SystemExit, run.parseArguments, argv)
        self.assertRaises(ValueError, variantPeer, "Bad Name", [])


class ReadinessTests(SynchronousTestCase):
    """
    Waiting for a peer to serve is bounded in attempts and time.
    """

    def test_givesUp(self) -> None:
        """
        A peer that never answers is given up on at the deadline, with the last error.
        """
        now = [0.0]

        def refuse(port: int, workload: object) -> tuple[int, bytes]:
            raise ConnectionRefusedError("connection refused")

        def sleep(seconds: float) -> None:
            now[0] += seconds

        self.patch(processes, "fetch", refuse)
        problem = processes.waitUntilServing(
            1, WORKLOADS["small"], None, 2.0, clock=lambda: now[0], sleep=sleep
        )
        self.assertIn("after 2 s", problem or "")
        self.assertIn("connection refused", problem or "")
        self.assertLessEqual(now[0], 2.2)

    def test_servesAtLastAttempt(self) -> None:
        """
        A peer that answers right after a few refusals is ready.
        """
        answers = [ConnectionRefusedError("no"), ConnectionRefusedError("no"), (200, b"hello, world\n")]

        def fetch(port: int, workload: object) -> tuple[int, bytes]:
            answer = answers.pop(0)
            if isinstance(answer, Exception):
                raise answer
            return answer

        self.patch(processes, "fetch", fetch)
        self.assertIsNone(
            processes.waitUntilServing(
                1, WORKLOADS["small"], None, 5.0, clock=lambda: 0.0, sleep=lambda s: None
            )
        )


class ChartTests(SynchronousTestCase):
    """
    The figures the chart draws (drawing itself needs matplotlib).
    """

    def cell(self, peer: str, workload: str, cpu: float | None, rate: float = 100.0) -> Measurement:
        return Measurement(peer, workload, 100, 0, rate, 1.0, 2.0, 0.1, cpu, 50.0)

    def test_series(self) -> None:
        """
        One value per connection count for each peer measured; a peer never measured
        is left out; ratios are over Envoy's CPU per request, per workload.
        """
        from bench.chart import chartSeries, ratiosToEnvoy

        first = {("envoy", "small"): self.cell("envoy", "small", 100.0),
                 ("ours-fast", "small"): self.cell("ours-fast", "small", 90.0),
                 ("envoy", "post"): self.cell("envoy", "post", 200.0),
                 ("ours-fast", "post"): self.cell("ours-fast", "post", 300.0),
                 ("direct", "small"): self.cell("direct", "small", None)}
        second = {("envoy", "small"): self.cell("envoy", "small", 120.0)}
        series = chartSeries([(16, first), (256, second)], ["direct", "envoy", "ours-fast", "stock"], "small",
                             "cpuMicrosecondsPerRequest")
        self.assertEqual(series, {"envoy": [100.0, 120.0], "ours-fast": [90.0, None]})
        ratios = ratiosToEnvoy(first, ["envoy", "ours-fast", "direct"], ["small", "post"])
        self.assertEqual(ratios, {"envoy": [1.0, 1.0], "ours-fast": [0.9, 1.5]})

    def test_draw(self) -> None:
        """
        With matplotlib, the chart is a PNG file.
        """
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise SkipTest("needs matplotlib (requirements-test.txt)")
        from bench.chart import drawChart

        results = {("envoy", "small"): self.cell("envoy", "small", 100.0),
                   ("ours-fast", "small"): self.cell("ours-fast", "small", 90.0)}
        path = Path(self.mktemp() + ".png")
        drawChart(path, [(16, results), (256, results)], ["envoy", "ours-fast"],
                  {"date": "2026-12-01", "cpus": 2, "loadAverage": [1.0, 1.0, 1.0]})
        self.assertEqual(path.read_bytes()[:8], b"\x89PNG\r\n\x1a\n")


class ProfileTests(SynchronousTestCase):
    """
    How the profile puts py-spy's samples into components.
    """

    def test_components(self) -> None:
        """
        Socket calls are the kernel's, epoll_wait is idle (left out), llhttp is llhttp,
        other native leaves are the runtime, the rest goes to the innermost Python frame
        of ours or Twisted's.
        """
        from bench.profile import renderShares, shares

        base = "main (twisted/internet/base.py:697);doPoll (sidecar/reactor.py:59)"
        raw = [
            f"{base};doRead (twisted/internet/tcp.py:278);recv (libc.so.6) 30",
            f"{base};epoll_wait (libc.so.6) 50",
            f"{base};dataReceived (sidecar/downstream.py:157);feed_data (httptools/parser/parser.cpython-311.so) 5",
            f"{base};dataReceived (sidecar/downstream.py:157);requestHead (sidecar/headers.py:400) 10",
            f"{base};dataReceived (sidecar/downstream.py:157);_PyObject_Malloc (python3.11) 5",
        ]
        counts, busy, idle = shares(raw)
        self.assertEqual((busy, idle), (50, 50))
        self.assertEqual(counts, {"kernel: socket system calls": 30, "llhttp (httptools)": 5,
                                  "sidecar: headers": 10,
                                  "CPython runtime (native: objects, allocation, the evaluation loop)": 5})
        table = renderShares(counts, busy, 100.0)
        self.assertIn("| kernel: socket system calls | 60.0% | 60.0 |", table)
        self.assertIn("| **total** | 100% | 100.0 |", table)
        # With the system time measured: the kernel's row is that time, the others
        # share the user time by their samples.
        table = renderShares(counts, busy, 100.0, systemMicroseconds=40.0)
        self.assertIn("| kernel: socket system calls (system time, measured) | 40.0% | 40.0 |", table)
        self.assertIn("| sidecar: headers | 30.0% | 30.0 |", table)
        self.assertIn("| llhttp (httptools) | 15.0% | 15.0 |", table)
        self.assertIn("| **total** | 100% | 100.0 |", table)

    def test_systemTicks(self) -> None:
        """
        C{stime} is field 15 of C{/proc/PID/stat}, counted after the command's name.
        """
        from bench.measure import systemTicksFromStat

        stat = "42 (a (b) c) R 1 2 3 4 5 6 7 8 9 10 111 222 0 0 20 0 1 0 5 6 7"
        self.assertEqual(systemTicksFromStat(stat), 222)
class TcpThroughputTests(SynchronousTestCase):
    """
    The opaque-TCP throughput benchmark (C{bench/tcp_bench.py}): its figures and
    report, Envoy's C{tcp_proxy} configuration, and its short form run for real.
    """

    def test_figures(self) -> None:
        """
        MB/s are 10^6 bytes per second; the proxy's CPU per MB and its share of a
        core come from its clock ticks; C{direct} has no CPU figure; medians are per
        number.
        """
        figure = tcp_bench.figureFrom("ours", 500_000_000, 2.0, 50, ticksPerSecond=100)
        self.assertEqual((figure.megabytesPerSecond, figure.cpuMicrosecondsPerMegabyte, figure.cpuShare),
                         (250.0, 1000.0, 0.25))
        direct = tcp_bench.figureFrom("direct", 10**9, 1.0, None)
        self.assertEqual((direct.megabytesPerSecond, direct.cpuMicrosecondsPerMegabyte), (1000.0, None))
        median = tcp_bench.medianFigure([
            tcp_bench.figureFrom("ours", 10**9, seconds, ticks, 100)
            for seconds, ticks in ((1.0, 10), (4.0, 30), (2.0, 90))])
        self.assertEqual((median.megabytesPerSecond, median.cpuMicrosecondsPerMegabyte), (500.0, 300.0))

    def test_reportRatios(self) -> None:
        """
        Each of our peers gets its MB/s and CPU per MB as a ratio to Envoy's, with
        the 0.8 target's verdict.
        """
        medians = {
            "envoy": tcp_bench.figureFrom("envoy", 10**9, 1.0, 100, 100),
            "ours": tcp_bench.figureFrom("ours", 10**9, 1.25, 50, 100),
            "ours-slow": tcp_bench.figureFrom("ours-slow", 10**9, 2.0, 200, 100),
        }
        text = tcp_bench.renderReport(medians, 3, 1 << 30, ["a note"])
        self.assertIn("ours ÷ envoy, MB/s: 0.80 (target ≥ 0.8: met)", text)
        self.assertIn("ours ÷ envoy, CPU per MB: 0.50", text)
        self.assertIn("ours-slow ÷ envoy, MB/s: 0.50 (target ≥ 0.8: not met)", text)
        self.assertIn("| envoy | 1,000 | 1,000 | 100 |", text)

    def test_envoyTcpProxyConfig(self) -> None:
        """
        Envoy's listener has the C{tcp_proxy} filter alone, to the same static cluster.
        """
        from bench.peers import envoyTcpConfig

        config = envoyTcpConfig(1000, 1001, 1002)
        [listener] = config["static_resources"]["listeners"]
        [chain] = listener["filter_chains"]
        [only] = chain["filters"]
        self.assertEqual(only["name"], "envoy.filters.network.tcp_proxy")
        self.assertEqual(only["typed_config"]["cluster"], "service")
        [cluster] = config["static_resources"]["clusters"]
        endpoint = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
        self.assertEqual(endpoint["address"]["socket_address"]["port_value"], 1002)

    def test_shortStreamThroughEachPeer(self) -> None:
        """
        The short form, for real: 32 MiB straight to the sink, through our sidecar on
        a declared opaque port and through Envoy's C{tcp_proxy}; the sink hashes what
        it gets and every byte must be the bytes sent; each peer has a figure, the
        proxies a CPU figure.
        """
        from bench.peers import findEnvoy

        peers = ["direct", "ours"] + (["envoy"] if findEnvoy()[0] is not None else [])
        directory = Path(self.mktemp())
        directory.mkdir()
        session = tcp_bench.Session(directory, peers, {}, {}, verify=True)
        self.addCleanup(session.stop)
        session.start()
        medians = session.run(32 << 20, 1, 0)
        self.assertEqual(sorted(medians), sorted(peers))
        for name, figure in medians.items():
            self.assertGreater(figure.megabytesPerSecond, 0)
            self.assertEqual(figure.bytes, 32 << 20)
            self.assertEqual(figure.cpuMicrosecondsPerMegabyte is None, name == "direct")


class IdleMemoryTests(SynchronousTestCase):
    """
    The plain logic of C{bench/idle_bench.py}, and the new-connection workload.
    """

    def test_rssFromStatus(self) -> None:
        """
        The RSS is the C{VmRSS} line of C{/proc/<pid>/status}, in KiB; a text without
        one is an error.
        """
        from bench.idle_bench import rssKiBFromStatus

        text = "Name:\tpython3\nVmPeak:\t  900000 kB\nVmRSS:\t   63412 kB\nRssAnon:\t 50000 kB\n"
        self.assertEqual(rssKiBFromStatus(text), 63412)
        self.assertRaises(ValueError, rssKiBFromStatus, "Name:\tx\n")

    def test_bytesPerConnection(self) -> None:
        """
        The figure is the RSS growth in bytes over the connections opened.
        """
        from bench.idle_bench import bytesPerConnection, filesNeeded

        self.assertEqual(bytesPerConnection(60_000, 120_000, 10_000), 6144.0)
        self.assertGreater(filesNeeded(10_000), 10_000)

    def test_newConnectionWorkload(self) -> None:
        """
        The C{close} workload is the small GET on a new connection per request, checked
        like the small GET, with its own target of 1.2x Envoy's CPU per request.
        """
        close = WORKLOADS["close"]
        self.assertEqual((close.method, close.path, close.newConnection), ("GET", "/small", True))
        self.assertFalse(WORKLOADS["small"].newConnection)
        self.assertIsNone(answerProblem(close, 200, b"hello, world\n"))
        self.assertIsNotNone(answerProblem(close, 200, b"goodbye world"))
        [target] = [t for t in TARGETS if t.workload == "close"]
        self.assertEqual((target.numeratorPeer, target.denominatorPeer, target.bound), ("ours-fast", "envoy", 1.2))
