# -*- test-case-name: tests.test_metrics -*-
"""
Exposition: Istio's standard metrics and the proxy's own, read from the recorder when
someone scrapes, never per request.

L{SidecarCollector} is a C{prometheus_client} custom collector: its C{collect} turns the
L{sidecar.stats.Recorder}'s plain counters into metric families with Istio's names and
labels, so that Istio's dashboards and queries work unchanged.  L{prometheusText} renders
them with C{prometheus_client}'s exposition code, L{statsJSON} as JSON.  Nothing here
touches a reactor: everything is a function of the objects handed in.

L{workloadLabels} works out who this workload is (the C{destination_*} labels) from
flags and the usual pod environment variables.
"""

from __future__ import annotations

import re
from types import SimpleNamespace
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.utils import floatToGoString

from sidecar.config import MeshLabels
from sidecar.stats import Histogram, Recorder, Series

#: The content type of L{prometheusText}: the Prometheus text format 0.0.4, as Envoy's
#: C{/stats/prometheus} serves it.
CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4

UNKNOWN = "unknown"

#: Istio's standard labels of the request metrics, in Istio's order.
ISTIO_LABELS: Tuple[str, ...] = (
    "reporter",
    "source_workload",
    "source_workload_namespace",
    "source_principal",
    "source_app",
    "source_version",
    "source_cluster",
    "source_canonical_service",
    "source_canonical_revision",
    "destination_workload",
    "destination_workload_namespace",
    "destination_principal",
    "destination_app",
    "destination_version",
    "destination_service",
    "destination_service_name",
    "destination_service_namespace",
    "destination_canonical_service",
    "destination_canonical_revision",
    "destination_cluster",
    "request_protocol",
    "response_code",
    "grpc_response_status",
    "response_flags",
    "connection_security_policy",
)

#: The characters of the random suffixes Kubernetes gives pod names (no vowels, no
#: look-alikes), as in C{k8s.io/apimachinery/pkg/util/rand}.
_SUFFIX = "[bcdfghjklmnpqrstvwxz2456789]"
_DEPLOYMENT_POD = re.compile(rf"^(.+)-{_SUFFIX}{{6,10}}-{_SUFFIX}{{5}}$")
_GENERATED_POD = re.compile(rf"^(.+)-{_SUFFIX}{{5}}$")
_STATEFUL_POD = re.compile(r"^(.+)-\d+$")
_SPIFFE = re.compile(r"^spiffe://[^/]+/ns/([^/]+)/sa/[^/]+$")


def workloadFromPodName(podName: str) -> str:
    """
    The workload a pod belongs to, from its name, the way Istio guesses it without the
    API server: C{reviews-v1-545db77b95-2ps7q} (a Deployment's pod) and C{agent-x7k2p}
    (a DaemonSet's or Job's) drop their generated suffixes, C{web-0} (a StatefulSet's)
    its ordinal.
    """
    for pattern in (_DEPLOYMENT_POD, _GENERATED_POD, _STATEFUL_POD):
        match = pattern.match(podName)
        if match is not None:
            return match.group(1)
    return podName


def workloadLabels(
    environ: Mapping[str, str],
    workload: Optional[str] = None,
    namespace: Optional[str] = None,
    app: Optional[str] = None,
    version: Optional[str] = None,
    service: Optional[str] = None,
    principal: Optional[str] = None,
) -> MeshLabels:
    """
    Who this workload is: each value from its flag when given, else from the pod's
    environment, else C{unknown}.

      - workload: C{ISTIO_META_WORKLOAD_NAME}, else C{POD_NAME} less its generated
        suffix (L{workloadFromPodName});
      - namespace: C{POD_NAMESPACE};
      - app and version: C{APP} and C{APP_VERSION} (set them from the pod's C{app} and
        C{version} labels with the downward API);
      - service: C{APP.NAMESPACE.svc.cluster.local} when both are known (Istio's
        C{destination_service} is the service's host name);
      - principal: C{spiffe://TRUST_DOMAIN/ns/POD_NAMESPACE/sa/SERVICE_ACCOUNT}, the
        trust domain defaulting to C{cluster.local};
      - cluster: C{ISTIO_META_CLUSTER_ID}.
    """

    def pick(flag: Optional[str], *names: str) -> str:
        if flag:
            return flag
        for name in names:
            value = environ.get(name, "").strip()
            if value:
                return value
        return UNKNOWN

    if not workload:
        workload = environ.get("ISTIO_META_WORKLOAD_NAME", "").strip()
    if not workload and environ.get("POD_NAME", "").strip():
        workload = workloadFromPodName(environ["POD_NAME"].strip())
    namespace = pick(namespace, "POD_NAMESPACE")
    app = pick(app, "APP")
    if not service and app != UNKNOWN and namespace != UNKNOWN:
        service = f"{app}.{namespace}.svc.cluster.local"
    account = environ.get("SERVICE_ACCOUNT", "").strip()
    if not principal and account and namespace != UNKNOWN:
        trustDomain = environ.get("TRUST_DOMAIN", "").strip() or "cluster.local"
        principal = f"spiffe://{trustDomain}/ns/{namespace}/sa/{account}"
    return MeshLabels(
        workload=workload or UNKNOWN,
        namespace=namespace,
        app=app,
        version=pick(version, "APP_VERSION"),
        service=service or UNKNOWN,
        principal=principal or UNKNOWN,
        cluster=pick(None, "ISTIO_META_CLUSTER_ID"),
    )


def staticLabels(mesh: MeshLabels) -> Dict[str, str]:
    """
    The labels that are the same on every request series of this process (all but the
    source principal and namespace, the protocol, code, flags, security policy and the
    destination principal).
    """
    service = mesh.service
    if service != UNKNOWN:
        serviceName, _, rest = service.partition(".")
        serviceNamespace = rest.partition(".")[0] or mesh.namespace
    else:
        serviceName, serviceNamespace = mesh.app, mesh.namespace
    canonical = mesh.app if mesh.app != UNKNOWN else mesh.workload
    return {
        "reporter": "destination",
        "source_workload": UNKNOWN,
        "source_app": UNKNOWN,
        "source_version": UNKNOWN,
        "source_cluster": UNKNOWN,
        "source_canonical_service": UNKNOWN,
        "source_canonical_revision": UNKNOWN,
        "destination_workload": mesh.workload,
        "destination_workload_namespace": mesh.namespace,
        "destination_app": mesh.app,
        "destination_version": mesh.version,
        "destination_service": service,
        "destination_service_name": serviceName or UNKNOWN,
        "destination_service_namespace": serviceNamespace or UNKNOWN,
        "destination_canonical_service": canonical,
        "destination_canonical_revision": mesh.version if mesh.version != UNKNOWN else "latest",
        "destination_cluster": mesh.cluster,
        "grpc_response_status": "",
    }


def requestProtocol(protocol: str) -> str:
    """
    Istio's C{request_protocol} for a record's protocol: C{http} for every HTTP version
    (C{grpc} for a gRPC call's series).
    """
    return "http" if protocol.upper().startswith("HTTP") else protocol.lower() or UNKNOWN


def _peerSide(side: str, peer: Any) -> Dict[str, str]:
    """
    The C{source_*} or C{destination_*} workload labels of a peer (a
    L{sidecar.peers.PeerLabels}; C{None}: nothing known, all C{unknown}).
    """
    if peer is None:
        workload = namespace = app = version = cluster = UNKNOWN
    else:
        workload, namespace, app = peer.workload, peer.namespace, peer.app
        version, cluster = peer.version, peer.cluster
    labels = {
        f"{side}_workload": workload,
        f"{side}_workload_namespace": namespace,
        f"{side}_app": app,
        f"{side}_version": version,
        f"{side}_cluster": cluster,
        f"{side}_canonical_service": app if app != UNKNOWN else workload,
        f"{side}_canonical_revision": version if version != UNKNOWN else ("latest" if peer is not None else UNKNOWN),
    }
    if side == "destination":
        service = UNKNOWN if peer is None else peer.service
        if service != UNKNOWN:
            name, _, rest = service.partition(".")
            serviceNamespace = rest.partition(".")[0] or namespace
        else:
            name, serviceNamespace = app, namespace
        labels["destination_service"] = service
        labels["destination_service_name"] = name or UNKNOWN
        labels["destination_service_namespace"] = serviceNamespace or UNKNOWN
    return labels


def seriesLabels(key: Tuple[Any, ...], static: Mapping[str, str], principal: str) -> Tuple[str, ...]:
    """
    The Istio label values, in L{ISTIO_LABELS} order, of the recorder's series C{key}
    (protocol, status, flags, peer principal, mutual TLS, and optionally the direction,
    the peer's labels and a gRPC call's C{grpc-status}).

    Inbound (C{reporter="destination"}): the destination is this workload; under
    mutual TLS the source principal is the client's SPIFFE id (and its namespace the
    source namespace) and the destination principal our own, and the other source
    labels come from the peer metadata of a verified mesh client; otherwise every
    source label and both principals are C{unknown}, as Istio reports plaintext.

    Outbound (C{reporter="source"}): the source is this workload, the destination
    what the sidecar learnt of the peer (its certificate and metadata) when it
    originated mutual TLS; a destination outside the mesh is Istio's
    C{PassthroughCluster}.
    """
    protocol, status, flags, peerPrincipal, mutualTLS = key[:5]
    direction = key[5] if len(key) > 5 else "inbound"
    peer = key[6] if len(key) > 6 else None
    labels = dict(static)
    if len(key) > 7 and protocol == "grpc":
        labels["grpc_response_status"] = key[7]
    labels["request_protocol"] = requestProtocol(protocol)
    labels["response_code"] = str(status)
    labels["response_flags"] = flags or "-"
    labels["connection_security_policy"] = "mutual_tls" if mutualTLS else "none"
    if direction == "outbound":
        labels["reporter"] = "source"
        for name in ("workload", "workload_namespace", "app", "version", "cluster", "canonical_service",
                     "canonical_revision"):
            labels["source_" + name] = static["destination_" + name]
        labels["source_principal"] = principal if mutualTLS else UNKNOWN
        labels.update(_peerSide("destination", peer))
        if peer is None and not mutualTLS:
            labels["destination_service"] = labels["destination_service_name"] = "PassthroughCluster"
        remote = peer.principal if peer is not None else ""
        labels["destination_principal"] = remote if (mutualTLS and remote) else UNKNOWN
        return tuple(labels[name] for name in ISTIO_LABELS)
    labels["source_principal"] = peerPrincipal if (mutualTLS and peerPrincipal) else UNKNOWN
    if mutualTLS and peer is not None:
        labels.update(_peerSide("source", peer))
    match = _SPIFFE.match(labels["source_principal"])
    labels["source_workload_namespace"] = match.group(1) if match else UNKNOWN
    labels["destination_principal"] = principal if mutualTLS else UNKNOWN
    return tuple(labels[name] for name in ISTIO_LABELS)


class _Merged:
    """
    The sum of the recorder's series that share one Istio label set (HTTP/1.0 and 1.1
    are both C{http}).
    """

    __slots__ = ("requests", "duration", "requestBytes", "responseBytes", "requestMessages",
                 "responseMessages", "grpc")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.requests = 0
        self.requestMessages = 0
        self.responseMessages = 0
        self.grpc = False
        self.duration = Histogram(bounds)
        self.requestBytes = Histogram(bounds)
        self.responseBytes = Histogram(bounds)

    def add(self, series: Any) -> None:
        self.requests += series.requests
        self.requestMessages += series.requestMessages
        self.responseMessages += series.responseMessages
        for mine, theirs in ((self.duration, series.duration),
                             (self.requestBytes, series.requestBytes),
                             (self.responseBytes, series.responseBytes)):
            mine.counts = [a + b for a, b in zip(mine.counts, theirs.counts)]
            mine.sum += theirs.sum
            mine.count += theirs.count


def _copyHistogram(histogram: Histogram) -> Histogram:
    copy = Histogram(histogram.bounds)
    copy.counts = list(histogram.counts)
    copy.sum = histogram.sum
    copy.count = histogram.count
    return copy


def _copySeries(series: Any) -> Any:
    copy = Series()
    copy.requests = series.requests
    copy.requestMessages = series.requestMessages
    copy.responseMessages = series.responseMessages
    copy.duration = _copyHistogram(series.duration)
    copy.requestBytes = _copyHistogram(series.requestBytes)
    copy.responseBytes = _copyHistogram(series.responseBytes)
    return copy


def _buckets(histogram: Histogram) -> List[Tuple[str, float]]:
    return [(floatToGoString(bound), count) for bound, count in histogram.cumulative()]


def runtimeCollectors() -> Tuple[Any, ...]:
    """
    C{prometheus_client}'s process collector (C{process_cpu_seconds_total},
    C{process_resident_memory_bytes}, C{process_open_fds}, ..., read from C{/proc} when
    scraped) and platform collector (C{python_info}, worked out once, here), registered
    in no global registry: the service hands them to its L{SidecarCollector}.
    """
    return (ProcessCollector(registry=None), PlatformCollector(registry=None))


class SidecarCollector:
    """
    A C{prometheus_client} collector that reads the recorder, the pool and the engine
    each time it is collected.

    @ivar recorder: the L{Recorder} of this sidecar.
    @ivar pool: the L{sidecar.upstream.UpstreamPool} (C{active}, C{connecting}, C{idle},
        C{connects}, C{connectFailures}).
    @ivar engine: the L{sidecar.exchange.Engine} (C{draining}).
    @ivar mesh: who this workload is.
    @ivar startTime: when the process started, in seconds since the epoch.
    @ivar version: the sidecar's version, for C{sidecar_build_info}.
    @ivar localPrincipal: returns our own SPIFFE id from the certificate in use under
        mutual TLS, or C{""}; it wins over C{mesh.principal}.
    @ivar tls: the L{sidecar.mtls.MutualTLS} counters (C{handshakes},
        C{handshakeFailures}, C{handshakeTimeouts}, C{denials}, C{context.rotations},
        C{context.failures}), or C{None} without mutual TLS.
    @ivar accessLog: the L{sidecar.accesslog.AccessLog} (C{dropped}, C{buffered},
        C{limit}), or C{None} without an access log.
    @ivar logStream: returns twistd's log stream (L{sidecar.logs.LogStream}: C{dropped}),
        or C{None} when twistd's log is left as it is (a file).
    @ivar runtime: more collectors whose families follow ours (L{runtimeCollectors});
        they are read when scraped, in the formatting thread, never per request.
    """

    def __init__(self, recorder: Recorder, pool: Any, engine: Any, mesh: MeshLabels,
                 startTime: float, version: str = "",
                 localPrincipal: Callable[[], str] = lambda: "", tls: Any = None,
                 accessLog: Any = None, runtime: Sequence[Any] = (),
                 logStream: Callable[[], Any] = lambda: None) -> None:
        self.tls = tls
        self.accessLog = accessLog
        self.logStream = logStream
        self.runtime = tuple(runtime)
        self.recorder = recorder
        self.localPrincipal = localPrincipal
        self.pool = pool
        self.engine = engine
        self.mesh = mesh
        self.startTime = startTime
        self.version = version
        self._static = staticLabels(mesh)

    def snapshot(self) -> SidecarCollector:
        """
        A collector over a copy of every number, taken now: cheap (a few lists per
        series), so that the formatting, which is not, can run in another thread while
        the reactor goes on recording.
        """
        recorder, pool = self.recorder, self.pool
        frozenRecorder = SimpleNamespace(
            series={key: _copySeries(series) for key, series in list(recorder.series.items())},
            downstreamConnectionsActive=recorder.downstreamConnectionsActive,
            downstreamConnectionsTotal=recorder.downstreamConnectionsTotal,
            requestsActive=recorder.requestsActive,
            downstreamBytesReceived=recorder.downstreamBytesReceived,
            downstreamBytesSent=recorder.downstreamBytesSent,
            tcp=snapshotTcp(recorder),
        )
        frozenPool = SimpleNamespace(active=pool.active, idle=[None] * len(pool.idle), connecting=pool.connecting,
                                     connects=pool.connects, connectFailures=pool.connectFailures,
                                     pending=[None] * len(pool.pending), overflows=pool.overflows)
        frozenEngine = SimpleNamespace(draining=bool(self.engine.draining))
        principal = self.localPrincipal()
        tls = self.tls
        frozenTLS = None if tls is None else SimpleNamespace(
            handshakes=tls.handshakes, handshakeFailures=tls.handshakeFailures,
            handshakeTimeouts=tls.handshakeTimeouts, denials=tls.denials,
            context=SimpleNamespace(rotations=tls.context.rotations, failures=tls.context.failures))
        log = self.accessLog
        frozenLog = None if log is None else SimpleNamespace(dropped=log.dropped, buffered=log.buffered,
                                                             limit=log.limit)
        stream = self.logStream()
        frozenStream = None if stream is None else SimpleNamespace(dropped=stream.dropped)
        return SidecarCollector(frozenRecorder, frozenPool, frozenEngine, self.mesh,  # type: ignore[arg-type]
                                self.startTime, self.version, localPrincipal=lambda: principal,
                                tls=frozenTLS, accessLog=frozenLog, runtime=self.runtime,
                                logStream=lambda: frozenStream)

    def requestSeries(self) -> Dict[Tuple[str, ...], _Merged]:
        """
        The recorder's series under their Istio labels (sorted, so that the output is
        stable from one scrape to the next).
        """
        merged: Dict[Tuple[str, ...], _Merged] = {}
        principal = self.localPrincipal() or self.mesh.principal
        for key, series in list(self.recorder.series.items()):
            labels = seriesLabels(key, self._static, principal)
            into = merged.get(labels)
            if into is None:
                into = merged[labels] = _Merged(series.duration.bounds)
                into.grpc = key[0] == "grpc"
            into.add(series)
        return dict(sorted(merged.items()))

    def collect(self) -> Iterator[Metric]:
        """
        Every metric family, read now.
        """
        requests = CounterMetricFamily(
            "istio_requests_total", "Requests received by this workload's sidecar.",
            labels=ISTIO_LABELS)
        duration = HistogramMetricFamily(
            "istio_request_duration_milliseconds",
            "Time from the request head to the last response byte, in milliseconds.",
            labels=ISTIO_LABELS)
        requestBytes = HistogramMetricFamily(
            "istio_request_bytes", "Request body sizes, in bytes.", labels=ISTIO_LABELS)
        responseBytes = HistogramMetricFamily(
            "istio_response_bytes", "Response body sizes, in bytes.", labels=ISTIO_LABELS)
        requestMessages = CounterMetricFamily(
            "istio_request_messages_total", "gRPC messages received from clients.", labels=ISTIO_LABELS)
        responseMessages = CounterMetricFamily(
            "istio_response_messages_total", "gRPC messages sent to clients.", labels=ISTIO_LABELS)
        for labels, series in self.requestSeries().items():
            requests.add_metric(labels, series.requests)
            if series.grpc:
                requestMessages.add_metric(labels, series.requestMessages)
                responseMessages.add_metric(labels, series.responseMessages)
            duration.add_metric(labels, _buckets(series.duration), series.duration.sum)
            requestBytes.add_metric(labels, _buckets(series.requestBytes), series.requestBytes.sum)
            responseBytes.add_metric(labels, _buckets(series.responseBytes), series.responseBytes.sum)
        yield requests
        yield duration
        yield requestBytes
        yield responseBytes
        if requestMessages.samples:
            yield requestMessages
            yield responseMessages
        yield from tcpMetrics(self.recorder, self._static, self.localPrincipal() or self.mesh.principal)
        build = GaugeMetricFamily("istio_build", "Istio component build info", labels=("component", "tag"))
        build.add_metric(("proxy", self.version), 1)
        yield build
        yield from self.sidecarMetrics()
        for collector in self.runtime:
            yield from collector.collect()

    def sidecarMetrics(self) -> Iterator[Metric]:
        """
        The proxy's own gauges and counters, under C{sidecar_}.
        """
        recorder, pool = self.recorder, self.pool
        yield GaugeMetricFamily(
            "sidecar_downstream_connections_active", "Client connections open now (HTTP and opaque TCP).",
            value=recorder.downstreamConnectionsActive)
        yield CounterMetricFamily(
            "sidecar_downstream_connections_total", "Client connections accepted (HTTP and opaque TCP).",
            value=recorder.downstreamConnectionsTotal)
        yield GaugeMetricFamily(
            "sidecar_requests_active",
            "Requests in flight now (an upgraded stream counts until it closes).",
            value=recorder.requestsActive)
        upstream = GaugeMetricFamily(
            "sidecar_upstream_connections", "Connections to the service, by pool state.",
            labels=("state",))
        upstream.add_metric(("active",), pool.active)
        upstream.add_metric(("idle",), len(pool.idle))
        upstream.add_metric(("connecting",), pool.connecting)
        yield upstream
        yield CounterMetricFamily(
            "sidecar_upstream_connects_total", "Connections made to the service.",
            value=pool.connects)
        yield CounterMetricFamily(
            "sidecar_upstream_connect_failures_total", "Connects to the service that failed.",
            value=pool.connectFailures)
        yield GaugeMetricFamily(
            "sidecar_upstream_pending_requests",
            "Requests waiting for a connection to the service (the pool is at its limit).",
            value=len(pool.pending))
        yield CounterMetricFamily(
            "sidecar_upstream_overflows_total",
            "Requests refused with 503 (UO): connection limit reached and the queue full.",
            value=pool.overflows)
        yield CounterMetricFamily(
            "sidecar_downstream_received_bytes_total",
            "Body bytes received from clients, counted as each request ends.",
            value=recorder.downstreamBytesReceived)
        yield CounterMetricFamily(
            "sidecar_downstream_sent_bytes_total",
            "Body bytes sent to clients, counted as each request ends.",
            value=recorder.downstreamBytesSent)
        yield GaugeMetricFamily(
            "sidecar_draining", "1 while the sidecar drains (responses say Connection: close).",
            value=1 if self.engine.draining else 0)
        yield GaugeMetricFamily(
            "sidecar_process_start_time_seconds",
            "When the sidecar process started, in seconds since the epoch.",
            value=self.startTime)
        info = GaugeMetricFamily("sidecar_build_info", "The sidecar's version.", labels=("version",))
        info.add_metric((self.version,), 1)
        yield info
        accessLog = self.accessLog
        if accessLog is not None:
            yield CounterMetricFamily(
                "sidecar_access_log_dropped_records_total",
                "Access log records dropped because the log's output was not read and its buffer was full.",
                value=accessLog.dropped)
            yield GaugeMetricFamily(
                "sidecar_access_log_buffered_bytes",
                "Access log bytes waiting for the log's output to take them.", value=accessLog.buffered)
        stream = self.logStream()
        yield CounterMetricFamily(
            "sidecar_log_dropped_lines_total",
            "Lines of the sidecar's own log dropped because its output was not read and the buffer was full.",
            value=0 if stream is None else stream.dropped)
        tls = self.tls
        if tls is not None:
            for name, help, value in (
                ("sidecar_tls_handshakes_total", "Mutual TLS handshakes completed.", tls.handshakes),
                ("sidecar_tls_handshake_failures_total",
                 "Connections that ended before their TLS handshake completed.", tls.handshakeFailures),
                ("sidecar_tls_handshake_timeouts_total",
                 "Connections cut off for not finishing their TLS handshake in time.", tls.handshakeTimeouts),
                ("sidecar_tls_denials_total",
                 "Connections whose client identity the policy refused (their requests get 403).", tls.denials),
                ("sidecar_tls_rotations_total", "Times new certificate material was put in use.",
                 tls.context.rotations),
                ("sidecar_tls_rotation_failures_total",
                 "Changed certificate files that were refused (the old material stayed in use).",
                 tls.context.failures),
            ):
                yield CounterMetricFamily(name, help, value=value)


def prometheusText(collector: SidecarCollector) -> bytes:
    """
    The Prometheus text exposition (format 0.0.4) of C{collector}, by
    C{prometheus_client}'s own code.
    """
    return generate_latest(collector)  # type: ignore[arg-type]


def statsJSON(collector: SidecarCollector) -> Dict[str, object]:
    """
    The same families as L{prometheusText}, as plain data: each counter and gauge sample
    with its labels and value, each histogram series with its count, sum and cumulative
    buckets.
    """
    stats: List[Dict[str, object]] = []
    for family in collector.collect():
        if family.type == "histogram":
            bySeries: Dict[Tuple[Tuple[str, str], ...], Dict[str, Any]] = {}
            for sample in family.samples:
                labels = {k: v for k, v in sample.labels.items() if k != "le"}
                entry = bySeries.setdefault(tuple(sorted(labels.items())), {
                    "name": family.name, "type": "histogram", "labels": labels,
                    "count": 0, "sum": 0.0, "buckets": [],
                })
                if sample.name.endswith("_bucket"):
                    entry["buckets"].append([sample.labels["le"], sample.value])
                elif sample.name.endswith("_count"):
                    entry["count"] = sample.value
                elif sample.name.endswith("_sum"):
                    entry["sum"] = sample.value
            stats.extend(bySeries.values())
        else:
            for sample in family.samples:
                if sample.name.endswith("_created"):
                    continue
                stats.append({"name": sample.name, "type": family.type,
                              "labels": dict(sample.labels), "value": sample.value})
    return {"stats": stats}


# -- opaque TCP connections -------------------------------------------------------------

#: Istio's labels of the TCP metrics: the request labels less the response code and the
#: gRPC status.
TCP_LABELS: Tuple[str, ...] = tuple(
    name for name in ISTIO_LABELS if name not in ("response_code", "grpc_response_status"))


def tcpLabels(key: Tuple[Any, ...], static: Mapping[str, str], principal: str) -> Tuple[str, ...]:
    """
    The Istio label values, in L{TCP_LABELS} order, of the recorder's TCP series C{key}
    (flags, peer principal, mutual TLS, and optionally the direction and the peer's
    labels), with C{request_protocol="tcp"} and the rest as L{seriesLabels} reports
    them.
    """
    flags, peer, mutualTLS = key[:3]
    labels = dict(zip(ISTIO_LABELS, seriesLabels(("tcp", 0, flags, peer, mutualTLS) + tuple(key[3:]),
                                                 static, principal)))
    return tuple(labels[name] for name in TCP_LABELS)


def snapshotTcp(recorder: Any) -> Dict[Tuple[Any, ...], Any]:
    """
    A copy of the recorder's TCP counters, for L{SidecarCollector.snapshot}.
    """
    copies = {}
    for key, series in list(getattr(recorder, "tcp", {}).items()):
        copies[key] = SimpleNamespace(opened=series.opened, closed=series.closed,
                                      received=series.received, sent=series.sent)
    return copies


def tcpMetrics(recorder: Any, static: Mapping[str, str], principal: str) -> Iterator[Metric]:
    """
    Istio's TCP metrics from the recorder's TCP series: connections opened and closed,
    bytes received from clients and sent to them (counted as they flow; the bytes and
    openings of a connection still open are under C{response_flags="-"}, its closing
    under its final flags).
    """
    families = {
        "opened": CounterMetricFamily("istio_tcp_connections_opened_total",
                                      "TCP connections opened.", labels=TCP_LABELS),
        "closed": CounterMetricFamily("istio_tcp_connections_closed_total",
                                      "TCP connections closed.", labels=TCP_LABELS),
        "received": CounterMetricFamily("istio_tcp_received_bytes_total",
                                        "Bytes received from clients over TCP connections.", labels=TCP_LABELS),
        "sent": CounterMetricFamily("istio_tcp_sent_bytes_total",
                                    "Bytes sent to clients over TCP connections.", labels=TCP_LABELS),
    }
    merged: Dict[Tuple[str, ...], List[int]] = {}
    for key, series in list(getattr(recorder, "tcp", {}).items()):
        if not (series.opened or series.closed or series.received or series.sent):
            # Nothing counted (a connection's counts moved to its peer's labels once
            # its mutual TLS was verified): no series.
            continue
        labels = tcpLabels(key, static, principal)
        into = merged.setdefault(labels, [0, 0, 0, 0])
        into[0] += series.opened
        into[1] += series.closed
        into[2] += series.received
        into[3] += series.sent
    for labels, (opened, closed, received, sent) in sorted(merged.items()):
        families["opened"].add_metric(labels, opened)
        families["closed"].add_metric(labels, closed)
        families["received"].add_metric(labels, received)
        families["sent"].add_metric(labels, sent)
    yield from families.values()
