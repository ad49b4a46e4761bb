# -*- test-case-name: tests.test_tls -*-
"""
The mutual-TLS front door: the fast door behind a TLS layer that has verified the
client's certificate, learning the caller's SPIFFE id and asking the policy
(L{sidecar.spiffe}), over the rotating context of L{sidecar.tls}; the permissive port
that tells TLS from plaintext by the first byte; and L{MutualTLS}, which holds it all
together for L{sidecar.service}.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import attrs
from cryptography import x509
from OpenSSL import crypto
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IHandshakeListener
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from sidecar.config import H2Config
from sidecar.detect import HTTP1, TLS, DetectingFactory, Detector, firstByte
from sidecar.downstream import DownstreamFactory, DownstreamProtocol
from sidecar.peers import PeerMemory
from sidecar.h2door import H2ServerFactory, H2ServerProtocol
from sidecar.spiffe import DENIAL_BODY, XFCC, Admission, AllowPolicy, admit
from sidecar.tls import RotatingServerContext, ServerMaterial, TLSFiles, TLSLayerFactory

@implementer(IHandshakeListener)
class MutualTLSDownstreamProtocol(DownstreamProtocol):
    """
    The fast front door behind a TLS layer that has verified the client's certificate:
    at the first request it learns the client's SPIFFE id, asks the policy, and from
    then on adds C{X-Forwarded-Client-Cert} to every upstream request (or answers 403
    to every request when the policy refuses).
    """

    mutualTLS = True
    proto = b"https"

    def __init__(self, engine: Any, maxHeaderBytes: int, tls: MutualTLS, handshaken: bool = False) -> None:
        DownstreamProtocol.__init__(self, engine, maxHeaderBytes)
        self.tls = tls
        #: Built after the handshake, by detection (which then owns the handshake's
        #: timer and counters).
        self._handshaken = handshaken
        self._handshakeTimer: Any = None
        self._extra: List[Tuple[bytes, bytes]] = []

    def connectionMade(self) -> None:
        DownstreamProtocol.connectionMade(self)
        if not self._handshaken:
            self._handshakeTimer = self.engine.clock.callLater(self.tls.handshakeTimeout, self._handshakeTimedOut)

    def _handshakeTimedOut(self) -> None:
        self._handshakeTimer = None
        self.tls.handshakeTimeouts += 1
        self.transport.abortConnection()

    def handshakeCompleted(self) -> None:
        self._handshaken = True
        self.tls.handshakes += 1
        timer, self._handshakeTimer = self._handshakeTimer, None
        if timer is not None:
            timer.cancel()

    def identify(self) -> None:
        peer = self.transport.getPeerCertificate()
        if peer is None:  # not reachable with VERIFY_FAIL_IF_NO_PEER_CERT; refuse anyway
            self.denial = DENIAL_BODY
            return
        admission = self.tls.admission(crypto.dump_certificate(crypto.FILETYPE_ASN1, peer))
        self.peerPrincipal = admission.principal
        self._extra = [(XFCC, admission.xfcc)]
        if admission.allowed and admission.principal:
            self.peers = PeerMemory(admission.principal)
        if not admission.allowed:
            self.denial = DENIAL_BODY
            self.tls.denials += 1
            self.tls.log.warn(
                "mTLS client {client} refused (403, RBAC): {reason}",
                client=self.clientAddress, reason=admission.reason,
            )

    def extraRequestHeaders(self) -> List[Tuple[bytes, bytes]]:
        return self._extra

    def startResponse(self, exchange: Any, status: int, reason: bytes, head: Any) -> None:
        """
        A mesh peer that said who it is (the peer-metadata header, on this verified
        connection) is told who we are in the response.
        """
        metadata = self.tls.localMetadata
        if metadata and exchange.req.peerMetadata is not None and self.peers is not None:
            head.headers.append((PEER_HEADER, metadata))
        DownstreamProtocol.startResponse(self, exchange, status, reason, head)

    def dataReceived(self, data: bytes) -> None:
        if not self._identified and getattr(self.transport, "negotiatedProtocol", None) == b"h2":
            self._becomeH2(data)
            return
        DownstreamProtocol.dataReceived(self, data)

    def _becomeH2(self, data: bytes) -> None:
        """
        ALPN chose C{h2} on a listener without detection: hand the connection to the
        HTTP/2 door (this HTTP/1.1 door leaves the registry it joined at connect).
        """
        self._identified = True
        self.engine.doors.discard(self)
        recorder = self.engine.recorder
        recorder.downstreamConnectionsActive -= 1
        recorder.downstreamConnectionsTotal -= 1
        h2 = self.tls.h2Factory(self.engine, self.tls.h2config).buildProtocol(None)
        transport = self.transport
        transport.wrappedProtocol = h2
        h2.makeConnection(transport)
        h2.dataReceived(data)

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:
        timer, self._handshakeTimer = self._handshakeTimer, None
        if timer is not None:
            timer.cancel()
        if not self._handshaken:
            self.tls.handshakeFailures += 1
        DownstreamProtocol.connectionLost(self, reason)


class MutualTLSH2Protocol(H2ServerProtocol):
    """
    The HTTP/2 door behind a TLS layer that has verified the client's certificate: the
    caller's identity, C{X-Forwarded-Client-Cert} and the policy as for HTTP/1.1.
    """

    mutualTLS = True
    proto = b"https"

    def __init__(self, engine: Any, config: H2Config, tls: MutualTLS, pool: Any = None) -> None:
        H2ServerProtocol.__init__(self, engine, config, pool=pool)
        self.tls = tls

    def identify(self) -> None:
        transport = self.transport
        # HTTP/2 chosen by ALPN is the proxy's choice, not the service's.
        self.alpn = getattr(transport, "negotiatedProtocol", None) == b"h2"
        peer = transport.getPeerCertificate()
        if peer is None:  # not reachable with VERIFY_FAIL_IF_NO_PEER_CERT; refuse anyway
            self.denial = DENIAL_BODY
            return
        tls = self.tls
        admission = tls.admission(crypto.dump_certificate(crypto.FILETYPE_ASN1, peer))
        self.peerPrincipal = admission.principal
        self.extra = [(XFCC, admission.xfcc)]
        if not admission.allowed:
            self.denial = DENIAL_BODY
            tls.denials += 1
            tls.log.warn("mTLS client {client} refused (403, RBAC): {reason}",
                         client=self.clientAddress, reason=admission.reason)


class MutualTLSH2Factory(H2ServerFactory):
    """
    Builds L{MutualTLSH2Protocol}s behind the TLS layer.
    """

    def __init__(self, engine: Any, config: H2Config, tls: MutualTLS, pool: Any = None) -> None:
        H2ServerFactory.__init__(self, engine, config, pool)
        self.tls = tls

    def buildProtocol(self, addr: Any) -> MutualTLSH2Protocol:
        proto = MutualTLSH2Protocol(self.engine, self.config, self.tls, self.pool)
        proto.factory = self
        return proto


class MutualTLSDownstreamFactory(DownstreamFactory):
    """
    Builds L{MutualTLSDownstreamProtocol}s; wrap it in L{MutualTLS.serverFactory}'s
    TLS layer.
    """

    def __init__(self, engine: Any, maxHeaderBytes: int, tls: MutualTLS, handshaken: bool = False) -> None:
        DownstreamFactory.__init__(self, engine, maxHeaderBytes)
        self.tls = tls
        self.handshaken = handshaken

    def buildProtocol(self, addr: Any) -> MutualTLSDownstreamProtocol:
        proto = MutualTLSDownstreamProtocol(self.engine, self.maxHeaderBytes, self.tls, self.handshaken)
        proto.factory = self
        return proto


#: The peer-metadata header as the sidecar writes it (L{sidecar.peers}).
PEER_HEADER = b"X-Sidecar-Peer-Metadata"

#: The first byte of a TLS handshake record.
TLS_HANDSHAKE_RECORD = b"\x16"


#: One connection on a permissive port until its first byte is seen (the detector).
_FirstByte = Detector


class PermissiveFactory(DetectingFactory):
    """
    Istio's PERMISSIVE mode on one port, as the simplest table of detection: a
    connection whose first byte starts a TLS record (0x16) goes to the mutual-TLS
    factory, any other to the plain one.  (The sidecar's own listeners use the full
    detection of L{sidecar.detect}, with opaque TCP; see L{sidecar.service}.)
    """

    def __init__(self, plain: Any, tls: Any) -> None:
        self.plain = plain
        routes = {TLS: lambda detector: tls.buildProtocol(detector.addr),
                  HTTP1: lambda detector: plain.buildProtocol(detector.addr)}
        DetectingFactory.__init__(self, routes, None, None, classify=firstByte)
        self.tlsFactory = tls

    def startFactory(self) -> None:
        self.plain.doStart()
        self.tlsFactory.doStart()

    def stopFactory(self) -> None:
        self.plain.doStop()
        self.tlsFactory.doStop()


#: Seconds a client has to complete its TLS handshake (a client that connects and never
#: finishes would otherwise hold its connection forever).
HANDSHAKE_TIMEOUT = 10.0

#: Why a client whose certificate expired after its session began is refused.
EXPIRED = "the client certificate has expired (a resumed TLS session outlived it)"

#: How many client certificates' admissions L{MutualTLS} remembers.
ADMISSION_MEMORY = 4096


class MutualTLS:
    """
    Everything one sidecar needs for mutual TLS: the rotating context, the policy and
    a few counters (plain integers, for the metrics to read).

    @ivar handshakes: TLS handshakes completed.
    @ivar handshakeFailures: connections that ended before their handshake completed
        (no certificate, wrong CA, expired, old protocol, or a client that left).
    @ivar denials: connections refused by the policy (their requests get 403).
    @ivar handshakeTimeouts: connections cut off for not finishing their handshake in
        C{handshakeTimeout} seconds (also counted in C{handshakeFailures}).
    """

    def __init__(self, context: RotatingServerContext, policy: AllowPolicy, clock: Any,
                 log: Optional[Logger] = None) -> None:
        self.context = context
        self.policy = policy
        self.clock = clock
        self.log = log if log is not None else Logger()
        self.handshakes = 0
        self.handshakeFailures = 0
        self.denials = 0
        self.handshakeTimeouts = 0
        #: Seconds a client has to complete its TLS handshake before it is cut off.
        self.handshakeTimeout = HANDSHAKE_TIMEOUT
        #: This workload's peer metadata (L{sidecar.peers.metadataOf}), told to mesh
        #: peers that tell theirs; empty: none told.
        self.localMetadata = b""
        #: HTTP/2 settings and limits for clients that choose C{h2} by ALPN.
        self.h2config = H2Config()
        self._admissions: Dict[Tuple[bytes, str], Admission] = {}

    @classmethod
    def fromConfig(cls, config: Any, clock: Any) -> MutualTLS:
        """
        Build from a L{sidecar.config.TLSConfig} (reading the files now).

        @raise TLSFileError: when a file can't be used.
        """
        files = TLSFiles(config.cert, config.key, config.ca)
        log = Logger()
        context = RotatingServerContext(files, log=log)
        self = cls(context, AllowPolicy.fromStrings(config.allow), clock, log)
        log.info(
            "mTLS as {identity} (certificate serial {serial:x}); allowing {allowed}",
            identity=context.material.localId or "an identity without SPIFFE id",
            serial=context.material.serial,
            allowed=", ".join(str(r) for r in self.policy.rules) or "any client certificate from the CA",
        )
        return self

    def admission(self, der: bytes) -> Admission:
        """
        L{admit} for the client certificate C{der}, remembered: a workload reconnects
        with the same certificate for hours, and parsing it costs more than the rest of
        a request.  The memory is keyed by the whole certificate and our own id, is
        bounded, and starts afresh when full.

        A certificate past its end is refused here: a full handshake would have
        refused it, but a resumed TLS session carries the certificate it was made
        with, and OpenSSL does not check its dates again.
        """
        localId = self.context.material.localId
        key = (der, localId)
        admission = self._admissions.get(key)
        if admission is None:
            if len(self._admissions) >= ADMISSION_MEMORY:
                self._admissions.clear()
            admission = admit(self.policy, localId, x509.load_der_x509_certificate(der), der)
            self._admissions[key] = admission
        if admission.notAfter <= self.clock.seconds():
            return attrs.evolve(admission, allowed=False, reason=EXPIRED)
        return admission

    @property
    def material(self) -> ServerMaterial:
        """
        The server material in use now (our SPIFFE id is C{material.localId}).
        """
        return self.context.material

    def reload(self) -> bool:
        """
        Pick up rotated files (see L{RotatingServerContext.check}); for a timer.
        """
        return self.context.check()

    def serverFactory(self, engine: Any, maxHeaderBytes: int) -> TLSLayerFactory:
        """
        The factory of a mutual-TLS listener: the TLS layer around the fast front door.
        """
        return TLSLayerFactory(
            self.context, False, MutualTLSDownstreamFactory(engine, maxHeaderBytes, self), clock=self.clock
        )

    def h2Factory(self, engine: Any, config: Any, pool: Any = None) -> MutualTLSH2Factory:
        """
        The factory of the HTTP/2 door behind this TLS layer (after the handshake).
        """
        return MutualTLSH2Factory(engine, config, self, pool)

    def detectingServerFactory(self, detecting: Any) -> TLSLayerFactory:
        """
        The TLS layer around a L{sidecar.detect.DetectingFactory}: protocol detection
        on the decrypted stream (the detector owns the handshake's timer and counters).
        """
        return TLSLayerFactory(self.context, False, detecting, clock=self.clock)

    def admitPeer(self, transport: Any) -> Optional[Tuple[str, bool]]:
        """
        The client's SPIFFE id and whether the policy allows it, from the certificate
        on C{transport} (a TLS layer after its handshake); C{None} without one.  A
        refusal is counted and logged.
        """
        peer = transport.getPeerCertificate()
        if peer is None:
            return None
        admission = self.admission(crypto.dump_certificate(crypto.FILETYPE_ASN1, peer))
        if not admission.allowed:
            self.denials += 1
            self.log.warn("mTLS client refused (TCP connection closed, RBAC): {reason}", reason=admission.reason)
        return admission.principal, admission.allowed

    def permissiveFactory(self, plain: Any, engine: Any, maxHeaderBytes: int) -> PermissiveFactory:
        """
        The factory of a plain listener that also accepts mutual TLS.
        """
        return PermissiveFactory(plain, self.serverFactory(engine, maxHeaderBytes))
