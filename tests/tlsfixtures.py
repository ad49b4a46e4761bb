# -*- test-case-name: tests.test_tls -*-
"""
Certificates and files for the mutual-TLS tests: a mesh CA with a server and a few
clients (allowed, refused, expired, without or with several SPIFFE ids), a stranger
CA, and a Kubernetes-style secret directory whose contents are swapped through the
C{..data} symlink the way the kubelet does it.
"""

from __future__ import annotations

import datetime
import os
from typing import Dict, Optional

import attrs

from sidecar.certs import Issued, issue, makeCA, makeWorkload

TRUST_DOMAIN = "cluster.local"
SERVER_ID = "spiffe://cluster.local/ns/default/sa/backend"
FRONTEND_ID = "spiffe://cluster.local/ns/default/sa/frontend"
EVIL_ID = "spiffe://cluster.local/ns/default/sa/evil"


def now() -> datetime.datetime:
    """
    The wall-clock time, for certificates that real TLS stacks check.
    """
    return datetime.datetime.now(datetime.timezone.utc)


@attrs.define
class Mesh:
    """
    The certificates of one test, written as C{NAME.crt}/C{NAME.key} in C{directory}
    (and C{ca.crt}, C{other-ca.crt}).
    """

    directory: str
    ca: Issued
    otherCA: Issued
    issued: Dict[str, Issued]

    def crt(self, name: str) -> str:
        """
        The path of C{NAME.crt}.
        """
        return os.path.join(self.directory, name + ".crt")

    def key(self, name: str) -> str:
        """
        The path of C{NAME.key}.
        """
        return os.path.join(self.directory, name + ".key")

    def newServer(self, name: str, serial: Optional[int] = None) -> Issued:
        """
        Issue (and write as C{NAME}) another server certificate for C{backend}.
        """
        issued = issue(self.ca, [SERVER_ID], now(), dnsNames=["localhost"], ips=["127.0.0.1"],
                       commonName="backend", serial=serial)
        _writeIssued(self.directory, name, issued)
        self.issued[name] = issued
        return issued


def _writeIssued(directory: str, name: str, issued: Issued) -> None:
    with open(os.path.join(directory, name + ".crt"), "wb") as f:
        f.write(issued.certificatePEM())
    with open(os.path.join(directory, name + ".key"), "wb") as f:
        f.write(issued.keyPEM())


def writeMesh(directory: str) -> Mesh:
    """
    Make and write the test certificates:

      - C{backend}: the proxy's own (server) certificate;
      - C{frontend}: an allowed client; C{evil}: a client of the same CA that the
        policy refuses;
      - C{stranger}: C{frontend}'s id signed by another CA;
      - C{expired}: C{frontend}'s id, expired yesterday;
      - C{noid}: no SPIFFE id; C{twoids}: two SPIFFE ids.
    """
    os.makedirs(directory, exist_ok=True)
    t = now()
    ca = makeCA(TRUST_DOMAIN, t)
    otherCA = makeCA(TRUST_DOMAIN, t, name="another mesh's root")
    issued = {
        "backend": makeWorkload(ca, TRUST_DOMAIN, "default", "backend", t),
        "frontend": makeWorkload(ca, TRUST_DOMAIN, "default", "frontend", t),
        "evil": makeWorkload(ca, TRUST_DOMAIN, "default", "evil", t),
        "stranger": makeWorkload(otherCA, TRUST_DOMAIN, "default", "frontend", t),
        "expired": issue(ca, [FRONTEND_ID], t, validity=datetime.timedelta(days=1),
                         notBefore=t - datetime.timedelta(days=2), commonName="frontend"),
        "noid": issue(ca, [], t, dnsNames=["frontend.example"], commonName="frontend"),
        "twoids": issue(ca, [FRONTEND_ID, EVIL_ID], t, commonName="frontend"),
    }
    for name, one in issued.items():
        _writeIssued(directory, name, one)
    with open(os.path.join(directory, "ca.crt"), "wb") as f:
        f.write(ca.certificatePEM())
    with open(os.path.join(directory, "other-ca.crt"), "wb") as f:
        f.write(otherCA.certificatePEM())
    return Mesh(directory, ca, otherCA, issued)


class KubernetesSecret:
    """
    A directory laid out like a mounted Kubernetes secret: C{tls.crt}, C{tls.key} and
    C{ca.crt} are symlinks to C{..data/NAME}, and C{..data} is a symlink to a
    timestamped directory; an update writes a new directory and renames a new symlink
    over C{..data}, atomically.
    """

    FILES = ("tls.crt", "tls.key", "ca.crt")

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.generation = 0
        os.makedirs(directory, exist_ok=True)

    def path(self, name: str) -> str:
        """
        The path the proxy is given for C{name} (one of L{FILES}).
        """
        return os.path.join(self.directory, name)

    def update(self, cert: bytes, key: bytes, ca: bytes) -> None:
        """
        Publish new contents the way the kubelet does.
        """
        self.generation += 1
        stamp = f"..2026_11_23_00_00_{self.generation:02d}"
        target = os.path.join(self.directory, stamp)
        os.makedirs(target)
        for name, data in zip(self.FILES, (cert, key, ca)):
            with open(os.path.join(target, name), "wb") as f:
                f.write(data)
        tmp = os.path.join(self.directory, "..data_tmp")
        os.symlink(stamp, tmp)
        os.replace(tmp, os.path.join(self.directory, "..data"))
        for name in self.FILES:
            link = os.path.join(self.directory, name)
            if not os.path.islink(link):
                os.symlink(os.path.join("..data", name), link)
