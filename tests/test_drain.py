# -*- test-case-name: tests.test_drain -*-
"""
Tests for L{sidecar.drain}: readiness, the drain timeline and the exit, all on a
L{MemoryReactorClock} (no network, no real time).
"""

from __future__ import annotations

from typing import Any, List

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import succeed
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from sidecar.config import LifecycleConfig, UpstreamConfig
from sidecar.drain import (
    CLOSE_POLL,
    DRAINING,
    INITIALIZING,
    LIVE,
    Lifecycle,
    closeGracefully,
    installTermHandler,
    listeningAddresses,
    openConnections,
)
from sidecar.stats import Recorder
from tests.test_metrics import record


class FakeListener:
    """
    A listener service: running until stopped.
    """

    def __init__(self) -> None:
        self.running = True
        self.stops = 0
        self.factory = object()

    def stopService(self) -> None:
        self.running = False
        self.stops += 1


class FakeEngine:
    draining = False

    def __init__(self) -> None:
        self.doors: set = set()


class FakeDoor:
    """
    A fast-door connection as the drain sees it: busy or not, closed or not.
    """

    def __init__(self, busy: bool) -> None:
        self._busy = busy
        self.transport = FakeTransport()

    def busy(self) -> bool:
        return self._busy


class FakeTransport:
    """
    A client connection's transport that closes after C{lingers} polls once asked to.
    """

    def __init__(self, lingers: int = 0) -> None:
        self.lingers = lingers
        self.losing = False
        self.aborted = False

    @property
    def open(self) -> bool:
        if self.aborted:
            return False
        if self.losing:
            if self.lingers <= 0:
                return False
            self.lingers -= 1
        return True

    def loseConnection(self) -> None:
        self.losing = True

    def abortConnection(self) -> None:
        self.aborted = True


class Harness:
    """
    A L{Lifecycle} on a memory reactor with fake listeners and connections.
    """

    def __init__(self, testCase: SynchronousTestCase, **settings: Any) -> None:
        settings.setdefault("drainTimeout", 5.0)
        settings.setdefault("shutdownGrace", 20.0)
        self.reactor = MemoryReactorClock()
        self.reactor.running = True
        self.recorder = Recorder()
        self.engine = FakeEngine()
        self.listeners = [FakeListener(), FakeListener()]
        self.transports: List[FakeTransport] = []
        self.flushes = 0
        self.lines: List[List[str]] = []
        self.lifecycle = Lifecycle(
            self.reactor, LifecycleConfig(**settings), self.engine, self.recorder, self.listeners,
            UpstreamConfig(port=8080),
            connections=lambda: [t for t in self.transports if t.open],
            flush=self.flush,
            announce=self.announce,
        )
        testCase.addCleanup(self.lifecycle.stopService)

    def flush(self) -> None:
        self.flushes += 1

    def announce(self, addresses: List[str]) -> str:
        self.lines.append(addresses)
        return "ready " + ",".join(addresses)

    def start(self) -> Lifecycle:
        self.lifecycle.startService()
        self.reactor.advance(0)
        return self.lifecycle

    @property
    def stopped(self) -> bool:
        return bool(getattr(self.reactor, "hasStopped", False))

    def ready(self) -> tuple:
        results: List[tuple] = []
        self.lifecycle.ready().addCallback(results.append)
        return results[0] if results else None

    def beginRequest(self) -> None:
        self.recorder.requestsActive += 1

    def endRequest(self) -> None:
        self.recorder.requestsActive -= 1
        self.recorder.record(record(200))


class ReadinessTests(SynchronousTestCase):
    """
    C{/ready}'s answers and the start-up line.
    """

    def test_liveOnceListening(self) -> None:
        """
        The lifecycle is L{INITIALIZING} until its listeners listen, then L{LIVE}: ready
        answers 200 and the start-up line is logged once.
        """
        harness = Harness(self)
        self.assertEqual(harness.lifecycle.state, INITIALIZING)
        harness.lifecycle.startService()
        self.assertEqual(harness.lifecycle.state, INITIALIZING)
        harness.reactor.advance(0)
        self.assertEqual(harness.lifecycle.state, LIVE)
        self.assertEqual(harness.ready(), (200, "LIVE"))
        self.assertEqual(len(harness.lines), 1)

    def test_healthcheckFail(self) -> None:
        """
        A failed health check makes ready answer 503 C{DRAINING} (as Envoy does) without
        draining the traffic; restoring it makes ready answer 200 again.
        """
        harness = Harness(self)
        lifecycle = harness.start()
        lifecycle.failHealthcheck()
        self.assertEqual(harness.ready(), (503, DRAINING))
        self.assertEqual(lifecycle.reportedState, DRAINING)
        self.assertFalse(harness.engine.draining)
        self.assertTrue(all(listener.running for listener in harness.listeners))
        lifecycle.passHealthcheck()
        self.assertEqual(harness.ready(), (200, "LIVE"))

    def connectAttempt(self, harness: Harness) -> Any:
        """
        The factory of the last TCP connect the lifecycle made, checked to target the
        upstream.
        """
        host, port, factory, timeout, _ = harness.reactor.tcpClients[-1]
        self.assertEqual((host, port), ("127.0.0.1", 8080))
        self.assertLessEqual(timeout, 1.0)
        return factory

    def test_readyRequiresUpstream(self) -> None:
        """
        With C{readyRequiresUpstream}, ready answers 503 C{UPSTREAM UNREACHABLE} while a
        TCP connect to the service fails and 200 once one succeeds; the probe connection
        is closed at once.
        """
        harness = Harness(self, readyRequiresUpstream=True)
        harness.start()
        self.assertIsNone(harness.ready())
        self.connectAttempt(harness).clientConnectionFailed(None, Failure(ConnectionRefusedError()))
        results: List[tuple] = []
        harness.lifecycle.ready().addCallback(results.append)
        self.connectAttempt(harness).clientConnectionFailed(None, Failure(ConnectionRefusedError()))
        self.assertEqual(results, [(503, "UPSTREAM UNREACHABLE")])
        harness.lifecycle.ready().addCallback(results.append)
        transport = StringTransport()
        self.connectAttempt(harness).buildProtocol(None).makeConnection(transport)
        self.assertEqual(results[-1], (200, "LIVE"))
        self.assertTrue(transport.disconnecting)

    def test_waitForUpstream(self) -> None:
        """
        With C{waitForUpstream}, readiness (and the start-up line) waits until the
        service accepts a connect, retrying twice a second.
        """
        harness = Harness(self, waitForUpstream=10.0)
        lifecycle = harness.start()
        self.assertEqual(harness.ready(), (503, INITIALIZING))
        self.connectAttempt(harness).clientConnectionFailed(None, Failure(ConnectionRefusedError()))
        self.assertEqual(len(harness.reactor.tcpClients), 1)
        harness.reactor.advance(0.5)
        self.assertEqual(len(harness.reactor.tcpClients), 2)
        self.assertEqual(lifecycle.state, INITIALIZING)
        self.assertEqual(harness.lines, [])
        self.connectAttempt(harness).buildProtocol(None).makeConnection(StringTransport())
        self.assertEqual(lifecycle.state, LIVE)
        self.assertEqual(len(harness.lines), 1)

    def test_waitForUpstreamGivesUp(self) -> None:
        """
        When the service has not answered within C{waitForUpstream} seconds, the
        sidecar becomes ready anyway (and logs so).
        """
        harness = Harness(self, waitForUpstream=1.0)
        lifecycle = harness.start()
        for _ in range(2):
            self.connectAttempt(harness).clientConnectionFailed(None, Failure(ConnectionRefusedError()))
            self.assertEqual(lifecycle.state, INITIALIZING)
            harness.reactor.advance(0.5)
        self.connectAttempt(harness).clientConnectionFailed(None, Failure(ConnectionRefusedError()))
        self.assertEqual(lifecycle.state, LIVE)
        self.assertEqual(len(harness.lines), 1)


class DrainTests(SynchronousTestCase):
    """
    The drain timeline: 503 at once, listeners open for C{drainTimeout}, exit when idle
    or at C{drainTimeout + shutdownGrace}.
    """

    def test_drainListenersDoesNotExit(self) -> None:
        """
        L{Lifecycle.startDrain} (C{POST /drain_listeners}) turns ready to 503 and the
        engine to C{Connection: close} at once, closes the listeners after
        C{drainTimeout}, and does not stop the process.
        """
        harness = Harness(self, drainTimeout=5.0)
        lifecycle = harness.start()
        lifecycle.startDrain()
        self.assertEqual(harness.ready(), (503, DRAINING))
        self.assertTrue(harness.engine.draining)
        harness.reactor.advance(4.9)
        self.assertTrue(all(listener.running for listener in harness.listeners))
        harness.reactor.advance(0.1)
        self.assertEqual([listener.stops for listener in harness.listeners], [1, 1])
        harness.reactor.advance(100)
        self.assertFalse(harness.stopped)

    def test_idleKeepAliveClosedAfterDrainPeriod(self) -> None:
        """
        When the drain period ends, keep-alive client connections with nothing in
        flight are closed; one serving a request is left to finish.
        """
        harness = Harness(self, drainTimeout=5.0)
        idle, busy = FakeDoor(False), FakeDoor(True)
        harness.engine.doors.update([idle, busy])
        harness.start().startDrain()
        harness.reactor.advance(4.9)
        self.assertFalse(idle.transport.losing)
        harness.reactor.advance(0.1)
        self.assertTrue(idle.transport.losing)
        self.assertFalse(busy.transport.losing)

    def test_terminateIdleExitsAfterDrainPeriod(self) -> None:
        """
        With nothing in flight, SIGTERM exits right after the drain period, having
        flushed the access log.
        """
        harness = Harness(self, drainTimeout=5.0)
        harness.start().terminate()
        harness.reactor.advance(4.9)
        self.assertFalse(harness.stopped)
        harness.reactor.advance(0.1)
        self.assertTrue(harness.stopped)
        self.assertEqual(harness.flushes, 1)

    def test_inFlightRequestHoldsExit(self) -> None:
        """
        A request in flight at the end of the drain period holds the exit until it
        ends; the exit follows on the next turn of the reactor.
        """
        harness = Harness(self, drainTimeout=1.0, shutdownGrace=20.0)
        lifecycle = harness.start()
        harness.beginRequest()
        lifecycle.terminate()
        harness.reactor.advance(1.0)
        self.assertEqual([listener.running for listener in harness.listeners], [False, False])
        harness.reactor.advance(5.0)
        self.assertFalse(harness.stopped)
        harness.endRequest()
        self.assertFalse(harness.stopped)
        harness.reactor.advance(0)
        self.assertTrue(harness.stopped)
        self.assertNotIn(lifecycle._recorded, harness.recorder.sinks)

    def test_requestsEndingDuringDrainPeriod(self) -> None:
        """
        Requests that end during the drain period do not cut it short: the listeners
        stay open for the whole C{drainTimeout}.
        """
        harness = Harness(self, drainTimeout=3.0)
        lifecycle = harness.start()
        harness.beginRequest()
        lifecycle.terminate()
        harness.reactor.advance(1.0)
        harness.endRequest()
        harness.reactor.advance(1.0)
        self.assertFalse(harness.stopped)
        self.assertTrue(harness.listeners[0].running)
        harness.reactor.advance(1.0)
        self.assertTrue(harness.stopped)

    def test_connectionsCloseBeforeExit(self) -> None:
        """
        Once nothing is in flight, the client connections are closed gracefully (their
        last bytes written first) and the exit waits for them to go.
        """
        harness = Harness(self, drainTimeout=1.0)
        slow = FakeTransport(lingers=3)
        harness.transports.append(slow)
        harness.start().terminate()
        harness.reactor.advance(1.0)
        self.assertTrue(slow.losing)
        self.assertFalse(harness.stopped)
        for _ in range(3):
            harness.reactor.advance(CLOSE_POLL)
        self.assertTrue(harness.stopped)
        self.assertFalse(slow.aborted)

    def test_graceDeadline(self) -> None:
        """
        A request still in flight C{shutdownGrace} seconds after the drain period does
        not hold the exit: its connection is aborted (so that its exchange ends and is
        logged) and the process stops on the following turn of the reactor.
        """
        harness = Harness(self, drainTimeout=2.0, shutdownGrace=3.0)
        stuck = FakeTransport()
        harness.transports.append(stuck)
        harness.beginRequest()
        harness.start().terminate()
        harness.reactor.advance(2.0)
        harness.reactor.advance(2.99)
        self.assertFalse(harness.stopped)
        harness.reactor.advance(0.02)
        self.assertTrue(stuck.aborted)
        self.assertTrue(harness.stopped)
        self.assertEqual(harness.flushes, 1)

    def test_secondTerminateExitsAtOnce(self) -> None:
        """
        A second SIGTERM exits at once, whatever is in flight.
        """
        harness = Harness(self)
        lifecycle = harness.start()
        harness.beginRequest()
        lifecycle.terminate()
        self.assertFalse(harness.stopped)
        lifecycle.terminate()
        self.assertTrue(harness.stopped)
        self.assertEqual(harness.reactor.getDelayedCalls(), [])

    def test_quitTwiceDoesNotHurry(self) -> None:
        """
        C{/quitquitquit} called twice with a request in flight does not make the exit
        abrupt: the request may end within C{drainTimeout}, and the exit follows.
        """
        harness = Harness(self, drainTimeout=1.0)
        lifecycle = harness.start()
        harness.beginRequest()
        lifecycle.quit()
        lifecycle.quit()
        self.assertTrue(lifecycle.exiting)
        self.assertFalse(harness.stopped)
        harness.reactor.advance(1.0)
        harness.endRequest()
        harness.reactor.advance(0)
        self.assertTrue(harness.stopped)

    def test_quitIdleExitsAtOnce(self) -> None:
        """
        C{/quitquitquit} with nothing in flight exits on the next turn of the reactor,
        without waiting for the drain period: the listeners close, idle keep-alive
        clients are closed gracefully, the access log is flushed.
        """
        harness = Harness(self, drainTimeout=5.0)
        idle = FakeDoor(False)
        harness.engine.doors.add(idle)
        lifecycle = harness.start()
        lifecycle.quit()
        self.assertEqual(harness.ready(), (503, DRAINING))
        self.assertFalse(harness.stopped)
        harness.reactor.advance(0)
        self.assertEqual([listener.running for listener in harness.listeners], [False, False])
        self.assertTrue(idle.transport.losing)
        self.assertTrue(harness.stopped)
        self.assertEqual(harness.flushes, 1)
        self.assertEqual(harness.reactor.getDelayedCalls(), [])

    def test_quitWaitsForInFlight(self) -> None:
        """
        C{/quitquitquit} with a request in flight closes the listeners at once and
        exits on the turn after that request ends, well before C{drainTimeout}.
        """
        harness = Harness(self, drainTimeout=5.0)
        lifecycle = harness.start()
        harness.beginRequest()
        lifecycle.quit()
        harness.reactor.advance(0)
        self.assertEqual([listener.running for listener in harness.listeners], [False, False])
        harness.reactor.advance(2.0)
        self.assertFalse(harness.stopped)
        harness.endRequest()
        harness.reactor.advance(0)
        self.assertTrue(harness.stopped)

    def test_quitBoundedByDrainTimeout(self) -> None:
        """
        A request still in flight C{drainTimeout} seconds after C{/quitquitquit} does
        not hold the exit (C{shutdownGrace} is not added): its connection is aborted.
        """
        harness = Harness(self, drainTimeout=2.0, shutdownGrace=20.0)
        stuck = FakeTransport()
        harness.transports.append(stuck)
        harness.beginRequest()
        harness.start().quit()
        harness.reactor.advance(0)
        harness.reactor.advance(1.99)
        self.assertFalse(harness.stopped)
        harness.reactor.advance(0.02)
        self.assertTrue(stuck.aborted)
        self.assertTrue(harness.stopped)

    def test_terminateAfterDrainedListeners(self) -> None:
        """
        SIGTERM after C{/drain_listeners} has already closed the listeners exits as
        soon as nothing is in flight, without another drain period.
        """
        harness = Harness(self, drainTimeout=1.0)
        lifecycle = harness.start()
        lifecycle.startDrain()
        harness.reactor.advance(1.0)
        self.assertFalse(harness.stopped)
        lifecycle.terminate()
        self.assertTrue(harness.stopped)

    def test_stopServiceCancelsTimers(self) -> None:
        """
        Stopping the service (the reactor stopping some other way) leaves no timer.
        """
        harness = Harness(self, waitForUpstream=5.0)
        lifecycle = harness.start()
        lifecycle.terminate()
        lifecycle.stopService()
        self.assertEqual(harness.reactor.getDelayedCalls(), [])


class FakeSignalModule:
    SIGTERM = 15

    def __init__(self) -> None:
        self.handlers: dict = {}

    def signal(self, number: int, handler: Any) -> None:
        self.handlers[number] = handler


class FakeThreadReactor:
    def __init__(self) -> None:
        self.fromThread: List[Any] = []

    def callFromThread(self, f: Any, *args: Any) -> None:
        self.fromThread.append((f, args))


class PlumbingTests(SynchronousTestCase):
    """
    The signal handler, the open-connection finder and the listening addresses.
    """

    def test_termHandler(self) -> None:
        """
        SIGTERM's handler hands the drain to the reactor thread rather than stopping the
        reactor.
        """
        signals, reactor = FakeSignalModule(), FakeThreadReactor()
        calls: List[int] = []
        installTermHandler(reactor, lambda: calls.append(1), signals)
        signals.handlers[15](15, None)
        self.assertEqual(calls, [])
        f, args = reactor.fromThread[0]
        f(*args)
        self.assertEqual(calls, [1])

    def test_signalsOnlyWhenAsked(self) -> None:
        """
        The lifecycle replaces the SIGTERM handler (once the reactor runs) and flushes
        the access log after shutdown only when asked to: tests never touch the
        process's signals.
        """
        harness = Harness(self)
        harness.reactor.running = False
        harness.lifecycle.startService()
        self.assertEqual(harness.reactor.whenRunningHooks, [])
        other = Harness(self)
        other.reactor.running = False
        other.lifecycle.handleSignals = True
        other.lifecycle.startService()
        self.assertEqual([hook[0] for hook in other.reactor.whenRunningHooks], [installTermHandler])
        self.assertEqual(other.reactor.triggers["after"]["shutdown"][0][0], other.flush)

    def test_openConnections(self) -> None:
        """
        The open client connections are the reactor's readers and writers whose protocol
        came from one of the proxy's listener factories, each once.
        """
        ours, admin = object(), object()

        class Selectable:
            def __init__(self, factory: object) -> None:
                self.protocol = type("P", (), {"factory": factory})()

        reading, writing, adminConnection = Selectable(ours), Selectable(ours), Selectable(admin)
        reactor = type("R", (), {
            "getReaders": lambda self: [reading, adminConnection, object()],
            "getWriters": lambda self: [reading, writing],
        })()
        self.assertEqual(openConnections(reactor, lambda: [ours]), [reading, writing])

    def test_listeningAddresses(self) -> None:
        """
        The start-up line names each listener's bound address, IPv6 in brackets.
        """

        class Port:
            def __init__(self, address: Any) -> None:
                self.address = address

            def getHost(self) -> Any:
                return self.address

        listeners = [type("L", (), {"_waitingForPort": succeed(Port(address))})()
                     for address in (IPv4Address("TCP", "127.0.0.1", 15001), IPv6Address("TCP", "::1", 15002))]
        result = self.successResultOf(listeningAddresses(listeners))
        self.assertEqual(result, ["127.0.0.1:15001", "[::1]:15002"])
        # The listener's own Deferred still gives the port to whoever asks next.
        self.assertIsInstance(self.successResultOf(listeners[0]._waitingForPort), Port)

    def test_closeGracefully(self) -> None:
        """
        A connection with a TLS layer (a L{ProtocolWrapper}, or a permissive port's
        first-byte switch) is closed through it, so that the client gets a close_notify;
        a plain one through its transport.
        """
        closed: List[str] = []

        class TLSLayer(ProtocolWrapper):
            def loseConnection(self) -> None:
                closed.append("layer")

        class Transport:
            def __init__(self, protocol: Any) -> None:
                self.protocol = protocol

            def loseConnection(self) -> None:
                closed.append("transport")

        class FirstByteSwitch:
            # A permissive port's protocol: closes through TLS when the client spoke TLS.
            def loseConnection(self) -> None:
                closed.append("switch")

        closeGracefully(Transport(TLSLayer(WrappingFactory(None), None)))
        closeGracefully(Transport(FirstByteSwitch()))
        closeGracefully(Transport(object()))
        self.assertEqual(closed, ["layer", "switch", "transport"])
