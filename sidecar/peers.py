# -*- test-case-name: tests.test_mesh -*-
"""
Who is at the other end of a mesh call, pure: the peer-metadata exchange between two
sidecars and the labels it fills.

Istio's sidecars tell each other who they are in C{x-envoy-peer-metadata} (a base64
protobuf) and C{x-envoy-peer-metadata-id}.  Ours is one header,
C{x-sidecar-peer-metadata: base64(json)} with C{workload}, C{namespace}, C{app},
C{version}, C{service} and C{cluster}:

  - the client's sidecar adds its own on every request it sends over mutual TLS it
    originated (and drops any copy the application sent);
  - the server's sidecar reads it only on a mutual-TLS connection whose certificate it
    verified (on plaintext the header is dropped unread), answers with its own in the
    response, and drops the request's copy before the service sees it;
  - the client's sidecar reads the answer only from a connection it verified, and
    drops it before the application sees it.

The principal never comes from the metadata: it is the verified certificate's SPIFFE
id.  A value that does not parse, or is larger than L{MAX_METADATA}, is ignored.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from typing import Any, Mapping, Optional

import attrs

#: The header, lower-cased as the forwarding rules look it up.
PEER_METADATA = b"x-sidecar-peer-metadata"

#: The largest metadata value read, in bytes (a mesh peer's is about 200).
MAX_METADATA = 4096

UNKNOWN = "unknown"

#: The fields of the metadata, in the order they are written.
FIELDS = ("workload", "namespace", "app", "version", "service", "cluster")

_SPIFFE = re.compile(r"^spiffe://[^/]+/ns/([^/]+)/sa/([^/]+)$")
_LABEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,252}$")


@attrs.frozen(cache_hash=True)
class PeerLabels:
    """
    What a sidecar learnt of the workload at the other end of a call: the source of an
    inbound call, the destination of an outbound one.  Hashable (part of the
    recorder's series keys), made once per connection or per distinct metadata value.

    @ivar principal: the peer's verified SPIFFE id, or C{""}.
    """

    principal: str = ""
    workload: str = UNKNOWN
    namespace: str = UNKNOWN
    app: str = UNKNOWN
    version: str = UNKNOWN
    service: str = UNKNOWN
    cluster: str = UNKNOWN


def fromPrincipal(principal: str) -> PeerLabels:
    """
    The labels a certificate alone gives: the SPIFFE id and, for an id of Istio's
    form C{spiffe://TD/ns/NS/sa/SA}, the namespace.
    """
    match = _SPIFFE.match(principal)
    return PeerLabels(principal=principal, namespace=match.group(1) if match else UNKNOWN)


def encodeMetadata(labels: Mapping[str, str]) -> bytes:
    """
    The header value for C{labels} (a mapping with the keys of L{FIELDS}; missing or
    C{unknown} ones are left out).
    """
    data = {name: labels[name] for name in FIELDS if labels.get(name, UNKNOWN) not in ("", UNKNOWN)}
    return base64.b64encode(json.dumps(data, sort_keys=True, separators=(",", ":")).encode("utf-8"))


def metadataOf(mesh: Any) -> bytes:
    """
    The header value of this workload, from its L{sidecar.config.MeshLabels}.
    """
    return encodeMetadata({name: getattr(mesh, name) for name in FIELDS})


def decodeMetadata(value: bytes, principal: str) -> Optional[PeerLabels]:
    """
    The labels of a peer whose verified SPIFFE id is C{principal} and whose metadata
    header is C{value}, or C{None} when C{value} is not valid metadata (too large, not
    base64, not a JSON object, a label that is not a label).  The namespace is the
    SPIFFE id's when the id has one: a peer cannot claim another namespace than its
    certificate's.
    """
    if len(value) > MAX_METADATA:
        return None
    try:
        data = json.loads(base64.b64decode(value, validate=True))
    except (binascii.Error, ValueError):
        return None
    if not isinstance(data, dict):
        return None
    fields = {}
    for name in FIELDS:
        label = data.get(name, UNKNOWN)
        if not isinstance(label, str) or (label != UNKNOWN and not _LABEL.match(label)):
            return None
        fields[name] = label
    match = _SPIFFE.match(principal)
    if match is not None:
        fields["namespace"] = match.group(1)
    return PeerLabels(principal=principal, **fields)


class PeerMemory:
    """
    The parse of the last metadata value seen on one connection: a peer sends the same
    value on every request, so each request costs one comparison.
    """

    __slots__ = ("principal", "raw", "labels", "certified")

    def __init__(self, principal: str) -> None:
        self.principal = principal
        self.raw: Optional[bytes] = None
        #: What the certificate alone says.
        self.certified = self.labels = fromPrincipal(principal)

    def learn(self, raw: Optional[bytes]) -> PeerLabels:
        """
        The peer's labels given the metadata value of one message (C{None}: none sent,
        the certificate's labels).
        """
        if raw is None:
            return self.certified
        if raw != self.raw:
            self.raw = raw
            self.labels = decodeMetadata(raw, self.principal) or self.certified
        return self.labels
