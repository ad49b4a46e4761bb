# -*- test-case-name: tests.test_stats -*-
"""
The recorder: turns records into counters and histograms with plain integers and lists
on the hot path.  Formatting (Prometheus, JSON, log lines) happens when someone reads.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from operator import attrgetter
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from sidecar.record import Record

#: Envoy's default histogram buckets (milliseconds for durations, bytes for sizes).
DEFAULT_BUCKETS: Tuple[float, ...] = (
    0.5, 1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000,
    300000, 600000, 1800000, 3600000,
)


class Histogram:
    """
    A fixed-bucket histogram: C{counts[i]} counts observations C{<= bounds[i]}
    (non-cumulative), the last slot those above every bound.
    """

    __slots__ = ("bounds", "counts", "sum", "count")

    def __init__(self, bounds: Sequence[float] = DEFAULT_BUCKETS) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        """
        Count one observation.
        """
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1

    def observeAll(self, values: List[float]) -> None:
        """
        Count many observations (sorts C{values}): as L{observe} on each, with one
        bisect per bound instead of one per value.
        """
        values.sort()
        counts = self.counts
        below = 0
        for i, bound in enumerate(self.bounds):
            upTo = bisect_right(values, bound, below)
            counts[i] += upTo - below
            below = upTo
        counts[-1] += len(values) - below
        self.sum += sum(values)
        self.count += len(values)

    def cumulative(self) -> List[Tuple[float, int]]:
        """
        C{(upper bound, cumulative count)} pairs, ending with C{(inf, count)}.
        """
        out = []
        running = 0
        for bound, n in zip(self.bounds + (float("inf"),), self.counts):
            running += n
            out.append((bound, running))
        return out


#: The labels by which requests are counted: protocol, status, flags, peer principal,
#: whether the connection was mutual TLS, the direction, the peer's labels (a
#: hashable L{sidecar.peers.PeerLabels}, made once per connection, or C{None}), and a
#: gRPC call's C{grpc-status} (C{""} otherwise; a gRPC call's protocol is C{"grpc"}).
SeriesKey = Tuple[Any, ...]


class Series:
    """
    The counters of one label set.
    """

    __slots__ = ("requests", "duration", "requestBytes", "responseBytes", "requestMessages",
                 "responseMessages")

    def __init__(self) -> None:
        self.requests = 0
        #: gRPC messages, both ways (gRPC series only).
        self.requestMessages = 0
        self.responseMessages = 0
        self.duration = Histogram()
        self.requestBytes = Histogram()
        self.responseBytes = Histogram()


class TcpSeries:
    """
    The counters of one TCP label set: connections opened and closed, bytes received
    from clients and sent to them (counted as they flow).
    """

    __slots__ = ("opened", "closed", "received", "sent")

    def __init__(self) -> None:
        self.opened = 0
        self.closed = 0
        self.received = 0
        self.sent = 0


#: The labels by which TCP connections are counted: flags, peer principal, mutual TLS,
#: direction, the peer's labels.
TcpKey = Tuple[str, str, bool, str, object]


#: A record's labels, as L{Recorder.fold} groups them: L{SeriesKey}'s fields with the
#: protocol as recorded, then whether it was a gRPC call.
_labelsOf = attrgetter("protocol", "status", "flags", "downstreamPeerPrincipal", "mutualTLS", "direction",
                       "peer", "grpcStatus", "grpc")
_duration = attrgetter("duration")
_bytesReceived = attrgetter("bytesReceived")
_bytesSent = attrgetter("bytesSent")
_requestMessages = attrgetter("requestMessages")
_responseMessages = attrgetter("responseMessages")


class Recorder:
    """
    Aggregates L{Record}s and passes each to the access log.

    The gauges are plain attributes that the front doors and the pool update.

    @ivar series: counters by L{SeriesKey}.
    @ivar sinks: callables given every record (the access log).
    """

    #: Records counted in one batch at most: L{record} folds them into the series
    #: when this many wait (or when someone reads, whichever comes first).
    FOLD_EVERY = 1024

    def __init__(self, sinks: Sequence[Callable[[Record], None]] = ()) -> None:
        self._series: Dict[SeriesKey, Series] = {}
        #: Records not yet folded into L{series}.
        self._unfolded: List[Record] = []
        self._bytesReceived = 0
        self._bytesSent = 0
        self._last: Optional[Record] = None
        self.sinks = list(sinks)
        self.downstreamConnectionsActive = 0
        self.downstreamConnectionsTotal = 0
        self.requestsActive = 0
        #: Opaque TCP connections by L{TcpKey} (see L{sidecar.tcp}).
        self.tcp: Dict[TcpKey, TcpSeries] = {}
        #: Callables given every TCP record (the access log's TCP formatter).
        self.tcpSinks: List[Callable[[object], None]] = []
        self.lastTcpRecord: Optional[object] = None

    def record(self, rec: Record) -> None:
        """
        Count one finished exchange and pass it to the sinks.  This is on the hot path:
        the record waits in a list, and its counts are added in batches (L{fold}) when
        the series are read or L{FOLD_EVERY} records wait, in C-level passes over the
        batch instead of a dict lookup, three bisects and six additions per request.
        """
        unfolded = self._unfolded
        unfolded.append(rec)
        if len(unfolded) >= self.FOLD_EVERY:
            self.fold()
        for sink in self.sinks:
            sink(rec)

    def fold(self) -> None:
        """
        Add the waiting records to the series: grouped by label set, each group's
        histograms filled from its sorted values (one bisect per bucket bound, not per
        record).
        """
        unfolded = self._unfolded
        if not unfolded:
            return
        self._unfolded = []
        self._last = unfolded[-1]
        groups: Dict[Tuple[Any, ...], List[Record]] = {}
        for rec in unfolded:
            key = _labelsOf(rec)
            group = groups.get(key)
            if group is None:
                groups[key] = [rec]
            else:
                group.append(rec)
        allSeries = self._series
        for labels, recs in groups.items():
            # The label set's first field is the protocol; a gRPC call counts as "grpc".
            key = ("grpc",) + labels[1:-1] if labels[-1] else labels[:-1]
            series = allSeries.get(key)
            if series is None:
                series = allSeries[key] = Series()
            series.requests += len(recs)
            if labels[-1]:
                series.requestMessages += sum(map(_requestMessages, recs))
                series.responseMessages += sum(map(_responseMessages, recs))
            series.duration.observeAll([d * 1000.0 for d in map(_duration, recs)])
            received = list(map(_bytesReceived, recs))
            sent = list(map(_bytesSent, recs))
            series.requestBytes.observeAll(received)
            series.responseBytes.observeAll(sent)
            self._bytesReceived += sum(received)
            self._bytesSent += sum(sent)

    @property
    def series(self) -> Dict[SeriesKey, Series]:
        """
        The counters by L{SeriesKey}, with every record so far folded in.
        """
        self.fold()
        return self._series

    @property
    def downstreamBytesReceived(self) -> int:
        """
        Request body bytes received from clients, over every recorded exchange.
        """
        self.fold()
        return self._bytesReceived

    @property
    def downstreamBytesSent(self) -> int:
        """
        Response body bytes sent to clients, over every recorded exchange.
        """
        self.fold()
        return self._bytesSent

    @property
    def lastRecord(self) -> Optional[Record]:
        """
        The most recent record, or L{None}.
        """
        unfolded = self._unfolded
        if unfolded:
            return unfolded[-1]
        return self._last

    def totalRequests(self) -> int:
        """
        How many exchanges have been recorded.
        """
        return sum(s.requests for s in self.series.values())

    def tcpSeries(self, flags: str, principal: str, mutualTLS: bool, direction: str = "inbound",
                  peer: object = None) -> TcpSeries:
        """
        The TCP counters of one label set, made on first use; a splice keeps the one
        it counts its bytes into.
        """
        key = (flags, principal, mutualTLS, direction, peer)
        series = self.tcp.get(key)
        if series is None:
            series = self.tcp[key] = TcpSeries()
        return series

    def recordTcp(self, rec: object) -> None:
        """
        Count one finished TCP connection (a L{sidecar.record.TcpRecord}) as closed under
        its flags, and pass it to the TCP sinks.  Its bytes were counted as they flowed.
        """
        self.tcpSeries(rec.flags, rec.downstreamPeerPrincipal, rec.mutualTLS,  # type: ignore[attr-defined]
                       rec.direction, rec.peer).closed += 1  # type: ignore[attr-defined]
        self.lastTcpRecord = rec
        for sink in self.tcpSinks:
            sink(rec)
