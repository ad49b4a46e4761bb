# -*- test-case-name: tests.test_h2 -*-
"""
HTTP/2 heads and gRPC framing as pure functions, shared by the HTTP/2 door
(L{sidecar.h2door}) and the HTTP/2 upstream (L{sidecar.h2upstream}), as
L{sidecar.http1} is for HTTP/1.1.

  - L{requestFromHeaders}: a client's HEADERS (pseudo-headers first) to the method,
    the path and a L{RequestHead}, through the same forwarding rules as HTTP/1.1
    (C{:authority} stands for C{Host});
  - L{responseHeaders} / L{requestHeaders}: the engine's heads to HTTP/2 header lists
    (lower-case names, C{content-length} from the proxy's own parse, no
    connection-specific header);
  - L{MessageCounter}: counts gRPC's length-prefixed messages as bytes pass;
  - L{grpcStatusOf} and L{grpcLocalReply}: the gRPC status of a response, and the
    proxy's own answers to a gRPC call (trailers-only, as Envoy sends them).

The codec (libnghttp2 through L{sidecar.nghttp2}, or h2 from python-hyper) does the
framing and HPACK; nothing here writes a frame.  L{newConnection} picks it.
"""

from __future__ import annotations

from typing import Any, List, Optional, Sequence, Tuple
from urllib.parse import quote

from hpack import NeverIndexedHeaderTuple

from sidecar.headers import Header, Headers, RequestHead, ResponseHead, requestHead

#: The connection-specific headers of RFC 9113 8.2.2 (h2 refuses them inbound; they
#: must never go out in an HTTP/2 head).
CONNECTION_SPECIFIC = frozenset([
    b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade", b"host",
])

_GRPC = b"application/grpc"

#: Request headers sent as never-indexed HPACK literals (RFC 7541 7.1.3):
#: C{x-request-id} is unique per request (indexed, it would crowd the table that every
#: header of every later request is searched against, for no gain); credentials stay
#: out of the shared compression context, as nghttp2 (Envoy's codec) keeps them, and so
#: do cookies shorter than 20 bytes (guessable by a CRIME-style probe).
_NEVER_INDEXED = frozenset([b"x-request-id", b"authorization", b"proxy-authorization"])

#: HTTP statuses to gRPC codes (grpc/doc/http-grpc-status-mapping.md), for the proxy's
#: own answers to a gRPC call.
_HTTP_TO_GRPC = {400: 13, 401: 16, 403: 7, 404: 12, 429: 14, 502: 14, 503: 14, 504: 14}

#: gRPC codes by name, for logs and tests.
GRPC_OK, GRPC_DEADLINE_EXCEEDED, GRPC_UNIMPLEMENTED, GRPC_INTERNAL, GRPC_UNAVAILABLE = 0, 4, 12, 13, 14


def isGrpc(contentType: bytes) -> bool:
    """
    Whether a C{content-type} names gRPC (C{application/grpc}, C{application/grpc+proto}...).
    """
    return contentType[:16].lower() == _GRPC


def requestFromHeaders(headers: Sequence[Header], clientIP: str, proto: bytes,
                       extra: Headers = (), endStream: bool = False,  # type: ignore[assignment]
                       ) -> Tuple[bytes, bytes, RequestHead, bool]:
    """
    A client's HTTP/2 request head (h2 has validated it: pseudo-headers first, no
    connection-specific header, lower-case names) as the engine sees a request; split
    C{cookie} headers are joined into one.

    @param endStream: the HEADERS frame ended the stream (no body).
    @return: C{(method, path, head, grpc)}; C{head.error} says why the request must be
        refused (no C{:method}/C{:path}, CONNECT).
    """
    method = path = b""
    authority: Optional[bytes] = None
    regular: Headers = []
    grpc = False
    host: Optional[bytes] = None
    cookies: List[bytes] = []
    for pair in headers:
        name = pair[0]
        if name[:1] == b":":
            if name == b":method":
                method = pair[1]
            elif name == b":path":
                path = pair[1]
            elif name == b":authority":
                authority = pair[1]
        elif name == b"host":
            host = pair[1]
        elif name == b"cookie":
            # HTTP/2 may split cookies; HTTP/1.1 wants one header (RFC 9113 8.2.3).
            cookies.append(pair[1])
        else:
            if name == b"content-type" and isGrpc(pair[1]):
                grpc = True
            regular.append(pair)
    if cookies:
        regular.append((b"cookie", b"; ".join(cookies)))
    if authority is None:
        authority = host
    if authority is not None:
        regular.insert(0, (b"host", authority))
    head = requestHead(method, path, "2", regular, clientIP, proto, extra)
    if not method or not path:
        head.error = "an HTTP/2 request without :method or :path"
    elif method == b"CONNECT":
        head.error = "CONNECT is not supported"
    elif authority is None:
        head.error = "an HTTP/2 request without :authority or Host"
    # Framing is the proxy's: a body without a length goes chunked to HTTP/1.1.
    if not endStream and head.contentLength is None:
        head.chunked = True
    elif endStream:
        head.chunked = False
    return method, path, head, grpc


def responseHeaders(status: int, head: ResponseHead, withLength: bool) -> List[Header]:
    """
    The HTTP/2 response head for the engine's C{head}: C{:status}, the headers with
    lower-case names, and C{content-length} from the upstream codec's parse.
    """
    out = [(b":status", b"%d" % status)]
    append = out.append
    for name, value in head.headers:
        name = name.lower()
        if name not in CONNECTION_SPECIFIC:
            append((name, value))
    if withLength and head.contentLength is not None:
        append((b"content-length", b"%d" % head.contentLength))
    return out


def requestHeaders(method: bytes, target: bytes, req: RequestHead, scheme: bytes,
                   grpc: bool, never: Any = None) -> List[Header]:
    """
    The HTTP/2 request head for the service: pseudo-headers from the request line and
    C{Host}, C{te: trailers} for gRPC (its servers require it), C{content-length} when
    the proxy parsed one, and the forwarded headers without connection-specific ones.

    @param never: the codec's never-indexed header class, built from one C{(name,
        value)} tuple (L{sidecar.nghttp2.NeverIndexed}); C{None} for hpack's
        C{NeverIndexedHeaderTuple} (h2).
    """
    authority = req.authority.encode("latin-1")
    if target[:1] != b"/" and target != b"*":
        # An absolute-form target (a forward-proxy style request): split it.
        rest = target.partition(b"://")[2]
        slash = rest.find(b"/")
        if slash < 0:
            authority, target = authority or rest, b"/"
        else:
            authority, target = authority or rest[:slash], rest[slash:]
    out = [(b":method", method), (b":scheme", scheme), (b":path", target), (b":authority", authority)]
    append = out.append
    for name, value in req.headers:
        name = name.lower()
        if name in _NEVER_INDEXED or (name == b"cookie" and len(value) < 20):
            append(NeverIndexedHeaderTuple(name, value) if never is None else never((name, value)))
        elif name not in CONNECTION_SPECIFIC:
            append((name, value))
    if grpc:
        append((b"te", b"trailers"))
    if req.contentLength is not None:
        append((b"content-length", b"%d" % req.contentLength))
    return out


def responseFromHeaders(headers: Sequence[Header]) -> Tuple[int, Headers]:
    """
    An HTTP/2 response head from the service: its status and its regular headers.
    """
    status = 0
    regular: Headers = []
    for pair in headers:
        if pair[0][:1] == b":":
            if pair[0] == b":status":
                status = int(pair[1])
        else:
            regular.append(pair)
    return status, regular


def grpcStatusOf(headers: Sequence[Header]) -> Optional[str]:
    """
    The C{grpc-status} value among C{headers} (trailers, or the head of a trailers-only
    response), or C{None}.
    """
    for name, value in headers:
        if name == b"grpc-status":
            return value.decode("ascii", "replace")
    return None


def grpcStatusFor(httpStatus: int) -> int:
    """
    The gRPC code a client infers from an HTTP status (the proxy's own replies).
    """
    return _HTTP_TO_GRPC.get(httpStatus, 2)


def grpcLocalReply(status: int, body: bytes, server: bytes) -> Tuple[int, List[Header]]:
    """
    The proxy's own answer to a gRPC call that failed before the service answered: a
    trailers-only response, HTTP 200, with C{grpc-status} mapped from C{status} and
    C{grpc-message} the reply's text (percent-encoded), as Envoy answers.

    @return: the gRPC code and the HEADERS (ending the stream).
    """
    code = grpcStatusFor(status)
    message = quote(body.strip().decode("utf-8", "replace"), safe=" !\"#$&'()*+,-./:;<=>?@[\\]^_`{|}~").encode("ascii")
    return code, [(b":status", b"200"), (b"server", server), (b"content-type", b"application/grpc"),
                  (b"grpc-status", b"%d" % code), (b"grpc-message", message)]


class MessageCounter:
    """
    Counts gRPC messages (a 5-byte prefix: a flag byte and a 4-byte big-endian length,
    then the message) in a byte stream cut anywhere, without copying the bytes.

    @ivar messages: messages whose prefix has been seen.
    """

    __slots__ = ("messages", "_skip", "_prefix")

    def __init__(self) -> None:
        self.messages = 0
        #: Message bytes still to pass before the next prefix.
        self._skip = 0
        #: Bytes of a prefix cut by a frame boundary.
        self._prefix = b""

    def feed(self, data: bytes) -> None:
        """
        Count the prefixes in C{data}, the next bytes of the stream.
        """
        n = len(data)
        i = 0
        skip = self._skip
        while True:
            if skip:
                if n - i <= skip:
                    self._skip = skip - (n - i)
                    return
                i += skip
                skip = 0
            if i >= n:
                self._skip = 0
                return
            prefix = self._prefix
            if prefix or n - i < 5:
                piece = data[i:i + 5 - len(prefix)]
                prefix += piece
                i += len(piece)
                if len(prefix) < 5:
                    self._prefix = prefix
                    self._skip = 0
                    return
                self._prefix = b""
                skip = int.from_bytes(prefix[1:5], "big")
            else:
                skip = int.from_bytes(data[i + 1:i + 5], "big")
                i += 5
            self.messages += 1


class GrpcCounts:
    """
    The messages of one gRPC call, both ways.
    """

    __slots__ = ("request", "response")

    def __init__(self) -> None:
        self.request = MessageCounter()
        self.response = MessageCounter()


#: The HTTP/2 codecs (C{H2Config.codec}, C{--h2-codec}): C{auto} is libnghttp2 when it
#: loads, else h2.
H2_CODECS = ("auto", "nghttp2", "h2")

#: The environment variable that picks the codec when the configuration says C{auto}
#: (to run a test suite against either codec).
CODEC_ENVIRONMENT = "SIDECAR_H2_CODEC"


def codecFor(config: Any, environ: Any = None) -> str:
    """
    The codec a connection uses: C{"nghttp2"} or C{"h2"}.

    @param config: the L{sidecar.config.H2Config}; its C{codec} C{"auto"} defers to
        C{$SIDECAR_H2_CODEC}, then to libnghttp2 when it loads.
    @param environ: the environment (C{os.environ} when C{None}).
    """
    codec = config.codec
    if codec == "auto":
        if environ is None:
            import os

            environ = os.environ
        codec = environ.get(CODEC_ENVIRONMENT, "auto") or "auto"
    if codec == "h2":
        return "h2"
    from sidecar.nghttp2 import loadBinding

    if loadBinding() is not None:
        return "nghttp2"
    if codec == "nghttp2":
        raise RuntimeError("the HTTP/2 codec nghttp2 was asked for, but libnghttp2 cannot be loaded")
    return "h2"


def newConnection(config: Any, client: bool, h2configuration: Any) -> Any:
    """
    A new HTTP/2 connection of either side on the configured codec: an
    L{sidecar.nghttp2.NgConnection}, or a tuned h2 C{H2Connection}.

    @param h2configuration: a function of no argument returning h2's
        C{H2Configuration} for this side (used with h2 only).
    """
    if codecFor(config) == "nghttp2":
        from sidecar.nghttp2 import newSession

        return newSession(config, client)
    from h2.connection import H2Connection

    from sidecar.compat import tuneH2Connection

    return tuneH2Connection(H2Connection(h2configuration()))


def startConnection(h2: Any, config: Any, client: bool) -> None:
    """
    Open an HTTP/2 connection of either side with the sidecar's settings: stream and
    connection windows, the header list limit, no server push, and (as a server) the
    concurrent streams a client may open.

    @param h2: a new connection from L{newConnection}.
    @param config: the L{sidecar.config.H2Config}.
    @param client: the sidecar is the client (the upstream side).
    """
    from h2.connection import H2Connection

    if not isinstance(h2, H2Connection):
        # nghttp2: the session knows its configuration.
        h2.initiate_connection()
        return
    from h2.settings import SettingCodes, Settings

    values = {
        SettingCodes.INITIAL_WINDOW_SIZE: config.streamWindow,
        SettingCodes.MAX_HEADER_LIST_SIZE: config.maxHeaderListSize,
        SettingCodes.ENABLE_PUSH: 0,
    }
    if not client:
        values[SettingCodes.MAX_CONCURRENT_STREAMS] = config.maxConcurrentStreams
    h2.local_settings = Settings(client=client, initial_values=values)
    h2.decoder.max_header_list_size = config.maxHeaderListSize
    h2.initiate_connection()
    if config.connectionWindow > 65535:
        h2.increment_flow_control_window(config.connectionWindow - 65535)
