# -*- test-case-name: tests.test_admin -*-
"""
Tests for L{sidecar.admin}: every endpoint of the admin site, driven with raw HTTP
bytes through twisted.web's own channel over a L{StringTransport}, so that the client's
address can be anything (a non-loopback peer without a network namespace).
"""

from __future__ import annotations

import json
from typing import Any, Dict, Optional, Tuple

import attrs
import httptools
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.defer import Deferred
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from sidecar.admin import REDACTED, adminSite, configDump, healthSite, isLoopback
from sidecar.config import ProxyConfig, UpstreamConfig
from sidecar.drain import DRAINING
from tests.test_drain import Harness
from tests.test_metrics import Fixture, record


class Response:
    """
    A parsed HTTP response.
    """

    def __init__(self, raw: bytes) -> None:
        self.status = 0
        self.headers: Dict[str, str] = {}
        self.body = b""
        parser = httptools.HttpResponseParser(self)
        parser.feed_data(raw)
        self.status = parser.get_status_code()

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_body(self, body: bytes) -> None:
        self.body += body

    def json(self) -> Any:
        return json.loads(self.body)


LOOPBACK = IPv4Address("TCP", "127.0.0.1", 40000)


class AdminSiteMixin:
    """
    An admin site over a recorder with a few records and a live lifecycle.
    """

    def setUp(self) -> None:
        self.harness = Harness(self)
        self.lifecycle = self.harness.start()
        self.fixture = Fixture()
        for status in (200, 200, 404):
            self.fixture.recorder.record(record(status, sent=7))
        self.config = ProxyConfig(listen="tcp:8000", upstream=UpstreamConfig(port=8080), accessLog="/var/log/a.log")
        self.harness.reactor.advance(42)
        self.site = adminSite(self.fixture.collector, self.lifecycle, self.config, "1.2.3",
                              self.harness.reactor, startTime=0.0)

    def request(self, method: str, path: str, peer: Any = LOOPBACK, body: bytes = b"") -> Response:
        """
        Send one request from C{peer} and return the response.
        """
        transport = StringTransport(peerAddress=peer, hostAddress=IPv4Address("TCP", "127.0.0.1", 15000))
        channel = self.site.buildProtocol(peer)
        channel.makeConnection(transport)
        channel.dataReceived(
            f"{method} {path} HTTP/1.1\r\nHost: admin\r\nContent-Length: {len(body)}\r\n"
            f"Connection: close\r\n\r\n".encode("ascii") + body)
        channel.connectionLost(None)
        return Response(transport.value())


class ReadEndpointTests(AdminSiteMixin, SynchronousTestCase):
    """
    The C{GET} endpoints.
    """

    def test_prometheus(self) -> None:
        """
        C{/stats/prometheus} serves the Prometheus text format 0.0.4 with the recorded
        counts.
        """
        response = self.request("GET", "/stats/prometheus")
        self.assertEqual(response.status, 200)
        self.assertTrue(response.headers["content-type"].startswith("text/plain; version=0.0.4"))
        families = {f.name: f for f in text_string_to_metric_families(response.body.decode())}
        counts = {s.labels["response_code"]: s.value for s in families["istio_requests"].samples}
        self.assertEqual(counts, {"200": 2, "404": 1})

    def test_formattingOffloaded(self) -> None:
        """
        The metrics are formatted by the site's C{offload} (a thread pool in the
        service), from a snapshot taken when the request arrived; the response waits for
        it.
        """
        pending: list = []

        def offload(f: Any, *args: Any) -> Deferred:
            d: Deferred = Deferred()
            pending.append((d, f, args))
            return d

        self.site = adminSite(self.fixture.collector, self.lifecycle, self.config, "1.2.3",
                              self.harness.reactor, startTime=0.0, offload=offload)
        transport = StringTransport(peerAddress=LOOPBACK)
        channel = self.site.buildProtocol(LOOPBACK)
        channel.makeConnection(transport)
        channel.dataReceived(b"GET /stats/prometheus HTTP/1.1\r\nHost: admin\r\n\r\n")
        self.assertEqual(transport.value(), b"")
        self.fixture.recorder.record(record(200))
        d, f, args = pending.pop()
        d.callback(f(*args))
        response = Response(transport.value())
        self.assertEqual(response.status, 200)
        families = {f.name: f for f in text_string_to_metric_families(response.body.decode())}
        self.assertEqual({s.labels["response_code"]: s.value for s in families["istio_requests"].samples},
                         {"200": 2, "404": 1})
        channel.connectionLost(None)

    def test_statsFormatPrometheus(self) -> None:
        """
        C{/stats?format=prometheus} is the same text as C{/stats/prometheus}.
        """
        self.assertEqual(self.request("GET", "/stats?format=prometheus").body,
                         self.request("GET", "/stats/prometheus").body)

    def test_statsJSON(self) -> None:
        """
        C{/stats} is JSON with the same counters.
        """
        response = self.request("GET", "/stats")
        self.assertEqual(response.headers["content-type"], "application/json")
        counts = {s["labels"]["response_code"]: s["value"] for s in response.json()["stats"]
                  if s["name"] == "istio_requests_total"}
        self.assertEqual(counts, {"200": 2, "404": 1})
        self.assertEqual(self.request("GET", "/stats?format=xml").status, 400)

    def test_serverInfo(self) -> None:
        """
        C{/server_info} tells the version, the state, the uptime from the reactor's clock
        and the effective configuration.
        """
        info = self.request("GET", "/server_info").json()
        self.assertEqual((info["version"], info["state"], info["uptime_seconds"]), ("1.2.3", "LIVE", 42))
        self.assertEqual(info["configuration"]["upstream"]["port"], 8080)
        self.lifecycle.startDrain()
        self.assertEqual(self.request("GET", "/server_info").json()["state"], DRAINING)

    def test_configDump(self) -> None:
        """
        C{/config_dump} is the effective configuration as JSON, file paths included.
        """
        dump = self.request("GET", "/config_dump").json()
        self.assertEqual(dump["accessLog"], "/var/log/a.log")
        self.assertEqual(dump["lifecycle"]["drainTimeout"], 5.0)
        self.assertEqual(dump["mesh"]["workload"], "unknown")

    def test_ready(self) -> None:
        """
        C{/ready} answers 200 C{LIVE} while serving and 503 C{DRAINING} once draining.
        """
        response = self.request("GET", "/ready")
        self.assertEqual((response.status, response.body), (200, b"LIVE\n"))
        self.lifecycle.startDrain()
        response = self.request("GET", "/ready")
        self.assertEqual((response.status, response.body), (503, b"DRAINING\n"))

    def test_index(self) -> None:
        """
        C{/} lists the endpoints; an unknown path is 404.
        """
        self.assertIn(b"/quitquitquit", self.request("GET", "/").body)
        self.assertEqual(self.request("GET", "/nope").status, 404)


class MutationTests(AdminSiteMixin, SynchronousTestCase):
    """
    The C{POST} endpoints: POST only, loopback clients only.
    """

    def test_getIsMethodNotAllowed(self) -> None:
        """
        C{GET} on a mutation is 405 with C{Allow: POST}, and does nothing.
        """
        for path in ("/drain_listeners", "/quitquitquit", "/healthcheck/fail", "/healthcheck/ok"):
            response = self.request("GET", path)
            self.assertEqual(response.status, 405, path)
            self.assertIn("POST", response.headers.get("allow", ""), path)
        self.assertEqual(self.lifecycle.state, "LIVE")
        self.assertFalse(self.lifecycle.exiting)

    def test_drainListeners(self) -> None:
        """
        C{POST /drain_listeners} from loopback starts draining without exiting.
        """
        response = self.request("POST", "/drain_listeners")
        self.assertEqual(response.status, 200)
        self.assertEqual(self.lifecycle.state, DRAINING)
        self.assertTrue(self.harness.engine.draining)
        self.assertFalse(self.lifecycle.exiting)

    def test_quitquitquit(self) -> None:
        """
        C{POST /quitquitquit} from loopback answers 200 and, with nothing in flight,
        exits on the next turn of the reactor (once the answer is on its way), without
        the drain period.
        """
        response = self.request("POST", "/quitquitquit")
        self.assertEqual((response.status, response.body), (200, b"OK\n"))
        self.assertTrue(self.lifecycle.exiting)
        self.assertFalse(self.harness.stopped)
        self.harness.reactor.advance(0)
        self.assertTrue(self.harness.stopped)

    def test_quitquitquitFromElsewhere(self) -> None:
        """
        A client that is not on this host (IPv4, IPv6, or IPv4 mapped in IPv6) gets 403
        from every mutation, and nothing happens.
        """
        for peer in (IPv4Address("TCP", "10.1.2.3", 5555), IPv6Address("TCP", "fd00::5", 5555),
                     IPv6Address("TCP", "::ffff:10.1.2.3", 5555)):
            for path in ("/quitquitquit", "/drain_listeners", "/healthcheck/fail"):
                response = self.request("POST", path, peer=peer)
                self.assertEqual(response.status, 403, (peer, path))
        self.assertEqual(self.lifecycle.state, "LIVE")
        self.assertFalse(self.lifecycle.exiting)
        self.assertFalse(self.lifecycle.healthcheckFailed)

    def test_otherLoopbackAddresses(self) -> None:
        """
        127.0.0.2, C{::1} and C{::ffff:127.0.0.1} are loopback clients too.
        """
        for peer in (IPv4Address("TCP", "127.0.0.2", 1), IPv6Address("TCP", "::1", 1),
                     IPv6Address("TCP", "::ffff:127.0.0.1", 1)):
            self.assertEqual(self.request("POST", "/healthcheck/ok", peer=peer).status, 200, peer)

    def test_healthcheck(self) -> None:
        """
        C{/healthcheck/fail} makes C{/ready} answer 503; C{/healthcheck/ok} undoes it.
        """
        self.assertEqual(self.request("POST", "/healthcheck/fail").status, 200)
        self.assertEqual(self.request("GET", "/ready").status, 503)
        self.assertEqual(self.request("POST", "/healthcheck/ok").status, 200)
        self.assertEqual(self.request("GET", "/ready").status, 200)


class HealthSiteTests(AdminSiteMixin, SynchronousTestCase):
    """
    The network-facing health port: readiness and the metrics, nothing else.
    """

    def setUp(self) -> None:
        AdminSiteMixin.setUp(self)
        self.site = healthSite(self.fixture.collector, self.lifecycle, self.harness.reactor)

    def test_ready(self) -> None:
        """
        C{GET /ready} and C{GET /healthz/ready} (Istio's path) give the admin site's
        answer: 200 C{LIVE}, then 503 after a failed health check or once draining.
        """
        for path in ("/ready", "/healthz/ready"):
            response = self.request("GET", path)
            self.assertEqual((response.status, response.body), (200, b"LIVE\n"), path)
        self.lifecycle.failHealthcheck()
        for path in ("/ready", "/healthz/ready"):
            self.assertEqual(self.request("GET", path).status, 503, path)
        self.lifecycle.passHealthcheck()
        self.lifecycle.startDrain()
        for path in ("/ready", "/healthz/ready"):
            response = self.request("GET", path)
            self.assertEqual((response.status, response.body), (503, b"DRAINING\n"), path)

    def test_prometheus(self) -> None:
        """
        C{GET /stats/prometheus} serves the same exposition as the admin site.
        """
        response = self.request("GET", "/stats/prometheus")
        self.assertEqual(response.status, 200)
        self.assertTrue(response.headers["content-type"].startswith("text/plain; version=0.0.4"))
        families = {f.name: f for f in text_string_to_metric_families(response.body.decode())}
        counts = {s.labels["response_code"]: s.value for s in families["istio_requests"].samples}
        self.assertEqual(counts, {"200": 2, "404": 1})

    def test_nothingElse(self) -> None:
        """
        Every other path is 404, from any client, and no mutation happens: the
        configuration, the JSON stats, the index and the actions stay on the admin site.
        """
        for method, path in [("GET", "/"), ("GET", "/config_dump"), ("GET", "/server_info"), ("GET", "/stats"),
                             ("GET", "/stats?format=json"), ("GET", "/stats/prometheus/"), ("GET", "/ready/x"),
                             ("GET", "/healthz"), ("GET", "/healthz/ready/"), ("POST", "/quitquitquit"),
                             ("POST", "/drain_listeners"), ("POST", "/healthcheck/fail"), ("GET", "/nope")]:
            for peer in (LOOPBACK, IPv4Address("TCP", "10.1.2.3", 5555)):
                self.assertEqual(self.request(method, path, peer=peer).status, 404, (method, path))
        self.assertEqual(self.lifecycle.state, "LIVE")
        self.assertFalse(self.lifecycle.exiting)
        self.assertFalse(self.lifecycle.healthcheckFailed)


@attrs.frozen
class FakeTLS:
    cert: str = "/etc/certs/cert.pem"
    key: str = "/etc/certs/key.pem"
    keyData: bytes = b"\x30\x82"
    inline: str = "-----BEGIN PRIVATE KEY-----\nMII...\n-----END PRIVATE KEY-----\n"
    passphrase: Optional[str] = "hunter2"
    allow: Tuple[str, ...] = ("spiffe://cluster.local/ns/a/sa/b",)


@attrs.frozen
class ConfigWithTLS:
    listen: str = "tcp:8000"
    tls: FakeTLS = FakeTLS()


class PureTests(SynchronousTestCase):
    """
    L{configDump} and L{isLoopback}.
    """

    def test_configDumpRedacts(self) -> None:
        """
        The configuration dump shows file paths and plain settings, never bytes, PEM
        text or a field named like a secret.
        """
        dump = configDump(ConfigWithTLS())
        self.assertEqual(dump["tls"]["cert"], "/etc/certs/cert.pem")
        self.assertEqual(dump["tls"]["key"], "/etc/certs/key.pem")
        self.assertEqual(dump["tls"]["allow"], ["spiffe://cluster.local/ns/a/sa/b"])
        self.assertEqual((dump["tls"]["keyData"], dump["tls"]["inline"], dump["tls"]["passphrase"]),
                         (REDACTED, REDACTED, REDACTED))
        self.assertNotIn("MII", json.dumps(dump))
        self.assertNotIn("hunter2", json.dumps(dump))

    def test_isLoopback(self) -> None:
        """
        Loopback means 127.0.0.0/8, C{::1}, their IPv4-mapped form, or a UNIX socket.
        """
        self.assertTrue(isLoopback(IPv4Address("TCP", "127.255.0.1", 1)))
        self.assertTrue(isLoopback(UNIXAddress(b"/run/admin.sock")))
        self.assertFalse(isLoopback(IPv4Address("TCP", "192.168.1.1", 1)))
        self.assertFalse(isLoopback(IPv6Address("TCP", "::", 1)))
        self.assertFalse(isLoopback(None))
