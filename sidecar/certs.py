# -*- test-case-name: tests.test_certs -*-
"""
C{sidecar-certs}: a development CA and workload certificates with SPIFFE ids, so that
mutual TLS can be tried in a minute::

    sidecar-certs ca --trust-domain cluster.local          # certs/ca.crt, certs/ca.key
    sidecar-certs workload --ns default --sa backend       # certs/backend.crt, .key
    sidecar-certs workload --ns default --sa frontend      # certs/frontend.crt, .key

Keys are ECDSA P-256.  The CA carries its trust domain as a URI SAN
(C{spiffe://cluster.local}), so C{workload} finds it there.  Workload certificates are
X509-SVIDs: one C{spiffe://TD/ns/NS/sa/SA} URI SAN, usable as server and client
certificates, valid for 24 hours by default (like Istio's); unless C{--dns}/C{--ip} is
given they also name C{localhost} and C{127.0.0.1}, so curl can check the server.

This is a development tool: the CA key sits unencrypted in a file.  The functions
(L{makeCA}, L{issue}, L{makeWorkload}) take the time as an argument and return
certificate and key objects, so tests make expired or odd certificates with them.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
import sys
from typing import List, Optional, Sequence

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from sidecar.spiffe import InvalidSpiffeId, parseSpiffeId, uriSANs

#: How far back C{notBefore} is set, for clocks that are a little behind.
CLOCK_SKEW = datetime.timedelta(minutes=5)


@attrs.frozen
class Issued:
    """
    A certificate and its private key.
    """

    certificate: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    def certificatePEM(self) -> bytes:
        """
        The certificate in PEM.
        """
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    def keyPEM(self) -> bytes:
        """
        The private key in unencrypted PKCS#8 PEM.
        """
        return self.key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )


def newKey() -> ec.EllipticCurvePrivateKey:
    """
    A new ECDSA P-256 key (cheap handshakes, what Istio uses by default).
    """
    return ec.generate_private_key(ec.SECP256R1())


def makeCA(trustDomain: str, now: datetime.datetime, validity: datetime.timedelta = datetime.timedelta(days=365),
           key: Optional[ec.EllipticCurvePrivateKey] = None, name: Optional[str] = None) -> Issued:
    """
    A self-signed CA for C{trustDomain}, carrying C{spiffe://TRUSTDOMAIN} as a URI SAN.

    @param now: the issue time (C{notBefore} is a few minutes earlier).
    @raise InvalidSpiffeId: when C{trustDomain} is not a valid trust domain.
    """
    spiffe = parseSpiffeId(f"spiffe://{trustDomain}")
    key = key or newKey()
    subject = x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "sidecar development CA"),
        x509.NameAttribute(NameOID.COMMON_NAME, (name or f"{trustDomain} root")[:64]),
    ])
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + validity)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                          data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                          encipher_only=False, decipher_only=False),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(str(spiffe))]), critical=False)
        .sign(key, hashes.SHA256())
    )
    return Issued(certificate, key)


def issue(ca: Issued, uris: Sequence[str], now: datetime.datetime,
          validity: datetime.timedelta = datetime.timedelta(hours=24),
          dnsNames: Sequence[str] = (), ips: Sequence[str] = (), commonName: str = "workload",
          notBefore: Optional[datetime.datetime] = None, key: Optional[ec.EllipticCurvePrivateKey] = None,
          serial: Optional[int] = None) -> Issued:
    """
    A leaf certificate signed by C{ca}, for TLS servers and clients, with the given
    URI, DNS and IP SANs (any number of each, so tests can make certificates with no
    or several SPIFFE ids).

    @param now: the issue time; the certificate is valid from a few minutes before it
        (or from C{notBefore}) for C{validity}.
    """
    key = key or newKey()
    names: List[x509.GeneralName] = [x509.UniformResourceIdentifier(u) for u in uris]
    names += [x509.DNSName(d) for d in dnsNames]
    names += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
    start = notBefore if notBefore is not None else now - CLOCK_SKEW
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "sidecar development workload"),
            x509.NameAttribute(NameOID.COMMON_NAME, commonName[:64] or "workload"),
        ]))
        .issuer_name(ca.certificate.subject)
        .public_key(key.public_key())
        .serial_number(serial if serial is not None else x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + validity if notBefore is not None else now + validity)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                          data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
                          encipher_only=False, decipher_only=False),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                       critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False)
    )
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return Issued(builder.sign(ca.key, hashes.SHA256()), key)


def workloadId(trustDomain: str, namespace: str, serviceAccount: str) -> str:
    """
    Istio's SPIFFE id for a service account, C{spiffe://TD/ns/NS/sa/SA}.

    @raise InvalidSpiffeId: when a part makes it invalid.
    """
    return str(parseSpiffeId(f"spiffe://{trustDomain}/ns/{namespace}/sa/{serviceAccount}"))


def makeWorkload(ca: Issued, trustDomain: str, namespace: str, serviceAccount: str, now: datetime.datetime,
                 validity: datetime.timedelta = datetime.timedelta(hours=24),
                 dnsNames: Sequence[str] = ("localhost",), ips: Sequence[str] = ("127.0.0.1",)) -> Issued:
    """
    A workload's X509-SVID: one SPIFFE id for C{namespace}/C{serviceAccount}.
    """
    return issue(ca, [workloadId(trustDomain, namespace, serviceAccount)], now, validity,
                 dnsNames=dnsNames, ips=ips, commonName=serviceAccount)


def trustDomainOf(certificate: x509.Certificate) -> Optional[str]:
    """
    The trust domain a CA made by L{makeCA} names in its URI SAN, else C{None}.
    """
    for uri in uriSANs(certificate):
        try:
            return parseSpiffeId(uri).trustDomain
        except InvalidSpiffeId:
            continue
    return None


def _write(path: str, data: bytes, private: bool) -> None:
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


class CertsError(Exception):
    """
    A sentence for the user; C{main} prints it and exits with status 1.
    """


def _loadCA(directory: str) -> Issued:
    certPath = os.path.join(directory, "ca.crt")
    keyPath = os.path.join(directory, "ca.key")
    try:
        with open(certPath, "rb") as f:
            certificate = x509.load_pem_x509_certificate(f.read())
        with open(keyPath, "rb") as f:
            key = serialization.load_pem_private_key(f.read(), password=None)
    except FileNotFoundError as e:
        raise CertsError(f"{e.filename}: no such file; make a CA first with: sidecar-certs ca --dir {directory}")
    except (OSError, ValueError, TypeError) as e:
        raise CertsError(f"the CA in {directory} cannot be read ({e})")
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CertsError(f"{keyPath}: not an ECDSA key made by sidecar-certs")
    return Issued(certificate, key)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sidecar-certs",
        description="Make a development CA and workload certificates with SPIFFE ids for the sidecar's mutual TLS.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    ca = sub.add_parser("ca", help="make a CA: DIR/ca.crt and DIR/ca.key")
    ca.add_argument("--trust-domain", default="cluster.local", help="the SPIFFE trust domain (default cluster.local)")
    ca.add_argument("--dir", default="certs", help="where to write (default ./certs)")
    ca.add_argument("--days", type=int, default=365, help="validity in days (default 365)")
    ca.add_argument("--force", action="store_true", help="replace an existing CA")
    wl = sub.add_parser("workload", help="make a workload certificate: DIR/SA.crt and DIR/SA.key")
    wl.add_argument("--ns", default="default", help="the namespace (default default)")
    wl.add_argument("--sa", required=True, help="the service account")
    wl.add_argument("--dir", default="certs", help="the CA's directory, where the files go too (default ./certs)")
    wl.add_argument("--trust-domain", default=None, help="default: the CA's")
    wl.add_argument("--hours", type=float, default=24, help="validity in hours (default 24)")
    wl.add_argument("--dns", action="append", default=[], help="a DNS SAN (repeatable; default localhost)")
    wl.add_argument("--ip", action="append", default=[], help="an IP SAN (repeatable; default 127.0.0.1)")
    wl.add_argument("--name", default=None, help="file name stem (default: the service account)")
    return parser


def run(argv: Sequence[str], now: datetime.datetime, out=sys.stdout) -> None:
    """
    Carry out one C{sidecar-certs} command at time C{now}.

    @raise CertsError: with a sentence for the user.
    """
    args = _parser().parse_args(list(argv))
    os.makedirs(args.dir, exist_ok=True)
    try:
        if args.command == "ca":
            certPath = os.path.join(args.dir, "ca.crt")
            if os.path.exists(certPath) and not args.force:
                raise CertsError(f"{certPath} exists; pass --force to replace the CA (every workload "
                                 "certificate it signed stops being trusted)")
            if args.days <= 0:
                raise CertsError("--days must be positive")
            ca = makeCA(args.trust_domain, now, datetime.timedelta(days=args.days))
            _write(os.path.join(args.dir, "ca.key"), ca.keyPEM(), private=True)
            _write(certPath, ca.certificatePEM(), private=False)
            print(f"CA for spiffe://{args.trust_domain}: {certPath} and {os.path.join(args.dir, 'ca.key')}", file=out)
            return
        ca = _loadCA(args.dir)
        trustDomain = args.trust_domain or trustDomainOf(ca.certificate)
        if trustDomain is None:
            raise CertsError(f"the CA in {args.dir} names no trust domain; pass --trust-domain")
        if args.hours <= 0:
            raise CertsError("--hours must be positive")
        dnsNames, ips = args.dns, args.ip
        if not dnsNames and not ips:
            dnsNames, ips = ["localhost"], ["127.0.0.1"]
        try:
            for ip in ips:
                ipaddress.ip_address(ip)
        except ValueError as e:
            raise CertsError(f"--ip: {e}")
        issued = makeWorkload(ca, trustDomain, args.ns, args.sa, now, datetime.timedelta(hours=args.hours),
                              dnsNames=dnsNames, ips=ips)
    except InvalidSpiffeId as e:
        raise CertsError(f"not a valid SPIFFE id: {e}")
    stem = os.path.join(args.dir, args.name or args.sa)
    _write(stem + ".key", issued.keyPEM(), private=True)
    _write(stem + ".crt", issued.certificatePEM(), private=False)
    print(f"{workloadId(trustDomain, args.ns, args.sa)}: {stem}.crt and {stem}.key "
          f"(serial {issued.certificate.serial_number:x}, valid {args.hours:g} h)", file=out)


def main(argv: Optional[Sequence[str]] = None) -> None:
    """
    The C{sidecar-certs} console script.
    """
    try:
        run(sys.argv[1:] if argv is None else argv, datetime.datetime.now(datetime.timezone.utc))
    except CertsError as e:
        print(f"sidecar-certs: {e}.", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":  # pragma: no cover
    main()
