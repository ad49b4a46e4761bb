# -*- test-case-name: tests.test_workers -*-
"""
C{--workers N}: the counters summed over workers, the limits shared out, access-log
lines never interleaved, and, with real processes (httpbin as the service, the sidecar
under C{twistd -n}), one admin site over every worker, a dead worker started again,
and SIGTERM draining them all.
"""

from __future__ import annotations

import os
import re
import signal
import sys
import threading
from types import SimpleNamespace
from typing import Any, Dict, List

from twisted.internet.testing import MemoryReactorClock
from twisted.python import usage
from twisted.python.filepath import FilePath
from twisted.trial.unittest import SynchronousTestCase

from sidecar.accesslog import PIPE_BUF, AccessLog
from sidecar.config import ProxyConfig, UpstreamConfig
from sidecar.record import Record
from sidecar.stats import Recorder
from sidecar.tap import Options
from sidecar.workers import mergeSnapshots, shareOut, workerCount
from tests.test_admin_process import (Child, canConnect, freePort, missingPeers, request, requestCounts,
                                      startHttpbin, waitFor)


def record(status: int = 200, duration: float = 0.01, sent: int = 13) -> Record:
    return Record(0.0, duration, duration, 0, sent, status, "GET", "/", "HTTP/1.1", "svc", "127.0.0.1:80",
                  "-", "id", "10.0.0.1", "curl", "10.0.0.1:1", "", False)


def snapshotOf(recorder: Recorder, active: int = 0, idle: int = 0, connects: int = 0) -> Any:
    return SimpleNamespace(
        recorder=recorder,
        pool=SimpleNamespace(active=active, idle=[None] * idle, connecting=0, connects=connects,
                             connectFailures=0, pending=[], overflows=0),
        tls=None, accessLog=SimpleNamespace(dropped=1, buffered=0, limit=100))


class UnitTests(SynchronousTestCase):
    """
    The plain logic of the workers.
    """

    def test_merge(self):
        """
        Series, histograms, gauges and pool counters are summed over the workers.
        """
        a, b = Recorder(), Recorder()
        for _ in range(3):
            a.record(record())
        b.record(record())
        b.record(record(status=503))
        a.requestsActive, b.requestsActive = 2, 5
        total = mergeSnapshots([snapshotOf(a, active=1, idle=2, connects=3),
                                snapshotOf(b, active=4, idle=1, connects=5)])
        byStatus = {key[1]: series for key, series in total.recorder.series.items()}
        self.assertEqual((byStatus[200].requests, byStatus[503].requests), (4, 1))
        self.assertEqual(byStatus[200].duration.count, 4)
        self.assertEqual(sum(byStatus[200].responseBytes.counts), 4)
        self.assertAlmostEqual(byStatus[200].duration.sum, 40.0)
        self.assertEqual(total.recorder.requestsActive, 7)
        self.assertEqual((total.pool.active, len(total.pool.idle), total.pool.connects), (5, 3, 8))
        self.assertEqual(total.accessLog.dropped, 2)
        # The workers' own counters are untouched.
        self.assertEqual(a.series[next(iter(a.series))].requests, 3)

    def test_shareOut(self):
        """
        Each worker gets the pool limits divided by the number of workers, rounded up,
        and no admin or health site.
        """
        config = ProxyConfig(upstream=UpstreamConfig(maxConnections=1024, maxPending=5, maxIdle=None),
                             admin="tcp:15000", health="tcp:15021")
        part = shareOut(config, 3)
        self.assertEqual((part.upstream.maxConnections, part.upstream.maxPending, part.upstream.maxIdle),
                         (342, 2, None))
        self.assertEqual((part.admin, part.health), (None, None))
        self.assertEqual(shareOut(config, 3).upstream.idleLimit, 342)

    def test_count(self):
        """
        C{--workers} takes a count or C{auto}; zero, words and non-TCP listeners with
        several workers are refused with one sentence.
        """
        self.assertEqual(workerCount("auto"), len(os.sched_getaffinity(0)))
        self.assertEqual(workerCount("3"), 3)
        options = Options()
        options.parseOptions(["--workers", "2", "--access-log", "none"])
        self.assertEqual(options["config"].workers, 2)
        for argv in (["--workers", "0"], ["--workers", "many"],
                     ["--workers", "2", "--listen", "unix:/tmp/sidecar-test.sock"]):
            error = self.assertRaises(usage.UsageError, Options().parseOptions, argv)
            self.assertTrue(str(error).startswith(("--workers:", "--listen:")), str(error))

    def test_wholeLines(self):
        """
        With C{wholeLines}, the access log writes only whole lines, at most C{PIPE_BUF}
        bytes at a time; a longer line goes alone.
        """
        writes: List[bytes] = []
        output = SimpleNamespace(write=lambda data: writes.append(bytes(data)) or len(data))
        reactor = MemoryReactorClock()
        log = AccessLog(output, lambda rec: rec.path + "\n", reactor, 10 ** 7, wholeLines=True)  # type: ignore[arg-type]
        for n in range(400):
            log(Record(0.0, 0.0, None, 0, 0, 200, "GET", f"/{n:04d}" + "x" * 40, "HTTP/1.1", "", "", "-", "",
                       "", "", "", "", False))
        log(Record(0.0, 0.0, None, 0, 0, 200, "GET", "/" + "y" * (PIPE_BUF * 2), "HTTP/1.1", "", "", "-", "",
                   "", "", "", "", False))
        log.flush()
        self.assertGreater(len(writes), 4)
        for data in writes:
            self.assertTrue(data.endswith(b"\n"))
            self.assertTrue(len(data) <= PIPE_BUF or data.count(b"\n") == 1, len(data))
        self.assertEqual(b"".join(writes).count(b"\n"), 401)


TEXT_LINE = re.compile(r'^\[[^\]]+\] "GET /get\?n=\d+ HTTP/1\.1" 200 - ')


class ProcessTests(SynchronousTestCase):
    """
    Two workers under C{twistd -n sidecar --workers 2}, httpbin behind them.
    """

    def setUp(self):
        problem = missingPeers()
        if problem:
            raise self.skipTest(problem)
        self.upstream = startHttpbin(self)
        self.port, self.adminPort = freePort(), freePort()
        self.accessLog = FilePath(self.mktemp())
        argv = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "-n", "--pidfile=",
                "sidecar", "--workers", "2", "--listen", f"tcp:{self.port}:interface=127.0.0.1",
                "--admin", f"tcp:{self.adminPort}:interface=127.0.0.1", "--health", "none",
                "--upstream", str(self.upstream), "--access-log", self.accessLog.path, "--drain-timeout", "1",
                "--shutdown-grace", "5"]
        self.sidecar = Child(self, argv, FilePath(self.mktemp()))
        self.addCleanup(self.killWorkers)
        waitFor(lambda: self.metric("sidecar_workers") == 2 and self.ready(), "two workers serving", 60)

    def workerPids(self) -> List[int]:
        pids = []
        for name in os.listdir("/proc"):
            if name.isdigit():
                try:
                    with open(f"/proc/{name}/stat") as f:
                        fields = f.read().rsplit(")", 1)[1].split()
                except OSError:
                    continue
                if int(fields[1]) == self.sidecar.pid:
                    pids.append(int(name))
        return pids

    def killWorkers(self) -> None:
        for pid in self.workerPids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def scrape(self) -> str:
        if self.sidecar.process.poll() is not None:
            raise AssertionError(f"the sidecar exited: {self.sidecar.text()}")
        try:
            return request(self.adminPort, "GET", "/stats/prometheus", timeout=5)[2].decode()
        except OSError:
            return ""

    def metric(self, name: str) -> float:
        match = re.search(rf"^{name} (\S+)$", self.scrape(), re.M)
        return float(match.group(1)) if match else -1.0

    def ready(self) -> bool:
        try:
            return request(self.adminPort, "GET", "/ready", timeout=5)[0] == 200
        except OSError:
            return False

    def burst(self, count: int, start: int = 0) -> None:
        """
        C{count} requests, each on its own connection, eight at a time.
        """
        results: Dict[int, int] = {}

        def one(n: int) -> None:
            results[n] = request(self.port, "GET", f"/get?n={n}", timeout=20)[0]

        for first in range(start, start + count, 8):
            threads = [threading.Thread(target=one, args=(n,)) for n in range(first, min(first + 8, start + count))]
            for t in threads:
                t.start()
            for t in threads:
                t.join(30)
        self.assertEqual(sorted(results.values()), [200] * count)

    def test_oneAdminRestartDrain(self):
        """
        Requests served by both workers are counted once in the parent's metrics (within
        a second); their access-log lines are whole; a worker killed is logged, counted
        and started again, and serving goes on; SIGTERM drains both and the parent exits
        0, with no worker left.
        """
        self.burst(40)
        waitFor(lambda: requestCounts(self.scrape()).get(("200", "-")) == 40, "40 requests counted", 10)
        self.assertGreaterEqual(self.metric("sidecar_upstream_connects_total"), 1)

        victim = self.workerPids()[0]
        os.kill(victim, signal.SIGKILL)
        waitFor(lambda: self.metric("sidecar_worker_restarts_total") == 1, "the restart counted", 30)
        waitFor(lambda: self.metric("sidecar_workers") == 2 and victim not in self.workerPids(),
                "a new worker", 60)
        self.assertIn("worker 0 exited unexpectedly", self.sidecar.text() + "")
        self.burst(16, start=40)
        # The counts of the killed worker up to its last report stay in the totals.
        waitFor(lambda: requestCounts(self.scrape()).get(("200", "-"), 0) >= 16 + 1, "counted after", 10)

        workers = self.workerPids()
        self.sidecar.signal(signal.SIGTERM)
        self.assertEqual(self.sidecar.wait(30), 0, self.sidecar.text())
        self.assertEqual([pid for pid in workers if os.path.exists(f"/proc/{pid}")], [])
        text = self.sidecar.text()
        self.assertIn("stopping: every worker drains and exits", text)
        self.assertRegex(text, r"worker \d: draining")

        lines = self.accessLog.getContent().decode().splitlines()
        self.assertGreaterEqual(len(lines), 56)
        for line in lines:
            self.assertRegex(line, TEXT_LINE)
        self.assertFalse(canConnect(self.port))
