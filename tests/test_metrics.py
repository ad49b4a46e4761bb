# -*- test-case-name: tests.test_metrics -*-
"""
Tests for L{sidecar.metrics}: Istio's names and labels read from the recorder, the
Prometheus text (parsed back with C{prometheus_client.parser}, and linted by C{promtool}
when it is installed), the JSON view, and the workload labels from flags and the pod's
environment.  No reactor runs, no network is used.
"""

from __future__ import annotations

import shutil
import subprocess
from types import SimpleNamespace
from typing import Any, Dict, List, Tuple

from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from sidecar.config import MeshLabels, UpstreamConfig
from sidecar.exchange import Engine
from sidecar.record import Record
from sidecar.metrics import (
    ISTIO_LABELS,
    SidecarCollector,
    prometheusText,
    runtimeCollectors,
    seriesLabels,
    staticLabels,
    statsJSON,
    workloadFromPodName,
    workloadLabels,
)
from sidecar.stats import DEFAULT_BUCKETS, Recorder
from sidecar.upstream import UpstreamPool

CLIENT = "spiffe://cluster.local/ns/frontend/sa/web"
OURS = "spiffe://cluster.local/ns/shop/sa/reviews"


def record(status: int, flags: str = "-", duration: float = 0.010, received: int = 0, sent: int = 0,
           protocol: str = "HTTP/1.1", peer: str = "", mutualTLS: bool = False) -> Record:
    """
    A finished exchange with the given outcome.
    """
    return Record(1_700_000_000.0, duration, None, received, sent, status, "GET", "/", protocol,
                  "svc", "127.0.0.1:8080", flags, "id", "", "test", "127.0.0.1:5000", peer, mutualTLS)


#: The known mix: (status, flags, duration s, request bytes, response bytes).
MIX: List[Tuple[int, str, float, int, int]] = [
    (200, "-", 0.0004, 0, 100),
    (200, "-", 0.003, 10, 2000),
    (200, "-", 0.120, 0, 0),
    (404, "-", 0.002, 0, 9),
    (404, "-", 0.002, 0, 9),
    (503, "-", 0.007, 5, 30),
    (504, "UT", 1.0, 0, 24),
    (0, "DC", 0.3, 0, 0),
]


def families(text: bytes) -> Dict[str, object]:
    """
    The parsed families of a Prometheus text, by name.
    """
    return {family.name: family for family in text_string_to_metric_families(text.decode("utf-8"))}


class Fixture:
    """
    A recorder, pool and engine as the service builds them, and their collector.
    """

    def __init__(self, mesh: MeshLabels = MeshLabels(), localPrincipal: str = "", runtime: Any = (),
                 accessLog: Any = None) -> None:
        clock = MemoryReactorClock()
        self.recorder = Recorder()
        self.pool = UpstreamPool(clock, clock, UpstreamConfig(port=8080))
        self.engine = Engine(clock, self.pool, self.recorder)
        self.collector = SidecarCollector(self.recorder, self.pool, self.engine, mesh, 1_700_000_000.5,
                                          "9.9.9", localPrincipal=lambda: localPrincipal, runtime=runtime,
                                          accessLog=accessLog)


class PrometheusTextTests(SynchronousTestCase):
    """
    L{prometheusText} over a recorder fed a known mix of outcomes.
    """

    def setUp(self) -> None:
        self.fixture = Fixture(MeshLabels(workload="reviews-v1", namespace="shop", app="reviews",
                                          version="v1", service="reviews.shop.svc.cluster.local",
                                          principal=OURS),
                               runtime=runtimeCollectors(),
                               accessLog=SimpleNamespace(dropped=0, buffered=0, limit=1024))
        for status, flags, duration, received, sent in MIX:
            self.fixture.recorder.record(record(status, flags, duration, received, sent))
        self.parsed = families(prometheusText(self.fixture.collector))

    def samples(self, family: str, suffix: str = "") -> Dict[Tuple[str, str], float]:
        """
        C{(response_code, response_flags)} to value for the samples C{family + suffix}
        (the C{+Inf} bucket for C{_bucket}).
        """
        out = {}
        for sample in self.parsed[family].samples:
            if sample.name != family + suffix:
                continue
            if suffix == "_bucket" and sample.labels["le"] != "+Inf":
                continue
            key = (sample.labels["response_code"], sample.labels["response_flags"])
            out[key] = sample.value
        return out

    def test_requestCounts(self) -> None:
        """
        C{istio_requests_total} counts each (code, flags) outcome exactly as recorded.
        """
        self.assertEqual(self.samples("istio_requests", "_total"), {
            ("200", "-"): 3, ("404", "-"): 2, ("503", "-"): 1, ("504", "UT"): 1, ("0", "DC"): 1,
        })

    def test_histogramCounts(self) -> None:
        """
        Each histogram's count and +Inf bucket equal the request count of its series, and
        its sum is the sum of the observations (milliseconds for durations, bytes for
        sizes).
        """
        expected = self.samples("istio_requests", "_total")
        for name in ("istio_request_duration_milliseconds", "istio_request_bytes", "istio_response_bytes"):
            self.assertEqual(self.samples(name, "_count"), expected, name)
            self.assertEqual(self.samples(name, "_bucket"), expected, name)
        sums = self.samples("istio_response_bytes", "_sum")
        self.assertEqual(sums[("200", "-")], 2100)
        self.assertEqual(sums[("404", "-")], 18)
        self.assertAlmostEqual(self.samples("istio_request_duration_milliseconds", "_sum")[("504", "UT")], 1000.0)

    def test_envoyBuckets(self) -> None:
        """
        The histograms use Envoy's default buckets, cumulative: the 0.4 ms request is in
        every bucket, the 3 ms one from C{le="5"} on, the 120 ms one from C{le="250"} on.
        """
        buckets = [(float(s.labels["le"]), s.value) for s in self.parsed["istio_request_duration_milliseconds"].samples
                   if s.name.endswith("_bucket") and s.labels["response_code"] == "200"]
        self.assertEqual([le for le, _ in buckets], list(DEFAULT_BUCKETS) + [float("inf")])
        byBound = dict(buckets)
        self.assertEqual((byBound[0.5], byBound[1], byBound[5], byBound[100], byBound[250]), (1, 1, 2, 2, 3))

    def test_istioLabels(self) -> None:
        """
        Every request series carries Istio's standard labels: reporter C{destination},
        the workload's identity, C{http}, and C{unknown} for the peer of plaintext
        traffic.
        """
        sample = self.parsed["istio_requests"].samples[0]
        self.assertEqual(set(sample.labels), set(ISTIO_LABELS))
        self.assertEqual(sample.labels["reporter"], "destination")
        self.assertEqual(sample.labels["destination_workload"], "reviews-v1")
        self.assertEqual(sample.labels["destination_workload_namespace"], "shop")
        self.assertEqual(sample.labels["destination_app"], "reviews")
        self.assertEqual(sample.labels["destination_version"], "v1")
        self.assertEqual(sample.labels["destination_service"], "reviews.shop.svc.cluster.local")
        self.assertEqual(sample.labels["destination_service_name"], "reviews")
        self.assertEqual(sample.labels["destination_service_namespace"], "shop")
        self.assertEqual(sample.labels["request_protocol"], "http")
        self.assertEqual(sample.labels["connection_security_policy"], "none")
        self.assertEqual(sample.labels["source_principal"], "unknown")
        self.assertEqual(sample.labels["destination_principal"], "unknown")

    def test_sidecarGauges(self) -> None:
        """
        The proxy's own numbers are exposed under C{sidecar_}, read from the recorder,
        the pool and the engine at scrape time.
        """
        recorder, pool = self.fixture.recorder, self.fixture.pool
        recorder.downstreamConnectionsActive, recorder.downstreamConnectionsTotal = 2, 7
        recorder.requestsActive = 1
        pool.active, pool.connecting, pool.connects, pool.connectFailures = 3, 1, 11, 4
        pool.idle.extend([object(), object()])
        pool.pending.extend([object()] * 5)
        pool.overflows = 9
        self.fixture.engine.draining = True
        parsed = families(prometheusText(self.fixture.collector))

        def value(name: str, **labels: str) -> float:
            for family in parsed.values():
                for sample in family.samples:
                    if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                        return sample.value
            raise KeyError(name)

        self.assertEqual(value("sidecar_downstream_connections_active"), 2)
        self.assertEqual(value("sidecar_downstream_connections_total"), 7)
        self.assertEqual(value("sidecar_requests_active"), 1)
        self.assertEqual(value("sidecar_upstream_connections", state="active"), 3)
        self.assertEqual(value("sidecar_upstream_connections", state="idle"), 2)
        self.assertEqual(value("sidecar_upstream_connections", state="connecting"), 1)
        self.assertEqual(value("sidecar_upstream_connects_total"), 11)
        self.assertEqual(value("sidecar_upstream_connect_failures_total"), 4)
        self.assertEqual(value("sidecar_upstream_pending_requests"), 5)
        self.assertEqual(value("sidecar_upstream_overflows_total"), 9)
        self.assertEqual(value("sidecar_downstream_received_bytes_total"), 15)
        self.assertEqual(value("sidecar_downstream_sent_bytes_total"), 2172)
        self.assertEqual(value("sidecar_draining"), 1)
        self.assertEqual(value("sidecar_process_start_time_seconds"), 1_700_000_000.5)
        self.assertEqual(value("sidecar_build_info", version="9.9.9"), 1)

    def test_istioBuild(self) -> None:
        """
        C{istio_build} is a gauge of 1 with Istio's labels: C{component="proxy"} and
        the version as C{tag}.
        """
        [sample] = self.parsed["istio_build"].samples
        self.assertEqual((self.parsed["istio_build"].type, sample.labels, sample.value),
                         ("gauge", {"component": "proxy", "tag": "9.9.9"}, 1))

    def test_processAndPlatform(self) -> None:
        """
        C{prometheus_client}'s process and platform collectors are in the exposition
        with this process's real numbers: resident memory, open descriptors, CPU time,
        start time, and C{python_info}.
        """
        import platform
        import resource

        def value(name: str) -> float:
            return [s.value for f in self.parsed.values() for s in f.samples if s.name == name][0]

        self.assertGreater(value("process_resident_memory_bytes"), 1024 * 1024)
        self.assertGreaterEqual(value("process_open_fds"), 3)
        self.assertGreater(value("process_cpu_seconds_total"), 0)
        self.assertEqual(value("process_max_fds"), resource.getrlimit(resource.RLIMIT_NOFILE)[0])
        [info] = self.parsed["python_info"].samples
        self.assertEqual((info.labels["implementation"], info.labels["version"]),
                         (platform.python_implementation(), platform.python_version()))

    def test_runtimeReadWhenScraped(self) -> None:
        """
        The runtime collectors are read once per scrape (in the formatting thread, from
        a snapshot too), never when a request is recorded.
        """
        calls = []

        class Counting:
            def collect(self) -> Any:
                calls.append(1)
                return iter(())

        fixture = Fixture(runtime=(Counting(),))
        for _ in range(100):
            fixture.recorder.record(record(200))
        self.assertEqual(calls, [])
        prometheusText(fixture.collector)
        prometheusText(fixture.collector.snapshot())
        self.assertEqual(calls, [1, 1])

    def test_accessLogGauges(self) -> None:
        """
        The access log's dropped records and the bytes it holds are exposed, as they
        were when the snapshot was taken.
        """
        log = SimpleNamespace(dropped=3, buffered=4096, limit=65536)
        fixture = Fixture(accessLog=log)
        snapshot = fixture.collector.snapshot()
        log.dropped = 5
        for collector, dropped in ((snapshot, 3), (fixture.collector, 5)):
            parsed = families(prometheusText(collector))
            self.assertEqual(parsed["sidecar_access_log_dropped_records"].samples[0].value, dropped)
            self.assertEqual(parsed["sidecar_access_log_dropped_records"].type, "counter")
            self.assertEqual(parsed["sidecar_access_log_buffered_bytes"].samples[0].value, 4096)
        self.assertNotIn("sidecar_access_log_dropped_records", families(prometheusText(Fixture().collector)))

    def test_readAtScrapeTime(self) -> None:
        """
        A record that arrives between two scrapes shows in the second: nothing is cached.
        """
        self.fixture.recorder.record(record(200))
        parsed = families(prometheusText(self.fixture.collector))
        total = sum(s.value for s in parsed["istio_requests"].samples
                    if s.name == "istio_requests_total" and s.labels["response_code"] == "200")
        self.assertEqual(total, 4)

    def test_snapshot(self) -> None:
        """
        A snapshot holds the numbers of the moment it was taken: records and gauge
        changes that come later (while another thread formats it) do not show in it.
        """
        snapshot = self.fixture.collector.snapshot()
        self.fixture.recorder.record(record(200, sent=5))
        self.fixture.recorder.requestsActive = 9
        self.fixture.engine.draining = True
        frozen = families(prometheusText(snapshot))
        self.assertEqual(families(prometheusText(snapshot)).keys(), self.parsed.keys())
        counts = {s.labels["response_code"]: s.value for s in frozen["istio_requests"].samples
                  if s.labels["response_code"] == "200"}
        self.assertEqual(counts, {"200": 3})
        self.assertEqual(frozen["sidecar_requests_active"].samples[0].value, 0)
        self.assertEqual(frozen["sidecar_draining"].samples[0].value, 0)

    def test_jsonSameNumbers(self) -> None:
        """
        C{/stats}'s JSON holds the same numbers as the Prometheus text: each counter value
        and each histogram's count, sum and buckets.
        """
        data = statsJSON(self.fixture.collector)
        counters = {(s["labels"]["response_code"], s["labels"]["response_flags"]): s["value"]
                    for s in data["stats"] if s["name"] == "istio_requests_total"}
        self.assertEqual(counters, self.samples("istio_requests", "_total"))
        histograms = [s for s in data["stats"] if s["name"] == "istio_request_duration_milliseconds"]
        self.assertEqual({(h["labels"]["response_code"], h["labels"]["response_flags"]): h["count"]
                          for h in histograms}, counters)
        ok = [h for h in histograms if h["labels"]["response_code"] == "200"][0]
        self.assertEqual(ok["buckets"][0], ["0.5", 1])
        self.assertEqual(ok["buckets"][-1], ["+Inf", 3])
        self.assertAlmostEqual(ok["sum"], 123.4)
        gauges = {s["name"]: s["value"] for s in data["stats"] if s["type"] == "gauge" and not s["labels"]}
        self.assertEqual(gauges["sidecar_requests_active"], 0)

    def test_promtool(self) -> None:
        """
        C{promtool check metrics} finds no error in the text; its only remarks are about
        the units of Istio's own metric names (milliseconds, bytes), which must stay as
        Istio spells them.
        """
        promtool = shutil.which("promtool")
        if promtool is None:
            raise self.skipTest("promtool is not installed (Debian package prometheus; .ci/run installs it)")
        done = subprocess.run([promtool, "check", "metrics"], input=prometheusText(self.fixture.collector),
                              capture_output=True, timeout=60)
        self.assertEqual(promtoolProblems(done.stdout + done.stderr), [])
        self.assertIn(done.returncode, (0, 3))  # 3: lint remarks only, 1: errors
        # What the README tells operators to expect, exactly (process_*, python_info,
        # istio_build and the sidecar's own names add no remark).
        self.assertEqual((done.returncode, (done.stdout + done.stderr).decode().strip()),
                         (3, PROMTOOL_REMARK))


#: The one remark of C{promtool check metrics} (Prometheus 2.42) on the exposition.
PROMTOOL_REMARK = 'istio_request_duration_milliseconds use base unit "seconds" instead of "milliseconds"'


def promtoolProblems(output: bytes) -> List[str]:
    """
    The lines of C{promtool check metrics} output that are not the expected remark on
    Istio's C{istio_request_duration_milliseconds} name.
    """
    problems = []
    for line in output.decode("utf-8", "replace").splitlines():
        if not line.strip():
            continue
        if line.startswith("istio_request_duration_milliseconds") and 'base unit "seconds"' in line:
            continue
        problems.append(line)
    return problems


class LabelTests(SynchronousTestCase):
    """
    L{seriesLabels} and L{staticLabels}: per-series labels from the recorder's key.
    """

    def labels(self, key: tuple, mesh: MeshLabels = MeshLabels(principal=OURS)) -> Dict[str, str]:
        return dict(zip(ISTIO_LABELS, seriesLabels(key, staticLabels(mesh), mesh.principal)))

    def test_mutualTLS(self) -> None:
        """
        Under mutual TLS the source principal is the client's SPIFFE id, the source
        namespace comes from it, the destination principal is ours and the policy is
        C{mutual_tls}.
        """
        labels = self.labels(("HTTP/1.1", 200, "-", CLIENT, True))
        self.assertEqual(labels["connection_security_policy"], "mutual_tls")
        self.assertEqual(labels["source_principal"], CLIENT)
        self.assertEqual(labels["source_workload_namespace"], "frontend")
        self.assertEqual(labels["destination_principal"], OURS)

    def test_plaintext(self) -> None:
        """
        Plaintext traffic has policy C{none} and C{unknown} principals on both sides.
        """
        labels = self.labels(("HTTP/1.0", 502, "UF", "", False))
        self.assertEqual((labels["connection_security_policy"], labels["source_principal"],
                          labels["destination_principal"], labels["response_flags"], labels["response_code"],
                          labels["request_protocol"]),
                         ("none", "unknown", "unknown", "UF", "502", "http"))

    def test_httpVersionsMerged(self) -> None:
        """
        HTTP/1.0 and HTTP/1.1 series are one C{request_protocol="http"} series whose
        counts and histograms are their sums.
        """
        fixture = Fixture()
        fixture.recorder.record(record(200, protocol="HTTP/1.0", sent=10))
        fixture.recorder.record(record(200, protocol="HTTP/1.1", sent=20))
        merged = fixture.collector.requestSeries()
        self.assertEqual(len(merged), 1)
        series = list(merged.values())[0]
        self.assertEqual((series.requests, series.responseBytes.count, series.responseBytes.sum), (2, 2, 30))

    def test_certificatePrincipalWins(self) -> None:
        """
        The SPIFFE id of the certificate in use is the destination principal, over the
        one guessed from the environment.
        """
        fixture = Fixture(MeshLabels(principal="spiffe://guess/ns/a/sa/b"), localPrincipal=OURS)
        fixture.recorder.record(record(200, peer=CLIENT, mutualTLS=True))
        (labels,) = fixture.collector.requestSeries()
        self.assertEqual(dict(zip(ISTIO_LABELS, labels))["destination_principal"], OURS)

    def test_canonicalDefaults(self) -> None:
        """
        Without an app the canonical service is the workload, and without a version the
        canonical revision is C{latest}, as in Istio.
        """
        static = staticLabels(MeshLabels(workload="batch"))
        self.assertEqual((static["destination_canonical_service"], static["destination_canonical_revision"]),
                         ("batch", "latest"))


class WorkloadLabelsTests(SynchronousTestCase):
    """
    L{workloadLabels} and L{workloadFromPodName}.
    """

    def test_podNames(self) -> None:
        """
        Generated pod-name suffixes are dropped: a Deployment's two, a DaemonSet's one, a
        StatefulSet's ordinal; other names stay.
        """
        self.assertEqual(workloadFromPodName("reviews-v1-545db77b95-2ps7q"), "reviews-v1")
        self.assertEqual(workloadFromPodName("node-agent-x7k2p"), "node-agent")
        self.assertEqual(workloadFromPodName("web-0"), "web")
        self.assertEqual(workloadFromPodName("standalone"), "standalone")

    def test_fromEnvironment(self) -> None:
        """
        The pod's environment fills every label: workload from C{POD_NAME}, namespace,
        app and version, the service host and the SPIFFE id.
        """
        labels = workloadLabels({
            "POD_NAME": "reviews-v2-7d4c8b9f6d-xbcdf", "POD_NAMESPACE": "shop", "SERVICE_ACCOUNT": "reviews",
            "APP": "reviews", "APP_VERSION": "v2", "ISTIO_META_CLUSTER_ID": "Kubernetes",
        })
        self.assertEqual(labels, MeshLabels(
            workload="reviews-v2", namespace="shop", app="reviews", version="v2",
            service="reviews.shop.svc.cluster.local", principal=OURS, cluster="Kubernetes"))

    def test_flagsWin(self) -> None:
        """
        A flag wins over the environment; C{ISTIO_META_WORKLOAD_NAME} wins over
        C{POD_NAME}; C{TRUST_DOMAIN} changes the principal's trust domain.
        """
        labels = workloadLabels({"POD_NAME": "x-0", "ISTIO_META_WORKLOAD_NAME": "meta", "POD_NAMESPACE": "ns",
                                 "SERVICE_ACCOUNT": "sa", "TRUST_DOMAIN": "example.org", "APP": "env-app"},
                                app="flag-app", version="v9")
        self.assertEqual((labels.workload, labels.app, labels.version, labels.service, labels.principal),
                         ("meta", "flag-app", "v9", "flag-app.ns.svc.cluster.local",
                          "spiffe://example.org/ns/ns/sa/sa"))

    def test_unknown(self) -> None:
        """
        With neither flags nor environment, every label is C{unknown}.
        """
        self.assertEqual(workloadLabels({}), MeshLabels())


class TLSMetricsTests(SynchronousTestCase):
    """
    Under mutual TLS, the handshake, denial and rotation counters are exported.
    """

    def test_tlsCounters(self):
        """
        The L{sidecar.mtls.MutualTLS} counters appear as C{sidecar_tls_*_total}, taken
        from the snapshot at scrape time; without mutual TLS there are none.
        """
        from types import SimpleNamespace

        from prometheus_client.parser import text_string_to_metric_families

        from sidecar.config import MeshLabels
        from sidecar.metrics import SidecarCollector, prometheusText
        from sidecar.stats import Recorder

        tls = SimpleNamespace(handshakes=7, handshakeFailures=2, handshakeTimeouts=1, denials=3,
                              context=SimpleNamespace(rotations=4, failures=1))
        pool = SimpleNamespace(active=0, idle=[], connecting=0, connects=0, connectFailures=0, pending=[],
                               overflows=0)
        engine = SimpleNamespace(draining=False)
        collector = SidecarCollector(Recorder(), pool, engine, MeshLabels(), 0.0, "v", tls=tls)
        text = prometheusText(collector.snapshot()).decode()
        values = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}
        self.assertEqual(
            [values[n] for n in ("sidecar_tls_handshakes_total", "sidecar_tls_handshake_failures_total",
                                 "sidecar_tls_handshake_timeouts_total", "sidecar_tls_denials_total",
                                 "sidecar_tls_rotations_total", "sidecar_tls_rotation_failures_total")],
            [7, 2, 1, 3, 4, 1])
        plain = prometheusText(SidecarCollector(Recorder(), pool, engine, MeshLabels(), 0.0, "v")).decode()
        self.assertNotIn("sidecar_tls_", plain)
