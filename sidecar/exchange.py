# -*- test-case-name: tests.test_exchange -*-
"""
The protocol-neutral engine: one request/response stream in flight between a front
door and an upstream stream, and the interfaces of both.

  - a L{Door} is the downstream codec's response encoder (the fast HTTP/1.1 door of
    L{sidecar.downstream}, the twisted.web door of L{sidecar.resource}, an HTTP/2
    stream): the exchange tells it what to send, never how;
  - an L{UpstreamStream} is the mirror image on the service's side (HTTP/1.1 in
    L{sidecar.upstream}): send head, body, end; pause; abandon.  An L{UpstreamPool}
    hands them out;
  - an L{Exchange} owns the timing, the byte counts, the response flags and the
    backpressure between the two, applies the forwarding policy, and hands exactly one
    L{Record} to the recorder when it ends, however it ends.  Where it stands is one
    value, L{Phase}, and every change of it goes through L{Exchange._go}.

The exchange never writes bytes and imports no adapter.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict, FrozenSet, List, Optional, Protocol, Sequence, Tuple

import attrs
from twisted.logger import Logger

from sidecar.doors import Doors
from sidecar.filters import FILTER_ERROR, Call, FilterChain, FilterFailed
from sidecar.h2wire import GrpcCounts, grpcStatusFor, grpcStatusOf
from sidecar.headers import Header, Headers, RequestHead, ResponseHead
from sidecar.logs import WarningLimit
from sidecar.record import (
    DOWNSTREAM_CONNECTION_TERMINATION, DOWNSTREAM_PROTOCOL_ERROR, NO_ROUTE_FOUND, UPSTREAM_CONNECT_FAILURE,
    STREAM_IDLE_TIMEOUT, UPSTREAM_CONNECTION_TERMINATION, UPSTREAM_OVERFLOW, UPSTREAM_PROTOCOL_ERROR,
    UPSTREAM_REMOTE_RESET, UPSTREAM_REQUEST_TIMEOUT, UPSTREAM_RETRY_LIMIT_EXCEEDED, Record,
)

if TYPE_CHECKING:  # pragma: no cover
    from twisted.internet.interfaces import IPushProducer, IReactorTime
    from twisted.python.failure import Failure

    from sidecar.stats import Recorder

log = Logger()

#: Methods that may be sent again on a fresh connection when a pooled one turns out to
#: have been closed by the service (RFC 9110 9.2.2), provided the request has no body.
IDEMPOTENT = frozenset([b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"])

#: Seconds between two looks at the exchanges awaiting a response head
#: (L{Engine.sweepDeadlines}): the response timeout's granularity.
DEADLINE_SWEEP = 1.0

#: Request body bytes kept while the upstream stream is not there yet; past this the
#: client is paused.
PENDING_LIMIT = 64 * 1024

#: Which ends of a tunnel have sent their FIN (L{Exchange.tunnelEnds}).
_CLIENT_FIN = 1
_SERVICE_FIN = 2


class Door(Protocol):
    """
    What an L{Exchange} needs of the front door it came through: a response encoder
    (Envoy's C{ResponseEncoder}) and a tap on the client's reading.
    """

    clientAddress: str
    peerPrincipal: str
    mutualTLS: bool
    #: C{"inbound"} (a call to this workload) or C{"outbound"} (a call it makes).
    direction: str

    def sendContinue(self) -> None:
        """Tell the client to go on sending its body (C{100 Continue})."""

    def flush(self) -> None:
        """The upstream's read is over: send anything held back."""

    def startResponse(self, exchange: Exchange, status: int, reason: bytes, head: ResponseHead) -> None:
        """Send the response head to the client."""

    def writeBody(self, data: bytes) -> None:
        """Send response body bytes to the client."""

    def finishResponse(self, exchange: Exchange) -> None:
        """The response is complete."""

    def abortResponse(self, exchange: Exchange) -> None:
        """The response cannot be completed: close the client's connection."""

    def localReply(self, exchange: Exchange, status: int, body: bytes, headers: Sequence[Header] = ()) -> None:
        """Send a response made by the proxy itself (C{headers} beyond its own)."""

    def startTunnel(self, exchange: Exchange, stream: UpstreamStream) -> None:
        """After a 101, pass bytes both ways; C{stream} is the producer of the
        service's bytes (register it with the client's transport)."""

    def finishTunnel(self, exchange: Exchange) -> None:
        """The service sent its FIN on the tunnel: send a FIN to the client once its
        bytes are written (a half-close), and keep reading from it."""

    def closeTunnel(self, exchange: Exchange) -> None:
        """The tunnel is over: close the client's connection once its bytes are
        written."""

    def pauseReading(self) -> None:
        """Stop reading from the client until L{resumeReading}."""

    def resumeReading(self) -> None:
        """Read from the client again."""


class UpstreamStream(Protocol):
    """
    One request/response stream to the service, as the exchange drives it.  It is the
    producer of the response (an C{IPushProducer}: a slow client pauses it) and frames
    what it sends in its own protocol.  It answers through the exchange's
    C{upstream*}/C{response*}/C{tunnel*} methods.
    """

    def sendRequest(self, exchange: Exchange, reused: bool, body: Sequence[bytes], end: bool) -> None:
        """Send the exchange's request head, the body bytes already received, and,
        when C{end}, the end of the request.  Body parts are bytes-like: C{bytes} or
        a C{memoryview} of a door's read (see L{Exchange.requestBody})."""

    def sendBody(self, data: bytes) -> None:
        """Send request body bytes, C{bytes} or a C{memoryview} (after a 101: tunnel
        bytes)."""

    def sendEnd(self) -> None:
        """The request body is complete."""

    def streamFrom(self, producer: IPushProducer) -> None:
        """Pause C{producer} (the client) while the service reads slower than it sends,
        until the request ends."""

    def finishTunnel(self) -> None:
        """After a 101: the client will send no more; pass its FIN on (a half-close)."""

    def closeTunnel(self) -> None:
        """After a 101: the tunnel is over; close gracefully (a FIN after what is
        buffered, never a reset)."""

    def abandon(self) -> None:
        """Close without a word: the stream is not reused."""

    def pauseProducing(self) -> None:
        """Stop reading the response."""

    def resumeProducing(self) -> None:
        """Read the response again."""


class UpstreamPool(Protocol):
    """
    Where exchanges get upstream streams: it calls back L{Exchange.upstreamConnected},
    L{Exchange.upstreamConnectFailed} or L{Exchange.overflow}.
    """

    address: str

    def acquire(self, exchange: Exchange, fresh: bool = False) -> None:
        """Find a stream for C{exchange} (C{fresh}: not a reused connection)."""

    def cancel(self, exchange: Exchange) -> None:
        """C{exchange} no longer wants a stream (its client left)."""

    def release(self, stream: UpstreamStream) -> None:
        """C{stream}'s response ended cleanly: it may serve another exchange."""


class Phase:
    """
    Where an exchange stands, as small integers (cheap to compare and to hash on the
    hot path; L{NAMES} has their names).  The request body's arrival
    (L{Exchange.requestDone}) is a fact about the client, not a phase: a response may
    start before it ends.
    """

    #: Its head has arrived; it waits its turn behind pipelined requests.
    NEW = 0
    #: The request-head filters are deciding (one of them waits on a Deferred).
    FILTERING = 1
    #: Asked the pool for a stream (connecting, or waiting for a free connection).
    ACQUIRING = 2
    #: It has an upstream stream; the request is going up.
    SENDING = 3
    #: The whole request is with the service; the response timeout runs.
    AWAITING = 4
    #: The response head went to the client; the body follows.
    RESPONDING = 5
    #: The service switched protocols: bytes pass both ways untouched.
    TUNNEL = 6
    #: Over, and recorded.
    DONE = 7

    NAMES = ("new", "filtering", "acquiring", "sending", "awaiting", "responding", "tunnel", "done")


NEW, FILTERING, ACQUIRING, SENDING, AWAITING, RESPONDING, TUNNEL, DONE = range(8)

#: Every change of phase an exchange may make, indexed by the phase it leaves
#: (L{Exchange._go} checks it).
TRANSITIONS: Tuple[FrozenSet[int], ...] = (
    frozenset([FILTERING, ACQUIRING, DONE]),  # NEW
    frozenset([ACQUIRING, DONE]),  # FILTERING
    frozenset([SENDING, AWAITING, DONE]),  # ACQUIRING
    frozenset([AWAITING, RESPONDING, TUNNEL, DONE]),  # SENDING
    frozenset([ACQUIRING, RESPONDING, TUNNEL, DONE]),  # AWAITING
    frozenset([DONE]),  # RESPONDING
    frozenset([DONE]),  # TUNNEL
    frozenset(),  # DONE
)
_ANSWERED = frozenset([RESPONDING, TUNNEL])

#: Makes a L{Record} from a tuple of every field, in order, without the named tuple's
#: Python-level C{__new__} (tests check every record's field count).
_newRecord = tuple.__new__


class IllegalTransition(Exception):
    """
    An exchange was asked to move between phases that are not connected: a bug.
    """


@attrs.define(slots=True, eq=False)
class Engine:
    """
    What every exchange of one sidecar shares: the pool, the recorder, the clock and the
    settings.  Built once by L{sidecar.service}.
    """

    clock: IReactorTime
    pool: UpstreamPool
    recorder: Recorder
    serverHeader: bytes = b"amazing-proxy"
    responseTimeout: Optional[float] = 60.0
    #: Envoy's C{stream_idle_timeout}: an exchange with no byte either way for this long
    #: ends (flag C{SI}); C{None}: never.  Checked by L{sweepStreams}.
    streamIdleTimeout: Optional[float] = 300.0
    #: The largest response head, and the most headers in it (Envoy's 80 KiB and 100).
    maxResponseHeaderBytes: int = 80 * 1024
    maxResponseHeaders: int = 100
    #: Draining: every response says C{Connection: close} so clients move away.
    draining: bool = False
    #: The open client connections of every front door (for timeouts and drain).
    doors: Doors = attrs.field(factory=Doors)
    #: The filters every exchange runs, or C{None} (then they cost nothing).
    filters: Optional[FilterChain] = None
    #: Other upstreams a filter or route may choose by name (C{Call.upstream}).
    pools: Dict[str, UpstreamPool] = attrs.field(factory=dict)
    #: The pool for requests that arrived in a given HTTP version (C{"2"}: an HTTP/2
    #: service for HTTP/2 clients, Envoy's "use downstream protocol"); C{pool} for
    #: versions not listed.
    poolByVersion: Dict[str, UpstreamPool] = attrs.field(factory=dict)
    #: What to do with client request headers whose names have an underscore
    #: (C{--headers-with-underscores}): C{"allow"}, C{"drop"} or C{"reject"}.
    headersWithUnderscores: str = "allow"
    #: The largest request body accepted, in bytes (Envoy's buffer limit): past it, 413
    #: and close.  C{None}: no limit.
    maxRequestBytes: Optional[int] = None
    #: The exchanges waiting for a response head, each with its deadline
    #: (L{Exchange.deadline}): checked about once a second by L{sweepDeadlines}, instead
    #: of a timer scheduled and cancelled per request.
    awaiting: set = attrs.field(factory=set)
    #: The pending call of L{sweepDeadlines} while any exchange awaits.
    deadlineSweep: Any = attrs.field(default=None, init=False)
    #: Something else (the service's once-a-second sweep) calls L{sweepDeadlines}: the
    #: engine then schedules no timer of its own (with one request at a time it would
    #: start and cancel one per request).
    deadlinesSwept: bool = attrs.field(default=False, init=False)
    #: The exchanges' failure warnings, a few per second of each kind at most.
    warnings: WarningLimit = attrs.field(default=attrs.Factory(lambda self: WarningLimit(self.clock, log),
                                                               takes_self=True))
    #: The exchanges that have begun and not ended, of every door (for
    #: L{sweepStreams}).
    streams: set = attrs.field(factory=set)
    #: How many times an idempotent request whose connect failed is tried again on a
    #: new connection (Envoy's C{connect-failure} retry; exhausted: C{UF,URX}).
    connectRetries: int = 0

    def exchange(self, door: Door, method: bytes, target: bytes, version: str, req: RequestHead) -> Exchange:
        """
        Start timing a new exchange for a request whose head has just arrived.
        """
        self.recorder.requestsActive += 1
        return Exchange(self, door, method, target, version, req, self.clock.seconds())

    def watchDeadline(self, exchange: Exchange) -> None:
        """
        C{exchange} awaits its response head until its deadline: watch it.
        """
        self.awaiting.add(exchange)
        if self.deadlineSweep is None and not self.deadlinesSwept:
            self.deadlineSweep = self.clock.callLater(DEADLINE_SWEEP, self.sweepDeadlines)

    def unwatchDeadline(self, exchange: Exchange) -> None:
        """
        C{exchange} no longer awaits; the sweep stops when none does.
        """
        awaiting = self.awaiting
        awaiting.discard(exchange)
        if not awaiting and self.deadlineSweep is not None:
            self.deadlineSweep.cancel()
            self.deadlineSweep = None

    def sweepDeadlines(self) -> None:
        """
        Time out the exchanges past their deadline (504, flag C{UT}); again in
        L{DEADLINE_SWEEP} seconds while any awaits.  A response timeout therefore fires
        between its deadline and one sweep later.
        """
        self.deadlineSweep = None
        now = self.clock.seconds()
        for exchange in [e for e in self.awaiting if e.deadline is not None and now >= e.deadline]:
            exchange._timedOut()
        if self.awaiting and self.deadlineSweep is None and not self.deadlinesSwept:
            self.deadlineSweep = self.clock.callLater(DEADLINE_SWEEP, self.sweepDeadlines)

    def sweepStreams(self, now: float) -> None:
        """
        End the exchanges that have seen no byte either way for L{streamIdleTimeout}.

        Called about once a second (by the service's client sweep): each exchange
        counts its activity, and this pass notes when the count last moved, so that no
        timer is scheduled or cancelled per request.  A stall is noticed between the
        timeout and a second after it.
        """
        timeout = self.streamIdleTimeout
        if not timeout:
            return
        for exchange in list(self.streams):
            if exchange.activity != exchange.sweptActivity:
                exchange.sweptActivity = exchange.activity
                exchange.idleSince = now
            elif now - exchange.idleSince >= timeout:
                exchange.streamIdleTimedOut()


class Exchange:
    """
    One request/response stream in flight.

    The front door calls L{begin} when the exchange may use the upstream, then
    L{requestBody} and L{requestComplete} as the body arrives, and L{downstreamLost} if
    the client goes away.  The pool calls L{upstreamConnected},
    L{upstreamConnectFailed} or L{overflow}; the upstream stream calls
    L{responseHead}, L{responseBody}, L{responseComplete}, L{upstreamReadDone} and
    L{upstreamLost} (or L{upgradeAccepted} and the C{tunnel*} methods after a 101).

    @ivar phase: where it stands (a L{Phase} value).
    @ivar requestDone: the client's request has all arrived.
    @ivar mustClose: the client connection cannot be reused after this exchange.
    """

    __slots__ = (
        "engine", "door", "method", "target", "version", "req", "start", "phase", "stream",
        "pending", "pendingBytes", "requestDone", "bytesReceived", "bytesSent", "status", "flags",
        "upstreamStart", "upstreamServiceTime", "deadline", "timeout", "retried", "readingPaused",
        "mustClose", "malformed", "pool", "call", "held", "chain", "route", "retry",
        "activity", "sweptActivity", "idleSince",
        "tunnelEnds", "peer", "connectRetried", "trailers", "requestTrailers", "grpc",
        "grpcStatus",
    )

    def __init__(self, engine: Engine, door: Door, method: bytes, target: bytes, version: str,
                 req: RequestHead, start: float) -> None:
        self.engine = engine
        self.door = door
        self.method = method
        self.target = target
        self.version = version
        self.req = req
        self.start = start
        self.phase = NEW
        self.stream: Optional[UpstreamStream] = None
        self.pending: List[bytes] = []
        self.pendingBytes = 0
        self.requestDone = False
        self.bytesReceived = 0
        self.bytesSent = 0
        self.status = 0
        self.flags: List[str] = []
        self.upstreamStart = 0.0
        self.upstreamServiceTime: Optional[float] = None
        #: When the response head must have arrived (while awaiting it), else C{None}.
        self.deadline: Optional[float] = None
        #: A route's timer (its timeout, or a retry's back-off), else C{None}.
        self.timeout: Any = None
        self.retried = False
        self.readingPaused = False
        self.mustClose = False
        #: The 400 body to answer with in this exchange's turn: its request turned out
        #: malformed while it waited behind another.
        self.malformed: Optional[bytes] = None
        byVersion = engine.poolByVersion
        self.pool: UpstreamPool = byVersion.get(version, engine.pool) if byVersion else engine.pool
        #: What the filters see, when there are filters.
        self.call: Optional[Call] = None
        #: Response events held while response-head filters decide.
        self.held: Optional[List[Any]] = None
        #: The filter chain this exchange started with (a reload does not change it).
        self.chain: Optional[FilterChain] = None
        #: The route it took (L{sidecar.routes.Route}), when routes are configured.
        self.route: Any = None
        #: Its retry state (L{sidecar.routes.Retry}), when its route retries.
        self.retry: Any = None
        #: Events that moved bytes, and what L{Engine.sweepStreams} last saw of it.
        self.activity = 0
        self.sweptActivity = -1
        self.idleSince = 0.0
        #: Which ends of a tunnel have sent their FIN.
        self.tunnelEnds = 0
        #: What is known of the workload at the other end (a
        #: L{sidecar.peers.PeerLabels}), set by a mutual-TLS door or an upstream over
        #: mutual TLS the sidecar originated; C{None} otherwise.
        self.peer: Any = None
        #: Connects tried again after a connect failure.
        self.connectRetried = 0
        #: The response's trailers (HTTP/2 to HTTP/2; an HTTP/1.1 door drops them).
        self.trailers: Optional[Headers] = None
        #: The request's trailers, set by the door before L{requestComplete}.
        self.requestTrailers: Optional[Headers] = None
        #: The message counts of a gRPC call (set by the door that saw
        #: C{content-type: application/grpc}), else C{None}.
        self.grpc: Optional[GrpcCounts] = None
        #: The call's C{grpc-status}, once known.
        self.grpcStatus = ""

    @property
    def finished(self) -> bool:
        """
        Whether the exchange is over (and recorded).
        """
        return self.phase == DONE

    @property
    def headSent(self) -> bool:
        """
        Whether a response head (the service's or the proxy's) has gone to the client.
        """
        return self.phase in _ANSWERED or (self.phase == DONE and self.status != 0)

    def _go(self, phase: int) -> None:
        """
        The one place where the phase changes (the hot path's four steps inline the
        same check: C{if X not in TRANSITIONS[self.phase]: self._illegal(X)}).
        """
        if phase not in TRANSITIONS[self.phase]:
            self._illegal(phase)
        self.phase = phase

    def _illegal(self, phase: int) -> None:
        raise IllegalTransition(f"{Phase.NAMES[self.phase]} -> {Phase.NAMES[phase]}")

    # -- the client side -------------------------------------------------------------

    def begin(self) -> None:
        """
        The exchange may now talk to the client and the upstream: run the request-head
        filters, then answer C{Expect: 100-continue} and ask the pool for a stream.
        """
        limit = self.engine.maxRequestBytes
        if limit is not None and self.req.contentLength is not None and self.req.contentLength > limit:
            self._tooLarge()
            return
        self.engine.streams.add(self)
        chain = self.engine.filters
        if chain is not None:
            req = self.req
            door = self.door
            call = self.call = Call(self.method, req.target, req.authority, req.headers,
                                    door.clientAddress, door.peerPrincipal)
            router = chain.router
            if router is not None:
                route = self.route = router.select(call)
                if route is None:
                    self.reject(404, NO_ROUTE_FOUND, b"")
                    return
                call.route = route.name
                call.upstream = route.upstream
                chain = route.chain
                if route.retry is not None:
                    self.retry = route.retry.start(self)
            self.chain = chain
            if chain.requestBodies and (req.chunked or req.contentLength):
                # Filters may change the body's length: send it chunked.
                req.contentLength = None
                req.chunked = True
                if self.pending:
                    # Body bytes that arrived before this turn: filtered now, as the
                    # rest will be on arrival.
                    pending, self.pending = self.pending, []
                    self.pendingBytes = 0
                    for data in pending:
                        try:
                            data = chain.requestBody(call, bytes(data))
                        except Exception as e:
                            self._filterFailed(FilterFailed("request body filter", e))
                            return
                        if data:
                            self.pending.append(data)
                            self.pendingBytes += len(data)
            if chain.requestHeads:
                self._go(FILTERING)
                chain.runHeads(chain.requestHeads, "requestHead", call, self._requestFiltered,
                               self._filterFailed)
                return
            self._requestFiltered()
            return
        self._acquire()

    def _requestFiltered(self) -> None:
        """
        The request-head filters are done: answer as one of them asked, or go on.
        """
        if self.phase == DONE:
            return
        call = self.call
        reply = call.reply  # type: ignore[union-attr]
        if reply is not None:
            if reply.flag:
                self.flags.append(reply.flag)
            self.flags.extend(call.flags)  # type: ignore[union-attr]
            self.mustClose = self.mustClose or not self.requestDone
            self._localReply(reply.status, reply.body, reply.headers)
            return
        self.flags.extend(call.flags)  # type: ignore[union-attr]
        self.req.target = call.path  # type: ignore[union-attr]
        if call.upstream is not None:  # type: ignore[union-attr]
            pools = self.chain.pools  # type: ignore[union-attr]
            pool = (self.engine.pools if pools is None else pools).get(call.upstream)  # type: ignore[union-attr]
            if pool is None:
                self._filterFailed(FilterFailed("route", f"no upstream named {call.upstream!r}"))  # type: ignore[union-attr]
                return
            self.pool = pool
        self._acquire()

    def _acquire(self) -> None:
        if self.req.expectContinue and not self.requestDone and self.version == "1.1":
            self.door.sendContinue()
        if ACQUIRING not in TRANSITIONS[self.phase]:
            self._illegal(ACQUIRING)
        self.phase = ACQUIRING
        self.pool.acquire(self)

    def _filterFailed(self, failure: FilterFailed) -> None:
        """
        A filter raised or its Deferred failed: 500 (or a cut connection once the
        response has started), flag C{FE}, the filter named in the log.
        """
        if self.phase == DONE:
            return
        self._warn("filter {filter} failed on {method} {path}: {reason}", filter=failure.filter,
                   reason=failure.reason)
        self.held = None
        self._dropUpstream()
        self.flags.append(FILTER_ERROR)
        self.mustClose = self.mustClose or not self.requestDone
        self._localReply(500, b"filter error\n")

    def requestBody(self, data: bytes) -> None:
        """
        Request body bytes from the client (decoded: no framing): C{bytes}, or a
        C{memoryview} of a door's read (the HTTP/1.1 door passes a body that arrived
        with its head so); filters always get C{bytes}, an L{UpstreamStream} may get
        either.
        """
        phase = self.phase
        if phase == DONE:
            return
        self.activity += 1
        self.bytesReceived += len(data)
        limit = self.engine.maxRequestBytes
        if limit is not None and self.bytesReceived > limit:
            self._tooLarge()
            return
        if self.grpc is not None:
            self.grpc.request.feed(data)
        if self.call is not None and self.chain.requestBodies:  # type: ignore[union-attr]
            try:
                # (A door may pass a view of its read; filters get bytes.)
                data = self.chain.requestBody(self.call, bytes(data))  # type: ignore[union-attr]
            except Exception as e:
                self._filterFailed(FilterFailed("request body filter", e))
                return
            if not data:
                return
        if phase == SENDING or phase == RESPONDING or phase == TUNNEL:
            self.stream.sendBody(data)  # type: ignore[union-attr]
            return
        self.pending.append(data)
        self.pendingBytes += len(data)
        if self.pendingBytes > PENDING_LIMIT and not self.readingPaused:
            self.readingPaused = True
            self.door.pauseReading()

    def requestBodySpliced(self, size: int) -> None:
        """
        C{size} bytes of the request body went from the client's socket to the
        service's in the kernel (L{sidecar.tcp.KernelPath}): counted as bytes passed
        through L{requestBody} are, and no filter or gRPC count wanted them (the door
        splices only then).
        """
        self.activity += 1
        self.bytesReceived += size

    def requestComplete(self) -> None:
        """
        The client's request (head and body) has all arrived.
        """
        self.requestDone = True
        phase = self.phase
        if phase == SENDING:
            self.stream.sendEnd()  # type: ignore[union-attr]
            self._go(AWAITING)
            self._armTimeout()
        elif phase == RESPONDING:
            self.stream.sendEnd()  # type: ignore[union-attr]

    def downstreamLost(self, flag: str = DOWNSTREAM_CONNECTION_TERMINATION) -> None:
        """
        The client went away before the exchange ended (C{flag}: C{DC}, or C{DR} when
        it reset its HTTP/2 stream): cancel the upstream side.
        """
        if self.phase == DONE:
            return
        self.flags.append(flag)
        self._dropUpstream()
        self._end()

    # -- the pool's side -------------------------------------------------------------

    def upstreamConnected(self, stream: UpstreamStream, reused: bool) -> None:
        """
        The pool gives us C{stream}: send the head and whatever body has arrived.
        """
        if self.phase != ACQUIRING:
            self.pool.release(stream)
            return
        self.stream = stream
        self.upstreamStart = self.engine.clock.seconds()
        pending, self.pending = self.pending, []
        self.pendingBytes = 0
        done = self.requestDone
        phase = AWAITING if done else SENDING
        if phase not in TRANSITIONS[ACQUIRING]:
            self._illegal(phase)
        self.phase = phase
        stream.sendRequest(self, reused, pending, done)
        if self.readingPaused:
            self.readingPaused = False
            self.door.resumeReading()
        if done:
            self._armTimeout()
        elif self.phase == SENDING:
            stream.streamFrom(self.door)  # type: ignore[arg-type]

    def upstreamConnectFailed(self, reason: Failure) -> None:
        """
        No connection to the service could be made.
        """
        if self.phase != ACQUIRING:
            return
        if self.retry is not None:
            # The route's retry policy, not the engine's connect retries.
            if self.retry.again("connect-failure", 0):
                return
        else:
            retries = self.engine.connectRetries
            if retries and self.method in IDEMPOTENT:
                if self.connectRetried < retries:
                    self.connectRetried += 1
                    self.pool.acquire(self, fresh=True)
                    return
                self.flags.append(UPSTREAM_RETRY_LIMIT_EXCEEDED)
        self._warn("upstream connect to {upstream} failed for {method} {path}: {reason}",
                   reason=reason.getErrorMessage())
        self.flags.insert(0, UPSTREAM_CONNECT_FAILURE)
        self._localReply(502, b"upstream connect error or disconnect/reset before headers. "
                              b"reset reason: connection failure")

    def overflow(self) -> None:
        """
        The pool is at its connection limit and its queue is full: 503, flag C{UO}.
        """
        self._warn("upstream {upstream} overflow: {method} {path} refused, "
                   "the connection limit is reached and the queue is full")
        self.flags.append(UPSTREAM_OVERFLOW)
        self._localReply(503, b"upstream connect error or disconnect/reset before headers. "
                              b"reset reason: overflow")

    # -- the upstream stream's side --------------------------------------------------

    def responseHead(self, status: int, reason: bytes, head: ResponseHead) -> None:
        """
        The upstream's final response head arrived, after the forwarding rules.
        """
        self._cancelTimeout()
        self.activity += 1
        if status >= 500 and self.retry is not None and self.retry.again("status", status):
            return
        self.upstreamServiceTime = self.engine.clock.seconds() - self.upstreamStart
        if self.grpc is not None:
            # A trailers-only response carries its status in the head.
            self.grpcStatus = grpcStatusOf(head.headers) or ""
        call = self.call
        if call is not None and status != 101:
            chain = self.chain
            if chain.responseBodies and head.contentLength is not None:  # type: ignore[union-attr]
                # Filters may change the body's length: the door frames it anew.
                head.contentLength = None
            if chain.responseHeads:  # type: ignore[union-attr]
                call.status = status
                call.responseHeaders = head.headers
                self.held = []
                waiter = chain.runHeads(chain.responseHeads, "responseHead", call,  # type: ignore[union-attr]
                                        lambda: self._responseFiltered(status, reason, head), self._filterFailed)
                if waiter is not None:
                    # Decided later, outside the upstream's read: send what is ready.
                    waiter.addCallback(self._flushAfterFilters)
                return
        self._startResponse(status, reason, head)

    def _responseFiltered(self, status: int, reason: bytes, head: ResponseHead) -> None:
        """
        The response-head filters are done: send the (changed) head and what was held,
        or the local reply a filter asked for instead.
        """
        held, self.held = self.held, None
        if self.phase == DONE or held is None:
            return
        call = self.call
        reply = call.reply  # type: ignore[union-attr]
        if reply is not None:
            stream, self.stream = self.stream, None
            if stream is not None:
                stream.abandon()
            if reply.flag:
                self.flags.append(reply.flag)
            self._localReply(reply.status, reply.body, reply.headers)
            return
        head.headers = call.responseHeaders  # type: ignore[union-attr]
        if call.status != status:  # type: ignore[union-attr]
            # A filter changed the status: the door writes the standard reason.
            status, reason = call.status, b""  # type: ignore[union-attr]
        self._startResponse(status, reason, head)
        for event in held:
            if self.phase == DONE:
                return
            if event is None:
                self._end()
                self.door.finishResponse(self)
                return
            self.responseBody(event)

    def _flushAfterFilters(self, _: Any) -> None:
        """
        Response-head filters that waited have decided: send the head and the body held
        meanwhile now (when they decide within the upstream's read, its end flushes).
        """
        if self.phase == RESPONDING:
            self.door.flush()

    def _startResponse(self, status: int, reason: bytes, head: ResponseHead) -> None:
        self.status = status
        if status != 101:
            if RESPONDING not in TRANSITIONS[self.phase]:
                self._illegal(RESPONDING)
            self.phase = RESPONDING
        if not self.requestDone:
            # The service answered before the client finished sending: the rest of the
            # body goes nowhere and the connections can't be reused.
            self.mustClose = True
        self.door.startResponse(self, status, reason, head)

    def responseBody(self, data: bytes) -> None:
        """
        Response body bytes from the upstream (decoded: no framing).
        """
        self.activity += 1
        if self.call is not None:
            if self.held is not None:
                self.held.append(data)
                return
            chain = self.chain
            if chain.responseBodies:  # type: ignore[union-attr]
                try:
                    data = chain.responseBody(self.call, data)  # type: ignore[union-attr]
                except Exception as e:
                    self._filterFailed(FilterFailed("response body filter", e))
                    return
        self.bytesSent += len(data)
        if self.grpc is not None:
            self.grpc.response.feed(data)
        self.door.writeBody(data)

    def responseBodySpliced(self, size: int) -> None:
        """
        C{size} bytes of the response body went from the service's socket to the
        client's in the kernel: counted as bytes passed through L{responseBody} are.
        """
        self.activity += 1
        self.bytesSent += size

    def upstreamReadDone(self) -> None:
        """
        The upstream stream has handled one read: the door may send what it held back.
        """
        self.door.flush()

    def responseComplete(self, reusable: bool, trailers: Optional[Headers] = None) -> None:
        """
        The upstream's response ended; C{reusable} says whether its stream may serve
        another request; C{trailers} are the response's trailers (a door that cannot
        send them drops them).
        """
        if trailers is not None:
            self.trailers = trailers
            if self.grpc is not None:
                self.grpcStatus = grpcStatusOf(trailers) or self.grpcStatus
        stream, self.stream = self.stream, None
        if stream is not None:
            if reusable and self.requestDone:
                self.pool.release(stream)
            else:
                stream.abandon()
        if self.held is not None:
            self.held.append(None)
            return
        # The record first: finishing may start the next pipelined exchange at once.
        self._end()
        self.door.finishResponse(self)

    def upgradeAccepted(self, leftover: bytes) -> None:
        """
        The upstream answered 101 (its head went through L{responseHead}): from now on
        bytes flow both ways untouched.
        """
        self._go(TUNNEL)
        stream = self.stream
        self.door.startTunnel(self, stream)  # type: ignore[arg-type]
        stream.streamFrom(self.door)  # type: ignore[union-attr,arg-type]
        if leftover:
            self.tunnelToClient(leftover)

    def tunnelToClient(self, data: bytes) -> None:
        """
        Bytes from the upstream on an upgraded connection.
        """
        self.activity += 1
        self.bytesSent += len(data)
        self.door.writeBody(data)

    def tunnelToUpstream(self, data: bytes) -> None:
        """
        Bytes from the client on an upgraded connection.
        """
        self.activity += 1
        self.bytesReceived += len(data)
        if self.stream is not None:
            self.stream.sendBody(data)

    def tunnelClientFinished(self) -> None:
        """
        The client sent its FIN on an upgraded connection: the service gets a FIN too
        (never a reset), and its bytes still flow to the client.
        """
        self.activity += 1
        self.tunnelEnds |= _CLIENT_FIN
        if self.stream is not None:
            self.stream.finishTunnel()
        if self.tunnelEnds == _CLIENT_FIN | _SERVICE_FIN:
            self._closeTunnel()

    def tunnelUpstreamFinished(self) -> None:
        """
        The service sent its FIN on an upgraded connection: the client is told at once
        by a FIN, and its bytes still flow to the service.
        """
        self.activity += 1
        self.tunnelEnds |= _SERVICE_FIN
        if self.phase != DONE:
            self.door.finishTunnel(self)
        if self.tunnelEnds == _CLIENT_FIN | _SERVICE_FIN:
            self._closeTunnel()

    def tunnelClosed(self) -> None:
        """
        The client's connection of an upgraded exchange is gone: close the service's
        gracefully (a FIN), and the exchange is over.
        """
        stream, self.stream = self.stream, None
        if stream is not None:
            stream.closeTunnel()
        self._end()

    def tunnelUpstreamClosed(self) -> None:
        """
        The service's connection of an upgraded exchange is gone: close the client's
        once what it was sent is written, and the exchange is over.
        """
        self.stream = None
        if self.phase != DONE:
            self._end()
            self.door.closeTunnel(self)

    def _closeTunnel(self) -> None:
        """
        Both ends have sent their FIN: close both connections.
        """
        stream, self.stream = self.stream, None
        if stream is not None:
            stream.closeTunnel()
        if self.phase != DONE:
            self._end()
            self.door.closeTunnel(self)

    def upstreamLost(self, reason: Failure, reused: bool, responseStarted: bool,
                     flag: str = UPSTREAM_CONNECTION_TERMINATION) -> None:
        """
        The upstream stream closed before the response was complete (C{flag}: C{UC},
        or C{UR} when the service reset its HTTP/2 stream).
        """
        self._cancelTimeout()
        self.stream = None
        phase = self.phase
        if phase == DONE:
            return
        if phase == RESPONDING:
            self._warn("upstream {upstream} closed in the middle of the response to {method} {path}")
            self.flags.append(flag)
            self._end()
            self.door.abortResponse(self)
            return
        if (reused and not responseStarted and not self.retried and phase == AWAITING
                and self.method in IDEMPOTENT and not self.req.chunked and not self.req.contentLength
                and not self.req.upgrade):
            # A pooled connection the service had closed: once more, on a new connection.
            self.retried = True
            self._go(ACQUIRING)
            self.pool.acquire(self, fresh=True)
            return
        if self.retry is not None and self.retry.again("reset", 0):
            return
        self._warn("upstream {upstream} closed before answering {method} {path}: {reason}",
                   reason=reason.getErrorMessage())
        self.flags.append(flag)
        self._localReply(502, b"upstream connect error or disconnect/reset before headers. "
                              b"reset reason: " + (b"remote reset" if flag == UPSTREAM_REMOTE_RESET
                                                   else b"connection termination"))

    def upstreamProtocolError(self, detail: str) -> None:
        """
        The upstream sent something its codec could not parse.
        """
        self._cancelTimeout()
        stream, self.stream = self.stream, None
        if stream is not None:
            stream.abandon()
        if self.phase == DONE:
            return
        self._warn("upstream {upstream} sent a malformed response to {method} {path}: {detail}",
                   detail=detail)
        self.flags.append(UPSTREAM_PROTOCOL_ERROR)
        self._localReply(502, b"upstream sent a malformed response")

    # -- endings ---------------------------------------------------------------------

    def reject(self, status: int, flag: str, body: bytes) -> None:
        """
        Refuse the request without asking the upstream (authorization, overflow).
        """
        self.flags.append(flag)
        self.mustClose = self.mustClose or not self.requestDone
        self._localReply(status, body)

    def clientProtocolError(self, body: bytes) -> None:
        """
        The client's request body turned out malformed: drop the upstream side, answer
        400 if nothing was answered yet, and close.
        """
        self.mustClose = True
        self.requestDone = True
        if self.phase == DONE:
            return
        self._dropUpstream()
        self.flags.append(DOWNSTREAM_PROTOCOL_ERROR)
        self._localReply(400, body)

    def _tooLarge(self) -> None:
        """
        The request body is larger than C{maxRequestBytes}: drop the upstream side,
        answer 413 if nothing was answered yet (else cut the response), and close.
        """
        self.mustClose = True
        self.requestDone = True
        self._dropUpstream()
        self._localReply(413, b"Payload Too Large\n")

    def streamIdleTimedOut(self) -> None:
        """
        No byte either way for L{Engine.streamIdleTimeout} (Envoy's stream idle
        timeout, flag C{SI}): before the response, 504 if the request had all arrived
        and 408 if not (as Envoy); after it started, the client's connection is closed so
        that a truncated body is never taken for a complete one.
        """
        if self.phase == DONE:
            return
        self._warn("stream idle timeout: no byte on {method} {path} to {upstream} for {seconds} s",
                   seconds=self.engine.streamIdleTimeout)
        self.flags.append(STREAM_IDLE_TIMEOUT)
        if self.phase == TUNNEL:
            stream, self.stream = self.stream, None
            if stream is not None:
                stream.abandon()
            self._end()
            self.door.closeTunnel(self)
            return
        self._dropUpstream()
        if self.requestDone:
            self._localReply(504, b"stream timeout")
        else:
            self.mustClose = True
            self._localReply(408, b"stream timeout")

    def _timedOut(self) -> None:
        seconds = self._timeoutSeconds()
        self._cancelTimeout()
        if self.phase == AWAITING and self.retry is not None and self.retry.again("timeout", 0):
            return
        stream, self.stream = self.stream, None
        if stream is not None:
            stream.abandon()
        if self.phase != AWAITING:
            return
        self._warn("upstream {upstream} did not answer {method} {path} within {seconds} s",
                   seconds=seconds)
        self.flags.append(UPSTREAM_REQUEST_TIMEOUT)
        self._localReply(504, b"upstream request timeout")

    def _localReply(self, status: int, body: bytes, headers: Sequence[Header] = ()) -> None:
        """
        Answer with the proxy's own response, or, when the service's response has
        started, cut the client off: a truncated body is never presented as complete.
        """
        if self.phase in _ANSWERED:
            self._end()
            self.door.abortResponse(self)
            return
        self.status = status
        if self.grpc is not None:
            # A gRPC client gets a trailers-only 200 with the status mapped (Envoy's way).
            self.status = 200
            self.grpcStatus = "%d" % grpcStatusFor(status)
        else:
            self.bytesSent += 0 if self.method == b"HEAD" else len(body)
        if not self.requestDone:
            self.mustClose = True
        self._end()
        self.door.localReply(self, status, body, headers)

    def _warn(self, format: str, **fields: Any) -> None:
        """
        Log why this exchange failed, naming the upstream, the method and the path
        (a few of each kind per second: L{sidecar.logs.WarningLimit}).
        """
        self.engine.warnings.warn(format, upstream=self.pool.address, method=self.method.decode("latin-1"),
                                  path=self.target.decode("latin-1"), **fields)

    def _dropUpstream(self) -> None:
        """
        Give up on the upstream side: the timer, a wait or a connect under way, the
        stream.
        """
        self._cancelTimeout()
        if self.phase == ACQUIRING:
            self.pool.cancel(self)
        stream, self.stream = self.stream, None
        if stream is not None:
            stream.abandon()

    def _armTimeout(self) -> None:
        """
        The whole request is with the service: from now on it has C{responseTimeout}
        seconds to answer (as Envoy's route timeout, so a long upload is not cut short).
        """
        if self.deadline is not None or self.timeout is not None or self.phase != AWAITING:
            return
        engine = self.engine
        seconds = engine.responseTimeout if self.route is None else self._timeoutSeconds()
        if not seconds:
            return
        if self.route is None:
            # The engine's timeout, on every request: the once-a-second sweep.
            self.deadline = engine.clock.seconds() + seconds
            engine.watchDeadline(self)
        else:
            # A route's timeout or a retry's per-try timeout (sub-second ones are
            # common): a timer of its own, exact.
            self.timeout = engine.clock.callLater(seconds, self._timedOut)

    def _timeoutSeconds(self) -> Optional[float]:
        """
        The response timeout of this try: the engine's, or its route's, shortened to
        the retry policy's per-try timeout.
        """
        seconds = self.engine.responseTimeout
        route = self.route
        if route is not None:
            if route.timeout is not None:
                seconds = route.timeout or None
            if self.retry is not None:
                seconds = self.retry.tryTimeout(seconds)
        return seconds

    def retryUpstream(self, delay: float, fresh: bool) -> None:
        """
        Try the upstream again after C{delay} seconds (the route's retry policy said
        so, L{sidecar.routes.Retry.again}): drop the stream and the timer, wait, ask the
        pool again (C{fresh}: for a new connection).
        """
        self._cancelTimeout()
        stream, self.stream = self.stream, None
        if stream is not None:
            stream.abandon()
        if self.phase != ACQUIRING:
            self._go(ACQUIRING)
        self.timeout = self.engine.clock.callLater(delay, self._acquireAgain, fresh)

    def _acquireAgain(self, fresh: bool) -> None:
        self.timeout = None
        if self.phase == ACQUIRING:
            self.pool.acquire(self, fresh=fresh)

    def _cancelTimeout(self) -> None:
        if self.deadline is not None:
            self.deadline = None
            self.engine.unwatchDeadline(self)
        timer = self.timeout
        if timer is not None:
            # A route's timer: its timeout, or a retry's back-off.
            self.timeout = None
            if timer.active():
                timer.cancel()

    def _end(self) -> None:
        if self.phase == DONE:
            return
        # Every phase may end.
        self.phase = DONE
        engine = self.engine
        engine.recorder.requestsActive -= 1
        engine.streams.discard(self)
        if self.deadline is not None or self.timeout is not None:
            self._cancelTimeout()
        if self.readingPaused:
            self.readingPaused = False
            self.door.resumeReading()
        door = self.door
        grpc = self.grpc
        # The tuple made in C: calling the named tuple runs its generated __new__ in
        # Python (a frame and 30 bytecodes per request).
        record = _newRecord(Record, (
            self.start,
            engine.clock.seconds() - self.start,
            self.upstreamServiceTime,
            self.bytesReceived,
            self.bytesSent,
            self.status,
            self.method.decode("latin-1"),
            self.target.decode("latin-1"),
            "HTTP/" + self.version if self.version else "-",
            self.req.authority,
            self.pool.address,
            ",".join(self.flags) if self.flags else "-",
            self.req.requestId,
            self.req.forwardedFor,
            self.req.userAgent,
            door.clientAddress,
            door.peerPrincipal,
            door.mutualTLS,
            grpc is not None,
            self.grpcStatus,
            grpc.request.messages if grpc is not None else 0,
            grpc.response.messages if grpc is not None else 0,
            door.direction,
            self.peer,
        ))
        engine.recorder.record(record)
        if self.retry is not None:
            self.retry.ended()
        chain = self.chain
        if chain is not None and chain.loggers:
            for failure in chain.logged(record):
                self._warn("filter {filter} failed on the record of {method} {path}: {reason}",
                           filter=failure.filter, reason=failure.reason)
