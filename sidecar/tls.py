# -*- test-case-name: tests.test_tls -*-
"""
Mutual TLS for the sidecar's listeners: SPIFFE identities, the allow policy, the
C{X-Forwarded-Client-Cert} value, server contexts that are rebuilt when their files
change on disk, and the front door that knows its caller.

The module has two halves, kept apart on purpose:

  - the pure half (L{parseSpiffeId}, L{peerIdentity}, L{AllowPolicy},
    L{xfccElement}, L{admit}) works on certificates and strings and returns
    structured results, in the manner of service-identity's C{hazmat.py}: no
    reactor, no files, no OpenSSL objects;
  - the thin adapter half (L{loadMaterial}, L{RotatingServerContext},
    L{MutualTLSDownstreamProtocol}, L{MutualTLSDownstreamFactory},
    L{PermissiveFactory}, L{MutualTLS}) reads the files, builds pyOpenSSL contexts,
    watches for rotation on an injected clock, and hooks into the fast front door.

Why not service-identity for the SPIFFE id: its URI-IDs compare only scheme and
host, so C{spiffe://cluster.local/ns/a/sa/evil} would match an expected
C{spiffe://cluster.local/ns/a/sa/good}; a workload identity needs the exact
comparison of L{AllowPolicy}.  service-identity remains the tool for DNS and IP
identities (a Twisted client's C{optionsForClientTLS} uses it; the tests do).
"""

from __future__ import annotations

import hashlib
import os
import re
from typing import Any, Dict, List, Optional, Sequence, Tuple

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from OpenSSL import SSL, crypto
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IHandshakeListener, IOpenSSLServerConnectionCreator
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from zope.interface import implementer

from sidecar.detect import HTTP1, TLS, DetectingFactory, Detector, firstByte
from sidecar.downstream import DownstreamFactory, DownstreamProtocol

# ------------------------------------------------------------------------------------
# The pure half: identities, policy, header value.
# ------------------------------------------------------------------------------------

#: The longest SPIFFE id the SPIFFE standard allows (in bytes).
MAX_SPIFFE_ID = 2048

_TRUST_DOMAIN = re.compile(r"[a-z0-9._-]+\Z")
_PATH_SEGMENT = re.compile(r"[A-Za-z0-9._-]+\Z")

#: What a client whose identity the policy refuses reads (Envoy's RBAC filter body).
DENIAL_BODY = b"RBAC: access denied\n"

#: The header the proxy owns on upstream requests (L{sidecar.headers} drops a client's).
XFCC = b"X-Forwarded-Client-Cert"


class InvalidSpiffeId(ValueError):
    """
    A string that is not a SPIFFE id (or, in a policy, not a SPIFFE id or trust-domain
    wildcard).  The message is a sentence naming the problem.
    """


@attrs.frozen
class SpiffeId:
    """
    A parsed SPIFFE id, C{spiffe://<trustDomain><path>}.

    @ivar trustDomain: lower-case letters, digits, C{.}, C{-} and C{_}.
    @ivar path: empty, or C{/}-separated non-empty segments with no C{.}/C{..} segment
        and no trailing C{/}.
    """

    trustDomain: str
    path: str

    def __str__(self) -> str:
        return f"spiffe://{self.trustDomain}{self.path}"


def parseSpiffeId(text: str) -> SpiffeId:
    """
    Parse C{text} as a SPIFFE id, strictly, by the SPIFFE-ID standard: scheme C{spiffe}
    (lower case), a trust domain of C{[a-z0-9._-]} with no port or user info, a path of
    C{[A-Za-z0-9._-]} segments, no query or fragment, at most 2048 bytes.

    @raise InvalidSpiffeId: with a sentence saying what is wrong.
    """
    if len(text.encode("utf-8", "replace")) > MAX_SPIFFE_ID:
        raise InvalidSpiffeId(f"{text[:40]!r}... is longer than {MAX_SPIFFE_ID} bytes")
    if not text.startswith("spiffe://"):
        raise InvalidSpiffeId(f"{text!r} does not start with spiffe://")
    rest = text[len("spiffe://"):]
    trustDomain, slash, path = rest.partition("/")
    path = slash + path
    if not trustDomain:
        raise InvalidSpiffeId(f"{text!r} has no trust domain")
    if not _TRUST_DOMAIN.match(trustDomain):
        raise InvalidSpiffeId(
            f"{text!r} has a trust domain with characters other than lower-case letters, digits, '.', '-' and '_'"
        )
    if path:
        segments = path[1:].split("/")
        for segment in segments:
            if not segment:
                raise InvalidSpiffeId(f"{text!r} has an empty path segment or a trailing '/'")
            if segment in (".", ".."):
                raise InvalidSpiffeId(f"{text!r} has a '.' or '..' path segment")
            if not _PATH_SEGMENT.match(segment):
                raise InvalidSpiffeId(
                    f"{text!r} has a path with characters other than letters, digits, '.', '-' and '_'"
                )
    return SpiffeId(trustDomain, path)


@attrs.frozen
class PeerIdentity:
    """
    Who a certificate says its holder is.

    @ivar spiffeId: the certificate's single valid SPIFFE id, else C{None}.
    @ivar uris: every URI SAN of the certificate, in order.
    @ivar problem: why there is no identity (a phrase), else C{None}.
    """

    spiffeId: Optional[SpiffeId]
    uris: Tuple[str, ...] = ()
    problem: Optional[str] = None

    @property
    def principal(self) -> str:
        """
        The SPIFFE id as text, or C{""} without one (what records and metrics carry).
        """
        return "" if self.spiffeId is None else str(self.spiffeId)


def uriSANs(certificate: x509.Certificate) -> Tuple[str, ...]:
    """
    The URI subject alternative names of C{certificate}, in order.
    """
    try:
        san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return ()
    return tuple(san.value.get_values_for_type(x509.UniformResourceIdentifier))


def identityFromURIs(uris: Sequence[str]) -> PeerIdentity:
    """
    The identity carried by a certificate with URI SANs C{uris}: exactly one C{spiffe:}
    URI that parses as a SPIFFE id.  Zero or several SPIFFE URIs give no identity.
    """
    spiffe = [u for u in uris if u[:7].lower() == "spiffe:"]
    if not spiffe:
        return PeerIdentity(None, tuple(uris), "the certificate has no SPIFFE id")
    if len(spiffe) > 1:
        return PeerIdentity(None, tuple(uris), f"the certificate has {len(spiffe)} SPIFFE ids")
    try:
        parsed = parseSpiffeId(spiffe[0])
    except InvalidSpiffeId as e:
        return PeerIdentity(None, tuple(uris), f"the certificate's SPIFFE id is invalid: {e}")
    return PeerIdentity(parsed, tuple(uris))


def peerIdentity(certificate: x509.Certificate) -> PeerIdentity:
    """
    The identity of C{certificate}'s holder, read from its URI SANs (see
    L{identityFromURIs}).
    """
    return identityFromURIs(uriSANs(certificate))


@attrs.frozen
class AllowRule:
    """
    One C{--tls-allow} entry.

    @ivar trustDomain: the trust domain the peer must belong to.
    @ivar path: the exact path the peer's id must have, or C{None} for any id in the
        trust domain (the C{spiffe://td/*} form).
    """

    trustDomain: str
    path: Optional[str]

    def matches(self, spiffeId: SpiffeId) -> bool:
        """
        Whether C{spiffeId} is allowed by this rule: same trust domain and, for an
        exact rule, the same path, byte for byte.
        """
        if spiffeId.trustDomain != self.trustDomain:
            return False
        return self.path is None or spiffeId.path == self.path

    def __str__(self) -> str:
        return f"spiffe://{self.trustDomain}{'/*' if self.path is None else self.path}"


def parseAllowRule(text: str) -> AllowRule:
    """
    Parse a C{--tls-allow} value: an exact SPIFFE id, or C{spiffe://TRUST.DOMAIN/*}
    for every id of a trust domain.  No other wildcard is accepted.

    @raise InvalidSpiffeId: with a sentence saying what is wrong.
    """
    text = text.strip()
    if text.endswith("/*"):
        parsed = parseSpiffeId(text[:-2])
        if parsed.path:
            raise InvalidSpiffeId(
                f"{text!r}: a wildcard stands for a whole trust domain only (spiffe://TRUST.DOMAIN/*)"
            )
        return AllowRule(parsed.trustDomain, None)
    if "*" in text:
        raise InvalidSpiffeId(f"{text!r}: '*' is only allowed as the whole path, spiffe://TRUST.DOMAIN/*")
    parsed = parseSpiffeId(text)
    return AllowRule(parsed.trustDomain, parsed.path)


@attrs.frozen
class Decision:
    """
    The policy's answer for one peer.

    @ivar allowed: whether the peer may make requests.
    @ivar reason: a phrase saying why not (or which rule allowed it).
    """

    allowed: bool
    reason: str


@attrs.frozen
class AllowPolicy:
    """
    Which client identities may call the service.  Without rules, every client whose
    certificate chains to the CA is allowed (with or without a SPIFFE id).
    """

    rules: Tuple[AllowRule, ...] = ()

    @classmethod
    def fromStrings(cls, values: Sequence[str]) -> AllowPolicy:
        """
        Build the policy from C{--tls-allow} values.

        @raise InvalidSpiffeId: for the first value that is not valid.
        """
        return cls(tuple(parseAllowRule(v) for v in values))

    def decide(self, identity: PeerIdentity) -> Decision:
        """
        Whether the peer with C{identity} is allowed, and why.
        """
        if not self.rules:
            return Decision(True, "no --tls-allow rules: any certificate from the CA")
        spiffeId = identity.spiffeId
        if spiffeId is None:
            return Decision(False, identity.problem or "the certificate has no SPIFFE id")
        for rule in self.rules:
            if rule.matches(spiffeId):
                return Decision(True, f"allowed by {rule}")
        return Decision(False, f"{spiffeId} matches no --tls-allow rule")


_XFCC_SPECIAL = frozenset(',;="')


def _xfccValue(value: str) -> str:
    if any(c in _XFCC_SPECIAL for c in value):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return value


def xfccElement(by: str, certificateDER: bytes, uri: str) -> bytes:
    """
    The C{X-Forwarded-Client-Cert} value for one client, in Envoy's format:
    C{By=<our SPIFFE id>;Hash=<SHA-256 of the client certificate's DER, hex>;URI=<the
    client's SPIFFE id>}.  C{By} and C{URI} are left out when empty; values holding
    C{,;="} are quoted.

    @param by: our own SPIFFE id, or C{""}.
    @param certificateDER: the client certificate, DER-encoded.
    @param uri: the client's SPIFFE id, or C{""}.
    """
    parts = []
    if by:
        parts.append("By=" + _xfccValue(by))
    parts.append("Hash=" + hashlib.sha256(certificateDER).hexdigest())
    if uri:
        parts.append("URI=" + _xfccValue(uri))
    return ";".join(parts).encode("ascii", "replace")


@attrs.frozen
class Admission:
    """
    What the proxy decided about one mutual-TLS client, once per connection.

    @ivar principal: the client's SPIFFE id, or C{""}.
    @ivar allowed: whether its requests are served.
    @ivar reason: why (a phrase, for the log).
    @ivar xfcc: the C{X-Forwarded-Client-Cert} value for its requests.
    """

    principal: str
    allowed: bool
    reason: str
    xfcc: bytes


def admit(policy: AllowPolicy, localId: str, certificate: x509.Certificate, der: bytes) -> Admission:
    """
    Decide about a client from its certificate: its identity, the policy's answer and
    the header value the service will see.

    @param policy: the allow policy.
    @param localId: our own SPIFFE id (the XFCC C{By}), or C{""}.
    @param certificate: the client's (already chain-verified) certificate.
    @param der: the same certificate, DER-encoded.
    """
    identity = peerIdentity(certificate)
    decision = policy.decide(identity)
    return Admission(identity.principal, decision.allowed, decision.reason,
                     xfccElement(localId, der, identity.principal))


# ------------------------------------------------------------------------------------
# The adapter half: files, OpenSSL contexts, rotation.
# ------------------------------------------------------------------------------------

#: TLS 1.2 suites: forward-secret AEAD only (TLS 1.3 suites are all modern already).
TLS12_CIPHERS = (
    b"ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:"
    b"ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:"
    b"ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305"
)

#: The one application protocol offered by ALPN.
ALPN = b"http/1.1"


class TLSFileError(Exception):
    """
    A certificate, key or CA file that can't be used.  C{str()} is one sentence that
    names the flag and the file.
    """

    def __init__(self, flag: str, path: str, problem: str) -> None:
        Exception.__init__(self, f"{flag}: {path}: {problem}.")
        self.flag = flag
        self.path = path
        self.problem = problem


@attrs.frozen
class TLSFiles:
    """
    Where the server's material lives.

    @ivar cert: PEM certificate, optionally followed by its chain.
    @ivar key: PEM private key (unencrypted) of the first certificate.
    @ivar ca: PEM bundle of the CAs client certificates must chain to.
    """

    cert: str
    key: str
    ca: str

    def flagged(self) -> Tuple[Tuple[str, str], ...]:
        """
        C{(flag, path)} pairs, in the order they are read.
        """
        return (("--tls-cert", self.cert), ("--tls-key", self.key), ("--tls-ca", self.ca))


@attrs.frozen(eq=False)
class ServerMaterial:
    """
    One generation of server material: the built context and what the proxy needs to
    know about it.

    @ivar context: the pyOpenSSL server context.
    @ivar localId: our own SPIFFE id from our certificate, or C{""}.
    @ivar serial: our certificate's serial number.
    @ivar digest: SHA-256 over the three files' contents (which generation this is).
    """

    context: SSL.Context
    localId: str
    serial: int
    digest: str


def _read(flag: str, path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise TLSFileError(flag, path, "no such file")
    except IsADirectoryError:
        raise TLSFileError(flag, path, "is a directory, not a PEM file")
    except OSError as e:
        raise TLSFileError(flag, path, f"cannot be read ({e.strerror})")


def _certificates(flag: str, path: str, data: bytes) -> List[x509.Certificate]:
    if b"-----BEGIN CERTIFICATE-----" not in data:
        raise TLSFileError(flag, path, "holds no PEM certificate")
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError as e:
        raise TLSFileError(flag, path, f"holds a PEM certificate that cannot be parsed ({e})")


def _publicBytes(key: Any) -> bytes:
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def buildMaterial(files: TLSFiles, certData: bytes, keyData: bytes, caData: bytes) -> ServerMaterial:
    """
    Check the three files' contents and build the server context: TLS 1.2 and 1.3
    only, forward-secret AEAD suites, ALPN C{http/1.1}, a client certificate required
    and verified against the CA bundle, no renegotiation.

    @raise TLSFileError: naming the file at fault.
    """
    chain = _certificates("--tls-cert", files.cert, certData)
    try:
        key = serialization.load_pem_private_key(keyData, password=None)
    except TypeError:
        raise TLSFileError("--tls-key", files.key, "is an encrypted private key; the sidecar needs it unencrypted")
    except (ValueError, crypto.Error) as e:
        raise TLSFileError("--tls-key", files.key, f"holds no usable PEM private key ({e})")
    if not isinstance(key, (rsa.RSAPrivateKey, ec.EllipticCurvePrivateKey, ed25519.Ed25519PrivateKey,
                            ed448.Ed448PrivateKey)):
        raise TLSFileError("--tls-key", files.key, "holds a kind of key TLS servers cannot use")
    leaf = chain[0]
    if _publicBytes(leaf.public_key()) != _publicBytes(key.public_key()):
        raise TLSFileError("--tls-key", files.key, f"does not match the certificate in {files.cert}")
    authorities = _certificates("--tls-ca", files.ca, caData)
    for authority in authorities:
        try:
            constraints = authority.extensions.get_extension_for_class(x509.BasicConstraints).value
        except x509.ExtensionNotFound:
            constraints = None
        if constraints is not None and not constraints.ca:
            raise TLSFileError("--tls-ca", files.ca,
                               f"holds a certificate that is not a CA ({authority.subject.rfc4514_string()})")

    context = SSL.Context(SSL.TLS_SERVER_METHOD)
    context.set_min_proto_version(SSL.TLS1_2_VERSION)
    context.set_max_proto_version(SSL.TLS1_3_VERSION)
    context.set_options(SSL.OP_NO_COMPRESSION | SSL.OP_CIPHER_SERVER_PREFERENCE | SSL.OP_NO_RENEGOTIATION)
    context.set_cipher_list(TLS12_CIPHERS)
    try:
        context.use_certificate(leaf)
        for extra in chain[1:]:
            context.add_extra_chain_cert(extra)
        context.use_privatekey(key)
        context.check_privatekey()
    except SSL.Error as e:
        raise TLSFileError("--tls-key", files.key, f"is refused by OpenSSL with the certificate in {files.cert} ({e})")
    store = context.get_cert_store()
    assert store is not None
    for authority in authorities:
        try:
            store.add_cert(crypto.X509.from_cryptography(authority))
        except crypto.Error:
            pass  # the same CA twice in the bundle
        context.add_client_ca(authority)
    context.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT | SSL.VERIFY_CLIENT_ONCE)
    # Session resumption with client verification needs a session id context.
    context.set_session_id(b"sidecar-mtls")
    context.set_alpn_select_callback(_selectALPN)

    local = peerIdentity(leaf)
    digest = hashlib.sha256(b"\0".join([certData, keyData, caData])).hexdigest()
    return ServerMaterial(context, local.principal, leaf.serial_number, digest)


def _selectALPN(connection: SSL.Connection, offered: List[bytes]) -> Any:
    if ALPN in offered:
        return ALPN
    return SSL.NO_OVERLAPPING_PROTOCOLS


def loadMaterial(files: TLSFiles) -> ServerMaterial:
    """
    Read the three files and build the server material from them.

    @raise TLSFileError: naming the file that is missing, unreadable or wrong.
    """
    data = [_read(flag, path) for flag, path in files.flagged()]
    return buildMaterial(files, *data)


def _fingerprint(paths: Sequence[str]) -> Tuple[Any, ...]:
    """
    What C{stat} says of each file, through symlinks (a Kubernetes secret update swaps
    the C{..data} symlink, so the inode changes even when sizes and times do not).
    """
    out: List[Any] = []
    for path in paths:
        try:
            st = os.stat(path)
        except OSError as e:
            out.append(("missing", e.errno))
        else:
            out.append((st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns))
    return tuple(out)


@implementer(IOpenSSLServerConnectionCreator)
class RotatingServerContext:
    """
    The server side of every mutual-TLS connection: each new connection gets the
    current context; L{check}, called every second or two by a timer, rebuilds the
    context when a file changed, and swaps it in only if it is valid.  Connections
    already open keep the context they started with.

    @ivar material: the generation in use.
    @ivar rotations: how many times new material was put in use.
    @ivar failures: how many changed generations were refused.
    """

    def __init__(self, files: TLSFiles, material: Optional[ServerMaterial] = None,
                 log: Optional[Logger] = None) -> None:
        self.files = files
        self.log = log if log is not None else Logger()
        self._paths = (files.cert, files.key, files.ca)
        self._seen = _fingerprint(self._paths)
        self.material = material if material is not None else loadMaterial(files)
        self._refused: Optional[str] = None
        self.rotations = 0
        self.failures = 0

    def serverConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        """
        A new server connection on the current context.
        """
        return SSL.Connection(self.material.context, None)

    def check(self) -> bool:
        """
        Look at the files: when any changed since the last look, read them, and when
        their contents differ from the material in use, build and swap in the new
        material.  A file that can't be used is logged once per version and ignored.

        @return: whether new material was put in use.
        """
        seen = _fingerprint(self._paths)
        if seen == self._seen:
            return False
        self._seen = seen
        try:
            data = [_read(flag, path) for flag, path in self.files.flagged()]
        except TLSFileError as e:
            return self._refuse(str(e), str(e))
        digest = hashlib.sha256(b"\0".join(data)).hexdigest()
        if digest == self.material.digest or digest == self._refused:
            return False
        try:
            material = buildMaterial(self.files, *data)
        except TLSFileError as e:
            return self._refuse(digest, str(e))
        old, self.material = self.material, material
        self._refused = None
        self.rotations += 1
        self.log.info(
            "mTLS material reloaded: certificate serial {old:x} -> {new:x} ({identity}); "
            "new connections use it",
            old=old.serial, new=material.serial, identity=material.localId or "no SPIFFE id",
        )
        return True

    def _refuse(self, version: str, why: str) -> bool:
        if version != self._refused:
            self._refused = version
            self.failures += 1
            self.log.error(
                "mTLS material not reloaded, still serving certificate serial {serial:x}: {why}",
                serial=self.material.serial, why=why,
            )
        return False


# ------------------------------------------------------------------------------------
# The front door that knows its caller.
# ------------------------------------------------------------------------------------


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
        if not admission.allowed:
            self.denial = DENIAL_BODY
            self.tls.denials += 1
            self.tls.log.warn(
                "mTLS client {client} refused (403, RBAC): {reason}",
                client=self.clientAddress, reason=admission.reason,
            )

    def extraRequestHeaders(self) -> List[Tuple[bytes, bytes]]:
        return self._extra

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:
        timer, self._handshakeTimer = self._handshakeTimer, None
        if timer is not None:
            timer.cancel()
        if not self._handshaken:
            self.tls.handshakeFailures += 1
        DownstreamProtocol.connectionLost(self, reason)


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
        """
        localId = self.context.material.localId
        key = (der, localId)
        admission = self._admissions.get(key)
        if admission is None:
            if len(self._admissions) >= ADMISSION_MEMORY:
                self._admissions.clear()
            admission = admit(self.policy, localId, x509.load_der_x509_certificate(der), der)
            self._admissions[key] = admission
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

    def serverFactory(self, engine: Any, maxHeaderBytes: int) -> TLSMemoryBIOFactory:
        """
        The factory of a mutual-TLS listener: the TLS layer around the fast front door.
        """
        return TLSMemoryBIOFactory(
            self.context, False, MutualTLSDownstreamFactory(engine, maxHeaderBytes, self), clock=self.clock
        )

    def detectingServerFactory(self, detecting: Any) -> TLSMemoryBIOFactory:
        """
        The TLS layer around a L{sidecar.detect.DetectingFactory}: protocol detection
        on the decrypted stream (the detector owns the handshake's timer and counters).
        """
        return TLSMemoryBIOFactory(self.context, False, detecting, clock=self.clock)

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


__all__ = [
    "ALPN", "Admission", "AllowPolicy", "AllowRule", "DENIAL_BODY", "Decision", "InvalidSpiffeId",
    "MutualTLS", "MutualTLSDownstreamFactory", "MutualTLSDownstreamProtocol", "PeerIdentity",
    "PermissiveFactory", "RotatingServerContext", "ServerMaterial", "SpiffeId", "TLSFileError", "TLSFiles",
    "XFCC", "admit", "buildMaterial", "identityFromURIs", "loadMaterial", "parseAllowRule", "parseSpiffeId",
    "peerIdentity", "uriSANs", "xfccElement",
]
