# -*- test-case-name: tests.test_stats -*-
"""
The recorder: turns records into counters and histograms with plain integers and lists
on the hot path.  Formatting (Prometheus, JSON, log lines) happens when someone reads.
"""

from __future__ import annotations

from bisect import bisect_left
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


class Recorder:
    """
    Aggregates L{Record}s and passes each to the access log.

    The gauges are plain attributes that the front doors and the pool update.

    @ivar series: counters by L{SeriesKey}.
    @ivar sinks: callables given every record (the access log).
    """

    def __init__(self, sinks: Sequence[Callable[[Record], None]] = ()) -> None:
        self.series: Dict[SeriesKey, Series] = {}
        self.sinks = list(sinks)
        self.downstreamConnectionsActive = 0
        self.downstreamConnectionsTotal = 0
        self.requestsActive = 0
        self.downstreamBytesReceived = 0
        self.downstreamBytesSent = 0
        self.lastRecord: Optional[Record] = None
        #: Opaque TCP connections by L{TcpKey} (see L{sidecar.tcp}).
        self.tcp: Dict[TcpKey, TcpSeries] = {}
        #: Callables given every TCP record (the access log's TCP formatter).
        self.tcpSinks: List[Callable[[object], None]] = []
        self.lastTcpRecord: Optional[object] = None

    def record(self, rec: Record) -> None:
        """
        Count one finished exchange.  This is on the hot path: a dict lookup, three
        bisects (L{Histogram.observe}, inlined) and the sinks.
        """
        key = ("grpc" if rec.grpc else rec.protocol, rec.status, rec.flags, rec.downstreamPeerPrincipal,
               rec.mutualTLS, rec.direction, rec.peer, rec.grpcStatus)
        series = self.series.get(key)
        if series is None:
            series = self.series[key] = Series()
        series.requests += 1
        if rec.grpc:
            series.requestMessages += rec.requestMessages
            series.responseMessages += rec.responseMessages
        histogram, value = series.duration, rec.duration * 1000.0
        histogram.counts[bisect_left(histogram.bounds, value)] += 1
        histogram.sum += value
        histogram.count += 1
        histogram, value = series.requestBytes, rec.bytesReceived
        histogram.counts[bisect_left(histogram.bounds, value)] += 1
        histogram.sum += value
        histogram.count += 1
        histogram, value = series.responseBytes, rec.bytesSent
        histogram.counts[bisect_left(histogram.bounds, value)] += 1
        histogram.sum += value
        histogram.count += 1
        self.downstreamBytesReceived += rec.bytesReceived
        self.downstreamBytesSent += rec.bytesSent
        self.lastRecord = rec
        for sink in self.sinks:
            sink(rec)

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
