# -*- test-case-name: tests.test_drain -*-
"""
Readiness, graceful drain and shutdown.

L{Lifecycle} is the sidecar's state (C{INITIALIZING}, C{LIVE}, C{DRAINING}) and the
timeline of a drain::

    drain starts ──── drainTimeout ────▶ listeners close ──── shutdownGrace ────▶ exit
    /ready 503, every response            new connections      at the latest;
    says Connection: close                are refused          earlier as soon as no
                                                               request is in flight

A drain starts on SIGTERM (which then exits) or C{POST /drain_listeners} (which does
not).  A second SIGTERM exits at once.  C{POST /quitquitquit} is Envoy's: no drain
period, the listeners close at once and the process exits as soon as nothing is in
flight, after C{drainTimeout} seconds at the latest.  The clock, the
reactor and the ways to find the open client connections are passed in, so that all of
it runs on a L{twisted.internet.testing.MemoryReactorClock} in the tests.
"""

from __future__ import annotations

import signal as _signal
from typing import TYPE_CHECKING, Any, Callable, Iterable, List, Optional, Sequence

from twisted.application.service import Service
from twisted.internet.defer import Deferred, gatherResults, succeed
from twisted.internet.error import ReactorNotRunning
from twisted.internet.protocol import ClientFactory, Protocol
from twisted.logger import Logger

from sidecar.compat import listeningPort
from sidecar.config import LifecycleConfig

if TYPE_CHECKING:  # pragma: no cover
    from twisted.python.failure import Failure

log = Logger()

INITIALIZING = "INITIALIZING"
LIVE = "LIVE"
DRAINING = "DRAINING"

#: How often the start-up wait tries to connect to the service, in seconds.
UPSTREAM_RETRY = 0.5

#: How long a readiness or start-up probe may take to connect, at most, in seconds.
PROBE_TIMEOUT = 1.0

#: How often the end of a drain looks whether the client connections have closed.
CLOSE_POLL = 0.05


class _Probe(Protocol):
    def connectionMade(self) -> None:
        self.factory.result(True)  # type: ignore[attr-defined]
        self.transport.abortConnection()


class _ProbeFactory(ClientFactory):
    protocol = _Probe
    noisy = False

    def __init__(self) -> None:
        self.deferred: Deferred[bool] = Deferred()

    def result(self, answered: bool) -> None:
        d, self.deferred = self.deferred, None
        if d is not None:
            d.callback(answered)

    def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
        self.result(False)


def probeUpstream(reactor: Any, host: str, port: int, timeout: float = PROBE_TIMEOUT) -> Deferred[bool]:
    """
    Whether the service at C{host:port} accepts a TCP connect within C{timeout}
    seconds; the connection is closed at once.

    @param reactor: an L{IReactorTCP}.
    """
    factory = _ProbeFactory()
    d = factory.deferred
    reactor.connectTCP(host, port, factory, timeout=timeout)
    return d


def openConnections(reactor: Any, factories: Callable[[], Iterable[Any]]) -> List[Any]:
    """
    The transports of the client connections open now on the listeners whose factories
    C{factories()} returns, found among the reactor's readers and writers.

    @param reactor: an L{IReactorFDSet}.
    """
    wanted = {id(factory) for factory in factories()}
    seen = set()
    found = []
    for selectable in list(reactor.getReaders()) + list(reactor.getWriters()):
        protocol = getattr(selectable, "protocol", None)
        if id(getattr(protocol, "factory", None)) in wanted and id(selectable) not in seen:
            seen.add(id(selectable))
            found.append(selectable)
    return found


def closeGracefully(transport: Any) -> None:
    """
    Close a client connection once its last bytes are written: through its TLS layer
    when it has one (so that the client gets a C{close_notify}), else its transport.
    """
    protocol = getattr(transport, "protocol", None)
    # A TLS wrapper, or a permissive port's first-byte switch, closes through TLS.
    close = getattr(protocol, "loseConnection", None)
    if close is not None:
        close()
    else:
        transport.loseConnection()


def listeningAddresses(listeners: Sequence[Any]) -> Deferred[List[str]]:
    """
    C{host:port} (or the path) of each listener in C{listeners}
    (L{twisted.application.internet.StreamServerEndpointService}s, started), once each
    listens.
    """

    def address(port: Any) -> Any:
        if port is None:
            return "?"
        host = port.getHost()
        if hasattr(host, "port"):
            return f"[{host.host}]:{host.port}" if ":" in host.host else f"{host.host}:{host.port}"
        return str(getattr(host, "name", host))

    waits = []
    for listener in listeners:
        waiting = listeningPort(listener)
        if waiting is None:
            waits.append(succeed("?"))
            continue
        result: Deferred[str] = Deferred()

        def got(port: Any, result: Deferred[str] = result) -> Any:
            result.callback(address(port))
            return port

        waiting.addCallback(got)
        waits.append(result)
    return gatherResults(waits)


def installTermHandler(reactor: Any, onTerm: Callable[[], None], signalModule: Any = _signal) -> None:
    """
    Make SIGTERM call C{onTerm} in the reactor thread, replacing the handler twistd
    installs (which stops the reactor at once).  Call it once the reactor runs.
    """

    def handler(signum: int, frame: Any) -> None:
        reactor.callFromThread(onTerm)

    signalModule.signal(signalModule.SIGTERM, handler)


class Lifecycle(Service):
    """
    Readiness, drain and shutdown of one sidecar.

    @ivar state: L{INITIALIZING} until the listeners listen (and, with
        C{waitForUpstream}, the service answers), then L{LIVE}, then L{DRAINING}.
    @ivar healthcheckFailed: C{POST /healthcheck/fail} was called (and not undone by
        C{/healthcheck/ok}): C{/ready} answers 503.
    @ivar exiting: the process exits at the end of this drain.
    @ivar handleSignals: install the SIGTERM handler when the reactor runs (set by
        L{sidecar.tap.makeService}, not in tests).
    """

    handleSignals = False

    def __init__(
        self,
        reactor: Any,
        config: LifecycleConfig,
        engine: Any,
        recorder: Any,
        listeners: List[Any],
        upstream: Any,
        connections: Callable[[], Iterable[Any]] = lambda: (),
        flush: Callable[[], None] = lambda: None,
        announce: Callable[[List[str]], str] = lambda addresses: "",
        adminListeners: Callable[[], List[Any]] = lambda: [],
    ) -> None:
        """
        @param reactor: the reactor: its clock, C{connectTCP} for the probes, C{stop}.
        @param config: the drain and readiness settings.
        @param engine: the L{sidecar.exchange.Engine} whose C{draining} we set.
        @param recorder: the L{sidecar.stats.Recorder} whose C{requestsActive} says what
            is in flight, and to whose sinks we listen for the last one to end.
        @param listeners: the proxy's listener services (this very list: read at drain
            time).
        @param upstream: the L{sidecar.config.UpstreamConfig} of the service.
        @param connections: returns the transports of the open client connections.
        @param flush: pushes the access log out (before exiting, and after the reactor
            has closed the last connections).
        @param announce: makes the start-up line from the listening addresses.
        @param adminListeners: the admin listener services, for the start-up line.
        """
        self.reactor = reactor
        self.config = config
        self.engine = engine
        self.recorder = recorder
        self.listeners = listeners
        self.upstream = upstream
        self.connections = connections
        self.flush = flush
        self.announce = announce
        self.adminListeners = adminListeners
        self.state = INITIALIZING
        self.healthcheckFailed = False
        self.exiting = False
        self.drainStarted: Optional[float] = None
        self.listenersClosed = False
        self.addresses: List[str] = []
        self._calls: List[Any] = []
        self._deadline: Any = None
        self._watching = False
        self._checkPending = False
        self._exited = False
        self._waitUntil: Optional[float] = None

    # -- service ---------------------------------------------------------------------

    def startService(self) -> None:
        """
        Announce readiness once every listener listens (and the service answers, with
        C{waitForUpstream}); install the SIGTERM handler when the reactor runs.
        """
        Service.startService(self)
        if self.handleSignals:
            self.reactor.callWhenRunning(installTermHandler, self.reactor, self.terminate)
            self.reactor.addSystemEventTrigger("after", "shutdown", self.flush)
        self._later(0, self._listening)

    def stopService(self) -> None:
        """
        Cancel every pending timer.
        """
        Service.stopService(self)
        self._cancelAll()

    def _listening(self) -> None:
        d = listeningAddresses(list(self.listeners) + list(self.adminListeners()))
        d.addCallback(self._bound)
        d.addErrback(lambda f: log.failure("could not read the listening addresses", f))

    def _bound(self, addresses: List[str]) -> None:
        self.addresses = addresses
        if self.config.waitForUpstream is not None:
            self._waitUntil = self.reactor.seconds() + self.config.waitForUpstream
            log.info("waiting up to {seconds} s for {upstream} to accept connections",
                     seconds=self.config.waitForUpstream, upstream=self.upstream.address)
            self._tryUpstream()
        else:
            self._live()

    def _tryUpstream(self) -> None:
        if self.state != INITIALIZING or not self.running:
            return
        d = probeUpstream(self.reactor, self.upstream.host, self.upstream.port,
                          min(PROBE_TIMEOUT, self.config.waitForUpstream or PROBE_TIMEOUT))
        d.addCallback(self._upstreamAnswered)

    def _upstreamAnswered(self, answered: bool) -> None:
        if self.state != INITIALIZING:
            return
        if answered:
            self._live()
        elif self.reactor.seconds() >= (self._waitUntil or 0):
            log.warn("{upstream} did not accept a connection within {seconds} s; "
                     "ready anyway", upstream=self.upstream.address,
                     seconds=self.config.waitForUpstream)
            self._live()
        else:
            self._later(UPSTREAM_RETRY, self._tryUpstream)

    def _live(self) -> None:
        if self.state == INITIALIZING:
            self.state = LIVE
        log.info("{line}", line=self.announce(self.addresses))

    # -- readiness -------------------------------------------------------------------

    @property
    def reportedState(self) -> str:
        """
        The state as C{/server_info} and C{/ready} tell it: a failed health check reads
        as L{DRAINING}, as in Envoy.
        """
        if self.state == LIVE and self.healthcheckFailed:
            return DRAINING
        return self.state

    def ready(self) -> Deferred[tuple]:
        """
        C{(status, text)} for C{/ready}: C{(200, "LIVE")} while serving, C{(503,
        state)} otherwise, and, with C{readyRequiresUpstream}, C{(503, "UPSTREAM
        UNREACHABLE")} while the service refuses connections.
        """
        state = self.reportedState
        if state != LIVE:
            return succeed((503, state))
        if not self.config.readyRequiresUpstream:
            return succeed((200, LIVE))
        d = probeUpstream(self.reactor, self.upstream.host, self.upstream.port,
                          min(PROBE_TIMEOUT, self.upstream.connectTimeout))
        d.addCallback(lambda answered: (200, LIVE) if answered else (503, "UPSTREAM UNREACHABLE"))
        return d

    def failHealthcheck(self) -> None:
        """
        C{/ready} answers 503 until L{passHealthcheck}; traffic is still served.
        """
        if not self.healthcheckFailed:
            log.info("health check set to fail: /ready answers 503")
        self.healthcheckFailed = True

    def passHealthcheck(self) -> None:
        """
        Undo L{failHealthcheck}.
        """
        if self.healthcheckFailed:
            log.info("health check restored")
        self.healthcheckFailed = False

    # -- drain and exit --------------------------------------------------------------

    def startDrain(self, announce: bool = True) -> None:
        """
        Start draining (once): C{/ready} answers 503, every response says C{Connection:
        close}, and the listeners close after C{drainTimeout} seconds.

        @param announce: log the drain's start (L{quit} says its own line).
        """
        if self.drainStarted is not None:
            return
        self.drainStarted = self.reactor.seconds()
        self.state = DRAINING
        self.engine.draining = True
        if announce:
            log.info("draining: /ready answers 503, responses say Connection: close, "
                     "the listeners close in {seconds} s ({active} requests in flight)",
                     seconds=self.config.drainTimeout, active=self.recorder.requestsActive)
        self._later(self.config.drainTimeout, self._drainPeriodOver)

    def terminate(self) -> None:
        """
        SIGTERM, C{/quitquitquit}: drain, then exit as soon as nothing is in flight
        after the drain period, or after C{shutdownGrace} more seconds at the latest.
        A second call exits at once.
        """
        if self.exiting:
            log.info("asked again to stop: exiting now ({active} requests in flight)",
                     active=self.recorder.requestsActive)
            self._exit()
            return
        self.exiting = True
        self.startDrain()
        if self.listenersClosed:
            self._shutdownTail()

    def quit(self) -> None:
        """
        C{/quitquitquit}, as Envoy's (what a Job's last step calls): exit as soon as
        nothing is in flight.  The listeners close and idle keep-alive clients are let
        go at once, without the drain period; a request in flight is waited for, at
        most C{drainTimeout} seconds.  The first check runs on the next turn, once the
        answer to the call is on its way.  Calling it again, or after SIGTERM, does not
        hurry the exit.
        """
        if self.exiting:
            return
        self.exiting = True
        log.info("quitquitquit: closing the listeners, exiting once nothing is in flight "
                 "({active} requests now; {seconds} s at most)",
                 active=self.recorder.requestsActive, seconds=self.config.drainTimeout)
        self.startDrain(announce=False)
        self._later(0, self._quitNow)

    def _quitNow(self) -> None:
        self.closeListeners("quitquitquit")
        self._releaseIdleClients()
        self._shutdownTail(self.config.drainTimeout)

    def _drainPeriodOver(self) -> None:
        self.closeListeners("drain period over")
        self._releaseIdleClients()
        if self.exiting:
            self._shutdownTail()

    def _releaseIdleClients(self) -> None:
        # Keep-alive clients with nothing in flight would only hear "Connection: close"
        # on their next request: close them now.
        for door in list(self.engine.doors):
            if not door.busy() and door.transport is not None:
                closeGracefully(door.transport)

    def closeListeners(self, why: str = "drain period over") -> None:
        """
        Stop accepting connections on the proxy's listeners (the admin site stays).

        @param why: what the log line says caused it.
        """
        if self.listenersClosed:
            return
        self.listenersClosed = True
        for listener in list(self.listeners):
            if listener.running:
                listener.stopService()
        log.info("{why}: listeners closed, {active} requests in flight",
                 why=why, active=self.recorder.requestsActive)

    def _shutdownTail(self, grace: Optional[float] = None) -> None:
        """
        Exit once nothing is in flight, or after C{grace} seconds (default
        C{shutdownGrace}) at the latest.
        """
        if self._deadline is None:
            self._deadline = self._later(self.config.shutdownGrace if grace is None else grace, self._graceOver)
        self._idleCheck()

    def _idleCheck(self) -> None:
        self._checkPending = False
        if self._exited:
            return
        if self.recorder.requestsActive <= 0:
            self._stopWatching()
            self._closeConnections()
        elif not self._watching:
            # Be told of each request that ends: the last one lets us exit.
            self._watching = True
            self.recorder.sinks.append(self._recorded)

    def _recorded(self, record: Any) -> None:
        """
        A sink of the recorder while requests are in flight at shutdown; the check
        runs on the next turn, out of the front door's call stack.
        """
        if self.recorder.requestsActive <= 0 and not self._checkPending:
            # Not removed from the sinks here: the recorder is iterating them.
            self._checkPending = True
            self._later(0, self._idleCheck)

    def _stopWatching(self) -> None:
        if self._watching:
            self._watching = False
            if self._recorded in self.recorder.sinks:
                self.recorder.sinks.remove(self._recorded)

    def _closeConnections(self) -> None:
        """
        Nothing is in flight: close the client connections once their last bytes are
        written, then exit.
        """
        for transport in self.connections():
            closeGracefully(transport)
        self._waitForClose()

    def _waitForClose(self) -> None:
        if self._exited:
            return
        if list(self.connections()):
            self._later(CLOSE_POLL, self._waitForClose)
            return
        log.info("no request in flight: exiting")
        self._exit()

    def _graceOver(self) -> None:
        self._deadline = None
        remaining = list(self.connections())
        log.warn("shutdown deadline reached: closing {connections} connections with {active} "
                 "requests in flight", connections=len(remaining),
                 active=self.recorder.requestsActive)
        for transport in remaining:
            transport.abortConnection()
        # The aborted connections end their exchanges (and log them) on the next turn.
        self._later(0, self._exit)

    def _exit(self) -> None:
        if self._exited:
            return
        self._exited = True
        self._stopWatching()
        self._cancelAll()
        self.flush()
        try:
            self.reactor.stop()
        except ReactorNotRunning:
            pass

    # -- timers ----------------------------------------------------------------------

    def _later(self, delay: float, f: Callable[..., Any], *args: Any) -> Any:
        self._calls = [c for c in self._calls if c.active()]
        call = self.reactor.callLater(delay, f, *args)
        self._calls.append(call)
        return call

    def _cancelAll(self) -> None:
        calls, self._calls = self._calls, []
        for call in calls:
            if call.active():
                call.cancel()
