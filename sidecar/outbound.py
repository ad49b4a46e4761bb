# -*- test-case-name: tests.test_mesh -*-
"""
The outbound half of the mesh: the listener that takes the workload's own outgoing
connections (captured by the init script's C{-o PORT}), and the mutual TLS the sidecar
originates to destinations inside the mesh.

The path of one captured connection::

  app connects to 10.0.0.7:80 ─ iptables REDIRECT ─ outbound listener (SO_ORIGINAL_DST
      gives 10.0.0.7:80; a connection that no REDIRECT brought is refused, NR)
    └─ detection (L{sidecar.detect}, the inbound table)
        ├─ HTTP/1.x: the fast door (C{reporter="source"} records) on the pool of
        │   10.0.0.7:80 (L{OutboundDestinations}: built at first use, bounded); in
        │   the mesh (C{--mesh-networks}), each pooled connection is mutual TLS with
        │   our workload certificate, ALPN C{http/1.1}, the server's SPIFFE id
        │   checked before the first request byte goes (L{Origination}), and every
        │   request carries our peer metadata
        └─ anything else: the opaque splice (L{sidecar.tcp}) to 10.0.0.7:80, over
            the same verified mutual TLS in the mesh (no ALPN), plain outside it

L{MeshPolicy} is pure: which destinations are in the mesh and which SPIFFE id their
servers must have (the trust domain of our own certificate by default, an exact id
per C{--mesh-peer CIDR=ID}).
"""

from __future__ import annotations

import ipaddress
from typing import Any, Dict, Optional, Sequence, Tuple

import attrs
from cryptography import x509
from OpenSSL import SSL, crypto
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IHandshakeListener, IOpenSSLClientConnectionCreator
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from sidecar.downstream import DownstreamFactory, DownstreamProtocol
from sidecar.peers import PeerMemory
from sidecar.record import OUTBOUND
from sidecar.spiffe import AllowRule, peerIdentity
from sidecar.tls import TLSLayerFactory
from sidecar.upstream import CLOSED, CONNECTING, UpstreamConnection, UpstreamPool

log = Logger()

#: The ALPN of HTTP/1.1 over the mesh (C{h2} will join it with the HTTP/2 codec).
HTTP11 = b"http/1.1"

#: Istio's retry policy for the mesh: an idempotent request whose connect failed is
#: tried on a new connection twice more (C{attempts: 2}, C{retryOn: connect-failure}).
CONNECT_RETRIES = 2

#: Destinations (address and port) whose pools are kept at most; past it, those with
#: nothing open or waiting are let go first.
MAX_DESTINATIONS = 4096


class TLSVerificationError(ConnectionDone):
    """
    The server's certificate verified against the mesh CA but its SPIFFE id is not
    the one expected: the connection is refused before any request byte is sent.
    """


@attrs.frozen
class MeshPolicy:
    """
    Which destinations are inside the mesh, and who their servers must be.

    @ivar networks: the mesh's address ranges (C{--mesh-networks}).
    @ivar peers: C{(range, rule)} pairs (C{--mesh-peer CIDR=ID}): a destination in the
        range must present that exact id (or any of that trust domain for
        C{spiffe://TD/*}); the narrowest range wins.  Their ranges are in the mesh too.
    @ivar trustDomain: the trust domain a mesh server's id must be in when no
        C{--mesh-peer} says more (our own certificate's).
    """

    networks: Tuple[Any, ...] = ()
    peers: Tuple[Tuple[Any, AllowRule], ...] = ()
    trustDomain: str = ""

    def expected(self, host: str) -> Optional[AllowRule]:
        """
        The rule the server at C{host} must match when C{host} is in the mesh, else
        C{None} (the connection passes unchanged).
        """
        try:
            address = ipaddress.ip_address(host.partition("%")[0])
        except ValueError:
            return None
        best: Optional[Tuple[int, AllowRule]] = None
        for network, rule in self.peers:
            if address in network and (best is None or network.prefixlen > best[0]):
                best = (network.prefixlen, rule)
        if best is not None:
            return best[1]
        for network in self.networks:
            if address in network:
                return AllowRule(self.trustDomain, None)
        return None


def meshPolicy(networks: Sequence[str], peers: Sequence[Tuple[str, str]], localId: str) -> MeshPolicy:
    """
    The policy of C{--mesh-networks} and C{--mesh-peer} values (already validated),
    with our own SPIFFE id C{localId} giving the default trust domain.
    """
    from sidecar.spiffe import parseAllowRule, parseSpiffeId

    trustDomain = parseSpiffeId(localId).trustDomain if localId else ""
    return MeshPolicy(
        tuple(ipaddress.ip_network(n, strict=False) for n in networks),
        tuple((ipaddress.ip_network(n, strict=False), parseAllowRule(i)) for n, i in peers),
        trustDomain,
    )


def verifyServer(transport: Any, rule: AllowRule, now: Optional[float] = None) -> Tuple[str, Optional[str]]:
    """
    The SPIFFE id of the server on C{transport} (a TLS layer after its handshake, its
    chain already verified against the mesh CA) and, when it is not acceptable, why.

    @param now: the time, in seconds since the epoch: a certificate past its end is
        refused (OpenSSL does not look again when a session is resumed).
    """
    peer = transport.getPeerCertificate()
    if peer is None:
        return "", "the server presented no certificate"
    certificate = x509.load_der_x509_certificate(crypto.dump_certificate(crypto.FILETYPE_ASN1, peer))
    if now is not None and certificate.not_valid_after_utc.timestamp() <= now:
        return "", "the server's certificate has expired (a resumed TLS session outlived it)"
    identity = peerIdentity(certificate)
    if identity.spiffeId is None:
        return "", identity.problem or "the server's certificate has no SPIFFE id"
    if not rule.matches(identity.spiffeId):
        return identity.principal, f"the server is {identity.principal}, not {rule}"
    return identity.principal, None


@implementer(IOpenSSLClientConnectionCreator)
class _OriginatedTLS:
    """
    Client connections on the rotating material's client context, offering C{alpn},
    and the TLS session to resume with this destination (L{SessionMemory}).
    """

    def __init__(self, context: Any, alpn: Optional[bytes], sessions: SessionMemory) -> None:
        self.context = context
        self.alpn = alpn
        self.sessions = sessions

    def clientConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        connection = self.context.clientConnection()
        if self.alpn is not None:
            connection.set_alpn_protos([self.alpn])
        self.sessions.offer(connection)
        return connection


class SessionMemory:
    """
    The TLS session last learnt from one mesh destination, offered by the next
    connection to it: a TLS 1.3 resumption skips the certificate exchange and its
    signatures on both sides (the server's sidecar issues the tickets).

    What keeps it safe:

      - a session is learnt only from a connection whose server was verified
        (chain and SPIFFE id), and offered only to the same destination, whose
        identity rule does not change; a resumed connection is checked again
        (L{verifyServer} sees the certificate the session was made with);
      - a session belongs to the client context it was made on: once our material
        rotates (a new certificate or trust bundle), it is not offered, and the next
        handshake is a full one verified against the new CAs;
      - a handshake that fails, or a server that fails the identity check, forgets it.
    """

    __slots__ = ("_session", "_context")

    def __init__(self) -> None:
        self._session: Any = None
        self._context: Any = None

    def learn(self, connection: SSL.Connection) -> None:
        """
        Keep the session of C{connection}, a verified connection that has read from
        its server (so TLS 1.3 tickets, sent after the handshake, have arrived).
        """
        session = connection.get_session()
        if session is not None:
            self._session, self._context = session, connection.get_context()

    def offer(self, connection: SSL.Connection) -> None:
        """
        Offer the session to C{connection} (not yet started), if it was made on the
        same client context.
        """
        session = self._session
        if session is not None:
            if self._context is connection.get_context():
                connection.set_session(session)
            else:
                self.forget()

    def forget(self) -> None:
        """
        Offer nothing until a verified connection teaches a new session.
        """
        self._session = self._context = None


class Origination:
    """
    Mutual TLS originated to one destination: the TLS layer to wrap a connect's factory
    in, and the check of the server's identity after the handshake.

    @ivar rule: the SPIFFE id (or trust domain) the server must have.
    @ivar sessions: the TLS session resumed with this destination.
    """

    def __init__(self, context: Any, rule: AllowRule, alpn: Optional[bytes], clock: Any,
                 sessions: Optional[SessionMemory] = None) -> None:
        self.rule = rule
        self.clock = clock
        self.sessions = sessions if sessions is not None else SessionMemory()
        self._creator = _OriginatedTLS(context, alpn, self.sessions)

    def wrap(self, factory: Any) -> TLSLayerFactory:
        """
        C{factory} behind a client TLS layer.
        """
        return TLSLayerFactory(self._creator, True, factory, clock=self.clock)

    def verify(self, transport: Any) -> Tuple[str, Optional[str]]:
        """
        L{verifyServer} with this destination's rule; a refusal forgets the session.
        """
        principal, problem = verifyServer(transport, self.rule, self.clock.seconds())
        if problem is not None:
            self.sessions.forget()
        return principal, problem


@implementer(IHandshakeListener)
class TLSUpstreamConnection(UpstreamConnection):
    """
    The HTTP/1.1 upstream over mutual TLS the sidecar originated: it joins its pool
    (and gets a request) only once the handshake is over and the server's SPIFFE id is
    the expected one; a handshake that fails, a wrong id, or no handshake within the
    connect timeout is a connect failure (C{UF}).
    """

    _timer: Any = None
    _problem: Optional[str] = None

    def connectionMade(self) -> None:
        from sidecar.transport import prepare

        self.write, self.writeSequence = prepare(self.transport)
        pool = self.pool
        self._timer = pool.clock.callLater(pool.config.connectTimeout, self._handshakeTimedOut)

    def _handshakeTimedOut(self) -> None:
        self._timer = None
        self._problem = "no TLS handshake within the connect timeout"
        self.transport.abortConnection()

    def handshakeCompleted(self) -> None:
        timer, self._timer = self._timer, None
        if timer is not None and timer.active():
            timer.cancel()
        principal, problem = self.pool.origination.verify(self.transport)
        if problem is not None:
            self._problem = problem
            self.transport.abortConnection()
            return
        self.peers = PeerMemory(principal)
        # The first read from the server comes after its session tickets: learn the
        # session then (an instance attribute, so later reads cost nothing).
        self.dataReceived = self._firstRead  # type: ignore[method-assign]
        self.pool.connected(self)

    def _firstRead(self, data: bytes) -> None:
        del self.dataReceived
        handle = getattr(self.transport, "getHandle", None)
        if handle is not None:
            self.pool.origination.sessions.learn(handle())
        UpstreamConnection.dataReceived(self, data)

    def sendRequest(self, exchange: Any, reused: bool, body: Any, end: bool) -> None:
        exchange.peer = self.peers.certified
        UpstreamConnection.sendRequest(self, exchange, reused, body, end)

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:
        timer, self._timer = self._timer, None
        if timer is not None and timer.active():
            timer.cancel()
        if self.state == CONNECTING:
            # The TCP connect succeeded, mutual TLS did not: a connect failure.
            self.state = CLOSED
            problem = self._problem
            if problem is None:
                problem = f"TLS handshake failed: {reason.getErrorMessage()}"
                self.pool.origination.sessions.forget()
            log.warn("mutual TLS to {upstream} refused: {problem}", upstream=self.pool.address, problem=problem)
            self.factory.clientConnectionFailed(None, Failure(TLSVerificationError(problem)))  # type: ignore[attr-defined]
            return
        UpstreamConnection.connectionLost(self, reason)


class TLSUpstreamPool(UpstreamPool):
    """
    A pool of L{TLSUpstreamConnection}s to one mesh destination.
    """

    connectionClass = TLSUpstreamConnection

    def __init__(self, reactor: Any, clock: Any, config: Any, origination: Origination) -> None:
        UpstreamPool.__init__(self, reactor, clock, config, wrap=origination.wrap)
        self.origination = origination


class OutboundDoor(DownstreamProtocol):
    """
    The fast door on a captured outbound connection: records are C{outbound}, and, to
    a mesh destination, every request carries our peer metadata.
    """

    direction = OUTBOUND

    def __init__(self, engine: Any, maxHeaderBytes: int, mesh: bool, extra: Any) -> None:
        DownstreamProtocol.__init__(self, engine, maxHeaderBytes)
        self.mutualTLS = mesh
        self._extra = extra

    def connectionMade(self) -> None:
        DownstreamProtocol.connectionMade(self)
        # As Envoy's outbound listeners: the workload calling out is not a hop of
        # X-Forwarded-For (the server's sidecar appends the pod's address).
        self.clientIP = ""

    def extraRequestHeaders(self) -> Any:
        return self._extra


class OutboundDoorFactory(DownstreamFactory):
    """
    Builds the L{OutboundDoor}s of one destination.
    """

    def __init__(self, engine: Any, maxHeaderBytes: int, mesh: bool, extra: Any) -> None:
        DownstreamFactory.__init__(self, engine, maxHeaderBytes)
        self.mesh = mesh
        self.extra = extra

    def buildProtocol(self, addr: Any) -> OutboundDoor:
        door = OutboundDoor(self.engine, self.maxHeaderBytes, self.mesh, self.extra)
        door.factory = self
        return door


@attrs.define(eq=False)
class Destination:
    """
    Everything the outbound listener keeps for one destination address and port.

    @ivar rule: the identity its server must have in the mesh, or C{None} (outside).
    @ivar pool: its HTTP/1.1 pool.
    @ivar doors: the factory of the fast door on that pool.
    @ivar tcp: the mutual TLS of its opaque connections, or C{None}.
    """

    rule: Optional[AllowRule]
    pool: Any
    doors: OutboundDoorFactory
    tcp: Optional[Origination]


class OutboundDestinations:
    """
    The outbound listener's state, built lazily per destination and bounded, hanging
    off the service: pools by C{(host, port)}, each with its door factory on a
    L{sidecar.origdst.PortEngine} of the main engine (so one recorder, one doors
    registry) that retries connect failures.
    """

    def __init__(self, reactor: Any, upstream: Any, engine: Any, maxHeaderBytes: int, policy: MeshPolicy,
                 context: Any, metadata: bytes, limit: int = MAX_DESTINATIONS) -> None:
        self.reactor = reactor
        self.upstream = upstream
        self.engine = engine
        self.maxHeaderBytes = maxHeaderBytes
        self.policy = policy
        self.context = context
        self.limit = limit
        self._extra = [(b"X-Sidecar-Peer-Metadata", metadata)] if metadata else []
        self.destinations: Dict[Tuple[str, int], Destination] = {}

    def get(self, host: str, port: int) -> Destination:
        """
        The destination C{host:port}, built at first use.
        """
        key = (host, port)
        found = self.destinations.get(key)
        if found is None:
            if len(self.destinations) >= self.limit:
                self._forget()
            found = self.destinations[key] = self._build(host, port)
        return found

    def _build(self, host: str, port: int) -> Destination:
        from sidecar.origdst import PortEngine

        config = attrs.evolve(self.upstream, host=host, port=port, original=False)
        rule = self.policy.expected(host) if self.context is not None else None
        tcp = None
        if rule is None:
            pool: Any = UpstreamPool(self.reactor, self.reactor, config)
            extra: Any = []
        else:
            origination = Origination(self.context, rule, HTTP11, self.reactor)
            pool = TLSUpstreamPool(self.reactor, self.reactor, config, origination)
            # Opaque connections to the same destination resume the HTTP pool's sessions.
            tcp = Origination(self.context, rule, None, self.reactor, origination.sessions)
            extra = self._extra
        engine = PortEngine(self.engine, pool)
        engine.connectRetries = CONNECT_RETRIES  # type: ignore[attr-defined]
        doors = OutboundDoorFactory(engine, self.maxHeaderBytes, rule is not None, extra)
        return Destination(rule, pool, doors, tcp)

    def _forget(self) -> None:
        """
        Let go of the destinations with nothing open, opening or waiting (their idle
        connections closed).
        """
        for key, destination in list(self.destinations.items()):
            pool = destination.pool
            if not (pool.active or pool.connecting or pool.pending):
                pool.closeAll()
                del self.destinations[key]

    def sweep(self) -> None:
        """
        Close idle upstream connections in every pool (for the pool timer).
        """
        for destination in list(self.destinations.values()):
            destination.pool.sweep()

    def closeAll(self) -> None:
        """
        Close every pooled connection.
        """
        for destination in list(self.destinations.values()):
            destination.pool.closeAll()
