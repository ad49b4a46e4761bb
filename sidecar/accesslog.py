# -*- test-case-name: tests.test_accesslog -*-
"""
Access log formats (pure functions of a L{Record}) and the writer that batches lines.

Three formats:
  - C{seed}: the article's block per request;
  - C{text}: one line per request in the spirit of Istio's default access log;
  - C{json}: one JSON object per line, snake_case fields.

The writer, L{LineWriter} (L{AccessLog} is one), never blocks the reactor.  A
container's log pipe can stall; a blocking write to it would freeze every request and
the readiness probe.  So the records of one reactor turn are written in one
non-blocking write; what the output does not take waits in a buffer of bounded size,
written when the output becomes writable again; a record that does not fit is dropped
and counted, and one line per episode says how many were lost once the output is read
again.  twistd's own log lines can go through the same writer (L{sidecar.logs}).
"""

from __future__ import annotations

import errno
import select
import json
import os
import socket
import stat
import sys
import time
from typing import Any, Callable, Dict, List, Optional

from twisted.logger import Logger
from twisted.python.failure import Failure

from sidecar.record import OUTBOUND, Record, TcpRecord

log = Logger()

#: The default bound of the bytes the access log holds while its output is not read:
#: about 4,000 C{text} records, a few seconds of a busy sidecar, so that a short stall
#: of the log reader loses nothing, while a long one costs at most this much memory.
LOG_BUFFER_BYTES = 1024 * 1024


def _ms(seconds: Optional[float]) -> Optional[int]:
    if seconds is None:
        return None
    return int(round(seconds * 1000.0))


def isoTime(seconds: float) -> str:
    """
    An RFC 3339 UTC timestamp with milliseconds, as Envoy's C{%START_TIME%}.
    """
    whole = int(seconds)
    millis = int((seconds - whole) * 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)) + ".%03dZ" % millis


def _dash(value: str) -> str:
    return value if value else "-"


def formatText(rec: Record) -> str:
    """
    One line in the spirit of Istio's default access log::

      [START_TIME] "METHOD PATH PROTOCOL" STATUS FLAGS BYTES_RECEIVED BYTES_SENT
      DURATION UPSTREAM_SERVICE_TIME "X-FORWARDED-FOR" "USER-AGENT" "REQUEST-ID"
      "AUTHORITY" "UPSTREAM_HOST" DOWNSTREAM_REMOTE_ADDRESS
    """
    ust = _ms(rec.upstreamServiceTime)
    return (
        f'[{isoTime(rec.startTime)}] "{rec.method} {rec.path} {rec.protocol}" {rec.status} '
        f'{rec.flags} {rec.bytesReceived} {rec.bytesSent} {_ms(rec.duration)} '
        f'{"-" if ust is None else ust} "{_dash(rec.forwardedFor)}" "{_dash(rec.userAgent)}" '
        f'"{_dash(rec.requestId)}" "{_dash(rec.authority)}" "{_dash(rec.upstreamHost)}" '
        f'{rec.downstreamRemoteAddress}{_outbound(rec)}\n'
    )


def _outbound(rec: Any) -> str:
    """
    The text formats' last column on an outbound record: C{outbound} and the
    destination's verified SPIFFE id (C{-} outside the mesh); inbound lines are
    unchanged.
    """
    if rec.direction != OUTBOUND:
        return ""
    peer = rec.peer
    return f" outbound {_dash(peer.principal) if peer is not None else '-'}"


def _peerPrincipal(rec: Any) -> Optional[str]:
    peer = rec.peer
    return (peer.principal or None) if (peer is not None and rec.direction == OUTBOUND) else None


def toJSON(rec: Record) -> Dict[str, object]:
    """
    The record as the C{json} format's fields (a gRPC call's also has C{grpc_status}
    and its message counts).
    """
    fields = _jsonFields(rec)
    if rec.grpc:
        fields["grpc_status"] = rec.grpcStatus or None
        fields["request_messages"] = rec.requestMessages
        fields["response_messages"] = rec.responseMessages
    return fields


def _jsonFields(rec: Record) -> Dict[str, object]:
    return {
        "start_time": isoTime(rec.startTime),
        "method": rec.method,
        "path": rec.path,
        "protocol": rec.protocol,
        "response_code": rec.status,
        "response_flags": rec.flags,
        "bytes_received": rec.bytesReceived,
        "bytes_sent": rec.bytesSent,
        "duration_ms": _ms(rec.duration),
        "upstream_service_time_ms": _ms(rec.upstreamServiceTime),
        "x_forwarded_for": rec.forwardedFor or None,
        "user_agent": rec.userAgent or None,
        "request_id": rec.requestId or None,
        "authority": rec.authority or None,
        "upstream_host": rec.upstreamHost or None,
        "downstream_remote_address": rec.downstreamRemoteAddress,
        "downstream_peer_principal": rec.downstreamPeerPrincipal or None,
        "direction": rec.direction,
        "upstream_peer_principal": _peerPrincipal(rec),
    }


def formatJSON(rec: Record) -> str:
    """
    One JSON object per line.
    """
    return json.dumps(toJSON(rec), separators=(",", ":")) + "\n"


def formatSeed(rec: Record) -> str:
    """
    The article's block, with the sizes being the body bytes actually transferred.
    """
    authority = rec.authority or rec.upstreamHost
    return (
        f"Original URL: http://{authority}{rec.path}\n"
        f"Proxy URL: http://{rec.upstreamHost}{rec.path}\n"
        f"Request Duration: {_goDuration(rec.duration)}\n"
        f"Request Size: {rec.bytesReceived}\n"
        f"Response Size: {rec.bytesSent}\n"
        f"Response Status: {rec.status}\n\n"
    )


def _goDuration(seconds: float) -> str:
    """
    A duration as Go's C{time.Duration} prints it (C{1.979348ms}), as in the article.
    """
    if seconds >= 1:
        return f"{seconds:.6f}".rstrip("0").rstrip(".") + "s"
    if seconds >= 0.001:
        return f"{seconds * 1e3:.6f}".rstrip("0").rstrip(".") + "ms"
    return f"{seconds * 1e6:.3f}".rstrip("0").rstrip(".") + "µs"


FORMATS: Dict[str, Callable[[Record], str]] = {
    "seed": formatSeed,
    "text": formatText,
    "json": formatJSON,
}


#: The largest write the kernel makes atomic on a pipe (4096 on Linux).
PIPE_BUF = getattr(select, "PIPE_BUF", 512)


class LogOutput:
    """
    A file descriptor written without blocking.

    @ivar fd: the descriptor, ours (closed by L{close}).
    @ivar isSocket: whether it is a socket (written with C{MSG_DONTWAIT}, which leaves
        the descriptor's flags alone).
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._socket: Optional[socket.socket] = None
        if stat.S_ISSOCK(os.fstat(fd).st_mode):
            self._socket = socket.socket(fileno=fd)

    @property
    def isSocket(self) -> bool:
        return self._socket is not None

    def fileno(self) -> int:
        return self.fd

    def write(self, data: Any) -> int:
        """
        Write what the descriptor takes now; raise L{BlockingIOError} when it takes
        nothing.
        """
        if self._socket is not None:
            return self._socket.send(data, socket.MSG_DONTWAIT)
        return os.write(self.fd, data)

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
        else:
            os.close(self.fd)


def openOutput(path: str, stdout: Any = None) -> LogOutput:
    """
    The output of the access log: standard output for C{"-"}, else a file opened for
    appending.

    Standard output is shared with whatever else writes to descriptor 1 with blocking
    writes (twistd's own log, unless L{sidecar.logs} writes it through this output).
    C{O_NONBLOCK} belongs to an open file description, which C{dup} shares, so the
    access log gets a description of its own where that matters:
      - a pipe, FIFO or terminal is opened anew through C{/proc/self/fd/1}, with
        C{O_NONBLOCK};
      - a socket (systemd's journal) is written with C{MSG_DONTWAIT} on a duplicate;
      - a regular file is duplicated, sharing its offset with twistd's writes so that
        neither overwrites the other (a file never makes a write wait);
      - without C{/proc}, a pipe's duplicate is made non-blocking: then twistd's own
        writes may fail while the pipe is full, rather than the proxy freezing.

    @param stdout: the standard output stream (default C{sys.stdout}; C{sys.__stdout__}
        if twistd has already replaced it).
    """
    if path != "-":
        return LogOutput(os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NONBLOCK,
                                 0o644))
    stream = stdout if stdout is not None else sys.stdout
    try:
        fd = stream.fileno()
    except (AttributeError, OSError, ValueError):
        fd = 1
    mode = os.fstat(fd).st_mode
    if stat.S_ISREG(mode) or stat.S_ISSOCK(mode):
        return LogOutput(os.dup(fd))
    try:
        return LogOutput(os.open(f"/proc/self/fd/{fd}", os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC | os.O_NONBLOCK))
    except OSError:
        copy = os.dup(fd)
        os.set_blocking(copy, False)
        return LogOutput(copy)


class LineWriter:
    """
    Writes whole lines to a L{LogOutput} without ever blocking: the lines offered in one
    reactor turn go out in one write on the next turn; what the output does not take
    waits (with the lines that follow) in a buffer of at most C{limit} bytes, written as
    the reactor says the output is writable; a line that does not fit is refused, and
    the one who offered it counts it.  Every byte written to the output goes through
    here, so lines from several sources (the access log, twistd's log) never interleave
    within a line.

    This is also an C{IWriteDescriptor}, registered with the reactor only while bytes
    wait.

    @ivar output: where the lines go.
    @ivar limit: the most bytes held (waiting and this turn's lines together).
    @ivar written: bytes the output has taken.
    @ivar drained: called (in order) each time the output has taken everything held:
        where the sources say what they dropped meanwhile.
    """

    def __init__(self, output: LogOutput, reactor: Any, limit: int = LOG_BUFFER_BYTES,
                 wholeLines: bool = False) -> None:
        """
        @param reactor: an C{IReactorTime} and C{IReactorFDSet}: the turn's flush, and
            being told when the output is writable again.
        @param wholeLines: several processes share the output (C{--workers}): every
            write is whole lines of at most C{PIPE_BUF} bytes (a longer line alone), so
            that the kernel never interleaves two processes' lines, on a pipe or a file
            opened for appending.
        """
        self.wholeLines = wholeLines
        self.output = output
        self.reactor = reactor
        self.limit = limit
        self.written = 0
        self.drained: List[Callable[[], None]] = []
        self._lines: List[bytes] = []
        self._pending = b""
        self._buffered = 0
        self._flushCall: Any = None
        self._waiting = False
        self._broken = False

    @property
    def buffered(self) -> int:
        """
        Bytes held now, not yet taken by the output.
        """
        return self._buffered

    @property
    def waiting(self) -> bool:
        """
        Whether bytes wait for the output to become writable (then a write now would
        take nothing).
        """
        return self._waiting

    def offer(self, line: bytes) -> bool:
        """
        Hold C{line} for the next write; C{False} (and nothing held) when it does not
        fit in the buffer or the output has failed.  A line longer than the whole
        buffer (a long traceback) is still taken when nothing else is held.
        """
        if self._broken or (self._buffered + len(line) > self.limit and self._buffered):
            return False
        self._lines.append(line)
        self._buffered += len(line)
        if self._flushCall is None and not self._waiting:
            self._flushCall = self.reactor.callLater(0, self.flush)
        return True

    def flush(self) -> None:
        """
        Write what is held, as much as the output takes now.
        """
        if self._flushCall is not None and self._flushCall.active():
            self._flushCall.cancel()
        self._flushCall = None
        if self._lines:
            self._pending = self._pending + b"".join(self._lines) if self._pending else b"".join(self._lines)
            self._lines = []
        self._writeSome()

    def _writeSome(self) -> None:
        pending = self._pending
        view = memoryview(pending)
        offset = 0
        while offset < len(pending) and not self._broken:
            end = len(pending)
            if self.wholeLines and end - offset > PIPE_BUF:
                cut = pending.rfind(b"\n", offset, offset + PIPE_BUF)
                end = cut + 1 if cut >= 0 else pending.find(b"\n", offset) + 1 or len(pending)
            try:
                n = self.output.write(view[offset:end])
            except BlockingIOError:
                break
            except InterruptedError:
                continue
            except OSError as e:
                # A closed pipe (EPIPE) or a full disk: the proxy goes on, and every
                # later line is refused and counted.
                self._fail(os.strerror(e.errno or errno.EIO))
                return
            offset += n
        self.written += offset
        self._pending = pending[offset:]
        self._buffered -= offset
        if self._pending:
            if not self._waiting:
                self._waiting = True
                self.reactor.addWriter(self)
            return
        if self._waiting:
            self._waiting = False
            self.reactor.removeWriter(self)
        # Last, as what they log may come back here to be written.
        for drained in self.drained:
            drained()

    def _fail(self, why: str) -> None:
        self._broken = True
        self._pending = b""
        self._lines = []
        self._buffered = 0
        if self._waiting:
            self._waiting = False
            self.reactor.removeWriter(self)
        log.error("log output: writing failed ({why}); the bytes waiting are lost and later lines are "
                  "dropped", why=why)

    # IWriteDescriptor, while bytes wait.

    def fileno(self) -> int:
        return self.output.fileno()

    def doWrite(self) -> None:
        if self._lines:
            self._pending += b"".join(self._lines)
            self._lines = []
        self._writeSome()

    def connectionLost(self, reason: Failure) -> None:
        if self._waiting:
            self._waiting = False
            self._fail(reason.getErrorMessage())

    def logPrefix(self) -> str:
        return "LineWriter"


class AccessLog(LineWriter):
    """
    A L{LineWriter} of formatted records (see there: batched, non-blocking, bounded):
    records that do not fit are dropped and counted, and one line per episode, once the
    output has taken everything again, says how many.  twistd's own log may write
    through it too (L{sidecar.logs}), when both go to standard output.

    @ivar dropped: records dropped because the buffer was full, since the start.
    """

    def __init__(self, output: LogOutput, fmt: Callable[[Record], str], reactor: Any,
                 limit: int = LOG_BUFFER_BYTES, wholeLines: bool = False) -> None:
        """
        @param reactor: an C{IReactorTime} and C{IReactorFDSet}: the turn's flush, and
            being told when the output is writable again.
        @param wholeLines: see L{LineWriter}.
        """
        LineWriter.__init__(self, output, reactor, limit, wholeLines)
        self.format = fmt
        self.dropped = 0
        self._episodeDrops = 0
        self._episodeStart = 0.0
        self.drained.append(self._saidDropped)

    def __call__(self, rec: Record) -> None:
        # L{LineWriter.offer}, inline: this runs once per request.
        if self._broken:
            self.dropped += 1
            return
        line = self.format(rec).encode("utf-8", "backslashreplace")
        if self._buffered + len(line) > self.limit:
            self.dropped += 1
            if not self._episodeDrops:
                self._episodeStart = self.reactor.seconds()
            self._episodeDrops += 1
            return
        self._lines.append(line)
        self._buffered += len(line)
        if self._flushCall is None and not self._waiting:
            self._flushCall = self.reactor.callLater(0, self.flush)

    def _saidDropped(self) -> None:
        if self._episodeDrops:
            # Said once the output is read again: said while it was not, the line
            # itself would wait on the same full pipe (twistd's log is often stdout).
            count, self._episodeDrops = self._episodeDrops, 0
            log.warn("access log: dropped {count} records in {seconds:.1f} s while its output was not read "
                     "(buffer {limit} bytes)", count=count, limit=self.limit,
                     seconds=max(0.0, self.reactor.seconds() - self._episodeStart))

    def logPrefix(self) -> str:
        return "AccessLog"


# -- opaque TCP connections (L{sidecar.record.TcpRecord}) ----------------------------


def formatTcpText(rec: TcpRecord) -> str:
    """
    One line per TCP connection in the columns of L{formatText}, as Envoy logs a TCP
    connection with Istio's format: C{"- - -"} and C{0} for the request and status,
    C{-} for every HTTP field::

      [START_TIME] "- - -" 0 FLAGS BYTES_RECEIVED BYTES_SENT DURATION - "-" "-" "-" "-"
      "UPSTREAM_HOST" DOWNSTREAM_REMOTE_ADDRESS
    """
    return (
        f'[{isoTime(rec.startTime)}] "- - -" 0 {rec.flags} {rec.bytesReceived} {rec.bytesSent} '
        f'{_ms(rec.duration)} - "-" "-" "-" "-" "{_dash(rec.upstreamHost)}" '
        f'{rec.downstreamRemoteAddress}{_outbound(rec)}\n'
    )


def toTcpJSON(rec: TcpRecord) -> Dict[str, object]:
    """
    A TCP record as the C{json} format's fields: the same keys as L{toJSON} (the HTTP
    ones null, the status 0), with C{protocol} C{tcp}, how detection chose TCP, and
    why the connection ended when it did not end cleanly.
    """
    return {
        "start_time": isoTime(rec.startTime),
        "method": None,
        "path": None,
        "protocol": "tcp",
        "response_code": 0,
        "response_flags": rec.flags,
        "bytes_received": rec.bytesReceived,
        "bytes_sent": rec.bytesSent,
        "duration_ms": _ms(rec.duration),
        "upstream_service_time_ms": None,
        "x_forwarded_for": None,
        "user_agent": None,
        "request_id": None,
        "authority": None,
        "upstream_host": rec.upstreamHost or None,
        "downstream_remote_address": rec.downstreamRemoteAddress,
        "downstream_peer_principal": rec.downstreamPeerPrincipal or None,
        "direction": rec.direction,
        "upstream_peer_principal": _peerPrincipal(rec),
        "detected": rec.detected or None,
        "connection_termination_details": rec.detail or None,
    }


def formatTcpJSON(rec: TcpRecord) -> str:
    """
    One JSON object per line.
    """
    return json.dumps(toTcpJSON(rec), separators=(",", ":")) + "\n"


def formatTcpSeed(rec: TcpRecord) -> str:
    """
    The article's block for a TCP connection: where it came from and went, how long,
    the bytes each way and the flags.
    """
    return (
        f"TCP Connection: {rec.downstreamRemoteAddress} -> {_dash(rec.upstreamHost)}\n"
        f"Connection Duration: {_goDuration(rec.duration)}\n"
        f"Bytes Received: {rec.bytesReceived}\n"
        f"Bytes Sent: {rec.bytesSent}\n"
        f"Response Flags: {rec.flags}\n\n"
    )


TCP_FORMATS: Dict[str, Callable[[TcpRecord], str]] = {
    "seed": formatTcpSeed,
    "text": formatTcpText,
    "json": formatTcpJSON,
}


def tcpSink(writer: AccessLog, fmt: Callable[[TcpRecord], str]) -> Callable[[TcpRecord], None]:
    """
    A sink of TCP records for the recorder that writes through C{writer} (the same
    buffer, order and non-blocking output as the HTTP records), formatting them with
    C{fmt}; the HTTP records' path is untouched.
    """
    def sink(rec: TcpRecord) -> None:
        http = writer.format
        writer.format = fmt  # type: ignore[assignment]
        try:
            writer(rec)  # type: ignore[arg-type]
        finally:
            writer.format = http

    return sink
