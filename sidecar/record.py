# -*- test-case-name: tests.test_accesslog -*-
"""
What one exchange leaves behind: the immutable L{Record} and Envoy's response flags.

The recorder, the access log, the metrics and drain import only this module, never
the engine.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import attrs

# Response flags, as Envoy names them.
UPSTREAM_CONNECT_FAILURE = "UF"
UPSTREAM_CONNECTION_TERMINATION = "UC"
UPSTREAM_REQUEST_TIMEOUT = "UT"
UPSTREAM_PROTOCOL_ERROR = "UPE"
DOWNSTREAM_CONNECTION_TERMINATION = "DC"
DOWNSTREAM_PROTOCOL_ERROR = "DPE"
UNAUTHORIZED = "RBAC"
UPSTREAM_OVERFLOW = "UO"
STREAM_IDLE_TIMEOUT = "SI"
NO_ROUTE_FOUND = "NR"
UPSTREAM_RETRY_LIMIT_EXCEEDED = "URX"

#: Which way a call went through this sidecar: to its own workload (Istio's
#: C{reporter="destination"}), or from it to another (C{reporter="source"}).
INBOUND = "inbound"
OUTBOUND = "outbound"
#: The service reset the HTTP/2 stream (RST_STREAM), or refused it (GOAWAY).
UPSTREAM_REMOTE_RESET = "UR"
#: The client reset its HTTP/2 stream.
DOWNSTREAM_REMOTE_RESET = "DR"


class Record(NamedTuple):
    """
    What happened to one request.  Times are seconds from the reactor's clock.

    A named tuple, not an attrs class: one is built for every request, and a tuple
    is built in a fraction of a frozen attrs instance's time (24 guarded attribute
    stores).  It is as immutable; C{record._replace(status=...)} makes a changed copy.

    @ivar startTime: when the request head arrived (epoch seconds).
    @ivar duration: from C{startTime} to the last byte sent (or the end of the exchange).
    @ivar upstreamServiceTime: from the request being sent upstream to the response head,
        or C{None} when the upstream never answered.
    @ivar bytesReceived: request body bytes received from the client (decoded, so chunked
        bodies count their data only; for an upgraded stream, the client's bytes).
    @ivar bytesSent: response body bytes sent to the client (the same way).
    @ivar status: the status sent to the client, C{0} when none was sent.
    @ivar flags: Envoy-style response flags joined with C{","}, or C{"-"}.
    @ivar mutualTLS: inbound, the client came over mutual TLS; outbound, the sidecar
        originated mutual TLS to the destination.
    @ivar direction: L{INBOUND} or L{OUTBOUND}.
    @ivar peer: what the sidecar learnt of the workload at the other end (a
        L{sidecar.peers.PeerLabels}: the source of an inbound call, the destination of
        an outbound one), or C{None}.
    @ivar grpc: the request was a gRPC call (C{content-type: application/grpc}).
    @ivar grpcStatus: its C{grpc-status} (from the trailers, or the proxy's own reply),
        or C{""}.
    @ivar requestMessages: gRPC messages the client sent.
    @ivar responseMessages: gRPC messages sent to the client.
    """

    startTime: float
    duration: float
    upstreamServiceTime: Optional[float]
    bytesReceived: int
    bytesSent: int
    status: int
    method: str
    path: str
    protocol: str
    authority: str
    upstreamHost: str
    flags: str
    requestId: str
    forwardedFor: str
    userAgent: str
    downstreamRemoteAddress: str
    downstreamPeerPrincipal: str = ""
    mutualTLS: bool = False
    grpc: bool = False
    grpcStatus: str = ""
    requestMessages: int = 0
    responseMessages: int = 0
    direction: str = INBOUND
    peer: Any = None


@attrs.frozen
class TcpRecord:
    """
    What happened to one opaque TCP connection.  Times are seconds from the reactor's
    clock.

    @ivar startTime: when the connection was handed to the splice (epoch seconds).
    @ivar duration: from C{startTime} until both sides were closed.
    @ivar bytesReceived: bytes received from the client (sent on to the service unless
        the connection was refused).
    @ivar bytesSent: bytes sent to the client (received from the service).
    @ivar upstreamHost: C{host:port} of the service, C{""} when none was chosen.
    @ivar flags: Envoy-style flags joined with C{","} (C{UF}, C{UC}, C{DC}, C{NR},
        C{SI}, C{RBAC}), or C{"-"}.
    @ivar downstreamRemoteAddress: the client's C{host:port}.
    @ivar downstreamPeerPrincipal: the client's SPIFFE id under mutual TLS.
    @ivar mutualTLS: whether the connection came over mutual TLS.
    @ivar detected: how detection chose TCP: C{tcp} (unknown bytes), C{tls}, C{http2},
        C{timeout} (the client said nothing: a server-first protocol), C{declared},
        C{closed} (the client half-closed first), C{nr}.
    @ivar detail: why the connection ended, in words, when it was not a clean close.
    @ivar direction: C{inbound}, or C{outbound} (a connection of the workload's own,
        captured on the outbound listener; C{mutualTLS} then says the sidecar
        originated mutual TLS to the destination).
    @ivar peer: outbound, the destination's L{sidecar.peers.PeerLabels} from its
        verified certificate; else C{None}.
    """

    startTime: float
    duration: float
    bytesReceived: int
    bytesSent: int
    upstreamHost: str
    flags: str
    downstreamRemoteAddress: str
    downstreamPeerPrincipal: str = ""
    mutualTLS: bool = False
    detected: str = ""
    detail: str = ""
    direction: str = INBOUND
    peer: Any = None

    @property
    def protocol(self) -> str:
        """
        Istio's C{request_protocol}: always C{tcp}.
        """
        return "tcp"
