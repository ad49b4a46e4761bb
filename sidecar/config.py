# -*- test-case-name: tests.test_tap -*-
"""
Frozen value objects for the whole configuration.  No Twisted imports here: the
configuration is plain data, built by L{sidecar.tap} and read by everything else.
"""

from __future__ import annotations

from typing import Any, Optional, Tuple

import attrs

LOG_FORMATS = ("seed", "text", "json")
ENGINES = ("fast", "web")


@attrs.frozen
class UpstreamConfig:
    """
    Where the service lives and how the pool treats its connections.

    @ivar host: the service's address, normally C{127.0.0.1}.
    @ivar port: the service's port.
    @ivar connectTimeout: seconds allowed for a TCP connect.
    @ivar responseTimeout: seconds from sending a request to the response head; C{None}
        means no limit.
    @ivar idleTimeout: seconds an idle pooled connection is kept; below the usual
        keep-alive of servers (Node 5 s, nginx 75 s) so that we close before they do.
    @ivar maxIdle: how many idle connections the pool keeps at most; C{None} (the
        default) follows C{maxConnections}, so that every connection the circuit breaker
        lets open may be reused (a lower cap closes and reopens connections whenever
        more requests than it are in flight).
    @ivar maxConnections: connections to the service open or opening at most.
    @ivar maxPending: requests waiting for a connection at most.
    @ivar original: C{--upstream original}: forward each connection to C{host} on the
        port the client originally dialled (C{SO_ORIGINAL_DST} after an iptables
        C{REDIRECT}); C{port} is then unused.
    """

    host: str = "127.0.0.1"
    port: int = 80
    connectTimeout: float = 5.0
    responseTimeout: Optional[float] = 60.0
    idleTimeout: float = 4.0
    maxIdle: Optional[int] = None
    #: Envoy's circuit-breaker defaults: connections open or opening at most, and
    #: requests waiting for one at most (past that, 503 with flag UO).
    maxConnections: int = 1024
    maxPending: int = 1024
    original: bool = False

    @property
    def idleLimit(self) -> int:
        """
        How many idle connections the pool keeps at most: C{maxIdle}, or
        C{maxConnections} when it is not set.
        """
        return self.maxConnections if self.maxIdle is None else self.maxIdle

    @property
    def address(self) -> str:
        """
        C{host:port}, as the access log and metrics show it (C{host:original} for
        C{--upstream original}).
        """
        if self.original:
            return f"{self.host}:original"
        if ":" in self.host:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"


@attrs.frozen
class MeshLabels:
    """
    Who this workload is, for the C{destination_*} labels of Istio's metrics; each is
    C{"unknown"} when neither a flag nor the pod's environment tells.

    @ivar workload: the workload (Deployment, StatefulSet...) name.
    @ivar namespace: the workload's namespace.
    @ivar app: the C{app} label.
    @ivar version: the C{version} label.
    @ivar service: the service's host name, C{NAME.NAMESPACE.svc.cluster.local}.
    @ivar principal: this workload's SPIFFE id (reported under mutual TLS only).
    @ivar cluster: the cluster id.
    """

    workload: str = "unknown"
    namespace: str = "unknown"
    app: str = "unknown"
    version: str = "unknown"
    service: str = "unknown"
    principal: str = "unknown"
    cluster: str = "unknown"


@attrs.frozen
class LifecycleConfig:
    """
    Readiness, drain and shutdown.

    @ivar drainTimeout: seconds the listeners stay open after draining starts, every
        response saying C{Connection: close}.
    @ivar shutdownGrace: seconds after the drain period that in-flight requests may
        still take before the process exits anyway.
    @ivar readyRequiresUpstream: C{/ready} answers 503 while the service refuses a TCP
        connect.
    @ivar waitForUpstream: seconds at start-up that readiness waits for the service to
        accept a TCP connect; C{None} to not wait.
    """

    drainTimeout: float = 5.0
    shutdownGrace: float = 20.0
    readyRequiresUpstream: bool = False
    waitForUpstream: Optional[float] = None


TLS_MODES = ("strict", "permissive")


@attrs.frozen
class TLSConfig:
    """
    Mutual TLS: the listener, the files, who may call, and how the plain port behaves.

    @ivar listen: a Twisted server endpoint string (plain TCP: the TLS layer is ours) for
        the mutual-TLS listener, or C{None} (permissive mode only).
    @ivar cert: PEM certificate file, optionally followed by its chain.
    @ivar key: PEM private key file.
    @ivar ca: PEM bundle of the CAs that client certificates must chain to.
    @ivar allow: C{--tls-allow} values: exact SPIFFE ids or C{spiffe://TD/*}; empty
        allows any client certificate from the CA.
    @ivar mode: C{"strict"}, or C{"permissive"}: the plain listener also accepts TLS.
    @ivar reloadInterval: seconds between looks at the files for rotation.
    """

    listen: Optional[str]
    cert: str
    key: str
    ca: str
    allow: Tuple[str, ...] = ()
    mode: str = "strict"
    reloadInterval: float = 1.0

    @property
    def permissive(self) -> bool:
        """
        Whether the plain listener also accepts mutual TLS.
        """
        return self.mode == "permissive"


UPSTREAM_PROTOCOLS = ("auto", "http1", "http2")


@attrs.frozen
class H2Config:
    """
    HTTP/2 on both sides: what the proxy advertises and the limits that refuse the
    protocol's known attacks (each in the README).

    @ivar maxConcurrentStreams: streams a client may have open on one connection
        (advertised in SETTINGS; more are refused), and streams the proxy opens on one
        connection to the service at most (fewer if the service says so).
    @ivar streamWindow: the flow-control window of each stream, both ways: the bytes of
        one stream the proxy holds at most while its reader is slow.
    @ivar connectionWindow: the connection's window (at least C{maxConcurrentStreams}
        stream windows, so that stalled streams never block the others).
    @ivar maxHeaderListSize: the largest decoded header list accepted (HPACK bombs).
    @ivar streamIdleTimeout: seconds a stream may make no progress (a zero window)
        before it is reset (flag C{SI}); C{None} for never.
    @ivar maxQueuedControlBytes: control frames (PING and SETTINGS acknowledgements,
        resets) the proxy queues for a client that does not read, at most.
    @ivar prematureResets: past this many streams reset by the client before their
        response, when they are half of the connection's streams or more, the
        connection is closed with GOAWAY (rapid reset, CVE-2023-44487).
    @ivar codec: the HTTP/2 codec, C{"auto"} (libnghttp2 when it loads, else h2;
        C{$SIDECAR_H2_CODEC} may choose), C{"nghttp2"} or C{"h2"}.
    """

    maxConcurrentStreams: int = 100
    streamWindow: int = 256 * 1024
    connectionWindow: int = 32 * 1024 * 1024
    maxHeaderListSize: int = 64 * 1024
    streamIdleTimeout: Optional[float] = 300.0
    maxQueuedControlBytes: int = 64 * 1024
    prematureResets: int = 500
    codec: str = "auto"


@attrs.frozen
class OutboundConfig:
    """
    The outbound listener and the mesh it originates mutual TLS to.

    @ivar listen: a Twisted server endpoint string for the listener the init
        script's C{-o PORT} redirects the workload's outgoing TCP to.
    @ivar meshNetworks: CIDRs inside the mesh (C{--mesh-networks}): destinations
        there get mutual TLS, their servers' ids in our trust domain.
    @ivar meshPeers: C{(CIDR, SPIFFE id or spiffe://TD/*)} pairs (C{--mesh-peer}):
        destinations there get mutual TLS with that exact id required.
    """

    listen: str
    meshNetworks: Tuple[str, ...] = ()
    meshPeers: Tuple[Tuple[str, str], ...] = ()


@attrs.frozen
class ProxyConfig:
    """
    The effective configuration of one sidecar process.

    @ivar listen: a Twisted server endpoint string for the plain listener, or C{None}.
    @ivar upstream: the upstream settings.
    @ivar serverHeader: the C{Server} header put on every response.
    @ivar accessLog: C{"-"} for stdout, a path, or C{None} for no access log.
    @ivar logFormat: one of L{LOG_FORMATS}.
    @ivar engine: C{"fast"} (the llhttp front door) or C{"web"} (twisted.web).
    @ivar admin: a Twisted server endpoint string for the admin site, or C{None}
        (loopback only by default: it shows the configuration and takes mutations).
    @ivar health: a Twisted server endpoint string for the network-facing health and
        metrics port (C{/ready}, C{/healthz/ready}, C{/stats/prometheus} only), or
        C{None}.  The command line's default is C{tcp:15021}; this value object's is
        C{None}, so that a sidecar built in a program binds no fixed port it did not ask
        for.
    @ivar accessLogBuffer: the most bytes of access log records held while the log's
        output is not read; beyond, records are dropped and counted.
    @ivar maxHeaderBytes: the largest request head accepted (431 beyond).
    @ivar tls: mutual TLS settings, or C{None} for none.
    @ivar mesh: who this workload is, for the metrics' labels.
    @ivar lifecycle: readiness, drain and shutdown settings.
    """

    listen: Optional[str] = "tcp:8000"
    upstream: UpstreamConfig = UpstreamConfig()
    serverHeader: str = "amazing-proxy"
    accessLog: Optional[str] = "-"
    logFormat: str = "text"
    engine: str = "fast"
    admin: Optional[str] = "tcp:15000:interface=127.0.0.1"
    health: Optional[str] = None
    accessLogBuffer: int = 1024 * 1024
    maxHeaderBytes: int = 64 * 1024
    #: Request headers with an underscore in their name: C{"allow"} (Envoy's and
    #: Istio's default), C{"drop"} or C{"reject"}.
    headersWithUnderscores: str = "allow"
    #: The largest request body accepted, in bytes (413 beyond; C{None}: no limit).
    maxRequestBytes: Optional[int] = None
    #: Seconds a client connection may sit idle between requests (C{None}: forever).
    clientIdleTimeout: Optional[float] = 300.0
    #: Seconds a client may take to send a request head before a 408 (C{None}: forever).
    requestHeadTimeout: Optional[float] = 30.0
    #: Envoy's C{stream_idle_timeout}: seconds an exchange may see no byte either way
    #: (C{None}: forever).
    streamIdleTimeout: Optional[float] = 300.0
    #: The largest response head accepted from the service (502 beyond; Envoy's 80 KiB).
    maxResponseHeaderBytes: int = 80 * 1024
    extra: Tuple[Tuple[str, str], ...] = ()
    #: Worker processes sharing the listeners (C{--workers}; L{sidecar.workers}); 1 is a
    #: single process.
    workers: int = 1
    tls: Optional[TLSConfig] = None
    #: Seconds to wait for a client's first bytes before treating the connection as
    #: opaque TCP (a server-first protocol); C{None}: wait for ever.
    protocolDetectTimeout: Optional[float] = 1.0
    #: Declared protocols by port dialled (C{tcp}, C{http}, C{http2}, C{grpc}); such
    #: ports are not sniffed.
    portProtocols: Tuple[Tuple[int, str], ...] = ()
    mesh: MeshLabels = MeshLabels()
    lifecycle: LifecycleConfig = LifecycleConfig()
    #: The YAML configuration file (routes, upstreams, filters; reloaded when it
    #: changes), or C{None}.
    configFile: Optional[str] = None
    #: C{--filter} flags: C{(name, JSON arguments)} of the filters every request runs.
    filters: Tuple[Tuple[str, str], ...] = ()
    #: Seconds between looks at C{configFile}.
    configReloadInterval: float = 1.0
    #: The application's probes the health port performs for the kubelet at
    #: C{/app-health/...} (C{sidecar.probes.Prober}s), from C{--app-probers} or
    #: C{ISTIO_KUBE_APP_PROBERS}.
    appProbers: Tuple[Any, ...] = ()
    #: The outbound listener and the mesh (C{--outbound-listen}), or C{None}.
    outbound: Optional[OutboundConfig] = None
    #: C{"auto"} (HTTP/2 to the service for HTTP/2 clients), C{"http1"} or C{"http2"}.
    upstreamProtocol: str = "auto"
    h2: H2Config = H2Config()
