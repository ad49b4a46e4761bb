# -*- test-case-name: tests.test_logs -*-
"""
The sidecar's own log never blocks the reactor and never floods: L{LogStream} in
place of twistd's standard output, L{takeOverRunnerLog} against the installed twistd
and C{twist}, L{WarningLimit} on a memory clock; and real C{twistd -n sidecar} and
C{python -m twisted sidecar} processes whose standard output is a pipe nobody reads,
in front of a service that refuses every connection.
"""

from __future__ import annotations

import fcntl
import io
import os
import re
import socket
import subprocess
import sys
import threading
import time
from types import SimpleNamespace
from typing import Any, List

from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import Logger, LogLevel, formatEvent, globalLogPublisher, textFileLogObserver
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath
from twisted.trial import unittest

from sidecar.accesslog import AccessLog, LineWriter, formatText, openOutput
from sidecar.logs import LogStream, WarningLimit, takeOverRunnerLog
from tests.test_accesslog import LINE, REC, ScriptedOutput, _Stdout
from tests.test_admin_process import Background, canConnect, environment, freePort, readAll, request, waitFor
from tests.test_exchange import GET, Harness


def captured(case: unittest.SynchronousTestCase, namespace: str) -> List[str]:
    """
    The warnings and errors logged in C{namespace} while C{case} runs, formatted.
    """
    seen: List[str] = []

    def observer(event: Any) -> None:
        if event.get("log_namespace") == namespace and event["log_level"] >= LogLevel.warn:
            seen.append(formatEvent(event))

    globalLogPublisher.addObserver(observer)
    case.addCleanup(globalLogPublisher.removeObserver, observer)
    return seen


class LogStreamTests(unittest.SynchronousTestCase):
    """
    L{LogStream} takes twistd's log lines whole, writes them without blocking through
    a L{LineWriter} (the access log's when they share an output), and drops and counts
    what does not fit.
    """

    def test_flushWritesAtOnce(self):
        """
        A line is written when the observer flushes, without waiting for a reactor turn
        (so a start-up error is seen even if the reactor never runs).
        """
        clock = MemoryReactorClock()
        output = ScriptedOutput()
        stream = LogStream(LineWriter(output, clock), clock)
        textFileLogObserver(stream)({"log_format": "hello {who}", "who": "world", "log_time": 0.0,
                                     "log_level": LogLevel.info, "log_namespace": "x"})
        self.assertEqual(output.writes, [b"1970-01-01T00:00:00+0000 [x#info] hello world\n"])
        self.assertEqual(stream.dropped, 0)

    def test_sharedWithTheAccessLog(self):
        """
        Through the access log's writer, log lines and records come out whole and in
        order, however little the output takes at a time.
        """
        clock = MemoryReactorClock()
        output = ScriptedOutput(room=7)
        accessLog = AccessLog(output, formatText, clock)
        stream = LogStream(accessLog, clock)
        accessLog(REC)
        stream.write("twistd line one\n")
        stream.flush()
        accessLog(REC)
        stream.write("twistd line two\n")
        stream.flush()
        for _ in range(200):
            output.room = 7
            accessLog.doWrite()
            clock.advance(0)
        self.assertEqual(output.taken, LINE + b"twistd line one\n" + LINE + b"twistd line two\n")
        self.assertNotIn(accessLog, clock.getWriters())

    def test_fullBufferDropsAndCounts(self):
        """
        Lines that do not fit are dropped and counted, and nothing is written while the
        output is blocked; once it takes everything, one line tells the count of the
        episode, and is written itself.
        """
        warnings = captured(self, "sidecar.logs")
        clock = MemoryReactorClock()
        output = ScriptedOutput(room=0)
        writer = LineWriter(output, clock, limit=40)
        stream = LogStream(writer, clock)
        for i in range(10):
            stream.write(f"line {i:02d} of the log\n")  # 19 bytes
            stream.flush()
            clock.advance(1)
        self.assertEqual((stream.dropped, writer.buffered, output.writes), (8, 38, []))
        self.assertIn(writer, clock.getWriters())
        self.assertEqual(warnings, [])
        output.room = None
        writer.doWrite()
        self.assertEqual(warnings, ["log: dropped 8 lines in 8.0 s while its output was not read (buffer 40 bytes)"])
        self.assertEqual(output.taken, b"line 00 of the log\nline 01 of the log\n")
        stream.write("and again\n")
        stream.flush()
        self.assertEqual(output.taken, b"line 00 of the log\nline 01 of the log\nand again\n")
        self.assertEqual((stream.dropped, len(warnings)), (8, 1))

    def test_longLine(self):
        """
        A line longer than the whole buffer (a traceback) is written when nothing else
        is held, and dropped otherwise.
        """
        clock = MemoryReactorClock()
        output = ScriptedOutput(room=0)
        writer = LineWriter(output, clock, limit=10)
        stream = LogStream(writer, clock)
        stream.write("x" * 30 + "\n")
        stream.write("y" * 30 + "\n")
        stream.flush()
        self.assertEqual((writer.buffered, stream.dropped), (31, 1))
        output.room = None
        writer.doWrite()
        self.assertEqual(output.taken, b"x" * 30 + b"\n")

    def test_otherThread(self):
        """
        A line logged in another thread is handed to the reactor's thread, not written
        there.
        """
        handed: List[Any] = []
        clock = MemoryReactorClock()
        clock.callFromThread = lambda f, *args: handed.append((f, args))  # type: ignore[attr-defined]
        output = ScriptedOutput()
        stream = LogStream(LineWriter(output, clock), clock, thread=threading.get_ident() + 1)
        stream.write("from a thread\n")
        stream.flush()
        self.assertEqual((output.writes, len(handed)), ([], 1))
        stream.thread = threading.get_ident()
        f, args = handed[0]
        f(*args)
        self.assertEqual(output.writes, [b"from a thread\n"])


class TakeOverTests(unittest.TestCase):
    """
    L{takeOverRunnerLog} gives twistd (and C{twist}) a L{LogStream} where they would
    log to a pipe, and leaves every other choice alone.
    """

    def pipe(self) -> tuple:
        read, write = os.pipe()
        self.addCleanup(os.close, read)
        self.addCleanup(os.close, write)
        return read, write

    def service(self, accessLog: Any = None) -> Any:
        return SimpleNamespace(accessLog=accessLog, config=SimpleNamespace(accessLogBuffer=4096), logStream=None)

    def twistdOptions(self, *argv: str) -> Any:
        from twisted.scripts.twistd import ServerOptions

        options = ServerOptions()
        for flag in argv:
            name, _, value = flag.lstrip("-").partition("=")
            options[name] = value or True
        return options

    def test_twistdForeground(self):
        """
        C{twistd -n}: twistd's own choice of log observer, made after
        C{makeService}, writes to the stream put in place of C{sys.stdout}, which
        writes to the pipe without blocking.
        """
        from twisted.scripts._twistd_unix import UnixAppLogger

        read, write = self.pipe()
        pipeFile = io.TextIOWrapper(io.FileIO(write, "w", closefd=False), write_through=True)
        self.patch(sys, "stdout", pipeFile)
        clock = MemoryReactorClock()
        options = self.twistdOptions("--nodaemon")
        service = self.service()
        stream = takeOverRunnerLog(options, service, clock)
        self.addCleanup(lambda: stream.writer.output.close())
        self.assertIs(sys.stdout, stream)
        self.assertIs(service.logStream, stream)
        self.assertFalse(os.get_blocking(stream.writer.fileno()))
        observer = UnixAppLogger(options)._getLogObserver()
        observer({"log_format": "hello", "log_time": 0.0, "log_level": LogLevel.info, "log_namespace": "x"})
        self.assertEqual(os.read(read, 100), b"1970-01-01T00:00:00+0000 [x#info] hello\n")

    def test_sharedWithTheAccessLog(self):
        """
        When the access log writes to the same pipe, twistd's lines go through its
        writer.
        """
        read, write = self.pipe()
        accessLog = AccessLog(openOutput("-", _Stdout(write)), formatText, MemoryReactorClock())
        self.addCleanup(accessLog.output.close)
        stdio = SimpleNamespace(stdout=_Stdout(write))
        stream = takeOverRunnerLog(self.twistdOptions("--nodaemon"), self.service(accessLog),
                                   MemoryReactorClock(), stdio)
        self.assertIs(stream.writer, accessLog)
        self.assertIs(stdio.stdout, stream)

    def test_leftAlone(self):
        """
        twistd's log is left as it is with C{--logfile FILE}, C{--syslog}, C{--logger},
        in a daemon (its log is C{twistd.log}), and when stdout is a regular file; and
        without a runner.
        """
        read, write = self.pipe()
        path = self.mktemp()
        with open(path, "w") as regular:
            for options, stdout in [
                (self.twistdOptions("--nodaemon", f"--logfile={path}"), _Stdout(write)),
                (self.twistdOptions("--nodaemon", "--syslog"), _Stdout(write)),
                (self.twistdOptions("--nodaemon", "--logger=x.y"), _Stdout(write)),
                (self.twistdOptions(), _Stdout(write)),
                (self.twistdOptions("--nodaemon"), regular),
                (None, _Stdout(write)),
            ]:
                stdio = SimpleNamespace(stdout=stdout)
                service = self.service()
                self.assertIsNone(takeOverRunnerLog(options, service, MemoryReactorClock(), stdio), options)
                self.assertIs(stdio.stdout, stdout)
                self.assertIsNone(service.logStream)

    def test_twist(self):
        """
        C{python -m twisted}: its log file, standard output or error on a pipe, is
        replaced in its options; a file it opened is left.
        """
        from twisted.application.twist._options import TwistOptions

        read, write = self.pipe()
        options = TwistOptions()
        options["logFile"] = _Stdout(write)
        stream = takeOverRunnerLog(options, self.service(), MemoryReactorClock())
        self.addCleanup(lambda: stream.writer.output.close())
        self.assertIs(options["logFile"], stream)
        stream.write("twist line\n")
        stream.flush()
        self.assertEqual(os.read(read, 100), b"twist line\n")
        with open(self.mktemp(), "w") as regular:
            options["logFile"] = regular
            self.assertIsNone(takeOverRunnerLog(options, self.service(), MemoryReactorClock()))
            self.assertIs(options["logFile"], regular)


class WarningLimitTests(unittest.SynchronousTestCase):
    """
    L{WarningLimit} logs a few warnings of each kind per second and sums up the rest.
    """

    def limit(self) -> tuple:
        clock = MemoryReactorClock()
        return clock, WarningLimit(clock, Logger(namespace="test.limit"), perSecond=3, summarySeconds=10)

    def test_underTheLimit(self):
        """
        Under the limit every warning is logged and nothing is scheduled.
        """
        seen = captured(self, "test.limit")
        clock, limit = self.limit()
        for i in range(6):
            limit.warn("failed {n}", n=i)
            clock.advance(0.5)
        self.assertEqual(seen, [f"failed {i}" for i in range(6)])
        self.assertEqual((clock.getDelayedCalls(), limit.suppressed), ([], 0))

    def test_summary(self):
        """
        Past C{perSecond} in one second, warnings are counted; the next second logs
        again; C{summarySeconds} after the first one left out, one line says how many
        were, with the last of them.  Each kind has its own count.
        """
        seen = captured(self, "test.limit")
        clock, limit = self.limit()
        for i in range(10):
            limit.warn("connect to {upstream} failed: {n}", upstream="127.0.0.1:1", n=i)
            limit.warn("timed out")
        self.assertEqual(sorted(seen), sorted([f"connect to 127.0.0.1:1 failed: {i}" for i in range(3)]
                                              + ["timed out"] * 3))
        self.assertEqual(limit.suppressed, 14)
        clock.advance(1)
        limit.warn("connect to {upstream} failed: {n}", upstream="127.0.0.1:1", n=10)
        self.assertEqual(seen[-1], "connect to 127.0.0.1:1 failed: 10")
        for i in range(11, 15):
            limit.warn("connect to {upstream} failed: {n}", upstream="127.0.0.1:1", n=i)
        self.assertEqual((seen[-1], limit.suppressed), ("connect to 127.0.0.1:1 failed: 12", 16))
        clock.advance(9)
        self.assertEqual(sorted(seen[-2:]), [
            "7 more like this in the last 10 s: timed out",
            "9 more like this in the last 10 s: connect to 127.0.0.1:1 failed: 14",
        ])
        self.assertEqual(clock.getDelayedCalls(), [])
        limit.warn("timed out")
        self.assertEqual(seen[-1], "timed out")

    def test_flush(self):
        """
        At shutdown, the summaries not yet due are logged at once.
        """
        seen = captured(self, "test.limit")
        clock, limit = self.limit()
        for i in range(5):
            limit.warn("failed {n}", n=i)
        clock.advance(2)
        limit.flush()
        self.assertEqual(seen[-1], "2 more like this in the last 2 s: failed 4")
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_exchangeWarnings(self):
        """
        A service refusing every connection: the exchanges' warnings are limited to ten
        a second, then summed up, while every request still gets its 502.
        """
        seen = captured(self, "sidecar.exchange")
        h = Harness()
        for i in range(30):
            door, client = h.client()
            door.dataReceived(GET)
            h.reactor.tcpClients[-1][2].clientConnectionFailed(None, Failure(ConnectionRefusedError()))
            self.assertIn(b"HTTP/1.1 502 Bad Gateway\r\n", client.value())
        self.assertEqual(len(seen), 10)
        self.assertIn("upstream connect to 127.0.0.1:8080 failed for GET /x: Connection was refused", seen[0])
        h.reactor.advance(10)
        self.assertEqual(len(seen), 11)
        self.assertRegex(seen[-1], r"^20 more like this in the last 10 s: upstream connect to 127\.0\.0\.1:8080 "
                                   r"failed for GET /x: ")


    def test_tcpWarnings(self):
        """
        The TCP splice's warnings are limited the same way: connections refused for
        want of a route, fifteen in a second, log ten lines, then a summary.
        """
        from twisted.internet.address import IPv4Address
        from twisted.internet.testing import StringTransport

        from sidecar.stats import Recorder
        from sidecar.tcp import TcpProxy

        seen = captured(self, "sidecar.tcp")
        clock = MemoryReactorClock()
        proxy = TcpProxy(clock, Recorder([]), 5.0, None)
        for i in range(15):
            proxy.refusal("no original destination").makeConnection(
                StringTransport(peerAddress=IPv4Address("TCP", "10.0.0.1", 1000 + i)))
        self.assertEqual(len(seen), 10)
        self.assertEqual(seen[0], "connection from 10.0.0.1:1000 closed (NR): no original destination")
        clock.advance(10)
        self.assertEqual(seen[10], "5 more like this in the last 10 s: connection from 10.0.0.1:1014 closed (NR): "
                                   "no original destination")


class UnreadStdoutProcessTests(unittest.SynchronousTestCase):
    """
    The sidecar as a real process whose standard output is a 4 KiB pipe nobody reads,
    in front of a service port that refuses every connection, so that every request
    fails and logs a warning through twistd's log.
    """

    def sidecar(self, runner: List[str], *flags: str) -> tuple:
        """
        Start the sidecar with C{runner} and C{flags}; return its listening and admin
        ports and the read end of its standard output.
        """
        read, write = os.pipe()
        fcntl.fcntl(write, getattr(fcntl, "F_SETPIPE_SZ", 1031), 4096)
        listen, admin, refused = freePort(), freePort(), freePort()
        errors = FilePath(self.mktemp())
        directory = FilePath(self.mktemp())
        directory.makedirs()
        with open(errors.path, "wb") as err:
            process = subprocess.Popen(
                runner + ["sidecar", "--listen", f"tcp:{listen}:interface=127.0.0.1", "--admin", str(admin),
                          "--health", "none", "--upstream", str(refused), "--access-log-buffer", "4096", *flags],
                stdin=subprocess.DEVNULL, stdout=write, stderr=err, env=environment(), cwd=directory.path)
        os.close(write)
        self.addCleanup(os.close, read)
        self.addCleanup(lambda: process.poll() is None and (process.kill(), process.wait(10)))
        waitFor(lambda: canConnect(admin) and request(admin, "GET", "/ready")[0] == 200, "the sidecar")
        return listen, admin, read

    def failing(self, listen: int, admin: int) -> dict:
        """
        Two bursts of requests a second apart (so that each second's warnings meet a
        full buffer), each answered 502 in under 2 s, with C{/ready} 200 between;
        then the metrics.
        """
        for burst in range(3):
            for i in range(30):
                started = time.monotonic()
                self.assertEqual(request(listen, "GET", f"/fail?b={burst}&n={i}", timeout=5)[0], 502, (burst, i))
                self.assertLess(time.monotonic() - started, 2.0, (burst, i))
                if i % 10 == 0:
                    self.assertEqual(request(admin, "GET", "/ready", timeout=5)[:3:2], (200, b"LIVE\n"))
            time.sleep(1.05)
        metrics = request(admin, "GET", "/stats/prometheus", timeout=5)[2].decode()
        return {s.name: s.value for f in text_string_to_metric_families(metrics) for s in f.samples}

    def test_twistdSharedWithTheAccessLog(self) -> None:
        """
        C{twistd -n sidecar --access-log -}: while the pipe is full, every request is
        answered 502 at once and C{/ready} stays 200; the log lines and records that
        did not fit are counted (C{sidecar_log_dropped_lines_total},
        C{sidecar_access_log_dropped_records_total}).  Once the pipe is read, each
        gets its one line, and the output holds only whole lines.
        """
        listen, admin, read = self.sidecar(
            [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "-n", "--pidfile="],
            "--access-log", "-")
        samples = self.failing(listen, admin)
        self.assertGreater(samples["sidecar_log_dropped_lines_total"], 0)
        self.assertGreater(samples["sidecar_access_log_dropped_records_total"], 0)
        received = bytearray()
        Background(lambda: readAll(read, received))
        waitFor(lambda: b"log: dropped " in received and b"access log: dropped " in received,
                "the dropped-lines lines", timeout=10)
        self.assertEqual(request(listen, "GET", "/fail?marker", timeout=5)[0], 502)
        waitFor(lambda: b"/fail?marker" in received, "the next record", timeout=10)
        [count] = re.findall(rb"\] log: dropped (\d+) lines in ", bytes(received))
        self.assertGreaterEqual(int(count), samples["sidecar_log_dropped_lines_total"])
        for line in bytes(received).decode().splitlines():
            self.assertRegex(line, r'^(\d{4}-\d\d-\d\dT[\d:]+[+-]\d{4} \[[\w.#-]+\] |\[\d{4}-\d\d-\d\dT[\d:.]+Z\] "GET /fail)')

    def test_twistSeparateWriter(self) -> None:
        """
        C{python -m twisted sidecar --access-log none} (JSON log lines on a pipe): the
        proxy keeps answering while its own log's output is not read; once it is, one
        line tells how many log lines were dropped.
        """
        listen, admin, read = self.sidecar([sys.executable, "-m", "twisted"], "--access-log", "none")
        samples = self.failing(listen, admin)
        self.assertGreater(samples["sidecar_log_dropped_lines_total"], 0)
        self.assertNotIn("sidecar_access_log_dropped_records_total", samples)
        received = bytearray()
        Background(lambda: readAll(read, received))
        waitFor(lambda: b'"log_format": "log: dropped {count} lines' in received, "the dropped-lines line",
                timeout=10)

    def test_startUpErrorIsWritten(self) -> None:
        """
        A start-up error (the listening port is taken) is written to the pipe before
        twistd exits, though the reactor never ran.
        """
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            read, write = os.pipe()
            self.addCleanup(os.close, read)
            process = subprocess.Popen(
                [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "-n", "--pidfile=",
                 "sidecar", "--listen", f"tcp:{port}:interface=127.0.0.1", "--admin", "none", "--health", "none"],
                stdin=subprocess.DEVNULL, stdout=write, stderr=subprocess.DEVNULL, env=environment())
            os.close(write)
            self.addCleanup(lambda: process.poll() is None and (process.kill(), process.wait(10)))
            received = bytearray()
            reader = Background(lambda: readAll(read, received))
            self.assertEqual(process.wait(30), 1)
            reader.join(5)
        self.assertIn(f"Couldn't listen on 127.0.0.1:{port}: [Errno 98] Address already in use.".encode(),
                      bytes(received))
