# -*- test-case-name: tests.test_headers -*-
"""
Pure forwarding rules for HTTP/1.1 heads: hop-by-hop removal (RFC 9110 7.6.1),
C{X-Forwarded-*}, the request id, the C{Server} header.

Everything here is a function of plain data (lists of C{(name, value)} byte pairs, in
the order and case the peer sent them) and returns plain data, so it is tested without
a reactor and shared by both front doors.
"""

from __future__ import annotations

import random
from typing import List, Optional, Tuple

import attrs

Header = Tuple[bytes, bytes]
Headers = List[Header]

#: Headers that describe one connection, never forwarded (RFC 9110 7.6.1, RFC 9112).
#: C{transfer-encoding} is framing: we re-frame bodies ourselves.  C{upgrade} is kept
#: only when the request is an upgrade.  C{expect} is answered by the proxy itself.
HOP_BY_HOP = frozenset(
    [
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"transfer-encoding",
        b"trailer",
        b"upgrade",
    ]
)

#: Headers the proxy owns on the upstream request: a client's copy is dropped.
_OWNED_REQUEST = frozenset([b"x-forwarded-proto", b"x-forwarded-client-cert", b"expect"])

# What the rules do with a header, by lower-cased name (one dict lookup per header on
# the hot path; a name not listed passes unchanged).
(_DROP, _CONNECTION, _FRAMING, _UPGRADE, _EXPECT, _HOST, _FORWARDED_FOR, _REQUEST_ID,
 _USER_AGENT, _LENGTH, _SERVER) = range(11)
_REQUEST_KINDS = {name: _DROP for name in HOP_BY_HOP | _OWNED_REQUEST}
_REQUEST_KINDS.update({
    b"connection": _CONNECTION, b"transfer-encoding": _FRAMING, b"upgrade": _UPGRADE,
    b"expect": _EXPECT, b"host": _HOST, b"x-forwarded-for": _FORWARDED_FOR,
    b"x-request-id": _REQUEST_ID, b"user-agent": _USER_AGENT, b"content-length": _LENGTH,
})
_RESPONSE_KINDS = {name: _DROP for name in HOP_BY_HOP}
_RESPONSE_KINDS.update({
    b"connection": _CONNECTION, b"transfer-encoding": _FRAMING, b"upgrade": _UPGRADE,
    b"server": _DROP, b"content-length": _LENGTH,
})


#: Tokens a service's C{Connection} header may not nominate for removal: the proxy frames
#: the body from its own parse (C{Content-Length} is the parsed length, C{Transfer-Encoding}
#: is the proxy's own), and C{Server} is the proxy's.  Other nominated headers go.
_RESPONSE_UNNOMINABLE = frozenset([
    b"close", b"keep-alive", b"upgrade", b"content-length", b"transfer-encoding", b"server",
])


def newRequestId(_bits=random.getrandbits) -> str:
    """
    A random (version 4) UUID in its text form.

    A request id needs uniqueness, not secrecy, so this uses the Mersenne Twister rather
    than C{os.urandom}: it is three times cheaper than C{str(uuid.uuid4())}.
    """
    h = "%032x" % _bits(128)
    return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{'89ab'[int(h[16], 16) & 3]}{h[17:20]}-{h[20:]}"


def connectionTokens(value: bytes) -> List[bytes]:
    """
    The lower-cased tokens of a C{Connection} header value.
    """
    return [t.strip().lower() for t in value.split(b",") if t.strip()]


@attrs.define(slots=True)
class RequestHead:
    """
    What the proxy learnt from a client's request head, and the head to send upstream.

    @ivar head: the request head for the upstream, ready to write.
    @ivar authority: the C{Host} header (empty if none).
    @ivar requestId: the C{X-Request-Id} sent upstream (the client's or a new one).
    @ivar forwardedFor: the C{X-Forwarded-For} value sent upstream.
    @ivar userAgent: the C{User-Agent} header, or empty.
    @ivar chunked: the request body is chunked (and is re-chunked upstream).
    @ivar contentLength: the request body's length when it has a C{Content-Length}.
    @ivar expectContinue: the client asked for C{100 Continue}.
    @ivar upgrade: the request asks to switch protocols (C{Upgrade} with
        C{Connection: upgrade}); the head keeps both for the upstream.
    @ivar error: a sentence when the head must be refused with a 400, else C{None}.
    """

    head: bytes = b""
    authority: str = ""
    requestId: str = ""
    forwardedFor: str = ""
    userAgent: str = ""
    chunked: bool = False
    contentLength: Optional[int] = None
    expectContinue: bool = False
    upgrade: bool = False
    error: Optional[str] = None


def requestHead(
    method: bytes,
    target: bytes,
    version: str,
    headers: Headers,
    clientIP: str,
    proto: bytes = b"http",
    extra: Headers = (),  # type: ignore[assignment]
) -> RequestHead:
    """
    Apply the forwarding rules to a client's request head.

    @param method: the request method, as sent.
    @param target: the request target, as sent (passed through unchanged).
    @param version: C{"1.1"} or C{"1.0"}.
    @param headers: the client's headers, in order and case.
    @param clientIP: the client's address, appended to C{X-Forwarded-For}.
    @param proto: C{b"http"} or C{b"https"}, for C{X-Forwarded-Proto}.
    @param extra: headers the proxy adds (e.g. C{X-Forwarded-Client-Cert}).
    @return: the head to send upstream and what the proxy learnt from it.
    """
    result = RequestHead()
    out: Headers = []
    append = out.append
    forwarded: List[bytes] = []
    upgradeValue = None
    connection: List[bytes] = []
    host = None
    kinds = _REQUEST_KINDS
    for pair in headers:
        kind = kinds.get(pair[0].lower())
        if kind is None:
            append(pair)
            continue
        name, value = pair
        if kind == _DROP:
            continue
        if kind == _CONNECTION:
            connection.extend(connectionTokens(value))
        elif kind == _FRAMING:
            # llhttp has already refused anything but a final "chunked".
            result.chunked = True
        elif kind == _UPGRADE:
            upgradeValue = value
        elif kind == _EXPECT:
            if value.strip().lower() == b"100-continue":
                result.expectContinue = True
            else:
                append(pair)
        elif kind == _HOST:
            if host is not None:
                result.error = "more than one Host header"
            host = value
            append(pair)
        elif kind == _FORWARDED_FOR:
            forwarded.append(value)
        elif kind == _REQUEST_ID:
            result.requestId = value.decode("latin-1")
            append(pair)
        elif kind == _USER_AGENT:
            result.userAgent = value.decode("latin-1")
            append(pair)
        else:  # _LENGTH
            result.contentLength = int(value)
            append(pair)

    if connection:
        named = set(connection)
        named.discard(b"close")
        named.discard(b"keep-alive")
        named.discard(b"upgrade")
        if named:
            out = [(n, v) for (n, v) in out if n.lower() not in named]
    if upgradeValue is not None and b"upgrade" in connection:
        result.upgrade = True
    if host is None:
        if version != "1.0":
            result.error = "HTTP/1.1 request without a Host header"
    else:
        result.authority = host.decode("latin-1")

    forwarded.append(clientIP.encode("ascii"))
    xff = b", ".join(forwarded)
    result.forwardedFor = xff.decode("latin-1")
    out.append((b"X-Forwarded-For", xff))
    out.append((b"X-Forwarded-Proto", proto))
    if not result.requestId:
        result.requestId = newRequestId()
        out.append((b"X-Request-Id", result.requestId.encode("ascii")))
    out.extend(extra)
    if result.chunked:
        out.append((b"Transfer-Encoding", b"chunked"))
    if result.upgrade:
        out.append((b"Connection", b"Upgrade"))
        out.append((b"Upgrade", upgradeValue))  # type: ignore[arg-type]

    parts = [method, b" ", target, b" HTTP/1.1\r\n"]
    for name, value in out:
        parts += (name, b": ", value, b"\r\n")
    parts.append(b"\r\n")
    result.head = b"".join(parts)
    return result


@attrs.define(slots=True)
class ResponseHead:
    """
    An upstream response head after the forwarding rules.

    @ivar headers: the headers to send to the client, without framing or connection
        headers (the front door adds those).
    @ivar contentLength: the body length when the upstream gave one.
    @ivar upgrade: the upstream's C{Upgrade} header value on a 101, else C{None}.
    @ivar chunked: the upstream framed the body as chunked.
    @ivar error: why the head can't be forwarded (a 502), else C{None}.
    """

    headers: Headers
    contentLength: Optional[int] = None
    upgrade: Optional[bytes] = None
    chunked: bool = False
    error: Optional[str] = None


def responseHead(headers: Headers, server: bytes) -> ResponseHead:
    """
    Apply the forwarding rules to an upstream response head.

    Hop-by-hop headers and those named in C{Connection} go, except the framing headers
    and C{Server} (L{_RESPONSE_UNNOMINABLE}): framing always comes from the proxy's own
    parse, so C{Connection: Content-Length} cannot unframe a body.  C{Server} is
    replaced by ours; C{Content-Length} is re-written from its parsed value; repeated
    headers (several C{Set-Cookie}) keep their order and case.

    @param headers: the upstream's headers.
    @param server: our C{Server} header value.
    """
    out: Headers = [(b"Server", server)]
    append = out.append
    connection: List[bytes] = []
    contentLength = None
    upgrade = None
    chunked = False
    error = None
    kinds = _RESPONSE_KINDS
    for pair in headers:
        kind = kinds.get(pair[0].lower())
        if kind is None:
            append(pair)
        elif kind == _LENGTH:
            # llhttp has refused a second one and anything but digits: this is the
            # length the proxy frames by, and the client is told exactly that.
            contentLength = int(pair[1])
            append((pair[0], b"%d" % contentLength))
        elif kind == _CONNECTION:
            connection.extend(connectionTokens(pair[1]))
        elif kind == _FRAMING:
            # Only one "chunked" can be forwarded: the proxy re-frames the body, and a
            # content coding (gzip, chunked) would reach the client unlabelled.  nginx
            # answers 502 the same way.
            if chunked or pair[1].strip().lower() != b"chunked":
                error = "unsupported Transfer-Encoding"
            chunked = True
        elif kind == _UPGRADE:
            upgrade = pair[1]
    if connection:
        named = set(connection) - _RESPONSE_UNNOMINABLE
        if named:
            out = [(n, v) for (n, v) in out if n.lower() not in named]
    return ResponseHead(out, contentLength, upgrade, chunked, error)


def bodyForbidden(method: bytes, status: int) -> bool:
    """
    Whether a response to C{method} with C{status} has no body whatever its headers say
    (RFC 9112 6.3: HEAD, 1xx, 204, 304).
    """
    return method == b"HEAD" or status < 200 or status == 204 or status == 304
