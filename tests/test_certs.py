# -*- test-case-name: tests.test_certs -*-
"""
Tests of C{sidecar-certs}: the development CA and workload certificates it writes.
"""

from __future__ import annotations

import datetime
import io
import os
import stat
import subprocess
import sys

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from twisted.trial import unittest

from sidecar.certs import CertsError, makeCA, run, trustDomainOf
from sidecar.spiffe import peerIdentity
from sidecar.tls import TLSFiles, loadMaterial

NOW = datetime.datetime(2026, 11, 23, 12, 0, tzinfo=datetime.timezone.utc)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class CertsTests(unittest.TestCase):
    """
    C{sidecar-certs ca} and C{sidecar-certs workload}.
    """

    def setUp(self) -> None:
        self.dir = self.mktemp()
        self.out = io.StringIO()

    def run_(self, *argv: str) -> None:
        run([*argv, "--dir", self.dir], NOW, self.out)

    def load(self, name: str) -> x509.Certificate:
        with open(os.path.join(self.dir, name), "rb") as f:
            return x509.load_pem_x509_certificate(f.read())

    def test_ca(self) -> None:
        """
        C{ca} writes a self-signed CA naming its trust domain, with a private key file
        readable by its owner only.
        """
        self.run_("ca", "--trust-domain", "example.org")
        ca = self.load("ca.crt")
        self.assertTrue(ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
        self.assertEqual(trustDomainOf(ca), "example.org")
        ca.verify_directly_issued_by(ca)
        self.assertEqual(stat.S_IMODE(os.stat(os.path.join(self.dir, "ca.key")).st_mode), 0o600)
        self.assertIn("spiffe://example.org", self.out.getvalue())

    def test_workload(self) -> None:
        """
        C{workload} signs an X509-SVID with the Istio-style SPIFFE id in the CA's trust
        domain, valid 24 hours, naming localhost and 127.0.0.1; the pair loads as
        server material.
        """
        self.run_("ca", "--trust-domain", "cluster.local")
        self.run_("workload", "--ns", "shop", "--sa", "cart")
        cert = self.load("cart.crt")
        cert.verify_directly_issued_by(self.load("ca.crt"))
        self.assertEqual(peerIdentity(cert).principal, "spiffe://cluster.local/ns/shop/sa/cart")
        self.assertEqual(cert.not_valid_after_utc - NOW, datetime.timedelta(hours=24))
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        self.assertEqual(san.get_values_for_type(x509.DNSName), ["localhost"])
        self.assertEqual([str(i) for i in san.get_values_for_type(x509.IPAddress)], ["127.0.0.1"])
        material = loadMaterial(TLSFiles(os.path.join(self.dir, "cart.crt"), os.path.join(self.dir, "cart.key"),
                                         os.path.join(self.dir, "ca.crt")))
        self.assertEqual(material.localId, "spiffe://cluster.local/ns/shop/sa/cart")
        with open(os.path.join(self.dir, "cart.key"), "rb") as f:
            serialization.load_pem_private_key(f.read(), password=None)

    def test_names(self) -> None:
        """
        C{--dns} and C{--ip} replace the default names.
        """
        self.run_("ca")
        self.run_("workload", "--sa", "web", "--dns", "web.default.svc", "--ip", "::1")
        san = self.load("web.crt").extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        self.assertEqual(san.get_values_for_type(x509.DNSName), ["web.default.svc"])
        self.assertEqual([str(i) for i in san.get_values_for_type(x509.IPAddress)], ["::1"])

    def test_refusals(self) -> None:
        """
        A second C{ca} without C{--force}, a workload without a CA, an invalid service
        account and a bad IP are refused in words.
        """
        with self.assertRaises(CertsError) as caught:
            self.run_("workload", "--sa", "web")
        self.assertIn("make a CA first", str(caught.exception))
        self.run_("ca")
        with self.assertRaises(CertsError) as caught:
            self.run_("ca")
        self.assertIn("--force", str(caught.exception))
        with self.assertRaises(CertsError) as caught:
            self.run_("workload", "--sa", "we b")
        self.assertIn("not a valid SPIFFE id", str(caught.exception))
        with self.assertRaises(CertsError) as caught:
            self.run_("workload", "--sa", "web", "--ip", "300.1.1.1")
        self.assertIn("--ip", str(caught.exception))

    def test_makeCA(self) -> None:
        """
        L{makeCA} refuses a trust domain that is not one.
        """
        from sidecar.spiffe import InvalidSpiffeId

        with self.assertRaises(InvalidSpiffeId):
            makeCA("Cluster.Local", NOW)

    def test_consoleScript(self) -> None:
        """
        The module runs as a program; an error is one line on stderr and status 1.
        """
        env = dict(os.environ, PYTHONPATH=ROOT)
        done = subprocess.run([sys.executable, "-m", "sidecar.certs", "workload", "--sa", "x", "--dir", self.dir],
                              capture_output=True, text=True, env=env, timeout=60)
        self.assertEqual(done.returncode, 1)
        self.assertTrue(done.stderr.startswith("sidecar-certs: "), done.stderr)
        self.assertEqual(done.stderr.count("\n"), 1)


class LayeringTests(unittest.TestCase):
    """
    The identity code stands apart from the proxy.
    """

    def test_certsWithoutFrontDoor(self) -> None:
        """
        C{import sidecar.certs} (and the pure L{sidecar.spiffe} under it) imports
        neither Twisted nor any front door: a fresh interpreter shows which modules
        were loaded.
        """
        code = ("import sys, sidecar.certs; "
                "print(' '.join(sorted(m for m in sys.modules if m.startswith(('sidecar', 'twisted')))))")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                             cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__)))).stdout.split()
        self.assertEqual(out, ["sidecar", "sidecar.certs", "sidecar.spiffe"])
