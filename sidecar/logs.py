# -*- test-case-name: tests.test_logs -*-
"""
The sidecar's own log (twistd's, through C{twisted.logger}), kept from blocking the
reactor and from flooding.

Two parts:
  - L{LogStream}: the text stream twistd's (or C{twist}'s) file log observer writes
    to, in place of a standard output that is a pipe, terminal or socket.  Each event's
    text is offered whole to a L{sidecar.accesslog.LineWriter}: written without
    blocking, held in a bounded buffer while the output is not read, dropped and
    counted beyond it.  When the access log also goes to standard output the two share
    one writer, so their lines never interleave within a line.
  - L{WarningLimit}: at most a few warnings of one kind per second (a failing upstream
    fails every request); the rest are counted, and one summary line per episode says
    how many were left out.

When the runner decides where its log goes, after the plugin's C{makeService}:

  - C{twistd -n} (or C{--logfile -}): C{AppLogger.start} builds
    C{textFileLogObserver(sys.stdout)}, reading C{sys.stdout} then; so
    L{takeOverRunnerLog} puts a L{LogStream} there first.  twistd then redirects
    C{sys.stdout} and C{sys.stderr} into the log, so C{print} and tracebacks reach the
    stream too;
  - C{python -m twisted} (C{twist}): the file is C{TwistOptions["logFile"]} (standard
    output, C{+} for standard error, or a file it opened); it is replaced there;
  - left alone: a regular file (C{--logfile FILE}, a daemon's C{twistd.log}, or a
    standard output redirected to a file: a file never makes a write wait),
    C{--syslog}, and C{--logger} (an observer the user chose).
"""

from __future__ import annotations

import os
import stat
import sys
import threading
from typing import Any, Dict, Optional

from twisted.logger import Logger, formatEvent

log = Logger()

#: Warnings of one kind logged per second at most before they are only counted.
WARNINGS_PER_SECOND = 10

#: Seconds after the first warning left out that the summary of the episode is logged.
SUMMARY_SECONDS = 10.0


class LogStream:
    """
    A text stream for C{twisted.logger}'s L{FileLogObserver<twisted.logger.FileLogObserver>}
    that never blocks: each C{write} is one event, offered whole to a L{LineWriter}
    (L{sidecar.accesslog.LineWriter}); what does not fit is dropped and counted, and one
    line per episode, once the output has taken everything again, says how many.

    The observer calls C{flush} after each event: the writer then writes at once,
    unless bytes already wait for the output.  So a line is out before the reactor runs
    or after it stops (a start-up error, the shutdown), and costs one write when the
    output is idle.

    An event logged from another thread (the thread pool that formats the metrics) is
    handed to the reactor's thread with C{callFromThread}.

    @ivar writer: the L{LineWriter}, perhaps the access log's.
    @ivar dropped: lines dropped because the buffer was full, since the start.
    """

    encoding = "utf-8"

    def __init__(self, writer: Any, reactor: Any, thread: Optional[int] = None) -> None:
        """
        @param writer: a L{sidecar.accesslog.LineWriter}.
        @param reactor: an C{IReactorTime} and C{IReactorThreads} (C{callFromThread}).
        @param thread: the ident of the reactor's thread (default: this thread's).
        """
        self.writer = writer
        self.reactor = reactor
        self.thread = threading.get_ident() if thread is None else thread
        self.dropped = 0
        self._episodeDrops = 0
        self._episodeStart = 0.0
        writer.drained.append(self._saidDropped)

    def write(self, text: str) -> None:
        """
        Hold one event's text for the output, or drop and count it.
        """
        if threading.get_ident() != self.thread:
            self.reactor.callFromThread(self._offer, text, True)
            return
        self._offer(text, False)

    def _offer(self, text: str, flush: bool) -> None:
        if not self.writer.offer(text.encode("utf-8", "backslashreplace")):
            self.dropped += 1
            if not self._episodeDrops:
                self._episodeStart = self.reactor.seconds()
            self._episodeDrops += 1
        elif flush:
            self.flush()

    def flush(self) -> None:
        """
        Write what is held now, unless bytes already wait for the output (then the
        reactor says when it is writable).
        """
        if threading.get_ident() == self.thread and not self.writer.waiting:
            self.writer.flush()

    def isatty(self) -> bool:
        return False

    def _saidDropped(self) -> None:
        if self._episodeDrops:
            count, self._episodeDrops = self._episodeDrops, 0
            log.warn("log: dropped {count} lines in {seconds:.1f} s while its output was not read "
                     "(buffer {limit} bytes)", count=count, limit=self.writer.limit,
                     seconds=max(0.0, self.reactor.seconds() - self._episodeStart))


def _blocksWhenFull(stream: Any) -> bool:
    """
    Whether writes to C{stream} can wait on a reader: a pipe, FIFO, terminal or socket,
    not a regular file (nor an object without a descriptor).
    """
    try:
        mode = os.fstat(stream.fileno()).st_mode
    except (AttributeError, OSError, ValueError):
        return False
    return not stat.S_ISREG(mode)


def logStreamFor(stream: Any, service: Any, reactor: Any) -> Optional[LogStream]:
    """
    A L{LogStream} to use in place of C{stream}, the runner's log file, or C{None} to
    leave it (a regular file, an object without a descriptor).  It writes through the
    access log's writer when that writes to the same file, else through a new one on a
    non-blocking open of C{stream}'s file (L{sidecar.accesslog.openOutput}), bounded as
    the access log.
    """
    from sidecar.accesslog import LineWriter, openOutput

    if not _blocksWhenFull(stream):
        return None
    accessLog = service.accessLog
    here = os.fstat(stream.fileno())
    if accessLog is not None:
        there = os.fstat(accessLog.fileno())
        if (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino):
            return LogStream(accessLog, reactor)
    return LogStream(LineWriter(openOutput("-", stream), reactor, service.config.accessLogBuffer), reactor)


def takeOverRunnerLog(runnerOptions: Any, service: Any, reactor: Any, stdio: Any = sys) -> Optional[LogStream]:
    """
    Give the runner (twistd or C{twist}) a L{LogStream} to log to, if it is about to
    log to a pipe, terminal or socket; record it as C{service.logStream}.  Called by
    C{makeService}, before the runner starts its log (see the module's docstring).

    @param runnerOptions: the runner's options (the parent of the plugin's), or C{None}
        when the plugin's options were parsed alone (nothing is done).
    @param stdio: where C{stdout} is (the C{sys} module).
    @return: the stream, or C{None} when the runner's log is left alone.
    """
    if runnerOptions is None:
        return None
    stream: Optional[LogStream] = None
    if "logFile" in runnerOptions:  # twist
        stream = logStreamFor(runnerOptions["logFile"], service, reactor)
        if stream is not None:
            runnerOptions["logFile"] = stream
    elif "nodaemon" in runnerOptions and "logfile" in runnerOptions:  # twistd on POSIX
        if runnerOptions.get("logger") or runnerOptions.get("syslog"):
            return None
        logfile = runnerOptions["logfile"]
        if logfile == "-" or (runnerOptions["nodaemon"] and not logfile):
            stream = logStreamFor(stdio.stdout, service, reactor)
            if stream is not None:
                stdio.stdout = stream
    service.logStream = stream
    return stream


class WarningLimit:
    """
    Logs at most C{perSecond} warnings of one kind (one format string) each second;
    past that, they are counted, and one summary line, C{summarySeconds} after the
    first one left out, says how many (and the last of them).  Nothing is kept or
    scheduled while warnings stay under the limit, and nothing at all while none are
    logged.

    @ivar suppressed: warnings left out since the start.
    """

    def __init__(self, clock: Any, logger: Logger, perSecond: int = WARNINGS_PER_SECOND,
                 summarySeconds: float = SUMMARY_SECONDS) -> None:
        """
        @param clock: an C{IReactorTime}.
        @param logger: where the warnings go (the namespace of the module they are
            about).
        """
        self.clock = clock
        self.log = logger
        self.perSecond = perSecond
        self.summarySeconds = summarySeconds
        self.suppressed = 0
        self._kinds: Dict[str, _Kind] = {}

    def warn(self, format: str, **fields: Any) -> None:
        """
        Log the warning, or count it if C{perSecond} of its kind were logged in the
        last second.
        """
        kind = self._kinds.get(format)
        now = self.clock.seconds()
        if kind is None:
            kind = self._kinds[format] = _Kind(now)
        elif now - kind.since >= 1.0:
            kind.since, kind.logged = now, 0
        if kind.logged < self.perSecond:
            kind.logged += 1
            self.log.warn(format, **fields)
            return
        self.suppressed += 1
        kind.left += 1
        kind.last = fields
        if kind.summary is None:
            kind.episodeStart = now
            kind.summary = self.clock.callLater(self.summarySeconds, self._summarize, format)

    def _summarize(self, format: str) -> None:
        kind = self._kinds[format]
        kind.summary = None
        count, kind.left = kind.left, 0
        if not count:
            return
        last = formatEvent(dict(kind.last or {}, log_format=format))
        kind.last = None
        self.log.warn("{count} more like this in the last {seconds:.0f} s: {last}", count=count, last=last,
                      seconds=self.clock.seconds() - kind.episodeStart)

    def flush(self) -> None:
        """
        Log the summaries due now (at shutdown).
        """
        for format, kind in list(self._kinds.items()):
            if kind.summary is not None:
                kind.summary.cancel()
                self._summarize(format)


class _Kind:
    """
    The count of one kind of warning.
    """

    __slots__ = ("since", "logged", "left", "last", "summary", "episodeStart")

    def __init__(self, since: float) -> None:
        self.since = since
        self.logged = 0
        self.left = 0
        self.last: Optional[Dict[str, Any]] = None
        self.summary: Any = None
        self.episodeStart = since
