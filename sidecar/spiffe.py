# -*- test-case-name: tests.test_tls -*-
"""
Workload identity and policy, pure: SPIFFE ids, the allow policy, the
C{X-Forwarded-Client-Cert} value and the admission of a client certificate.

In the manner of service-identity's C{hazmat.py}, everything here works on
certificates and strings and returns structured results: no reactor, no files, no
OpenSSL objects, no Twisted import.  L{sidecar.tls} builds contexts from files and
L{sidecar.mtls} is the front door that uses these.

Why not service-identity for the SPIFFE id: its URI-IDs compare only scheme and
host, so C{spiffe://cluster.local/ns/a/sa/evil} would match an expected
C{spiffe://cluster.local/ns/a/sa/good}; a workload identity needs the exact
comparison of L{AllowPolicy}.  service-identity remains the tool for DNS and IP
identities (a Twisted client's C{optionsForClientTLS} uses it; the tests do).
"""

from __future__ import annotations

import hashlib
import re
from typing import Optional, Sequence, Tuple

import attrs
from cryptography import x509

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
    @ivar notAfter: when the certificate expires, in seconds since the epoch (a
        resumed TLS session is not checked again by OpenSSL; the door is).
    """

    principal: str
    allowed: bool
    reason: str
    xfcc: bytes
    notAfter: float = float("inf")


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
                     xfccElement(localId, der, identity.principal), certificate.not_valid_after_utc.timestamp())
