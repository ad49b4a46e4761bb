# -*- test-case-name: tests.test_headers -*-
"""
Pure forwarding rules for HTTP/1.1 heads: hop-by-hop removal (RFC 9110 7.6.1),
C{X-Forwarded-*}, the request id, the C{Server} header.

Everything here is a function of plain data (lists of C{(name, value)} byte pairs, in
the order and case the peer sent them) and returns plain data, so it is tested without
a reactor and shared by both front doors.
"""

from __future__ import annotations

import functools

import itertools
import random
import re
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

#: Headers a client's C{Connection} may not nominate: the proxy frames, routes and
#: identifies requests with them (Envoy answers 400 to C{Connection: Host} too).
_PROTECTED = frozenset([
    b"host", b"content-length", b"transfer-encoding", b"x-forwarded-for", b"x-forwarded-proto",
    b"x-request-id", b"x-forwarded-client-cert",
])


def _underscoreSpellings(names: frozenset) -> frozenset:
    """
    Every spelling of C{names} with some of their hyphens written as underscores
    (C{x_forwarded_for}, C{x-forwarded_for}, ...): servers that map C{_} to C{-} (CGI,
    WSGI, PHP) would show the application these as the proxy's own headers.
    """
    out = set()
    for name in names:
        parts = name.split(b"-")
        for seps in itertools.product(b"-_", repeat=len(parts) - 1):
            spelled = parts[0] + b"".join(bytes([sep]) + part for sep, part in zip(seps, parts[1:]))
            if b"_" in spelled:
                out.add(spelled)
    return frozenset(out)


# What the rules do with a header, by lower-cased name (one dict lookup per header on
# the hot path; a name not listed passes unchanged).
(_DROP, _CONNECTION, _FRAMING, _UPGRADE, _EXPECT, _HOST, _FORWARDED_FOR, _REQUEST_ID,
 _USER_AGENT, _LENGTH, _SERVER, _PEER) = range(12)
#: The mesh peer-metadata header (L{sidecar.peers}): never forwarded either way, its
#: value kept aside for the mutual-TLS door and the mTLS-originating upstream to read.
_PEER_METADATA = b"x-sidecar-peer-metadata"
_REQUEST_KINDS = {name: _DROP for name in HOP_BY_HOP | _OWNED_REQUEST | _underscoreSpellings(_PROTECTED)}
_REQUEST_KINDS.update({
    b"connection": _CONNECTION, b"transfer-encoding": _FRAMING, b"upgrade": _UPGRADE,
    b"expect": _EXPECT, b"host": _HOST, b"x-forwarded-for": _FORWARDED_FOR,
    b"x-request-id": _REQUEST_ID, b"user-agent": _USER_AGENT, b"content-length": _LENGTH,
    _PEER_METADATA: _PEER,
})
_REQUEST_KINDS.update({name: _DROP for name in _underscoreSpellings(frozenset([_PEER_METADATA]))})
_RESPONSE_KINDS = {name: _DROP for name in HOP_BY_HOP}
_RESPONSE_KINDS.update({
    b"connection": _CONNECTION, b"transfer-encoding": _FRAMING, b"upgrade": _UPGRADE,
    b"server": _DROP, b"content-length": _LENGTH, _PEER_METADATA: _PEER,
})
_RESPONSE_KINDS.update({name: _DROP for name in _underscoreSpellings(frozenset([_PEER_METADATA]))})

#: What C{--headers-with-underscores} may say (Envoy's C{headers_with_underscores_action}).
UNDERSCORE_ACTIONS = ("allow", "drop", "reject")

#: A valid C{Host} (or absolute-form authority): an RFC 3986 IP-literal, or a reg-name
#: (which covers IPv4), and an optional port of 1 to 5 digits.  Spaces, tabs, C{/},
#: C{@}, C{\}, controls and bytes past ASCII are not in it.
_AUTHORITY = re.compile(
    rb"(?:\[(?:[0-9A-Fa-f:.]+|v[0-9A-Fa-f]+\.[A-Za-z0-9._~!$&'()*+,;=:-]+)\]"
    rb"|(?:[A-Za-z0-9._~!$&'()*+,;=-]|%[0-9A-Fa-f]{2})*)"
    rb"(?::([0-9]{1,5}))?\Z"
)


#: The bytes of a reg-name (unreserved and sub-delims) and the port's C{:}: a Host made
#: of these only is checked without the regular expression.
_PLAIN_AUTHORITY = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._~!$&'()*+,;=:"


def validAuthority(value: bytes) -> bool:
    """
    Whether C{value} is a valid C{Host} header value (RFC 9112 3.2, RFC 3986 3.2.2-3):
    a host and an optional numeric port no larger than 65535.

    The answers for short values are remembered (a service sees the same few hosts on
    every request; checking one costs six times a cache hit); long ones, which would
    make the cache's memory an attacker's to choose, are checked each time.
    """
    if len(value) <= _REMEMBERED_AUTHORITY:
        return _rememberedAuthority(value)
    return _checkAuthority(value)


def _checkAuthority(value: bytes) -> bool:
    if not value.translate(None, _PLAIN_AUTHORITY):
        # The common case, in a fraction of the regular expression's time.
        colon = value.find(b":")
        if colon < 0:
            return True
        port = value[colon + 1:]
        return port.isdigit() and (len(port) < 5 or (len(port) == 5 and port <= b"65535"))
    match = _AUTHORITY.match(value)
    if match is None:
        return False
    port = match.group(1)
    return port is None or int(port) <= 65535


#: The tokens of the commonest C{Connection} header, which names nothing to remove.
_KEEP_ALIVE = [b"keep-alive"]

#: The longest C{Host} value whose validity is remembered, and how many are.
_REMEMBERED_AUTHORITY = 256
_rememberedAuthority = functools.lru_cache(maxsize=1024)(_checkAuthority)


#: Tokens a service's C{Connection} header may not nominate for removal: the proxy frames
#: the body from its own parse (C{Content-Length} is the parsed length, C{Transfer-Encoding}
#: is the proxy's own), and C{Server} is the proxy's.  Other nominated headers go.
_RESPONSE_UNNOMINABLE = frozenset([
    b"close", b"keep-alive", b"upgrade", b"content-length", b"transfer-encoding", b"server",
])


#: The version (4) and variant (RFC 9562: binary 10) bits of a random UUID, and the
#: mask that clears them in 128 random bits.
_UUID_V4 = (0x4 << 76) | (0x2 << 62)
_UUID_MASK = ~((0xF << 76) | (0x3 << 62)) & ((1 << 128) - 1)


def newRequestId(_bits=random.getrandbits) -> str:
    """
    A random (version 4) UUID in its text form.

    A request id needs uniqueness, not secrecy, so this uses the Mersenne Twister rather
    than C{os.urandom}: it is three times cheaper than C{str(uuid.uuid4())}.
    """
    h = "%032x" % (_bits(128) & _UUID_MASK | _UUID_V4)
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def connectionTokens(value: bytes) -> List[bytes]:
    """
    The lower-cased tokens of a C{Connection} header value.
    """
    return [t.strip().lower() for t in value.split(b",") if t.strip()]


@attrs.define(slots=True)
class RequestHead:
    """
    What the proxy learnt from a client's request head, and the head to send upstream.

    @ivar headers: the headers for the upstream, in order, without framing
        (C{Content-Length}, C{Transfer-Encoding}): the upstream codec writes framing
        from L{contentLength} and L{chunked}, the proxy's own parse.
    @ivar target: the request target sent upstream (origin-form for an absolute-form
        target, else as the client sent it; a front door's path rule or a filter may
        change it; the record keeps the client's).
    @ivar authority: the C{Host} sent upstream (empty if none).
    @ivar requestId: the C{X-Request-Id} sent upstream (the client's or a new one).
    @ivar forwardedFor: the C{X-Forwarded-For} value sent upstream.
    @ivar userAgent: the C{User-Agent} header, or empty.
    @ivar chunked: the request body is chunked (and is re-chunked upstream).
    @ivar contentLength: the request body's length when it has a C{Content-Length}.
    @ivar expectContinue: the client asked for C{100 Continue}.
    @ivar upgrade: the request asks to switch protocols (C{Upgrade} with
        C{Connection: upgrade}); the head keeps both for the upstream.
    @ivar error: a sentence when the head must be refused, else C{None}.
    @ivar status: the status to refuse it with (400, or 501 for a transfer coding the
        proxy does not implement).
    @ivar peerMetadata: the value of the mesh peer-metadata header, which is never
        forwarded (only a mutual-TLS door reads it), or C{None}.
    """

    headers: Headers = attrs.field(factory=list)
    target: bytes = b""
    authority: str = ""
    requestId: str = ""
    forwardedFor: str = ""
    userAgent: str = ""
    chunked: bool = False
    contentLength: Optional[int] = None
    expectContinue: bool = False
    upgrade: bool = False
    error: Optional[str] = None
    status: int = 400
    peerMetadata: Optional[bytes] = None


def _originForm(method: bytes, target: bytes, result: RequestHead) -> Tuple[bytes, Optional[bytes]]:
    """
    Check a request target that does not start with C{/}: C{*} for C{OPTIONS}, or an
    absolute-form C{http(s)} URI, which becomes origin-form and its authority (RFC 9112
    3.2.2).  Sets C{result.error} when the target is invalid.

    @return: the target to send, and the authority that replaces C{Host} (or C{None}).
    """
    if target == b"*":
        if method != b"OPTIONS":
            result.error = "the asterisk-form target is for OPTIONS only"
        return target, None
    scheme, sep, rest = target.partition(b"://")
    if not sep or scheme.lower() not in (b"http", b"https"):
        result.error = "the request target is not in origin, absolute or asterisk form"
        return target, None
    cut = len(rest)
    for stop in (b"/", b"?", b"#"):
        at = rest.find(stop)
        if 0 <= at < cut:
            cut = at
    authority, path = rest[:cut], rest[cut:]
    if not authority or not validAuthority(authority):
        result.error = "the absolute-form target has an invalid authority"
        return target, None
    if not path.startswith(b"/"):
        path = b"/" + path
    return path, authority


def requestHead(
    method: bytes,
    target: bytes,
    version: str,
    headers: Headers,
    clientIP: str,
    proto: bytes = b"http",
    extra: Headers = (),  # type: ignore[assignment]
    defaultHost: bytes = b"",
    underscores: str = "allow",
) -> RequestHead:
    """
    Apply the forwarding rules to a client's request head.  Returns header lists, never
    bytes: each codec (L{sidecar.http1} for HTTP/1.1) serialises them.

    The body framing sent upstream is the proxy's own: C{Content-Length} or
    C{Transfer-Encoding: chunked} is generated from what was parsed, never copied, and
    C{Connection} may not nominate a header the proxy depends on (L{_PROTECTED}).

    @param method: the request method, as sent.
    @param target: the request target, as sent (origin-form passes unchanged).
    @param version: C{"1.1"} or C{"1.0"}.
    @param headers: the client's headers, in order and case.
    @param clientIP: the client's address, appended to C{X-Forwarded-For} (empty: not
        appended, as on the outbound path, where the client is the workload itself).
    @param proto: C{b"http"} or C{b"https"}, for C{X-Forwarded-Proto}.
    @param extra: headers the proxy adds (e.g. C{X-Forwarded-Client-Cert}).
    @param defaultHost: the C{Host} given to an HTTP/1.0 request without one (as
        Envoy's C{default_host_for_http_10}); when empty, such a request is refused.
    @param underscores: what to do with other header names with an underscore:
        C{"allow"}, C{"drop"} or C{"reject"} (400).  The underscore spellings of the
        headers the proxy owns are always dropped.
    @return: the head to send upstream and what the proxy learnt from it.
    """
    result = RequestHead(target=target)
    out: Headers = []
    append = out.append
    forwarded: List[bytes] = []
    upgradeValue = None
    connection: List[bytes] = []
    codings: Optional[List[bytes]] = None
    host = None
    hostAt = -1
    lengths = 0
    strict = underscores != "allow"
    kinds = _REQUEST_KINDS
    for pair in headers:
        kind = kinds.get(pair[0].lower())
        if kind is None:
            if strict and b"_" in pair[0]:
                if underscores == "drop":
                    continue
                result.error = "a header name has an underscore"
            append(pair)
            continue
        name, value = pair
        if kind == _DROP:
            continue
        if kind == _CONNECTION:
            connection.extend(connectionTokens(value))
        elif kind == _FRAMING:
            if codings is None:
                codings = []
            codings.extend(c.strip().lower() for c in value.split(b","))
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
            elif not validAuthority(value):
                result.error = "invalid Host header"
            host = value
            hostAt = len(out)
            append(pair)
        elif kind == _FORWARDED_FOR:
            forwarded.append(value)
        elif kind == _REQUEST_ID:
            result.requestId = value.decode("latin-1")
            append(pair)
        elif kind == _USER_AGENT:
            result.userAgent = value.decode("latin-1")
            append(pair)
        elif kind == _PEER:
            result.peerMetadata = value
        else:  # _LENGTH: framing, written by the upstream codec from the parse
            lengths += 1
            value = value.strip()
            if lengths > 1 or not value.isdigit():
                result.error = "invalid Content-Length"
            else:
                result.contentLength = int(value)

    if codings is not None:
        if codings != [b"chunked"]:
            # Envoy and nginx: 501 for a coding the proxy can't decode, before any
            # byte goes upstream (a gzip body must not be relabelled identity).
            result.error = "transfer coding not implemented"
            result.status = 501
        elif version == "1.0":
            result.error = "Transfer-Encoding in an HTTP/1.0 request"
        elif result.contentLength is not None:
            result.error = "Content-Length with Transfer-Encoding"
        else:
            result.chunked = True

    if target[:1] != b"/":
        target, authority = _originForm(method, target, result)
        if authority is not None and host is not None:
            # RFC 9112 3.2.2: the target's authority replaces Host.
            host = authority
            out[hostAt] = (b"Host", authority)
    result.target = target

    if connection:
        named = set(connection)
        named.discard(b"close")
        named.discard(b"keep-alive")
        named.discard(b"upgrade")
        if named:
            if not named.isdisjoint(_PROTECTED):
                result.error = "Connection names a header the proxy depends on"
            out = [(n, v) for (n, v) in out if n.lower() not in named]
    if upgradeValue is not None and b"upgrade" in connection:
        result.upgrade = True
    if host is None:
        if version != "1.0":
            result.error = "HTTP/1.1 request without a Host header"
        elif defaultHost:
            host = defaultHost
            out.append((b"Host", defaultHost))
        else:
            result.error = "HTTP/1.0 request without a Host header"
    if host is not None:
        result.authority = host.decode("latin-1")
    if clientIP:
        forwarded.append(clientIP.encode("ascii"))
    xff = b", ".join(forwarded)
    result.forwardedFor = xff.decode("latin-1")
    if result.error is not None:
        return result

    if xff:
        out.append((b"X-Forwarded-For", xff))
    out.append((b"X-Forwarded-Proto", proto))
    if not result.requestId:
        result.requestId = newRequestId()
        out.append((b"X-Request-Id", result.requestId.encode("ascii")))
    out.extend(extra)
    if result.upgrade:
        out.append((b"Connection", b"Upgrade"))
        out.append((b"Upgrade", upgradeValue))  # type: ignore[arg-type]
    result.headers = out
    return result


@attrs.define(slots=True)
class ResponseHead:
    """
    An upstream response head after the forwarding rules.

    @ivar headers: the headers to send to the client, without framing
        (C{Content-Length}, C{Transfer-Encoding}) or connection headers: the front door
        writes those from L{contentLength}, the upstream codec's parse.
    @ivar contentLength: the body length when the upstream gave one.
    @ivar upgrade: the upstream's C{Upgrade} header value on a 101, else C{None}.
    @ivar chunked: the upstream framed the body as chunked.
    @ivar error: why the head can't be forwarded (a 502), else C{None}.
    @ivar peerMetadata: the value of the mesh peer-metadata header, never passed to the
        client (only an mTLS-originating upstream reads it), or C{None}.
    """

    headers: Headers
    contentLength: Optional[int] = None
    upgrade: Optional[bytes] = None
    chunked: bool = False
    error: Optional[str] = None
    peerMetadata: Optional[bytes] = None


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
    peer = None
    kinds = _RESPONSE_KINDS
    for pair in headers:
        kind = kinds.get(pair[0].lower())
        if kind is None:
            append(pair)
        elif kind == _LENGTH:
            # Framing: the front door writes it from the parse (llhttp has refused a
            # second one and anything but digits).
            contentLength = int(pair[1])
        elif kind == _CONNECTION:
            value = pair[1]
            if b"," in value:
                connection.extend(connectionTokens(value))
            else:
                # One token (keep-alive, close): the common case, without the split.
                connection.append(value.strip().lower())
        elif kind == _FRAMING:
            # Only one "chunked" can be forwarded: the proxy re-frames the body, and a
            # content coding (gzip, chunked) would reach the client unlabelled.  nginx
            # answers 502 the same way.
            if chunked or pair[1].strip().lower() != b"chunked":
                error = "unsupported Transfer-Encoding"
            chunked = True
        elif kind == _UPGRADE:
            upgrade = pair[1]
        elif kind == _PEER:
            peer = pair[1]
    if connection and connection != _KEEP_ALIVE:
        named = set(connection) - _RESPONSE_UNNOMINABLE
        if named:
            out = [(n, v) for (n, v) in out if n.lower() not in named]
    return ResponseHead(out, contentLength, upgrade, chunked, error, peer)


def bodyForbidden(method: bytes, status: int) -> bool:
    """
    Whether a response to C{method} with C{status} has no body whatever its headers say
    (RFC 9112 6.3: HEAD, 1xx, 204, 304).
    """
    return method == b"HEAD" or status < 200 or status == 204 or status == 304
