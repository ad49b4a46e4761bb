# -*- test-case-name: tests.test_service -*-
"""
Assembly: builds the recorder, the pool, the engine and the listeners from a
L{ProxyConfig}.  It decides nothing; every policy lives in the modules it wires.
"""

from __future__ import annotations

import re
from typing import Any, Optional, Sequence, Tuple

from twisted.application import strports
from twisted.application.internet import TimerService
from twisted.application.service import MultiService, Service

from sidecar.accesslog import FORMATS, AccessLog, LogOutput, openOutput
from sidecar.config import ProxyConfig
from sidecar.exchange import Engine
from sidecar.stats import Recorder
from sidecar.upstream import UpstreamPool
from sidecar.admin import adminSite, healthSite
from sidecar.drain import Lifecycle, openConnections
from sidecar.metrics import SidecarCollector, runtimeCollectors
from sidecar.probes import probePaths, probeResource

#: The listen backlog every listener gets unless its endpoint string names one: Envoy's
#: 1024, where Twisted's default of 50 drops connects (and retries them a second later)
#: as soon as a burst of clients arrives at once.  The kernel caps it at
#: C{net.core.somaxconn}.
LISTEN_BACKLOG = 1024

#: Endpoint types whose server endpoint takes a C{backlog} argument.
_WITH_BACKLOG = frozenset(["tcp", "tcp6", "unix", "ssl"])


def withBacklog(description: str, backlog: int = LISTEN_BACKLOG) -> str:
    """
    C{description} (a Twisted server endpoint string) with C{backlog=BACKLOG} added,
    unless it names a backlog itself or its type takes none (C{systemd:} adopts a
    socket that is already listening).

    @param description: the user's endpoint string, such as C{tcp:8000}.
    @param backlog: the listen backlog to ask for.
    @return: the endpoint string to listen on.
    """
    kind = description.split(":", 1)[0].strip().lower()
    if kind not in _WITH_BACKLOG or re.search(r"(^|:)backlog=", description) or description.endswith("\\"):
        return description
    return f"{description}:backlog={backlog}"


def keepAcceptLogger(port: Any) -> Any:
    """
    Give a listening port its logger once: Twisted's TCP port reads its class-level
    C{Logger} descriptor twice per accept (for the logs of a failed accept), and a
    C{Logger} descriptor builds a new C{Logger} at every read.  The one kept is the
    one the descriptor builds (same namespace, same observer), so nothing logs
    differently.  A port without such a descriptor is left alone.

    @param port: the listening port.
    @return: C{port}.
    """
    import inspect

    from twisted.logger import Logger

    descriptor = inspect.getattr_static(type(port), "_logger", None)
    if isinstance(descriptor, Logger) and "_logger" not in vars(port):
        port._logger = descriptor.__get__(port, type(port))
    return port


def openAccessLog(path: Optional[str]) -> Optional[LogOutput]:
    """
    The output the access log writes to without blocking (L{openOutput}): standard
    output for C{"-"}, a file opened for appending otherwise, nothing for C{None}.
    """
    if path is None:
        return None
    return openOutput(path)


class SidecarService(MultiService):
    """
    The whole sidecar: listeners and timers as children, the shared objects as
    attributes.
    """

    def __init__(self, config: ProxyConfig, reactor: Any, adopted: Sequence[Tuple[int, int]] = ()) -> None:
        """
        @param adopted: for a worker of C{--workers} (L{sidecar.workers}): the
            addresses its parent reserved, as C{(descriptor, address family, backlog)},
            the plain listener's first, then the mutual-TLS and the outbound ones'; they
            replace the endpoint strings of the configuration.
        """
        MultiService.__init__(self)
        self.config = config
        self.reactor = reactor
        self._adopted = list(adopted)
        self.accessLog: Optional[AccessLog] = None
        #: twistd's own log, when it writes without blocking (L{sidecar.logs}).
        self.logStream: Any = None
        sinks = []
        output = openAccessLog(config.accessLog)
        if output is not None:
            # Workers share the output: whole lines, in writes the kernel never interleaves.
            self.accessLog = AccessLog(output, FORMATS[config.logFormat], reactor, config.accessLogBuffer,
                                       wholeLines=bool(adopted))
            sinks.append(self.accessLog)
        self.recorder = Recorder(sinks)
        self.pool = UpstreamPool(reactor, reactor, config.upstream)
        self.engine = Engine(
            reactor, self.pool, self.recorder,
            serverHeader=config.serverHeader.encode("ascii"),
            responseTimeout=config.upstream.responseTimeout,
            headersWithUnderscores=config.headersWithUnderscores,
            maxRequestBytes=config.maxRequestBytes,
            streamIdleTimeout=config.streamIdleTimeout,
            maxResponseHeaderBytes=config.maxResponseHeaderBytes,
        )
        self.configWatcher = None
        self._assembleFilters()
        TimerService(max(config.upstream.idleTimeout / 2, 0.5), self.pool.sweep).setServiceParent(self)
        self.h2pool = None
        if config.upstreamProtocol != "http1":
            from sidecar.h2upstream import H2UpstreamPool

            # HTTP/2 to the service: for HTTP/2 clients ("auto", Envoy's "use downstream
            # protocol"), or for every client ("http2").
            self.h2pool = H2UpstreamPool(reactor, reactor, config.upstream, config.h2)
            versions = ("2",) if config.upstreamProtocol == "auto" else ("2", "1.1", "1.0")
            self.engine.poolByVersion.update({version: self.h2pool for version in versions})
            TimerService(max(config.upstream.idleTimeout / 2, 0.5), self.h2pool.sweep).setServiceParent(self)
        sweep = TimerService(1.0, self.sweepClients)
        sweep.clock = reactor
        sweep.setServiceParent(self)
        # That sweep also times out the responses (no timer per request).
        self.engine.deadlinesSwept = True
        self.listeners = []
        self.tls = None
        if config.tls is not None:
            from sidecar.mtls import MutualTLS

            self.tls = MutualTLS.fromConfig(config.tls, reactor)
            from sidecar.peers import metadataOf

            self.tls.localMetadata = metadataOf(config.mesh)
            self.tls.h2config = config.h2
            reload = TimerService(config.tls.reloadInterval, self.tls.reload)
            reload.clock = reactor
            reload.setServiceParent(self)
        self._assembleListeners()

        self._assembleAdmin()

    def _assembleFilters(self) -> None:
        """
        The configuration file's routes, upstreams and filters (reloaded on a timer),
        or the C{--filter} flags' chain; nothing at all without them.
        """
        config, reactor = self.config, self.reactor
        if config.configFile is None and not config.filters:
            return
        from sidecar.builtins import FilterContext
        from sidecar.configfile import ConfigWatcher, filtersOnly

        context = FilterContext(clock=reactor, reactor=reactor)
        if config.configFile is None:
            self.engine.filters = filtersOnly(config.filters, context)
            return

        def apply(active: Any) -> None:
            self.engine.filters = active.chain
            self.engine.pools = dict(active.pools)

        self.configWatcher = ConfigWatcher(
            config.configFile, context, lambda settings: UpstreamPool(reactor, reactor, settings), apply,
            requestsActive=lambda: self.recorder.requestsActive, cliFilters=config.filters)
        reload = TimerService(config.configReloadInterval, self.configWatcher.check)
        reload.clock = reactor
        reload.setServiceParent(self)
    def _assembleListeners(self) -> None:
        """
        The inbound listeners, each detecting protocols (L{sidecar.detect}): HTTP/1.x
        to the front door, TLS to mutual TLS (permissive port) or opaque TCP, the rest
        to the TCP splice (L{sidecar.tcp}); and, for C{--upstream original}, the pools
        by port dialled (L{sidecar.origdst}).
        """
        from sidecar.accesslog import TCP_FORMATS, tcpSink
        from sidecar.origdst import OriginalDestinations
        from sidecar.tcp import TcpProxy

        config, reactor = self.config, self.reactor
        if self.accessLog is not None:
            self.recorder.tcpSinks.append(tcpSink(self.accessLog, TCP_FORMATS[config.logFormat]))
        self.tcp = TcpProxy(reactor, self.recorder, config.upstream.connectTimeout, config.clientIdleTimeout)
        self.originals = None
        if config.upstream.original:
            self.originals = OriginalDestinations(reactor, config.upstream, self.engine,
                                                  config.h2 if self.h2pool is not None else None)
            TimerService(max(config.upstream.idleTimeout / 2, 0.5), self.originals.sweep).setServiceParent(self)
        self._doors: dict = {}
        if config.listen is not None:
            permissive = self.tls is not None and config.tls.permissive
            self.listeners.append(self._listen(config.listen, self.detectingFactory(permissive=permissive),
                                               proxied=True))
        if self.tls is not None and config.tls.listen is not None:
            self.listeners.append(self._listen(config.tls.listen, self.tls.detectingServerFactory(
                self.detectingFactory(underTLS=True)), proxied=True))
        self.outbound = None
        if config.outbound is not None:
            self.listeners.append(self._listen(config.outbound.listen, self.outboundFactory(), proxied=True))

    def outboundFactory(self) -> Any:
        """
        The outbound listener's factory (L{sidecar.outbound}): the workload's own
        connections, each to its original destination, detected as inbound ones are;
        HTTP/1.x at L7 on a pool per destination, the rest spliced; mutual TLS
        originated to the mesh.
        """
        from sidecar.detect import HTTP1, NO_ROUTE, TCP, DetectingFactory
        from sidecar.outbound import OutboundDestinations, meshPolicy
        from sidecar.peers import metadataOf
        from sidecar.record import OUTBOUND

        config, reactor = self.config, self.reactor
        out = config.outbound
        tls = self.tls if (out.meshNetworks or out.meshPeers) else None
        policy = meshPolicy(out.meshNetworks, out.meshPeers, tls.material.localId if tls is not None else "")
        self.outbound = OutboundDestinations(
            reactor, config.upstream, self.engine, config.maxHeaderBytes, policy,
            tls.context if tls is not None else None, metadataOf(config.mesh))
        TimerService(max(config.upstream.idleTimeout / 2, 0.5), self.outbound.sweep).setServiceParent(self)

        def http1(detector: Any) -> Any:
            destination = detector.destination
            return self.outbound.get(destination.host, destination.port).doors.buildProtocol(detector.addr)

        def tcp(detector: Any) -> Any:
            destination = detector.destination
            found = self.outbound.get(destination.host, destination.port)
            return self.tcp.splice(destination.host, destination.port, detector.how, None, detector.started,
                                   origination=found.tcp, direction=OUTBOUND)

        def refuse(detector: Any) -> Any:
            destination = detector.destination
            return self.tcp.refusal(
                f"the outbound listener's connection to {destination.host}:{destination.port} has no original "
                f"destination (no iptables REDIRECT brought it here)")

        return DetectingFactory(
            {HTTP1: http1, TCP: tcp, NO_ROUTE: refuse}, reactor, config.protocolDetectTimeout,
            dict(config.portProtocols), original=True, limit=config.maxHeaderBytes,
            swap=frozenset([HTTP1]))

    def detectingFactory(self, underTLS: bool = False, permissive: bool = False) -> Any:
        """
        The factory of one inbound listener: protocol detection and its table of
        routes.  C{underTLS}: behind the mutual-TLS layer (detection on the decrypted
        stream); C{permissive}: a TLS ClientHello goes to mutual TLS.
        """
        from sidecar.detect import DECLARED, HTTP1, HTTP2, NO_ROUTE, TCP, TLS, DetectingFactory

        config = self.config
        upstream = config.upstream
        tls = self.tls if underTLS else None

        if upstream.original:
            def http1(detector: Any) -> Any:
                return self._doorFactory(detector.destination, underTLS).buildProtocol(detector.addr)
        else:
            # One front door for every connection: found once, not per connection.
            buildDoor = self._doorFactory(None, underTLS).buildProtocol

            def http1(detector: Any) -> Any:
                return buildDoor(detector.addr)

        identify = tls.admitPeer if tls is not None else None

        def tcp(detector: Any) -> Any:
            port = detector.destination.port if upstream.original else upstream.port
            return self.tcp.splice(upstream.host, port, detector.how, identify, detector.started)

        def refuse(detector: Any) -> Any:
            destination = detector.destination
            return self.tcp.refusal(
                f"--upstream original, but the connection to {destination.host}:{destination.port} "
                f"has no original destination (no iptables REDIRECT brought it here)")

        def http2(detector: Any) -> Any:
            return self._h2DoorFactory(detector.destination, underTLS, detector.how == "declared").buildProtocol(
                detector.addr)

        routes = {HTTP1: http1, HTTP2: http2, TCP: tcp, NO_ROUTE: refuse}
        if permissive:
            inner = self.tls.detectingServerFactory(self.detectingFactory(underTLS=True))
            routes[TLS] = lambda detector: inner.buildProtocol(detector.addr)
        fast = config.engine == "fast" and not underTLS
        return DetectingFactory(
            routes, self.reactor, config.protocolDetectTimeout,
            # The declared names (http, grpc...) as the kinds the routes are keyed by.
            {port: DECLARED[protocol] for port, protocol in config.portProtocols},
            original=upstream.original, limit=config.maxHeaderBytes,
            swap=frozenset([HTTP1, HTTP2]) if fast else frozenset([HTTP2]) if not underTLS else frozenset(),
            tls=tls)

    def _doorFactory(self, destination: Any, underTLS: bool) -> Any:
        """
        The front door's factory for a connection to C{destination}: one per port
        dialled with C{--upstream original} (each on its own pool), else one.
        """
        port = destination.port if self.originals is not None else None
        key = (port, underTLS)
        door = self._doors.get(key)
        if door is None:
            engine = self.engine if port is None else self.originals.engineFor(port)
            if underTLS:
                from sidecar.mtls import MutualTLSDownstreamFactory

                door = MutualTLSDownstreamFactory(engine, self.config.maxHeaderBytes, self.tls, handshaken=True)
            else:
                door = self.proxyFactory(engine)
            self._doors[key] = door
        return door

    def _h2DoorFactory(self, destination: Any, underTLS: bool, declared: bool) -> Any:
        """
        The HTTP/2 door's factory for a connection to C{destination}: one per port
        dialled with C{--upstream original} (each on that port's pools), else one.
        C{declared}: the port is declared C{http2}/C{grpc}, so every request goes to
        the service over HTTP/2 (when the sidecar has an HTTP/2 pool).
        """
        from sidecar.h2door import H2ServerFactory

        port = destination.port if self.originals is not None else None
        key = ("h2", port, underTLS, declared)
        door = self._doors.get(key)
        if door is None:
            engine = self.engine if port is None else self.originals.engineFor(port)
            pool = (self.h2pool if port is None else engine.h2pool) if declared else None
            if underTLS:
                door = self.tls.h2Factory(engine, self.config.h2, pool)
            else:
                door = H2ServerFactory(engine, self.config.h2, pool)
            self._doors[key] = door
        return door

    def _assembleAdmin(self) -> None:
        """
        The metrics collector, the lifecycle (readiness, drain, exit) and the admin site.
        """
        from sidecar import __version__

        config, reactor = self.config, self.reactor
        self.startTime = reactor.seconds()
        # With --upstream original, the gauges sum the pools of every port dialled.
        pools = self.pool if self.originals is None else self.originals.totals(self.pool)
        self.collector = SidecarCollector(
            self.recorder, pools, self.engine, config.mesh, self.startTime, __version__,
            localPrincipal=lambda: getattr(getattr(getattr(self, "tls", None), "material", None), "localId", "") or "",
            tls=self.tls, accessLog=self.accessLog, runtime=runtimeCollectors(),
            logStream=lambda: self.logStream, configFile=self.configWatcher)
        self.adminListeners = []
        self.healthListeners = []
        self.lifecycle = Lifecycle(
            reactor, config.lifecycle, self.engine, self.recorder, self.listeners, config.upstream,
            connections=self._clientConnections,
            flush=self.accessLog.flush if self.accessLog is not None else (lambda: None),
            announce=self._readyLine,
            adminListeners=lambda: self.adminListeners + self.healthListeners,
        )
        if config.admin is not None:
            site = adminSite(self.collector, self.lifecycle, config, __version__, reactor, self.startTime,
                             offload=self._offload,
                             configFile=self.configWatcher.dump if self.configWatcher is not None else None)
            self.adminListeners.append(self._listen(config.admin, site))
        if config.health is not None:
            probes = probeResource({p.path.encode("utf-8"): p for p in config.appProbers}, reactor)
            health = healthSite(self.collector, self.lifecycle, reactor, offload=self._offload,
                                more=probePaths(probes))
            self.healthListeners.append(self._listen(config.health, health))
        self.lifecycle.setServiceParent(self)

    def _offload(self, f: Any, *args: Any) -> Any:
        """
        Run C{f(*args)} in the reactor's thread pool (formatting the metrics), or right
        away on a reactor without one.
        """
        from twisted.internet.defer import maybeDeferred
        from twisted.internet.threads import deferToThreadPool

        getThreadPool = getattr(self.reactor, "getThreadPool", None)
        if getThreadPool is None:
            return maybeDeferred(f, *args)
        return deferToThreadPool(self.reactor, getThreadPool(), f, *args)

    def _clientConnections(self) -> list:
        """
        The open client connections: the fast door's registry (which sees connections
        paused both ways), and a scan of the reactor for the other doors.
        """
        found = [door.transport for door in self.engine.doors if door.transport is not None]
        seen = {id(t) for t in found}
        for transport in openConnections(self.reactor, lambda: [s.factory for s in self.listeners]):
            if id(transport) not in seen and id(getattr(transport, "protocol", None)) not in seen:
                found.append(transport)
        return found

    def _readyLine(self, addresses: list) -> str:
        proxied = addresses[:len(self.listeners)]
        admin = addresses[len(self.listeners):len(self.listeners) + len(self.adminListeners)]
        health = addresses[len(self.listeners) + len(self.adminListeners):]
        return (f"sidecar ready: listening on {', '.join(proxied)} ({self.config.engine} front door), "
                f"upstream {self.pool.address}, admin on {', '.join(admin) or 'none'}, "
                f"health on {', '.join(health) or 'none'}")

    def proxyFactory(self, engine: Any = None) -> Any:
        """
        The factory of the configured front door (on C{engine}, by default the
        sidecar's).
        """
        engine = self.engine if engine is None else engine
        if self.config.engine == "web":
            from sidecar.resource import proxySite

            return proxySite(engine, self.config.maxHeaderBytes)
        from sidecar.downstream import DownstreamFactory

        return DownstreamFactory(engine, self.config.maxHeaderBytes)

    def sweepClients(self) -> None:
        """
        Enforce the client idle and request-head timeouts.
        """
        now = self.reactor.seconds()
        self.engine.doors.sweep(now, self.config.clientIdleTimeout, self.config.requestHeadTimeout)
        self.tcp.sweep(now)
        self.engine.sweepStreams(now)
        self.engine.sweepDeadlines()

    def startService(self) -> None:
        MultiService.startService(self)
        from sidecar.compat import listeningPort
        from sidecar.listen import speedUp

        for listener in self.listeners:
            waiting = listeningPort(listener)
            if waiting is not None:
                waiting.addCallback(keepAcceptLogger)
                # The sidecar's accept loop and transports (L{sidecar.listen}).
                waiting.addCallback(speedUp)

    def _listen(self, description: str, factory: Any, proxied: bool = False) -> Any:
        if proxied and self._adopted:
            fd, family, backlog = self._adopted.pop(0)
            service = AdoptedPortService(self.reactor, fd, family, factory, backlog)
            service.setServiceParent(self)
            return service
        service = strports.service(withBacklog(description), factory, reactor=self.reactor)
        service.setServiceParent(self)
        return service

    def stopService(self):
        d = MultiService.stopService(self)
        self.pool.closeAll()
        if self.configWatcher is not None:
            self.configWatcher.closeAll()
        if self.h2pool is not None:
            self.h2pool.closeAll()
        if self.originals is not None:
            self.originals.closeAll()
        self.engine.warnings.flush()
        self.tcp.warnings.flush()
        if self.outbound is not None:
            self.outbound.closeAll()
        if self.accessLog is not None:
            self.accessLog.flush()
        return d


class AdoptedPortService(Service):
    """
    A listener of a worker of C{--workers} (L{sidecar.workers}): on the address of a
    socket its parent reserved and handed down (bound with C{SO_REUSEPORT}), a listening
    socket of its own, bound with C{SO_REUSEPORT} too, adopted into the reactor when
    started and closed when stopped.  It offers the port as
    L{sidecar.compat.listeningPort} reads it.
    """

    def __init__(self, reactor: Any, fd: int, family: int, factory: Any, backlog: int = LISTEN_BACKLOG) -> None:
        self.reactor = reactor
        self.fd = fd
        self.family = family
        self.factory = factory
        self.backlog = backlog
        self.port: Any = None
        self._waitingForPort: Any = None

    def startService(self) -> None:
        import socket

        from twisted.internet.defer import succeed

        Service.startService(self)
        reserved = socket.socket(fileno=self.fd)
        try:
            address = reserved.getsockname()
        finally:
            reserved.close()
        sock = socket.socket(self.family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind(address)
            sock.listen(self.backlog)
            sock.setblocking(False)
            self.port = self.reactor.adoptStreamPort(sock.fileno(), self.family, self.factory)
        finally:
            sock.close()  # the port holds its own duplicate
        self._waitingForPort = succeed(self.port)

    def stopService(self) -> Any:
        Service.stopService(self)
        port, self.port = self.port, None
        if port is not None:
            return port.stopListening()
        return None


def makeService(config: ProxyConfig, reactor: Any) -> SidecarService:
    """
    Build the sidecar for C{config} on C{reactor}.
    """
    return SidecarService(config, reactor)
