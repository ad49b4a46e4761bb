# -*- test-case-name: tests.test_accesslog -*-
"""
Access log formats (pure functions of a L{Record}) and the writer that batches lines.

Three formats:
  - C{seed}: the article's block per request;
  - C{text}: one line per request in the spirit of Istio's default access log;
  - C{json}: one JSON object per line, snake_case fields.
"""

from __future__ import annotations

import json
import time
from typing import IO, Callable, Dict, Optional

from sidecar.exchange import Record


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
        f'{rec.downstreamRemoteAddress}\n'
    )


def toJSON(rec: Record) -> Dict[str, object]:
    """
    The record as the C{json} format's fields.
    """
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


class AccessLog:
    """
    Writes formatted records to a file, batching the writes of one reactor turn into one
    flush.

    @ivar stream: the text file written to.
    """

    def __init__(self, stream: IO[str], fmt: Callable[[Record], str], clock) -> None:
        self.stream = stream
        self.format = fmt
        self.clock = clock
        self._flushCall = None

    def __call__(self, rec: Record) -> None:
        self.stream.write(self.format(rec))
        if self._flushCall is None:
            self._flushCall = self.clock.callLater(0, self.flush)

    def flush(self) -> None:
        """
        Push buffered lines to the file.
        """
        if self._flushCall is not None and self._flushCall.active():
            self._flushCall.cancel()
        self._flushCall = None
        try:
            self.stream.flush()
        except (OSError, ValueError):
            pass


# -- opaque TCP connections (L{sidecar.tcp.TcpRecord}) -------------------------------

from sidecar.tcp import TcpRecord  # noqa: E402


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
        f'{rec.downstreamRemoteAddress}\n'
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
