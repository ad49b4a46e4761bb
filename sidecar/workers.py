# -*- test-case-name: tests.test_workers -*-
"""
C{--workers N}: N processes serving the same listening sockets, one per core.

The parent (the process twistd or twist runs) reserves the proxy's addresses (a socket
bound with C{SO_REUSEPORT}, not listening) and starts N workers with L{runWorker}; each
binds its own listening socket to the same address with C{SO_REUSEPORT} (backlog 1024)
and runs the whole sidecar on it: its own engine, pool and recorder.  The kernel
spreads new connections evenly over the workers.  The parent serves no proxy
traffic; it owns:

  - the admin and health sites.  Each worker sends a copy of its counters to the
    parent once a second (L{SNAPSHOT_INTERVAL}) and when it stops; the parent's
    metrics and C{/stats} are the sum of the latest copy of every worker, plus
    C{sidecar_workers} and C{sidecar_worker_restarts_total}.  So counts lag the
    traffic by up to a second, and every number is a sum over the workers (the
    process collectors, C{process_*}, describe the parent alone);
  - the lifecycle.  SIGTERM (or C{/quitquitquit}, C{/drain_listeners}) is passed to
    every worker, which drains as a single sidecar does; the parent closes its copy of
    the sockets, and exits once every worker has, or after the drain period and the
    shutdown grace plus L{EXIT_MARGIN} seconds, killing what is left.  A second SIGTERM
    makes every worker exit at once;
  - the workers.  A worker that exits while the sidecar is not stopping is logged,
    counted and started again after L{RESTART_DELAY} seconds;
  - the log.  Workers send their log events to the parent, which writes them into its
    own log as C{worker N: ...}.  The access log is written by each worker, in writes
    of whole lines of at most C{PIPE_BUF} bytes, which the kernel never interleaves on
    a pipe, and on a file opened for appending.

The pool limits (C{--upstream-max-connections}, C{-max-pending}, C{-max-idle}) are
shared out: each worker gets the limit divided by N, rounded up.  The access log's
buffer is per worker.

Control messages between the two are netstrings of pickles on pipes only the parent
and its own children hold: the parent writes commands on a worker's standard input
(C{drain}, C{quit}, C{term}, C{now}; its end means the parent is gone, and the worker
exits), and the worker writes C{snapshot} and C{log} messages on descriptor 3.
"""

from __future__ import annotations

import base64
import math
import os
import pickle
import signal
import socket
import sys
from types import SimpleNamespace
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import attrs
from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.protocol import ProcessProtocol, Protocol
from twisted.logger import Logger, LogLevel, formatEvent
from twisted.protocols.basic import NetstringReceiver

from sidecar.config import ProxyConfig
from sidecar.stats import Histogram, Series

log = Logger()

#: Seconds between two copies of a worker's counters sent to the parent.
SNAPSHOT_INTERVAL = 1.0

#: Seconds before a worker that died is started again.
RESTART_DELAY = 1.0

#: Seconds past the drain period and the shutdown grace that the parent waits for the
#: workers to exit before killing them.
EXIT_MARGIN = 5.0

#: The environment variables that give a worker its configuration and its number.
CONFIG_VARIABLE = "SIDECAR_WORKER_CONFIG"
INDEX_VARIABLE = "SIDECAR_WORKER_INDEX"

#: The descriptor a worker writes its messages to the parent on.
MESSAGES_FD = 3

#: The first descriptor of the inherited listening sockets, in the worker.
FIRST_LISTEN_FD = 4

#: A worker's program: SIGTERM ignored from the first moment (one sent to the whole
#: process group must not kill a worker still starting; the parent passes it on as
#: C{term}, and the worker's own handler takes over once its reactor runs).
WORKER_MAIN = ("import signal; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
               "from sidecar.workers import runWorker; runWorker()")

#: The message length a netstring may have (a snapshot with many series is large).
MAX_MESSAGE = 64 * 1024 * 1024


def workerCount(value: str) -> int:
    """
    C{--workers}: a whole number of at least 1, or C{auto} (the CPUs this process may
    run on).

    @raise ValueError: for anything else.
    """
    value = value.strip().lower()
    if value == "auto":
        try:
            return max(1, len(os.sched_getaffinity(0)))
        except AttributeError:  # pragma: no cover
            return max(1, os.cpu_count() or 1)
    count = int(value)
    if count < 1:
        raise ValueError(value)
    return count


def shareOut(config: ProxyConfig, workers: int) -> ProxyConfig:
    """
    One worker's configuration: the pool limits divided by C{workers}, rounded up; no
    admin or health site (the parent's).
    """
    upstream = config.upstream

    def part(limit: Optional[int]) -> Optional[int]:
        return None if limit is None else max(1, math.ceil(limit / workers)) if limit else 0

    upstream = attrs.evolve(upstream, maxConnections=part(upstream.maxConnections),
                            maxPending=part(upstream.maxPending), maxIdle=part(upstream.maxIdle))
    return attrs.evolve(config, upstream=upstream, admin=None, health=None)


def listeningSocket(description: str, backlog: int) -> Tuple[socket.socket, int]:
    """
    Reserve the address of a C{tcp:} or C{tcp6:} server endpoint string (C{port},
    C{interface}, C{backlog} arguments) in this process: a socket bound with
    C{SO_REUSEPORT} and not listening, so that it takes no connection itself.  Each
    worker binds its own listening socket to the same address (L{sidecar.service.
    AdoptedPortService}) and the kernel spreads new connections evenly over them (a
    single shared listening socket lets whichever worker wakes first take a whole
    burst).  A port of 0 is chosen here, once, for all of them.

    @return: the socket and the backlog its workers listen with.
    @raise ValueError: for another kind of endpoint.
    """
    from twisted.internet.endpoints import _parseServer  # type: ignore[attr-defined]

    kind, args, kwargs = _parseServer(description, None)
    kind = kind.lower()
    if kind not in ("tcp", "tcp6"):
        raise ValueError(f"{description!r} is not a tcp: or tcp6: endpoint")
    port = int(kwargs.get("port", args[0] if args else 0))
    interface = kwargs.get("interface", "" if kind == "tcp" else "::")
    family = socket.AF_INET6 if kind == "tcp6" or ":" in interface else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((interface, port))
    except BaseException:
        sock.close()
        raise
    return sock, int(kwargs.get("backlog", backlog))


# -- counters ------------------------------------------------------------------------

def _addHistogram(total: Histogram, part: Histogram) -> None:
    total.counts = [a + b for a, b in zip(total.counts, part.counts)]
    total.sum += part.sum
    total.count += part.count


def mergeSnapshots(parts: Sequence[Any]) -> Any:
    """
    The sum of workers' counters: each part is what L{snapshotOf} made of one worker.

    @return: a namespace with C{recorder}, C{pool}, C{tls} and C{accessLog}, in the
        shapes L{sidecar.metrics.SidecarCollector} reads.
    """
    recorder = SimpleNamespace(series={}, downstreamConnectionsActive=0, downstreamConnectionsTotal=0,
                               requestsActive=0, downstreamBytesReceived=0, downstreamBytesSent=0)
    pool = SimpleNamespace(active=0, idle=[], connecting=0, connects=0, connectFailures=0, pending=[],
                           overflows=0)
    tls: Any = None
    accessLog: Any = None
    for part in parts:
        for name in ("downstreamConnectionsActive", "downstreamConnectionsTotal", "requestsActive",
                     "downstreamBytesReceived", "downstreamBytesSent"):
            setattr(recorder, name, getattr(recorder, name) + getattr(part.recorder, name))
        for key, series in part.recorder.series.items():
            total = recorder.series.get(key)
            if total is None:
                total = recorder.series[key] = Series()
            total.requests += series.requests
            _addHistogram(total.duration, series.duration)
            _addHistogram(total.requestBytes, series.requestBytes)
            _addHistogram(total.responseBytes, series.responseBytes)
        for name in ("active", "connecting", "connects", "connectFailures", "overflows"):
            setattr(pool, name, getattr(pool, name) + getattr(part.pool, name))
        pool.idle = pool.idle + list(part.pool.idle)
        pool.pending = pool.pending + list(part.pool.pending)
        if part.tls is not None:
            if tls is None:
                tls = SimpleNamespace(handshakes=0, handshakeFailures=0, handshakeTimeouts=0, denials=0,
                                      context=SimpleNamespace(rotations=0, failures=0))
            for name in ("handshakes", "handshakeFailures", "handshakeTimeouts", "denials"):
                setattr(tls, name, getattr(tls, name) + getattr(part.tls, name))
            tls.context.rotations += part.tls.context.rotations
            tls.context.failures += part.tls.context.failures
        if part.accessLog is not None:
            if accessLog is None:
                accessLog = SimpleNamespace(dropped=0, buffered=0, limit=0)
            for name in ("dropped", "buffered", "limit"):
                setattr(accessLog, name, getattr(accessLog, name) + getattr(part.accessLog, name))
    return SimpleNamespace(recorder=recorder, pool=pool, tls=tls, accessLog=accessLog)


def snapshotOf(collector: Any) -> Any:
    """
    A worker's counters as plain, picklable data (from its collector's snapshot).
    """
    frozen = collector.snapshot()
    return SimpleNamespace(recorder=frozen.recorder, pool=frozen.pool, tls=frozen.tls,
                           accessLog=frozen.accessLog)


# -- the parent ------------------------------------------------------------------------

class _WorkerMessages(NetstringReceiver):
    """
    The parent's end of one worker's message pipe.
    """

    MAX_LENGTH = MAX_MESSAGE

    def __init__(self, worker: WorkerProcess) -> None:
        self.worker = worker

    def stringReceived(self, data: bytes) -> None:
        try:
            message = pickle.loads(data)
        except Exception:
            log.failure("worker {index}: unreadable message", index=self.worker.index)
            return
        self.worker.received(message)


class WorkerProcess(ProcessProtocol):
    """
    The parent's side of one running worker.

    @ivar index: the worker's number, from 0.
    @ivar snapshot: its latest counters, or L{None} before the first.
    """

    def __init__(self, supervisor: WorkerSupervisor, index: int) -> None:
        self.supervisor = supervisor
        self.index = index
        self.snapshot: Any = None
        self.ended: Deferred[None] = Deferred()
        self._messages = _WorkerMessages(self)
        self._messages.makeConnection(self)  # type: ignore[arg-type]

    # What NetstringReceiver asks of its transport when it refuses a message.
    def loseConnection(self) -> None:
        log.error("worker {index}: message stream broken; stopping it", index=self.index)
        self.signal(signal.SIGKILL)

    def send(self, command: str) -> None:
        """
        Write a command (C{drain}, C{quit}, C{term}, C{now}) to the worker.
        """
        if self.transport is not None and not self.ended.called:
            self.transport.writeToChild(0, command.encode("ascii") + b"\n")

    def signal(self, number: int) -> None:
        try:
            if self.transport is not None and not self.ended.called:
                self.transport.signalProcess(number)
        except Exception:
            pass

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        if childFD == MESSAGES_FD:
            self._messages.dataReceived(data)

    def received(self, message: Any) -> None:
        kind = message[0]
        if kind == "snapshot":
            self.snapshot = message[1]
        elif kind == "log":
            _, level, text = message
            log.emit(LogLevel.levelWithName(level), "worker {index}: {text}", index=self.index, text=text)

    def processEnded(self, reason: Any) -> None:
        self.supervisor.ended(self, reason)
        self.ended.callback(None)


class WorkerSupervisor(Service):
    """
    Starts, watches and stops the workers; holds the listening sockets they share.

    @ivar workers: the running ones, by index.
    @ivar restarts: workers started again after dying, since the start.
    """

    def __init__(self, reactor: Any, config: ProxyConfig, count: int, sockets: Sequence[Tuple[socket.socket, int]],
                 python: str = sys.executable) -> None:
        self.reactor = reactor
        self.config = config
        self.count = count
        self.sockets = list(sockets)
        self.python = python
        self.workers: Dict[int, WorkerProcess] = {}
        self.restarts = 0
        self.stopping = False
        #: Counters of workers that have exited, so that totals never go back.
        self._gone: List[Any] = []
        self._restartCalls: Dict[int, Any] = {}
        self._workerConfig = shareOut(config, count)

    def startService(self) -> None:
        Service.startService(self)
        for index in range(self.count):
            self.spawn(index)

    def spawn(self, index: int) -> None:
        """
        Start worker C{index}.
        """
        self._restartCalls.pop(index, None)
        if self.stopping:
            return
        fds: Dict[int, Any] = {0: "w", 1: 1, 2: 2, MESSAGES_FD: "r"}
        listen: List[Tuple[int, int, int]] = []
        for offset, (sock, backlog) in enumerate(self.sockets):
            fds[FIRST_LISTEN_FD + offset] = sock.fileno()
            listen.append((FIRST_LISTEN_FD + offset, sock.family, backlog))
        env = dict(os.environ)
        env[CONFIG_VARIABLE] = base64.b64encode(pickle.dumps((self._workerConfig, listen))).decode("ascii")
        env[INDEX_VARIABLE] = str(index)
        env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
        worker = WorkerProcess(self, index)
        self.workers[index] = worker
        self.reactor.spawnProcess(worker, self.python, [self.python, "-c", WORKER_MAIN], env=env, childFDs=fds)
        log.info("worker {index} started (pid {pid})", index=index, pid=worker.transport.pid)

    def ended(self, worker: WorkerProcess, reason: Any) -> None:
        """
        A worker exited: keep its last counters; start it again unless stopping.
        """
        if self.workers.get(worker.index) is worker:
            del self.workers[worker.index]
        if worker.snapshot is not None:
            self._gone.append(worker.snapshot)
        if self.stopping:
            log.info("worker {index} exited", index=worker.index)
            return
        self.restarts += 1
        log.warn("worker {index} exited unexpectedly ({reason}); starting it again in {delay} s",
                 index=worker.index, reason=reason.getErrorMessage(), delay=RESTART_DELAY)
        self._restartCalls[worker.index] = self.reactor.callLater(RESTART_DELAY, self.spawn, worker.index)

    def merged(self) -> Any:
        """
        The sum of every worker's latest counters (and of those that have exited).
        """
        parts = [w.snapshot for w in self.workers.values() if w.snapshot is not None] + self._gone
        total = mergeSnapshots(parts)
        # Those that exited have nothing in flight any more.
        gone = mergeSnapshots(self._gone)
        for name in ("downstreamConnectionsActive", "requestsActive"):
            setattr(total.recorder, name, getattr(total.recorder, name) - getattr(gone.recorder, name))
        for name in ("active", "connecting"):
            setattr(total.pool, name, getattr(total.pool, name) - getattr(gone.pool, name))
        total.pool.idle = total.pool.idle[:len(total.pool.idle) - len(gone.pool.idle)]
        total.pool.pending = total.pool.pending[:len(total.pool.pending) - len(gone.pool.pending)]
        return total

    def reporting(self) -> int:
        """
        How many running workers have sent their counters at least once (they serve).
        """
        return sum(1 for w in self.workers.values() if w.snapshot is not None)

    def tell(self, command: str) -> None:
        """
        Send C{command} to every running worker.
        """
        for worker in list(self.workers.values()):
            worker.send(command)

    def closeSockets(self) -> None:
        """
        Close the parent's copy of the listening sockets (the workers close theirs as
        they drain).
        """
        sockets, self.sockets = self.sockets, []
        for sock, _ in sockets:
            sock.close()

    def stopAll(self) -> Deferred[None]:
        """
        No more restarts; fire once every worker has exited.
        """
        self.stopping = True
        for call in self._restartCalls.values():
            if call.active():
                call.cancel()
        self._restartCalls.clear()
        from twisted.internet.defer import gatherResults

        return gatherResults([w.ended for w in list(self.workers.values())]).addCallback(lambda _: None)

    def stopService(self) -> Deferred[None]:
        """
        Stop every worker: C{term} (drain), then SIGKILL past the drain period, the
        shutdown grace and L{EXIT_MARGIN}.
        """
        Service.stopService(self)
        self.closeSockets()
        done = self.stopAll()
        if not self.workers:
            return succeed(None)
        self.tell("term")
        lifecycle = self.config.lifecycle
        bound = lifecycle.drainTimeout + lifecycle.shutdownGrace + EXIT_MARGIN

        def kill() -> None:
            for worker in list(self.workers.values()):
                log.warn("worker {index} still running after {seconds} s; killing it",
                         index=worker.index, seconds=bound)
                worker.signal(signal.SIGKILL)

        call = self.reactor.callLater(bound, kill)
        done.addBoth(lambda result: call.active() and call.cancel())
        return done


class WorkersCollector:
    """
    C{sidecar_workers} and C{sidecar_worker_restarts_total}, for the parent's metrics.
    """

    def __init__(self, supervisor: WorkerSupervisor) -> None:
        self.supervisor = supervisor

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        yield GaugeMetricFamily("sidecar_workers", "Worker processes running.",
                                value=len(self.supervisor.workers))
        yield CounterMetricFamily("sidecar_worker_restarts", "Workers started again after dying.",
                                  value=self.supervisor.restarts)


def aggregateCollector(supervisor: WorkerSupervisor, engine: Any, mesh: Any, startTime: float, version: str,
                       runtime: Sequence[Any]) -> Any:
    """
    The parent's collector: L{sidecar.metrics.SidecarCollector} over the sum of the
    workers' counters.
    """
    from sidecar.metrics import SidecarCollector

    class AggregateCollector(SidecarCollector):
        def snapshot(self) -> SidecarCollector:
            total = supervisor.merged()
            return SidecarCollector(total.recorder, total.pool, SimpleNamespace(draining=bool(engine.draining)),
                                    mesh, startTime, version, tls=total.tls, accessLog=total.accessLog,
                                    runtime=runtime)

    placeholder = SimpleNamespace(series={})
    return AggregateCollector(placeholder, None, engine, mesh, startTime, version,  # type: ignore[arg-type]
                              runtime=runtime)


class _ParentRecorder:
    """
    What the parent's lifecycle reads of a recorder: requests in flight over the
    workers, and sinks (none are called: the parent records nothing).
    """

    def __init__(self, supervisor: WorkerSupervisor) -> None:
        self.supervisor = supervisor
        self.sinks: List[Any] = []

    @property
    def requestsActive(self) -> int:
        return self.supervisor.merged().recorder.requestsActive


def workersLifecycle(reactor: Any, config: ProxyConfig, supervisor: WorkerSupervisor, engine: Any,
                     announce: Any, adminListeners: Any) -> Any:
    """
    The parent's L{sidecar.drain.Lifecycle}: the same states and admin calls, passed
    on to every worker; it exits once the workers have.
    """
    from sidecar.drain import LIVE, Lifecycle

    class WorkersLifecycle(Lifecycle):
        def ready(self) -> Deferred[tuple]:
            if self.reportedState == LIVE and supervisor.reporting() == 0:
                return succeed((503, "WORKERS STARTING"))
            return Lifecycle.ready(self)

        def startDrain(self, announce: bool = True) -> None:
            if self.drainStarted is None:
                supervisor.tell("drain")
            Lifecycle.startDrain(self, announce)

        def closeListeners(self, why: str = "drain period over") -> None:
            supervisor.closeSockets()
            Lifecycle.closeListeners(self, why)

        def terminate(self) -> None:
            if self.exiting:
                log.info("asked again to stop: every worker exits now")
                supervisor.tell("now")
                return
            self.exiting = True
            log.info("stopping: every worker drains and exits ({seconds} s drain period)",
                     seconds=self.config.drainTimeout)
            self.state = "DRAINING"
            self.engine.draining = True
            supervisor.tell("term")
            supervisor.closeSockets()
            supervisor.stopAll().addCallback(lambda _: self._exit())

        def quit(self) -> None:
            if self.exiting:
                return
            self.exiting = True
            self.state = "DRAINING"
            self.engine.draining = True
            supervisor.tell("quit")
            supervisor.closeSockets()
            supervisor.stopAll().addCallback(lambda _: self._exit())

    return WorkersLifecycle(
        reactor, config.lifecycle, engine, _ParentRecorder(supervisor), [], config.upstream,
        announce=announce, adminListeners=adminListeners)


class WorkersService(MultiService):
    """
    The parent of C{--workers N}: the supervisor, the admin and health sites, the
    lifecycle.  Built by L{sidecar.tap.makeService} in place of the single-process
    L{sidecar.service.SidecarService}.
    """

    def __init__(self, config: ProxyConfig, reactor: Any, count: int) -> None:
        from sidecar import __version__
        from sidecar.admin import adminSite, healthSite
        from sidecar.metrics import runtimeCollectors
        from sidecar.service import LISTEN_BACKLOG, withBacklog
        from twisted.application import strports

        MultiService.__init__(self)
        self.config = config
        self.reactor = reactor
        #: The parent writes no access log; twistd's own log (L{sidecar.logs}).
        self.accessLog = None
        self.logStream: Any = None
        sockets = []
        # In the order the workers' services adopt them (L{SidecarService._listen}).
        descriptions = ([config.listen] + ([config.tls.listen] if config.tls is not None else [])
                        + ([config.outbound.listen] if getattr(config, "outbound", None) is not None else []))
        for description in descriptions:
            if description is not None:
                sockets.append(listeningSocket(description, LISTEN_BACKLOG))
        self.supervisor = WorkerSupervisor(reactor, config, count, sockets)
        self.supervisor.setServiceParent(self)
        self.engine = SimpleNamespace(draining=False, doors=[])
        self.startTime = reactor.seconds()
        self.collector = aggregateCollector(self.supervisor, self.engine, config.mesh, self.startTime,
                                            __version__, runtimeCollectors() + (WorkersCollector(self.supervisor),))
        self.adminListeners: List[Any] = []
        self.healthListeners: List[Any] = []
        addresses = [self._address(sock) for sock, _ in sockets]
        self.lifecycle = workersLifecycle(
            reactor, config, self.supervisor, self.engine,
            announce=lambda admin: (f"sidecar ready: {count} workers listening on {', '.join(addresses)}, "
                                    f"upstream {config.upstream.address}, admin and health on "
                                    f"{', '.join(admin) or 'none'}"),
            adminListeners=lambda: self.adminListeners + self.healthListeners)

        def listen(description: str, factory: Any) -> Any:
            service = strports.service(withBacklog(description), factory, reactor=reactor)
            service.setServiceParent(self)
            return service

        if config.admin is not None:
            site = adminSite(self.collector, self.lifecycle, config, __version__, reactor, self.startTime)
            self.adminListeners.append(listen(config.admin, site))
        if config.health is not None:
            health = healthSite(self.collector, self.lifecycle, reactor)
            self.healthListeners.append(listen(config.health, health))
        self.lifecycle.setServiceParent(self)

    @staticmethod
    def _address(sock: socket.socket) -> str:
        host, port = sock.getsockname()[:2]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# -- the worker ------------------------------------------------------------------------

class _ParentLink(Protocol):
    """
    The worker's end of the pipes to its parent: commands in on standard input, one a
    line (their end means the parent is gone), messages out on L{MESSAGES_FD}.

    @ivar service: the worker's L{sidecar.service.SidecarService}, once built.
    """

    service: Any = None

    def __init__(self) -> None:
        self._buffer = b""

    def send(self, message: Any) -> None:
        """
        Send a message (a tuple) to the parent.
        """
        if self.transport is None:
            return
        data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        self.transport.write(b"%d:%s," % (len(data), data))

    def dataReceived(self, data: bytes) -> None:
        self._buffer += data
        while b"\n" in self._buffer:
            line, self._buffer = self._buffer.split(b"\n", 1)
            self.command(line.decode("ascii", "replace").strip())

    def command(self, name: str) -> None:
        if self.service is None:
            return
        lifecycle = self.service.lifecycle
        if name == "drain":
            lifecycle.startDrain()
        elif name == "quit":
            lifecycle.quit()
        elif name == "term":
            if not lifecycle.exiting:
                lifecycle.terminate()
        elif name == "now":
            lifecycle.exiting = True
            lifecycle.terminate()

    def connectionLost(self, reason: Any = None) -> None:
        self.transport = None
        if self.service is None:
            return
        lifecycle = self.service.lifecycle
        if not lifecycle.exiting:
            lifecycle.exiting = True
            lifecycle.terminate()


def _forwardLogs(messages: _ParentLink) -> Any:
    """
    A log observer that sends each event, formatted, to the parent.
    """

    def observe(event: Dict[str, Any]) -> None:
        text = formatEvent(event)
        failure = event.get("log_failure")
        if failure is not None:
            text = f"{text}\n{failure.getTraceback()}"
        level = event.get("log_level", LogLevel.info)
        messages.send(("log", level.name, text))

    return observe


def runWorker() -> None:
    """
    One worker (L{WORKER_MAIN}), on the sockets and configuration its
    parent handed it.
    """
    from sidecar.reactor import installIfNone, tuneCollector

    installIfNone()
    from twisted.internet import reactor, stdio
    from twisted.internet.task import LoopingCall
    from twisted.logger import globalLogBeginner

    config, listen = pickle.loads(base64.b64decode(os.environ.pop(CONFIG_VARIABLE)))
    os.environ.pop(INDEX_VARIABLE, None)
    messages = _ParentLink()
    stdio.StandardIO(messages, stdin=0, stdout=MESSAGES_FD, reactor=reactor)
    globalLogBeginner.beginLoggingTo([_forwardLogs(messages)], redirectStandardIO=False)

    from sidecar.service import SidecarService

    service = SidecarService(config, reactor, adopted=listen)
    messages.service = service
    # SIGTERM is the parent's "term" (sent to the whole process group, it reaches the
    # workers twice: the second must not cut the drain short).
    from sidecar.drain import installTermHandler

    reactor.callWhenRunning(installTermHandler, reactor, lambda: messages.command("term"))
    reactor.addSystemEventTrigger("after", "shutdown", service.lifecycle.flush)
    send = lambda: messages.send(("snapshot", snapshotOf(service.collector)))  # noqa: E731
    reporter = LoopingCall(send)
    reporter.clock = reactor

    def start() -> None:
        tuneCollector()
        service.startService()
        reporter.start(SNAPSHOT_INTERVAL, now=True)

    def stop() -> Any:
        if reporter.running:
            reporter.stop()
        d = service.stopService()
        if d is None:
            d = succeed(None)
        return d.addBoth(lambda _: send())

    reactor.callWhenRunning(start)
    reactor.addSystemEventTrigger("before", "shutdown", stop)
    reactor.run()

