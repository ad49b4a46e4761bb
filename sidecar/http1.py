# -*- test-case-name: tests.test_http1 -*-
"""
HTTP/1.1 on the wire, as pure functions: request and response heads, the proxy's own
replies, C{100 Continue}, C{101}, chunk framing and reason phrases.

Both front doors and the HTTP/1.1 upstream build their bytes here and nowhere else.
Framing headers (C{Content-Length}, C{Transfer-Encoding}) are always written from
the proxy's own parse of the message, passed in as numbers and flags: the header
lists given to these functions never carry framing (L{sidecar.headers} removes it).
"""

from __future__ import annotations

from http import HTTPStatus
from typing import Dict, List, Optional, Sequence, Tuple

Header = Tuple[bytes, bytes]

#: The interim answer to C{Expect: 100-continue}.
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"

#: The end of a chunked body: the last chunk and an empty trailer section (trailers are
#: not forwarded).
LAST_CHUNK = b"0\r\n\r\n"

#: Headers a local reply never takes from a filter: the proxy frames its own replies.
_FRAMING = frozenset([b"content-length", b"transfer-encoding", b"connection", b"server"])

_REASONS: Dict[int, bytes] = {s.value: s.phrase.encode("ascii") for s in HTTPStatus}


def reason(status: int) -> bytes:
    """
    The standard reason phrase of C{status}, or C{b""} for an unregistered code.
    """
    return _REASONS.get(status, b"")


def chunk(data: bytes) -> Tuple[bytes, bytes, bytes]:
    """
    C{data} as one chunk: the parts to write, in order (no copy of C{data}).
    """
    return (b"%x\r\n" % len(data), data, b"\r\n")


#: C{name: value} from a header pair (the lines are joined in C, not in a Python loop).
_line = b": ".join


def _head(firstLine: bytes, headers: Sequence[Header], tail: bytes) -> bytes:
    """
    A head: C{firstLine} (with its CRLF), the header lines, then C{tail} (the lines the
    proxy writes itself, each with its CRLF) and the blank line.
    """
    if headers:
        return b"".join((firstLine, b"\r\n".join(map(_line, headers)), b"\r\n", tail, b"\r\n"))
    return b"".join((firstLine, tail, b"\r\n"))


def _framing(contentLength: Optional[int], chunked: bool) -> bytes:
    """
    The framing line of a head, from the proxy's own parse: chunked, a length, or none.
    """
    if chunked:
        return b"Transfer-Encoding: chunked\r\n"
    if contentLength is not None:
        return b"Content-Length: %d\r\n" % contentLength
    return b""


def requestHead(method: bytes, target: bytes, headers: Sequence[Header],
                contentLength: Optional[int], chunked: bool) -> bytes:
    """
    The head of a request to the service, always HTTP/1.1.

    @param headers: the headers after the forwarding rules, without framing.
    @param contentLength: the body length the proxy parsed, or C{None}.
    @param chunked: the body is sent chunked (it had no length the proxy knew).
    """
    return _head(b"%s %s HTTP/1.1\r\n" % (method, target), headers, _framing(contentLength, chunked))


def responseHead(status: int, statusReason: bytes, headers: Sequence[Header],
                 contentLength: Optional[int] = None, chunked: bool = False,
                 connection: Optional[bytes] = None) -> bytes:
    """
    The head of a response to a client, always HTTP/1.1.  An empty C{statusReason}
    becomes the standard one.

    @param headers: the headers after the forwarding rules, without framing or
        connection headers.
    @param contentLength: a C{Content-Length} to write (the proxy's own parse), or
        C{None}.
    @param chunked: write C{Transfer-Encoding: chunked} (the door re-chunks the body).
    @param connection: a C{Connection} value to write (C{close}, C{keep-alive}), or
        C{None}.
    """
    tail = _framing(contentLength, chunked)
    if connection is not None:
        tail += b"Connection: %s\r\n" % connection
    return _head(b"HTTP/1.1 %d %s\r\n" % (status, statusReason or reason(status)), headers, tail)


def switchingProtocols(statusReason: bytes, headers: Sequence[Header], upgrade: bytes) -> bytes:
    """
    A C{101} to the client, naming the protocol the service switched to.
    """
    return responseHead(101, statusReason, list(headers) + [(b"Connection", b"Upgrade"), (b"Upgrade", upgrade)])


def localReply(status: int, server: bytes, body: bytes, close: bool, keepAlive10: bool,
               withBody: bool = True, headers: Sequence[Header] = ()) -> bytes:
    """
    A response made by the proxy itself (an error, a refusal): plain text with a length.

    @param close: say C{Connection: close}.
    @param keepAlive10: say C{Connection: keep-alive} (an HTTP/1.0 client kept open).
    @param withBody: send the body (not for C{HEAD}); the length is the body's anyway.
    @param headers: more headers (a filter's C{WWW-Authenticate}, C{Retry-After});
        a C{Content-Type} among them replaces C{text/plain}.
    """
    contentType = b"text/plain"
    extra = []
    for name, value in headers:
        if name.lower() == b"content-type":
            contentType = value
        elif name.lower() not in _FRAMING:
            extra.append((name, value))
    parts = [
        b"HTTP/1.1 %d %s\r\nServer: %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n"
        % (status, reason(status), server, contentType, len(body))
    ]
    for name, value in extra:
        parts += (name, b": ", value, b"\r\n")
    if close:
        parts.append(b"Connection: close\r\n")
    elif keepAlive10:
        parts.append(b"Connection: keep-alive\r\n")
    parts.append(b"\r\n")
    if withBody:
        parts.append(body)
    return b"".join(parts)
