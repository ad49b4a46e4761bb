# -*- test-case-name: tests.test_tcp -*-
"""
Opaque TCP passthrough: the splice on string transports and a memory reactor (bytes,
producers, half-close, failures, the idle sweep, the record and the counters), the
original destination, the flags, the TCP access-log formats and metrics; then real
programs on loopback through a real sidecar: redis-server (SET/GET, a 10 MB value,
MONITOR streaming), an SMTP server (server-first, aiosmtpd), a gRPC service (grpcio,
unary and streaming), a refused connect and a connection with no original
destination.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import socket
import struct
import threading
import time
from typing import Any, List

from twisted.internet import reactor
from twisted.internet.error import ConnectionDone, ConnectionLost, ConnectionRefusedError
from twisted.internet.interfaces import IHalfCloseableDescriptor
from twisted.internet.protocol import Factory
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.internet.threads import blockingCallFromThread, deferToThread
from twisted.python import usage
from twisted.python.failure import Failure
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase
from zope.interface import implementer

from sidecar.accesslog import TCP_FORMATS, formatTcpSeed, formatTcpText, toJSON, toTcpJSON
from sidecar.config import MeshLabels
from sidecar.metrics import SidecarCollector, prometheusText
from sidecar.origdst import Destination, dialled, originalDestination, parseSockaddr
from sidecar.stats import Recorder
from sidecar.tap import Options
from sidecar.record import TcpRecord
from sidecar.tcp import PIPE_BYTES, TcpProxy, kernelSpliceable
from tests.support import PYTHON, ChildProcess, freePort, portAnswers

PEERS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "peers")


@implementer(IHalfCloseableDescriptor)
class HalfTransport(StringTransport):
    """
    A string transport that takes half-closes, as a TCP transport does.
    """

    writeClosed = False
    aborted = False

    def loseWriteConnection(self) -> None:
        self.writeClosed = True

    def abortConnection(self) -> None:
        self.aborted = True
        StringTransport.abortConnection(self)


class SpliceTests(SynchronousTestCase):
    """
    L{TcpSplice} between a client transport and the connection it makes.
    """

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.reactor.advance(1000.0)
        self.records: List[TcpRecord] = []
        self.recorder = Recorder()
        self.recorder.tcpSinks.append(self.records.append)
        self.proxy = TcpProxy(self.reactor, self.recorder, connectTimeout=3.0, idleTimeout=60.0)

    def open(self, identify: Any = None) -> Any:
        splice = self.proxy.splice("127.0.0.1", 6379, "tcp", identify)
        client = HalfTransport()
        splice.makeConnection(client)
        return splice, client

    def connectUpstream(self, index: int = 0) -> Any:
        factory = self.reactor.tcpClients[index][2]
        side = factory.buildProtocol(None)
        upstream = HalfTransport()
        side.makeConnection(upstream)
        return side, upstream

    def test_bytesBeforeTheConnectGoFirst(self):
        """
        While the connect is under way the client is not read from and its bytes are
        held; once connected they are written first, the two transports are tied
        with streaming producers both ways, and the client is read again.  The
        connect goes to the service with the connect timeout.
        """
        splice, client = self.open()
        self.assertEqual(client.producerState, "paused")
        splice.dataReceived(b"*1\r\n")
        splice.dataReceived(b"$4\r\nPING\r\n")
        host, port, _, timeout, _ = self.reactor.tcpClients[0]
        self.assertEqual((host, port, timeout), ("127.0.0.1", 6379, 3.0))
        side, upstream = self.connectUpstream()
        self.assertEqual(upstream.value(), b"*1\r\n$4\r\nPING\r\n")
        self.assertEqual((client.producer, client.streaming), (upstream, True))
        self.assertEqual((upstream.producer, upstream.streaming), (client, True))
        self.assertEqual(client.producerState, "producing")

    def test_bytesBothWaysCountedAsTheyFlow(self):
        """
        Bytes pass unchanged both ways and are in the recorder's TCP series before
        the connection ends; the one record at the end has them, the service and no
        flag.
        """
        splice, client = self.open()
        side, upstream = self.connectUpstream()
        splice.dataReceived(b"SET k v\r\n")
        side.dataReceived(b"+OK\r\n")
        series = self.recorder.tcp[("-", "", False, "inbound", None)]
        self.assertEqual((series.opened, series.received, series.sent, series.closed), (1, 9, 5, 0))
        self.assertEqual((upstream.value(), client.value()), (b"SET k v\r\n", b"+OK\r\n"))
        self.reactor.advance(2.5)
        splice.connectionLost(Failure(ConnectionDone()))
        self.assertTrue(upstream.disconnecting)
        side.connectionLost(Failure(ConnectionDone()))
        [rec] = self.records
        self.assertEqual((rec.bytesReceived, rec.bytesSent, rec.upstreamHost, rec.flags, rec.duration,
                          rec.startTime, rec.protocol),
                         (9, 5, "127.0.0.1:6379", "-", 2.5, 1000.0, "tcp"))
        self.assertEqual(self.recorder.tcp[("-", "", False, "inbound", None)].closed, 1)

    def test_halfCloseIsPassedOnAsFin(self):
        """
        The client's FIN becomes a FIN to the service, while the service's answer
        still reaches the client; then the service's FIN reaches the client and both
        are closed.  Nothing is reset.
        """
        splice, client = self.open()
        side, upstream = self.connectUpstream()
        splice.dataReceived(b"QUIT\r\n")
        splice.readConnectionLost()
        self.assertTrue(upstream.writeClosed)
        self.assertFalse(client.disconnecting)
        side.dataReceived(b"+OK\r\n")
        self.assertEqual(client.value(), b"+OK\r\n")
        side.readConnectionLost()
        self.assertTrue(client.writeClosed)
        self.assertTrue(client.disconnecting and upstream.disconnecting)
        self.assertFalse(client.aborted or upstream.aborted)

    def test_finBeforeTheConnect(self):
        """
        A client that sends and half-closes before the service answered the connect:
        its bytes, then the FIN, reach the service.
        """
        splice, client = self.open()
        splice.dataReceived(b"data")
        splice.readConnectionLost()
        side, upstream = self.connectUpstream()
        self.assertEqual((upstream.value(), upstream.writeClosed), (b"data", True))

    def test_connectFailureClosesTheClient(self):
        """
        A refused connect closes the client's connection (a FIN, not a reset), and
        the record says UF and why.
        """
        splice, client = self.open()
        factory = self.reactor.tcpClients[0][2]
        factory.clientConnectionFailed(None, Failure(ConnectionRefusedError()))
        self.assertTrue(client.disconnecting)
        self.assertFalse(client.aborted)
        splice.connectionLost(Failure(ConnectionDone()))
        [rec] = self.records
        self.assertEqual(rec.flags, "UF")
        self.assertIn("refused", rec.detail)

    def test_serviceResetIsUC(self):
        """
        The service's connection ending in error closes the client gracefully; UC.
        """
        splice, client = self.open()
        side, upstream = self.connectUpstream()
        side.connectionLost(Failure(ConnectionLost()))
        self.assertTrue(client.disconnecting)
        self.assertFalse(client.aborted)
        splice.connectionLost(Failure(ConnectionDone()))
        self.assertEqual([r.flags for r in self.records], ["UC"])

    def test_clientResetIsDC(self):
        """
        The client's connection ending in error closes the service's; DC.
        """
        splice, client = self.open()
        side, upstream = self.connectUpstream()
        splice.connectionLost(Failure(ConnectionLost()))
        self.assertTrue(upstream.disconnecting)
        side.connectionLost(Failure(ConnectionDone()))
        self.assertEqual([r.flags for r in self.records], ["DC"])

    def test_clientLeavesDuringTheConnect(self):
        """
        A client gone before the connect completes stops the connect; one record, DC.
        """
        splice, client = self.open()
        splice.connectionLost(Failure(ConnectionDone()))
        self.assertTrue(self.reactor.connectors[0].stoppedConnecting)
        self.assertEqual([r.flags for r in self.records], ["DC"])

    def test_idleSweepCloses(self):
        """
        The sweep closes both sides of a splice on which nothing moved for the idle
        timeout (SI), and leaves a busy one alone.
        """
        idle, idleClient = self.open()
        _, idleUpstream = self.connectUpstream(0)
        busy, busyClient = self.open()
        self.connectUpstream(1)
        for now in (0.0, 30.0, 59.0):
            busy.dataReceived(b"x")
            self.proxy.sweep(now)
        self.assertFalse(idleClient.disconnecting)
        self.proxy.sweep(61.0)
        self.assertTrue(idleClient.disconnecting and idleUpstream.disconnecting)
        self.assertFalse(busyClient.disconnecting)
        self.assertEqual(idle.flags, ["SI"])

    def test_drainClosesBothSides(self):
        """
        Closing a splice gracefully (as drain does, through the detector) closes both
        sides with a FIN once their bytes are out, and records no flag.
        """
        from sidecar.detect import TCP, DetectingFactory

        detector = DetectingFactory({TCP: lambda d: self.proxy.splice("127.0.0.1", 6379, d.how)},
                                    self.reactor, None, {12345: TCP}).buildProtocol(None)
        client = HalfTransport()
        detector.makeConnection(client)
        side, upstream = self.connectUpstream()
        detector.loseConnection()
        self.assertTrue(client.disconnecting and upstream.disconnecting)
        self.assertFalse(client.aborted or upstream.aborted)
        detector.connectionLost(Failure(ConnectionDone()))
        side.connectionLost(Failure(ConnectionDone()))
        self.assertEqual([(r.flags, r.detected) for r in self.records], [("-", "declared")])

    def test_refusedIdentity(self):
        """
        Under mutual TLS a client the policy refuses is closed without a connect to
        the service; the record has its principal and RBAC.
        """
        splice, client = self.open(identify=lambda transport: ("spiffe://td/ns/a/sa/b", False))
        self.assertEqual(self.reactor.tcpClients, [])
        self.assertTrue(client.disconnecting)
        splice.connectionLost(Failure(ConnectionDone()))
        [rec] = self.records
        self.assertEqual((rec.flags, rec.downstreamPeerPrincipal, rec.mutualTLS),
                         ("RBAC", "spiffe://td/ns/a/sa/b", True))

    def test_refusal(self):
        """
        A refusal records NR with its reason and closes the connection.
        """
        proto = self.proxy.refusal("no original destination")
        transport = HalfTransport()
        proto.makeConnection(transport)
        self.assertTrue(transport.disconnecting)
        [rec] = self.records
        self.assertEqual((rec.flags, rec.detail), ("NR", "no original destination"))

    def test_countedAsClientConnections(self):
        """
        A spliced connection is a client connection in C{sidecar_downstream_connections_*}
        as the doors' are, active until its record, whatever ended it (a connect
        failure too); a refused one (NR) is counted as accepted.
        """
        recorder = self.recorder
        splice, client = self.open()
        other, otherClient = self.open()
        self.assertEqual((recorder.downstreamConnectionsActive, recorder.downstreamConnectionsTotal), (2, 2))
        side, upstream = self.connectUpstream()
        splice.connectionLost(Failure(ConnectionDone()))
        side.connectionLost(Failure(ConnectionDone()))
        self.reactor.tcpClients[1][2].clientConnectionFailed(None, Failure(ConnectionRefusedError()))
        other.connectionLost(Failure(ConnectionDone()))
        self.assertEqual([r.flags for r in self.records], ["-", "UF"])
        self.assertEqual((recorder.downstreamConnectionsActive, recorder.downstreamConnectionsTotal), (0, 2))
        self.proxy.refusal("no original destination").makeConnection(HalfTransport())
        self.assertEqual((recorder.downstreamConnectionsActive, recorder.downstreamConnectionsTotal), (0, 3))


class PoolTotalsTests(SynchronousTestCase):
    """
    With C{--upstream original} the C{sidecar_upstream_*} families sum the pools of
    every port dialled.
    """

    def test_everyPortsPoolIsInTheGauges(self):
        """
        The configured pool and two per-port pools: each gauge and counter is the sum,
        the idle connections and waiting requests of all of them are counted, and a
        pool made after the collector is built is in the next scrape.
        """
        from types import SimpleNamespace

        from sidecar.config import UpstreamConfig
        from sidecar.origdst import OriginalDestinations

        def pool(**numbers: Any) -> Any:
            values = dict(active=0, idle=[], connecting=0, connects=0, connectFailures=0, pending=[], overflows=0)
            values.update(numbers)
            return SimpleNamespace(**values)

        originals = OriginalDestinations(MemoryReactorClock(), UpstreamConfig(original=True), None)
        first = pool(active=1, connects=1)
        totals = originals.totals(first)
        collector = SidecarCollector(Recorder(), totals, SimpleNamespace(draining=False), MeshLabels(), 0.0)
        originals.pools[6379] = pool(active=2, idle=[1, 2], connects=5, connectFailures=1, overflows=1)
        originals.pools[25] = pool(connecting=1, pending=[1], connects=3, connectFailures=2)
        text = prometheusText(collector.snapshot()).decode()
        for line in ('sidecar_upstream_connections{state="active"} 3.0',
                     'sidecar_upstream_connections{state="idle"} 2.0',
                     'sidecar_upstream_connections{state="connecting"} 1.0',
                     "sidecar_upstream_connects_total 9.0", "sidecar_upstream_connect_failures_total 3.0",
                     "sidecar_upstream_pending_requests 1.0", "sidecar_upstream_overflows_total 1.0"):
            self.assertIn(line, text.splitlines())



class OriginalDestinationTests(SynchronousTestCase):
    """
    Reading C{SO_ORIGINAL_DST}.
    """

    def test_parseSockaddr(self):
        """
        A C{sockaddr_in} and a C{sockaddr_in6} as the kernel returns them (family in
        host order, port and address in network order) parse to host and port.
        """
        v4 = struct.pack("=H", socket.AF_INET) + struct.pack("!H", 6379) + socket.inet_aton("10.1.2.3") + b"\0" * 8
        self.assertEqual(parseSockaddr(v4), ("10.1.2.3", 6379))
        v6 = (struct.pack("=H", socket.AF_INET6) + struct.pack("!H", 25) + b"\0" * 4
              + socket.inet_pton(socket.AF_INET6, "fd00::7") + b"\0" * 4)
        self.assertEqual(parseSockaddr(v6), ("fd00::7", 25))
        self.assertIsNone(parseSockaddr(b"\x01"))

    def test_notRedirected(self):
        """
        A plain loopback connection has no original destination other than its own
        address, so it is not redirected.
        """
        server = socket.socket()
        self.addCleanup(server.close)
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        client = socket.create_connection(server.getsockname())
        self.addCleanup(client.close)
        accepted, _ = server.accept()
        self.addCleanup(accepted.close)
        found = originalDestination(accepted)
        self.assertIn(found, (None, server.getsockname()))

    def test_dialledWithoutASocket(self):
        """
        A transport without a socket dialled its own address, not redirected.
        """
        transport = StringTransport()
        self.assertEqual(dialled(transport), Destination("10.0.0.1", 12345, False))


class FlagTests(SynchronousTestCase):
    """
    The protocol flags, refused with one sentence when wrong.
    """

    def parse(self, *argv: str) -> Any:
        options = Options()
        options.parseOptions(["--admin", "none", *argv])
        return options["config"]

    def test_declaredPorts(self):
        """
        C{--port-protocol} (repeatable) and C{--opaque-ports} become sorted pairs.
        """
        config = self.parse("--port-protocol", "50051=grpc", "--port-protocol", "8080=HTTP",
                            "--opaque-ports", "6379, 25")
        self.assertEqual(config.portProtocols, ((25, "tcp"), (6379, "tcp"), (8080, "http"), (50051, "grpc")))

    def test_badDeclarations(self):
        """
        An unknown protocol, a bad port and a port declared two ways are refused.
        """
        for argv, words in ((["--port-protocol", "80=ftp"], "--port-protocol"),
                            (["--port-protocol", "80"], "--port-protocol"),
                            (["--opaque-ports", "6379,x"], "--opaque-ports"),
                            (["--opaque-ports", "0"], "--opaque-ports"),
                            (["--port-protocol", "80=http", "--opaque-ports", "80"], "both http and tcp")):
            with self.assertRaises(usage.UsageError) as e:
                self.parse(*argv)
            self.assertIn(words, str(e.exception))

    def test_detectTimeoutAndOriginal(self):
        """
        The detection timeout defaults to 1 s, 0 means none; C{--upstream original}
        sets the original-destination mode.
        """
        self.assertEqual(self.parse().protocolDetectTimeout, 1.0)
        self.assertIsNone(self.parse("--protocol-detect-timeout", "0").protocolDetectTimeout)
        with self.assertRaises(usage.UsageError):
            self.parse("--protocol-detect-timeout", "soon")
        config = self.parse("--upstream", "original")
        self.assertEqual((config.upstream.original, config.upstream.address), (True, "127.0.0.1:original"))

    def test_originalWithTheTLSListener(self):
        """
        C{--upstream original} with a separate mutual-TLS listener is refused (its
        connections are not redirected); permissive mode is the way.
        """
        from tests.tlsfixtures import writeMesh

        mesh = writeMesh(self.mktemp())
        files = ["--tls-cert", mesh.crt("backend"), "--tls-key", mesh.key("backend"),
                 "--tls-ca", os.path.join(mesh.directory, "ca.crt")]
        with self.assertRaises(usage.UsageError) as e:
            self.parse("--upstream", "original", "--tls-listen", "0", *files)
        self.assertIn("--tls-mode permissive", str(e.exception))
        config = self.parse("--upstream", "original", "--tls-mode", "permissive", *files)
        self.assertTrue(config.tls.permissive)

    def test_originalCannotBeCheckedForReadiness(self):
        """
        C{--upstream original} has no one service port for readiness to check.
        """
        for flag in (["--ready-requires-upstream"], ["--wait-for-upstream", "5"]):
            with self.assertRaises(usage.UsageError) as e:
                self.parse("--upstream", "original", *flag)
            self.assertIn("--upstream original", str(e.exception))


RECORD = TcpRecord(1700000000.25, 1.5, 10, 20, "127.0.0.1:6379", "UC", "10.0.0.2:5555",
                   "spiffe://td/ns/a/sa/b", True, "tcp", "the service's connection ended")


class FormatTests(SynchronousTestCase):
    """
    The access log's TCP formats.
    """

    def test_text(self):
        """
        The text line has the HTTP line's columns with Envoy's dashes for TCP.
        """
        self.assertEqual(
            formatTcpText(RECORD),
            '[2023-11-14T22:13:20.250Z] "- - -" 0 UC 10 20 1500 - "-" "-" "-" "-" "127.0.0.1:6379" 10.0.0.2:5555\n')

    def test_json(self):
        """
        The JSON object has every key of the HTTP one, and says how TCP was chosen
        and why the connection ended.
        """
        fields = json.loads(TCP_FORMATS["json"](RECORD))
        from sidecar.exchange import Record

        http = toJSON(Record(0.0, 0.0, None, 0, 0, 200, "GET", "/", "HTTP/1.1", "", "", "-", "", "", "", "x:1"))
        self.assertLessEqual(set(http), set(fields))
        self.assertEqual(fields, toTcpJSON(RECORD))
        self.assertEqual((fields["protocol"], fields["response_code"], fields["method"], fields["bytes_sent"],
                          fields["downstream_peer_principal"], fields["detected"]),
                         ("tcp", 0, None, 20, "spiffe://td/ns/a/sa/b", "tcp"))
        self.assertIn("ended", fields["connection_termination_details"])

    def test_seed(self):
        """
        The seed block says where from and to, how long, the bytes and the flags.
        """
        self.assertEqual(formatTcpSeed(RECORD),
                         "TCP Connection: 10.0.0.2:5555 -> 127.0.0.1:6379\nConnection Duration: 1.5s\n"
                         "Bytes Received: 10\nBytes Sent: 20\nResponse Flags: UC\n\n")


class SinkTests(SynchronousTestCase):
    """
    TCP records go through the access log's one writer.
    """

    def test_inOrderWithTheHttpRecords(self):
        """
        A TCP record written between two HTTP records comes out between them, in the
        TCP format, and the writer formats HTTP records as before afterwards.
        """
        from sidecar.accesslog import AccessLog, LogOutput, formatText, tcpSink
        from sidecar.exchange import Record

        read, write = os.pipe()
        self.addCleanup(os.close, read)
        writer = AccessLog(LogOutput(write), formatText, MemoryReactorClock())
        self.addCleanup(writer.output.close)
        http = Record(1700000000.0, 0.001, None, 0, 2, 200, "GET", "/x", "HTTP/1.1", "a", "127.0.0.1:80", "-",
                      "", "", "", "10.0.0.2:1")
        writer(http)
        tcpSink(writer, formatTcpText)(RECORD)
        writer(http)
        writer.flush()
        lines = os.read(read, 65536).decode().splitlines()
        self.assertEqual([line.split('"')[1] for line in lines], ["GET /x HTTP/1.1", "- - -", "GET /x HTTP/1.1"])
        self.assertIs(writer.format, formatText)


class MetricsTests(SynchronousTestCase):
    """
    Istio's TCP metrics from the recorder's TCP series.
    """

    def test_exposition(self):
        """
        The four families carry Istio's labels with C{request_protocol="tcp"}, the
        security policy and the principals, in a snapshot taken before formatting.
        """
        recorder = Recorder()
        series = recorder.tcpSeries("-", "spiffe://td/ns/caller/sa/x", True)
        series.opened, series.received, series.sent = 2, 100, 300
        recorder.recordTcp(RECORD)
        pool = type("P", (), {"active": 0, "idle": [], "connecting": 0, "connects": 0, "connectFailures": 0,
                              "pending": [], "overflows": 0})()
        engine = type("E", (), {"draining": False})()
        collector = SidecarCollector(recorder, pool, engine, MeshLabels(workload="redis"), 0.0,
                                     localPrincipal=lambda: "spiffe://td/ns/db/sa/redis")
        text = prometheusText(collector.snapshot()).decode()
        sent = [line for line in text.splitlines() if line.startswith("istio_tcp_sent_bytes_total{")]
        self.assertEqual(len(sent), 2, sent)
        line = [s for s in sent if 'response_flags="-"' in s][0]
        for label in ('request_protocol="tcp"', 'connection_security_policy="mutual_tls"',
                      'source_principal="spiffe://td/ns/caller/sa/x"', 'source_workload_namespace="caller"',
                      'destination_principal="spiffe://td/ns/db/sa/redis"', 'destination_workload="redis"',
                      'reporter="destination"'):
            self.assertIn(label, line)
        self.assertNotIn("response_code", line)
        self.assertTrue(line.endswith(" 300.0"), line)
        self.assertIn('istio_tcp_connections_closed_total{', text)
        closed = [s for s in text.splitlines() if s.startswith("istio_tcp_connections_closed_total{")
                  and 'response_flags="UC"' in s]
        self.assertEqual(len(closed), 1)


# -- real programs on loopback ---------------------------------------------------------


def recv(sock: socket.socket, size: int) -> bytes:
    """
    Read exactly C{size} bytes.
    """
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise AssertionError(f"connection closed after {len(data)} of {size} bytes: {data[:200]!r}")
        data += chunk
    return data


def resp(*words: bytes) -> bytes:
    """
    A Redis command in RESP.
    """
    return b"*%d\r\n" % len(words) + b"".join(b"$%d\r\n%s\r\n" % (len(w), w) for w in words)


def redisExchange(port: int, host: str = "127.0.0.1") -> tuple:
    """
    One raw connection to Redis through the proxy whose every byte is known: SET, GET,
    then a half-close.  Returns the bytes sent and received.
    """
    sent = resp(b"SET", b"exact", b"x" * 1000) + resp(b"GET", b"exact")
    expected = b"+OK\r\n$1000\r\n" + b"x" * 1000 + b"\r\n"
    with socket.create_connection((host, port), timeout=10) as s:
        s.sendall(sent)
        got = recv(s, len(expected))
        s.shutdown(socket.SHUT_WR)
        assert s.recv(10) == b"", "the proxy did not pass the service's FIN on"
    assert got == expected, got[:100]
    return len(sent), len(got)


def redisMonitor(port: int, commands: int = 200, host: str = "127.0.0.1") -> int:
    """
    MONITOR through the proxy streams one line per command that another connection
    through the proxy sends; returns how many lines were seen.
    """
    with socket.create_connection((host, port), timeout=10) as monitor:
        monitor.sendall(resp(b"MONITOR"))
        assert recv(monitor, 5) == b"+OK\r\n"
        with socket.create_connection((host, port), timeout=10) as writer:
            for i in range(commands):
                writer.sendall(resp(b"SET", b"m%d" % i, b"v"))
                assert recv(writer, 5) == b"+OK\r\n"
        mine = b'"SET" "m'  # other connections may be writing at the same time (a 10 MB SET)
        seen, tail = 0, b""
        deadline = time.monotonic() + 20
        while seen < commands and time.monotonic() < deadline:
            chunk = tail + monitor.recv(1 << 20)
            seen += chunk.count(mine)
            tail = chunk[-(len(mine) - 1):]
    return seen


def redisPy(port: int, host: str = "127.0.0.1") -> None:
    """
    redis-py through the proxy: SET/GET and a 10 MB value, byte for byte.
    """
    import redis

    client = redis.Redis(host=host, port=port, socket_timeout=20)
    try:
        assert client.set("greeting", "hello")
        assert client.get("greeting") == b"hello"
        big = os.urandom(10 * 1024 * 1024)
        assert client.set("big", big)
        assert client.get("big") == big
    finally:
        client.close()


def smtpSession(port: int, host: str = "127.0.0.1") -> tuple:
    """
    A whole SMTP session through the proxy: the greeting (the server speaks first),
    a message, QUIT.  Returns the greeting and the seconds it took.
    """
    import smtplib

    started = time.monotonic()
    client = smtplib.SMTP(timeout=15)
    code, greeting = client.connect(host, port)
    waited = time.monotonic() - started
    assert code == 220, (code, greeting)
    client.sendmail("a@example.com", ["b@example.com"], "Subject: via sidecar\r\n\r\nhello through TCP\r\n")
    client.quit()
    return greeting, waited


def grpcClient(port: int, host: str = "127.0.0.1") -> bytes:
    """
    The greeter's client (unary and streaming) through the proxy, as a child program.
    """
    import subprocess

    done = subprocess.run([PYTHON, os.path.join(PEERS, "grpc_greeter.py"), "client", f"{host}:{port}"],
                          capture_output=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def missing(*programs: str, modules: tuple = ()) -> str | None:
    for program in programs:
        if shutil.which(program) is None:
            return f"needs {program}"
    for module in modules:
        if importlib.util.find_spec(module) is None:
            return f"needs the {module} Python package (pip install -r requirements-test.txt)"
    return None


def jsonRecords(path: str) -> List[dict]:
    """
    The access log's JSON records in C{path}.
    """
    with open(path) as f:
        return [json.loads(line) for line in f if line.startswith("{")]


class LoopbackCase(TestCase):
    """
    Real programs behind a real sidecar on 127.0.0.1, no REDIRECT.
    """

    def startService(self, argv: List[str], port: int) -> Any:
        child = ChildProcess(self, argv, stopSignal=15)
        return portAnswers(port).addCallback(lambda _: child)

    def startProxy(self, upstream: str, *args: str) -> Any:
        """
        Start the sidecar in front of C{upstream}, logging JSON to a file; fire with
        its listening port once it answers.
        """
        port = freePort()
        self.admin = freePort()
        self.log = self.mktemp()
        argv = [PYTHON, "-c", "from twisted.scripts.twistd import run; run()", "-n", "--pidfile=", "sidecar",
                "--listen", f"tcp:{port}:interface=127.0.0.1", "--upstream", upstream,
                "--admin", f"tcp:{self.admin}:interface=127.0.0.1", "--log-format", "json",
                "--access-log", self.log, "--connect-timeout", "2",
                *[a.replace("{port}", str(port)) for a in args]]
        self.proxy = ChildProcess(self, argv)
        return portAnswers(port).addCallback(lambda _: port)

    def records(self, count: int) -> List[dict]:
        """
        Wait (up to 10 s) until the access log has C{count} TCP records; return them.
        """
        deadline = time.monotonic() + 10
        while True:
            found = [r for r in jsonRecords(self.log) if r["protocol"] == "tcp"] if os.path.exists(self.log) else []
            if len(found) >= count or time.monotonic() > deadline:
                return found
            time.sleep(0.05)

    def metrics(self) -> str:
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{self.admin}/stats/prometheus", timeout=10) as r:
            return r.read().decode()


def tcpTotal(text: str, name: str) -> float:
    """
    The sum of every series of metric C{name} in a Prometheus text exposition.
    """
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + "{"))


class RedisLoopbackTests(LoopbackCase):
    """
    A real redis-server behind the sidecar, found by detection (nothing declared).
    """

    def setUp(self) -> Any:
        reason = missing("redis-server", modules=("redis",))
        if reason:
            raise SkipTest(reason)
        self.redisPort = freePort()
        d = self.startService(["/usr/bin/env", "redis-server", "--port", str(self.redisPort), "--bind", "127.0.0.1",
                               "--save", "", "--appendonly", "no"], self.redisPort)
        d.addCallback(lambda _: self.startProxy(str(self.redisPort)))
        d.addCallback(lambda port: setattr(self, "port", port))
        return d

    def test_redisThroughTheProxy(self):
        """
        redis-py's SET/GET and a 10 MB value round-trip byte for byte; MONITOR streams
        every command of another connection; a raw connection's record has exactly
        the bytes sent and received and no flag; the TCP metrics' byte totals equal
        the records' sums, and every connection opened was closed.
        """
        def run() -> None:
            redisPy(self.port)
            self.assertEqual(redisMonitor(self.port), 200)
            sent, received = redisExchange(self.port)
            records = self.records(4)
            self.assertEqual(len(records), 4, records)
            exact = [r for r in records if r["bytes_received"] == sent]
            self.assertEqual([(r["bytes_sent"], r["response_flags"], r["detected"], r["upstream_host"])
                              for r in exact], [(received, "-", "tcp", f"127.0.0.1:{self.redisPort}")])
            big = max(records, key=lambda r: r["bytes_received"])
            self.assertGreater(big["bytes_received"], 10 * 1024 * 1024)
            text = self.metrics()
            self.assertEqual(tcpTotal(text, "istio_tcp_received_bytes_total"),
                             sum(r["bytes_received"] for r in records))
            self.assertEqual(tcpTotal(text, "istio_tcp_sent_bytes_total"), sum(r["bytes_sent"] for r in records))
            self.assertEqual(tcpTotal(text, "istio_tcp_connections_opened_total"), 4)
            self.assertEqual(tcpTotal(text, "istio_tcp_connections_closed_total"), 4)
            self.assertIn('request_protocol="tcp"', text)
        return deferToThread(run)


class ServerFirstLoopbackTests(LoopbackCase):
    """
    A real SMTP server (aiosmtpd): the client waits for the greeting.
    """

    def setUp(self) -> Any:
        reason = missing(modules=("aiosmtpd",))
        if reason:
            raise SkipTest(reason)
        self.smtpPort = freePort()
        self.smtp = ChildProcess(self, [PYTHON, "-m", "aiosmtpd", "-n", "-l", f"127.0.0.1:{self.smtpPort}"],
                                 stopSignal=15)
        return portAnswers(self.smtpPort)

    def test_greetingAfterTheDetectionTimeout(self):
        """
        Undeclared, the silent client goes to TCP when the detection timeout (here
        0.3 s) passes: it gets the greeting and completes a session, and the message
        reaches the server; the record says it was told by the timeout.
        """
        def run() -> None:
            greeting, waited = smtpSession(self.port)
            self.assertGreaterEqual(waited, 0.3)
            records = self.records(1)
            self.assertEqual([(r["detected"], r["response_flags"]) for r in records], [("timeout", "-")])
            deadline = time.monotonic() + 5
            while b"hello through TCP" not in self.smtp.out and time.monotonic() < deadline:
                time.sleep(0.05)
            self.assertIn(b"hello through TCP", self.smtp.out)
        d = self.startProxy(str(self.smtpPort), "--protocol-detect-timeout", "0.3")
        d.addCallback(lambda port: setattr(self, "port", port))
        return d.addCallback(lambda _: deferToThread(run))

    def test_declaredPortIsNotKeptWaiting(self):
        """
        Declared opaque, the port is spliced at once: with a 30 s detection timeout
        the greeting still comes at once.
        """
        def run() -> None:
            greeting, waited = smtpSession(self.port)
            self.assertLess(waited, 10)
            # (The readiness probe's empty connection is spliced too: the port is declared.)
            self.assertEqual([r["detected"] for r in self.records(2) if r["bytes_received"]], ["declared"])
        d = self.startProxy(str(self.smtpPort), "--protocol-detect-timeout", "30", "--opaque-ports", "{port}")
        d.addCallback(lambda port: setattr(self, "port", port))
        return d.addCallback(lambda _: deferToThread(run))


class GrpcLoopbackTests(LoopbackCase):
    """
    A real gRPC service (grpcio): the HTTP/2 preface is detected and the calls go to
    the HTTP/2 door, at L7 (they passed as opaque TCP before the HTTP/2 codec).
    """

    def setUp(self) -> Any:
        reason = missing(modules=("grpc",))
        if reason:
            raise SkipTest(reason)
        self.grpcPort = freePort()
        d = self.startService([PYTHON, os.path.join(PEERS, "grpc_greeter.py"), "server",
                               f"127.0.0.1:{self.grpcPort}"], self.grpcPort)
        d.addCallback(lambda _: self.startProxy(str(self.grpcPort)))
        d.addCallback(lambda port: setattr(self, "port", port))
        return d

    def test_unaryAndStreaming(self):
        """
        A unary call and a 50-reply stream pass through; each is an HTTP/2 record with
        gRPC status 0 and its message counts, and no TCP record is left.
        """
        def run() -> None:
            self.assertIn(b"ok unary stream=50", grpcClient(self.port))
            deadline = time.monotonic() + 10
            calls: List[dict] = []
            while len(calls) < 2 and time.monotonic() < deadline:
                time.sleep(0.05)
                calls = [r for r in jsonRecords(self.log) if r["protocol"] == "HTTP/2"] if os.path.exists(self.log) else []
            self.assertEqual([(r["grpc_status"], r["response_flags"]) for r in calls], [("0", "-"), ("0", "-")])
            self.assertEqual(sorted(r["response_messages"] for r in calls), [1, 50])
            self.assertEqual([r for r in jsonRecords(self.log) if r["protocol"] == "tcp"], [])
        return deferToThread(run)


class FailureLoopbackTests(LoopbackCase):
    """
    Connections the proxy cannot pass on.
    """

    def test_refusedConnectClosesTheClient(self):
        """
        With nothing on the service's port, the client's bytes get a clean close (no
        reset) and the record says UF.
        """
        def run() -> None:
            with socket.create_connection(("127.0.0.1", self.port), timeout=10) as s:
                s.sendall(b"\x00hello")
                self.assertEqual(s.recv(10), b"")
            self.assertEqual([r["response_flags"] for r in self.records(1)], ["UF"])
        d = self.startProxy(str(freePort()))
        d.addCallback(lambda port: setattr(self, "port", port))
        return d.addCallback(lambda _: deferToThread(run))

    def test_noOriginalDestination(self):
        """
        With C{--upstream original} and no REDIRECT, the connection is closed and the
        record says NR and why.
        """
        def run() -> None:
            with socket.create_connection(("127.0.0.1", self.port), timeout=10) as s:
                self.assertEqual(s.recv(10), b"")
            # The readiness probe's connection was refused the same way.
            records = self.records(2)
            self.assertEqual({r["response_flags"] for r in records}, {"NR"})
            self.assertIn("no original destination", records[-1]["connection_termination_details"])
        d = self.startProxy("original")
        d.addCallback(lambda port: setattr(self, "port", port))
        return d.addCallback(lambda _: deferToThread(run))


class MutualTLSTcpTests(TestCase):
    """
    Opaque TCP under mutual TLS: on a permissive port, a TLS ClientHello goes to the
    mutual-TLS layer and detection runs again on the decrypted stream; Redis bytes
    there are spliced to a real redis-server with the client's identity on the
    record, or refused by the policy.
    """

    def setUp(self) -> Any:
        reason = missing("redis-server")
        if reason:
            raise SkipTest(reason)
        from tests.tlsfixtures import FRONTEND_ID, writeMesh

        self.frontend = FRONTEND_ID
        self.mesh = writeMesh(self.mktemp())
        self.redisPort = freePort()
        d = LoopbackCase.startService(self, ["/usr/bin/env", "redis-server", "--port", str(self.redisPort), "--bind",
                                             "127.0.0.1", "--save", "", "--appendonly", "no"], self.redisPort)
        return d.addCallback(lambda _: self.startSidecar())

    def startSidecar(self) -> Any:
        from sidecar.config import ProxyConfig, TLSConfig, UpstreamConfig
        from sidecar.service import SidecarService

        self.port = freePort()
        config = ProxyConfig(
            listen=f"tcp:{self.port}:interface=127.0.0.1",
            upstream=UpstreamConfig(port=self.redisPort),
            accessLog=None, admin=None,
            tls=TLSConfig(listen=None, cert=self.mesh.crt("backend"), key=self.mesh.key("backend"),
                          ca=os.path.join(self.mesh.directory, "ca.crt"), allow=(self.frontend,),
                          mode="permissive"),
        )
        self.service = SidecarService(config, reactor)
        self.records: List[TcpRecord] = []
        self.service.recorder.tcpSinks.append(self.records.append)
        self.service.startService()
        self.addCleanup(self.service.stopService)
        return portAnswers(self.port)

    def ping(self, name: str | None) -> bytes:
        """
        PING through the proxy, over mutual TLS as C{name}, or plain for C{None}.
        """
        import ssl

        raw = socket.create_connection(("127.0.0.1", self.port), timeout=10)
        sock: Any = raw
        try:
            if name is not None:
                context = ssl.create_default_context(cafile=os.path.join(self.mesh.directory, "ca.crt"))
                context.check_hostname = False
                context.load_cert_chain(self.mesh.crt(name), self.mesh.key(name))
                sock = context.wrap_socket(raw)
            sock.sendall(resp(b"PING"))
            try:
                answer = sock.recv(100)
                if name is not None and answer:
                    sock = sock.unwrap()  # close_notify: a clean end of the TLS stream
                return answer
            except (ssl.SSLError, ConnectionError):
                return b""
        finally:
            sock.close()

    def waitRecords(self, count: int) -> List[TcpRecord]:
        deadline = time.monotonic() + 10
        while len(self.records) < count and time.monotonic() < deadline:
            time.sleep(0.05)
        return list(self.records)

    def test_identityOnTheRecord(self):
        """
        An allowed client's PING over mutual TLS gets Redis's PONG, and its record
        says mutual TLS with its SPIFFE id; a plain client on the same port gets its
        PONG too, recorded without identity; a client the policy refuses gets
        nothing and a record with RBAC.
        """
        def run() -> None:
            self.assertEqual(self.ping("frontend"), b"+PONG\r\n")
            self.assertEqual(self.ping(None), b"+PONG\r\n")
            self.assertEqual(self.ping("evil"), b"")
            records = self.waitRecords(3)
            got = sorted((r.mutualTLS, r.downstreamPeerPrincipal, r.flags, r.bytesReceived) for r in records)
            self.assertEqual(got, sorted([
                (True, self.frontend, "-", 14), (False, "", "-", 14),
                (True, "spiffe://cluster.local/ns/default/sa/evil", "RBAC", 14)]))
            tls = self.service.tls
            self.assertEqual((tls.handshakes, tls.denials), (2, 1))
        return deferToThread(run)


#: A repeating pattern, so that a byte out of place changes the hash.
PATTERN = bytes(range(251)) * 4200


def sendPattern(sock: socket.socket, total: int) -> bytes:
    """
    Send C{total} bytes of L{PATTERN} over and over; return their SHA-256.
    """
    digest = hashlib.sha256()
    left = total
    while left:
        part = PATTERN[: min(left, len(PATTERN))]
        sock.sendall(part)
        digest.update(part)
        left -= len(part)
    return digest.digest()


def readAll(sock: socket.socket, limit: int = 1 << 30) -> tuple:
    """
    Read until the peer's FIN (at most C{limit} bytes); return the count and SHA-256.
    """
    digest = hashlib.sha256()
    total = 0
    while total < limit:
        data = sock.recv(1 << 20)
        if not data:
            break
        total += len(data)
        digest.update(data)
    return total, digest.digest()


class KernelSpliceTests(TestCase):
    """
    The splice between two plain TCP sockets on the real reactor, moved by the kernel
    (C{splice(2)} through a pipe): every byte in order, the pipe the only buffer,
    backpressure, half-close and resets, the counters.  The client and the service are
    blocking sockets in threads.
    """

    timeout = 60

    def setUp(self) -> None:
        if not hasattr(os, "splice"):
            raise SkipTest("needs os.splice (Linux, Python 3.10 or later)")
        self.records: List[TcpRecord] = []
        self.recorder = Recorder()
        self.recorder.tcpSinks.append(self.records.append)
        self.proxy = TcpProxy(reactor, self.recorder, connectTimeout=5.0, idleTimeout=None)
        self.service = socket.socket()
        self.addCleanup(self.service.close)
        self.service.bind(("127.0.0.1", 0))
        self.service.listen(8)
        self.service.settimeout(10)
        servicePort = self.service.getsockname()[1]
        self.splices: List[Any] = []

        self.replayed = b""

        def build(addr: Any) -> Any:
            splice = self.proxy.splice("127.0.0.1", servicePort, "declared")
            self.splices.append(splice)
            made = splice.connectionMade

            def connectionMade() -> None:
                # As the detector replays what it read while detecting.
                made()
                if self.replayed:
                    splice.dataReceived(self.replayed)

            splice.connectionMade = connectionMade  # type: ignore[method-assign]
            return splice

        factory = Factory()
        factory.buildProtocol = build  # type: ignore[method-assign]
        listening = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(listening.stopListening)
        self.port = listening.getHost().port

    def connect(self) -> tuple:
        """
        A client connection through the proxy and the service's side of it.
        """
        client = socket.create_connection(("127.0.0.1", self.port), timeout=20)
        self.addCleanup(client.close)
        accepted, _ = self.service.accept()
        accepted.settimeout(20)
        self.addCleanup(accepted.close)
        return client, accepted

    def record(self) -> TcpRecord:
        """
        Wait (up to 10 s) for the one record.
        """
        deadline = time.monotonic() + 10
        while not self.records and time.monotonic() < deadline:
            time.sleep(0.02)
        self.assertEqual(len(self.records), 1, self.records)
        return self.records[0]

    def test_largeTransfersBothWaysByteExact(self):
        """
        64 MiB each way at the same time arrive byte for byte, each followed by its
        FIN; nearly all of it went through the kernel's path (both directions), the
        record and the metric series count every byte, and the pipes are closed.  Both
        sockets have Nagle's delay off, as Envoy's C{tcp_proxy}.
        """
        total = 64 << 20

        def run() -> None:
            client, service = self.connect()
            results: dict = {}

            def serviceSends() -> None:
                results["serviceSent"] = sendPattern(service, total)
                service.shutdown(socket.SHUT_WR)

            def serviceReads() -> None:
                results["serviceGot"] = readAll(service)

            def clientReads() -> None:
                results["clientGot"] = readAll(client)

            workers = [threading.Thread(target=f) for f in (serviceSends, serviceReads, clientReads)]
            for worker in workers:
                worker.start()
            splice = self.splices[0]
            deadline = time.monotonic() + 10
            paths = ()
            while not paths and time.monotonic() < deadline:
                paths = blockingCallFromThread(reactor, lambda: splice.kernelPaths)
                time.sleep(0.01)
            nodelay = blockingCallFromThread(
                reactor, lambda: (splice.transport.getTcpNoDelay(), splice.upstream.transport.getTcpNoDelay()))
            self.assertEqual(nodelay, (True, True))
            clientSent = sendPattern(client, total)
            client.shutdown(socket.SHUT_WR)
            for worker in workers:
                worker.join(30)
            clientGot = results["clientGot"]
            self.assertEqual(results["serviceGot"], (total, clientSent))
            self.assertEqual(clientGot, (total, results["serviceSent"]))
            record = self.record()
            self.assertEqual((record.bytesReceived, record.bytesSent, record.flags), (total, total, "-"))
            series = self.recorder.tcp[("-", "", False, "inbound", None)]
            self.assertEqual((series.received, series.sent), (total, total))
            self.assertEqual(len(paths), 2)
            for path in paths:
                self.assertGreater(path.moved, total * 9 // 10)
            self.assertEqual(splice.kernelPaths, ())

        return deferToThread(run)

    def test_bytesHeldByTwistedGoFirst(self):
        """
        Bytes handed over before the connect (4 MiB, as the detector replays what it
        read) are written by Twisted; the client's bytes read meanwhile take Twisted's
        path too, and the kernel's only once Twisted holds nothing: the service gets
        them all in order.
        """
        self.replayed = PATTERN[:1000] * 4200
        total = 32 << 20

        def run() -> None:
            client, service = self.connect()
            results: dict = {}
            reader = threading.Thread(target=lambda: results.setdefault("got", readAll(service)))
            reader.start()
            sent = sendPattern(client, total)
            client.shutdown(socket.SHUT_WR)
            reader.join(30)
            expected = hashlib.sha256(self.replayed)
            left = total
            while left:
                part = PATTERN[: min(left, len(PATTERN))]
                expected.update(part)
                left -= len(part)
            self.assertNotEqual(sent, expected.digest())
            self.assertEqual(results["got"], (len(self.replayed) + total, expected.digest()))
            service.close()
            record = self.record()
            self.assertEqual(record.bytesReceived, len(self.replayed) + total)

        return deferToThread(run)

    def test_slowReaderBoundsWhatIsHeld(self):
        """
        A service that does not read: the client can only send what the socket
        buffers and one pipe hold (well under 64 MiB), the proxy holds at most one pipe
        of it (Twisted buffers nothing) and has stopped reading the client; once the
        service reads, everything arrives in order and the client's FIN follows.
        """
        cap = 256 << 20

        def run() -> None:
            client, service = self.connect()
            service.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 256 * 1024)
            client.setblocking(False)
            digest = hashlib.sha256()
            sent = 0
            stalled = time.monotonic()
            view = memoryview(PATTERN)
            while sent < cap and time.monotonic() - stalled < 1.5:
                try:
                    n = client.send(view)
                except BlockingIOError:
                    time.sleep(0.01)
                    continue
                digest.update(view[:n])
                sent += n
                stalled = time.monotonic()
            self.assertLess(sent, 64 << 20)
            splice = self.splices[0]

            def held() -> tuple:
                upstream = splice.upstream.transport
                path = splice.kernelPaths[0]
                return (path.pending, len(upstream.dataBuffer) + upstream._tempDataLen,
                        splice.transport in reactor.getReaders())

            pending, twisted, reading = blockingCallFromThread(reactor, held)
            self.assertLessEqual(pending, PIPE_BYTES)
            self.assertGreater(pending, 0)
            self.assertEqual(twisted, 0)
            self.assertFalse(reading)
            client.setblocking(True)
            client.shutdown(socket.SHUT_WR)
            self.assertEqual(readAll(service), (sent, digest.digest()))
            service.close()
            self.assertEqual(readAll(client), (0, hashlib.sha256().digest()))
            record = self.record()
            self.assertEqual((record.bytesReceived, record.bytesSent, record.flags), (sent, 0, "-"))

        return deferToThread(run)

    def test_halfCloseEachWay(self):
        """
        The service says all it has and sends FIN first: the client reads it to the
        end while still sending, and the service still gets all of that and the
        client's FIN after it; nothing is reset.
        """
        size = 8 << 20

        def run() -> None:
            client, service = self.connect()
            serviceSent = sendPattern(service, size // 2)
            service.shutdown(socket.SHUT_WR)
            self.assertEqual(readAll(client), (size // 2, serviceSent))
            clientSent = sendPattern(client, size)
            client.shutdown(socket.SHUT_WR)
            self.assertEqual(readAll(service), (size, clientSent))
            service.close()
            record = self.record()
            self.assertEqual((record.bytesReceived, record.bytesSent, record.flags), (size, size // 2, "-"))

        return deferToThread(run)

    def test_serviceResetWithBytesInThePipe(self):
        """
        The service resets while the pipe holds bytes for it: the client's
        connection is closed, the record says UC, and the pipes are closed.
        """
        def run() -> None:
            client, service = self.connect()
            service.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 256 * 1024)
            client.setblocking(False)
            started = time.monotonic()
            while time.monotonic() - started < 0.5:
                try:
                    client.send(PATTERN)
                except BlockingIOError:
                    time.sleep(0.01)
            splice = self.splices[0]
            self.assertGreater(blockingCallFromThread(reactor, lambda: splice.kernelPaths[0].pending), 0)
            service.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            service.close()
            client.setblocking(True)
            try:
                while client.recv(65536):
                    pass
            except ConnectionResetError:
                pass  # the proxy closed with our unread bytes in its buffer: the kernel resets
            record = self.record()
            self.assertEqual(record.flags, "UC")
            self.assertEqual(splice.kernelPaths, ())

        return deferToThread(run)

    def test_onlyPlainTcp(self):
        """
        Transports that are not plain TCP connections (a TLS layer, a test transport)
        keep Twisted's path.
        """
        self.assertFalse(kernelSpliceable(StringTransport(), StringTransport()))
