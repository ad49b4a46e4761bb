# -*- test-case-name: tests.test_tls -*-
"""
TLS material for the sidecar's listeners: certificate, key and CA files read and
checked (L{loadMaterial}), pyOpenSSL server contexts built from them, and
L{RotatingServerContext}, which rebuilds its context when the files change on disk and
keeps the old one when the new files are bad; and L{TLSLayer}, the TLS transport every
mutual-TLS connection runs over (Twisted's memory-BIO TLS with fewer Python steps per
record).

Identities and policy are in L{sidecar.spiffe} (pure); the mutual-TLS front door is
in L{sidecar.mtls}.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any, List, Optional, Sequence, Tuple

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from OpenSSL import SSL, crypto
from twisted.internet.interfaces import IHandshakeListener, IOpenSSLServerConnectionCreator
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from zope.interface import directlyProvides, implementer, providedBy

from sidecar.spiffe import peerIdentity
from sidecar.transport import prepare

#: TLS 1.2 suites: forward-secret AEAD only (TLS 1.3 suites are all modern already).
TLS12_CIPHERS = (
    b"ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:"
    b"ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:"
    b"ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305"
)

#: TLS 1.3 suites, ours preferred first (the server's order decides): AES-128-GCM with
#: SHA-256 first, as BoringSSL (Envoy) and Go prefer with AES hardware.  OpenSSL's own
#: order puts AES-256-GCM-SHA384 first, whose key schedule runs on SHA-384: a
#: resumed handshake's HKDF costs about twice as much, and every record's AES
#: fourteen rounds instead of ten.
TLS13_CIPHERSUITES = b"TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256"

#: The application protocols offered by ALPN, the preferred first.
ALPN_PROTOCOLS = (b"h2", b"http/1.1")
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
    @ivar clientContext: the pyOpenSSL client context of the same generation, for the
        mutual TLS the sidecar originates to mesh destinations: the same certificate
        and key presented, the server's certificate verified against the same CAs
        (its SPIFFE id is checked after the handshake, L{sidecar.outbound}).
    """

    context: SSL.Context
    localId: str
    serial: int
    digest: str
    clientContext: Optional[SSL.Context] = None


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
    only, forward-secret AEAD suites, ALPN C{h2} and C{http/1.1}, a client certificate required
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

    # Sessions are kept in this context's own cache, and a client's TLS 1.3 ticket is
    # only their id (OP_NO_TICKET): stateless tickets cost OpenSSL a serialisation, a
    # re-parse and an encryption of the session with the client's certificate for each
    # ticket, and a decryption and a parse at each resumption (a fifth of a resumed
    # connection's CPU).  The cache dies with the context: a rotation ends every session.
    context = _context(SSL.TLS_SERVER_METHOD, SSL.OP_CIPHER_SERVER_PREFERENCE | SSL.OP_NO_TICKET, files, leaf,
                       chain[1:], key, authorities)
    for authority in authorities:
        context.add_client_ca(authority)
    context.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT | SSL.VERIFY_CLIENT_ONCE)
    # Session resumption with client verification needs a session id context.
    context.set_session_id(b"sidecar-mtls")
    context.set_alpn_select_callback(_selectALPN)

    local = peerIdentity(leaf)
    digest = hashlib.sha256(b"\0".join([certData, keyData, caData])).hexdigest()
    return ServerMaterial(context, local.principal, leaf.serial_number, digest,
                          _clientContext(files, leaf, chain[1:], key, authorities))


#: OpenSSL's C{SSL_MODE_NO_AUTO_CHAIN} (part of its ABI since 1.0.2; pyOpenSSL names no
#: constant for it).
NO_AUTO_CHAIN = 0x8


def _intermediates(leaf: x509.Certificate, authorities: Sequence[x509.Certificate]) -> List[x509.Certificate]:
    """
    The certificates of the CA bundle that link C{leaf} to a self-signed root, by
    issuer name, the root left out: what OpenSSL's automatic chain would send.
    """
    bySubject: dict[Any, x509.Certificate] = {}
    for authority in authorities:
        bySubject.setdefault(authority.subject, authority)
    chain: List[x509.Certificate] = []
    current = leaf
    while len(chain) < 8:
        issuer = bySubject.get(current.issuer)
        if issuer is None or issuer.issuer == issuer.subject or issuer in chain:
            break
        chain.append(issuer)
        current = issuer
    return chain


def _context(method: int, options: int, files: TLSFiles, leaf: x509.Certificate,
             extras: Sequence[x509.Certificate], key: Any, authorities: Sequence[x509.Certificate]) -> SSL.Context:
    """
    What the server and client contexts share: TLS 1.2 and 1.3, forward-secret AEAD
    suites, no compression, no renegotiation, our certificate (with its chain) and key,
    and the CAs that verify the peer.

    The chain we present is decided here, once: the certificate file's own chain, or,
    when it holds only the leaf, the intermediates of the CA bundle that lead to it.
    OpenSSL would otherwise build that chain from the CA store at every full handshake
    (a chain verification per handshake, an eighth of a server's handshake CPU), and
    send the same certificates.
    """
    context = SSL.Context(method)
    context.set_min_proto_version(SSL.TLS1_2_VERSION)
    context.set_max_proto_version(SSL.TLS1_3_VERSION)
    context.set_options(SSL.OP_NO_COMPRESSION | SSL.OP_NO_RENEGOTIATION | options)
    context.set_cipher_list(TLS12_CIPHERS)
    context.set_tls13_ciphersuites(TLS13_CIPHERSUITES)
    context.set_mode(NO_AUTO_CHAIN)
    if not extras:
        extras = _intermediates(leaf, authorities)
    try:
        context.use_certificate(leaf)
        for extra in extras:
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
    return context


def _clientContext(files: TLSFiles, leaf: x509.Certificate, extras: Sequence[x509.Certificate], key: Any,
                   authorities: Sequence[x509.Certificate]) -> SSL.Context:
    """
    The client side of the same material: the server's chain verified against the CAs
    (no host name check: a mesh server is identified by its SPIFFE id, checked after
    the handshake).  ALPN is set per connection.
    """
    context = _context(SSL.TLS_CLIENT_METHOD, 0, files, leaf, extras, key, authorities)
    context.set_verify(SSL.VERIFY_PEER)
    return context


def _selectALPN(connection: SSL.Connection, offered: List[bytes]) -> Any:
    for protocol in ALPN_PROTOCOLS:
        if protocol in offered:
            return protocol
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

    def clientConnection(self) -> SSL.Connection:
        """
        A new client connection on the current generation's client context (for the
        mutual TLS the sidecar originates): it rotates with the server side.
        """
        connection = SSL.Connection(self.material.clientContext, None)
        connection.set_connect_state()
        return connection

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


#: What one call to read the TLS layer's output asks for at least (Twisted's size).
OUTPUT_READ = 2 ** 15

#: What one read of decrypted bytes asks for (one record is at most 16 KiB).
INPUT_READ = 2 ** 15


class PortableTLSLayer(TLSMemoryBIOProtocol):
    """
    Twisted's memory-BIO TLS transport with fewer Python steps per record, for every
    mutual-TLS connection, served or originated.  What it changes (the Twisted
    internals it relies on are listed in L{sidecar.compat}):

      - B{writes go out at once}: Twisted's default layer
        (C{BufferingTLSTransport}) holds small writes for a C{callLater(0)} and one
        more reactor turn, to make one record of many small writes.  The doors already
        write one response as one C{write} (head and body of one upstream read), so
        that costs a timer and a turn per response and gains nothing;
      - B{one output read and one send per write}: the buffer is handed to OpenSSL
        without copies (Twisted cuts it into 16 KiB slices, each copied, each followed
        by a read of the output and a send), and the records OpenSSL makes of it are
        read out with one C{bio_read} sized for them;
      - B{a server's TLS 1.3 session tickets ride with its first bytes}: OpenSSL
        writes them as the handshake completes; Twisted sends them in a segment of
        their own, we send them with the response (or the close), one send fewer per
        new connection.  A client's handshake bytes and every TLS 1.2 flight still go
        at once;
      - B{no empty output read after each TLS 1.3 read}: Twisted looks for output
        after every read (and gets an exception from OpenSSL when there is none); in
        TLS 1.3 a read leaves nothing that must go at once;
      - B{the handshake is sent at once}: the TCP connection under it gets the direct
        sends of L{sidecar.transport} from the start (the doors give them only after
        detection), so a server's first flight is not left for the next reactor turn;
      - the transport's interfaces are looked up once per transport class rather than
        declared one by one on every connection (the same result: Twisted's loop
        leaves the last one), and a server does not step its handshake before the
        client has sent anything.

    Reads, producers, close and errors are Twisted's.  This class talks to OpenSSL
    through pyOpenSSL's public C{Connection} methods; L{TLSLayer}, which every
    connection uses where the binding allows, makes the same calls without
    pyOpenSSL's per-call wrapping.
    """

    factory: TLSLayerFactory

    def makeConnection(self, transport: Any) -> None:
        self._tlsConnection = self.factory._creatorCallable(self)
        self._appSendBuffer = []
        provided = self.factory.interfaceOf(transport)
        if provided is not None:
            directlyProvides(self, provided)
        Protocol.makeConnection(self, transport)
        # The handshake's flights, too, leave within the call that makes them.
        prepare(self)
        self.factory.registerProtocol(self)
        if self._connectWrapped:
            ProtocolWrapper.makeConnection(self, transport)
        if not self.factory.server:
            # A client starts with its ClientHello; a server has nothing to do until
            # one arrives (Twisted asks OpenSSL anyway, and reads nothing back).
            self._checkHandshakeStatus()

    #: Whether reading can leave output behind that must go at once (not in TLS 1.3,
    #: whose post-handshake messages need no prompt answer: see L{dataReceived}).
    _readsWrite = True

    def dataReceived(self, data: bytes) -> None:
        tls = self._tlsConnection
        tls.bio_write(data)
        flush = self._readsWrite
        if not self._handshakeDone:
            self._checkHandshakeStatus()
            if not self._handshakeDone:
                return
            if tls.get_protocol_version() == SSL.TLS1_3_VERSION:
                # In TLS 1.3 reading writes nothing that is needed at once: a
                # KeyUpdate is answered with our next record, a NewSessionTicket
                # is answered by nothing, there is no renegotiation, and errors
                # and close_notify flush their alerts themselves.
                self._readsWrite = False
                # A client's Finished goes now; a server's session tickets wait
                # for its first bytes.
                flush = not self.factory.server
        if self._appSendBuffer:
            self._unbufferPendingWrites()
        while not self._lostTLSConnection:
            try:
                received = tls.recv(INPUT_READ)
            except SSL.WantReadError:
                break
            except SSL.ZeroReturnError:
                self._shutdownTLS()
                self._tlsShutdownFinished(None)
            except SSL.Error:
                self._tlsShutdownFinished(Failure())
            else:
                if not self._aborted:
                    self.wrappedProtocol.dataReceived(received)
        if flush:
            self._flushSendBIO()

    def _write(self, data: bytes) -> None:
        if self._lostTLSConnection:
            return
        size = len(data)
        if not size:
            return
        tls = self._tlsConnection
        view = memoryview(data) if size > 16384 else data
        done = 0
        while done < size:
            try:
                done += tls.send(view[done:] if done else view)
            except SSL.WantReadError:
                self._bufferedWrite(bytes(view[done:]))
                break
            except SSL.Error:
                self._tlsShutdownFinished(Failure())
                return
        self._flushSendBIO(size)

    def _flushSendBIO(self, expected: int = 0) -> None:
        """
        Send whatever OpenSSL has written, in as few reads as its size allows.

        @param expected: how many plaintext bytes were just encrypted.
        """
        tls = self._tlsConnection
        size = OUTPUT_READ if expected < OUTPUT_READ // 2 else expected + (expected >> 6) + OUTPUT_READ // 2
        while True:
            try:
                data = tls.bio_read(size)
            except SSL.WantReadError:
                return
            self.transport.write(data)
            if len(data) < size:
                return


def _rawBinding() -> Any:
    """
    The cffi binding pyOpenSSL calls OpenSSL through (C{OpenSSL._util.lib} and
    C{ffi}), when it has what L{TLSLayer} calls and a C{Connection} holds its C{SSL}
    object and memory BIOs where L{TLSLayer} reads them; otherwise C{None} (every
    connection then uses L{PortableTLSLayer}: correct, only slower).
    """
    try:
        from OpenSSL._util import ffi, lib
        names = ("SSL_read", "SSL_write", "SSL_do_handshake", "SSL_get_error", "SSL_pending", "BIO_read",
                 "BIO_write", "BIO_set_mem_eof_return", "BIO_get_mem_data", "ERR_peek_error", "ERR_GET_REASON",
                 "ERR_clear_error", "SSL_ERROR_WANT_READ", "SSL_ERROR_SSL", "SSL_ERROR_SYSCALL")
        if not all(hasattr(lib, name) for name in names):
            return None
        probe = SSL.Connection(SSL.Context(SSL.TLS_METHOD), None)
        if not all(hasattr(probe, name) for name in ("_ssl", "_into_ssl", "_from_ssl", "_raise_ssl_error",
                                                  "_handle_bio_errors")):
            return None
        return ffi, lib
    except Exception:
        return None


_BINDING = _rawBinding()


class TLSLayer(PortableTLSLayer):
    """
    L{PortableTLSLayer} calling OpenSSL's C{SSL_read}, C{SSL_write},
    C{SSL_do_handshake}, C{BIO_read} and C{BIO_write} through pyOpenSSL's own cffi
    binding, on the C{SSL} object and memory BIOs of the pyOpenSSL C{Connection}:
    the same calls pyOpenSSL makes, without its wrapping (per call: checks of the
    argument's type, a fresh buffer, three callback-error checks and an
    C{SSL_get_error}; and for every "nothing more to read" an exception raised and
    caught).  The results are read as pyOpenSSL reads them: any outcome other than
    data or "want read" is handed to pyOpenSSL's own C{_raise_ssl_error}, so errors,
    alerts and close_notify reach Twisted as the same exceptions.  The buffers the
    bytes are read into are the factory's, reused (the bytes are copied out before
    anything else runs).  Used where L{_rawBinding} finds the binding as expected.
    """

    _rawSSL: Any = None
    _rawInto: Any = None
    _rawFrom: Any = None

    def makeConnection(self, transport: Any) -> None:
        tls = self.factory._creatorCallable(self)
        self._rawSSL = tls._ssl
        self._rawInto = tls._into_ssl
        self._rawFrom = tls._from_ssl
        self._tlsConnection = tls
        self._appSendBuffer = []
        provided = self.factory.interfaceOf(transport)
        if provided is not None:
            directlyProvides(self, provided)
        Protocol.makeConnection(self, transport)
        prepare(self)
        self.factory.registerProtocol(self)
        if self._connectWrapped:
            ProtocolWrapper.makeConnection(self, transport)
        if not self.factory.server:
            self._checkHandshakeStatus()

    def _checkHandshakeStatus(self) -> None:
        if self._aborted:
            return
        ssl = self._rawSSL
        result = _lib.SSL_do_handshake(ssl)
        if result == 1:
            self._handshakeDone = True
            if IHandshakeListener.providedBy(self.wrappedProtocol):
                self.wrappedProtocol.handshakeCompleted()
            return
        if _lib.SSL_get_error(ssl, result) == _WANT_READ:
            self._flushSendBIO()
            return
        try:
            self._tlsConnection._raise_ssl_error(ssl, result)
        except SSL.WantReadError:
            self._flushSendBIO()
        except SSL.Error:
            self._tlsShutdownFinished(Failure())

    def dataReceived(self, data: bytes) -> None:
        ssl = self._rawSSL
        if ssl is None:
            return
        written = _lib.BIO_write(self._rawInto, data, len(data))
        if written != len(data):
            # A memory BIO takes all or nothing (nothing: out of memory).
            self._tlsConnection._handle_bio_errors(self._rawInto, written)
        flush = self._readsWrite
        if not self._handshakeDone:
            self._checkHandshakeStatus()
            if not self._handshakeDone:
                return
            if self._tlsConnection.get_protocol_version() == SSL.TLS1_3_VERSION:
                self._readsWrite = False
                flush = not self.factory.server
        if self._appSendBuffer:
            self._unbufferPendingWrites()
        self._readRecords(ssl)
        if flush:
            self._flushSendBIO()

    def _readRecords(self, ssl: Any) -> None:
        """
        Decrypt what the records written to OpenSSL hold and hand it to the wrapped
        protocol, until OpenSSL wants more, the peer closes, or an error.
        """
        buffer = self.factory.inputBuffer
        source = self._rawInto
        while not self._lostTLSConnection:
            received = _lib.SSL_read(ssl, buffer, INPUT_READ)
            if received > 0:
                if not self._aborted:
                    self.wrappedProtocol.dataReceived(_ffi.unpack(buffer, received))
                if not _lib.BIO_get_mem_data(source, _ffi.NULL) and not _lib.SSL_pending(ssl):
                    # Every byte written in was a whole record and is read (OpenSSL
                    # reads no further ahead than the record it decrypts): the next
                    # read would only say so.
                    return
                continue
            error = _lib.SSL_get_error(ssl, received)
            if error == _WANT_READ:
                return
            if received == 0 and _unexpectedEOF(error):
                # The TCP connection ended without close_notify (most clients close
                # so): pyOpenSSL's "Unexpected EOF" (which Twisted turns into
                # ConnectionLost), without raising it and capturing its traceback.
                _lib.ERR_clear_error()
                self._tlsShutdownFinished(Failure(SSL.SysCallError(-1, "Unexpected EOF")))
                return
            try:
                self._tlsConnection._raise_ssl_error(ssl, received)
            except SSL.WantReadError:
                return
            except SSL.ZeroReturnError:
                self._shutdownTLS()
                self._tlsShutdownFinished(None)
            except SSL.Error:
                self._tlsShutdownFinished(Failure())

    def _write(self, data: bytes) -> None:
        if self._lostTLSConnection:
            return
        size = len(data)
        if not size:
            return
        ssl = self._rawSSL
        done = _lib.SSL_write(ssl, data if type(data) is bytes else _ffi.from_buffer(data), size)
        if done == size and size < OUTPUT_READ // 2:
            # The usual write: its records (and a server's first session tickets)
            # fit the factory's buffer.
            buffer = self.factory.outputBuffer
            read = _lib.BIO_read(self._rawFrom, buffer, OUTPUT_READ)
            if read > 0:
                self.transport.write(_ffi.unpack(buffer, read))
                if read == OUTPUT_READ:
                    self._flushSendBIO()
            return
        if done <= 0:
            # In the middle of a handshake (the bytes wait for its end), or an error:
            # pyOpenSSL's reading of the result tells which.
            try:
                self._tlsConnection._raise_ssl_error(ssl, done)
            except SSL.WantReadError:
                self._bufferedWrite(bytes(data))
            except SSL.Error:
                self._tlsShutdownFinished(Failure())
                return
        elif done < size:
            # OpenSSL writes all or nothing unless asked otherwise; pyOpenSSL does not ask.
            self._writeRest(memoryview(data), size, done)
        self._flushSendBIO(size)

    def write(self, data: bytes) -> None:
        # Twisted's write and writeSequence, one call shorter.
        if self.disconnecting and self._producer is None:
            return
        self._write(data)

    def writeSequence(self, iovec: Any) -> None:
        if self.disconnecting and self._producer is None:
            return
        self._write(b"".join(iovec))

    def _writeRest(self, view: memoryview, size: int, done: int) -> None:
        tls = self._tlsConnection
        while done < size:
            try:
                done += tls.send(view[done:])
            except SSL.WantReadError:
                self._bufferedWrite(bytes(view[done:]))
                return
            except SSL.Error:
                self._tlsShutdownFinished(Failure())
                return

    def _flushSendBIO(self, expected: int = 0) -> None:
        """
        Send whatever OpenSSL has written, in as few reads as its size allows.

        @param expected: how many plaintext bytes were just encrypted.
        """
        source = self._rawFrom
        if source is None:
            return
        if expected < OUTPUT_READ // 2:
            size = OUTPUT_READ
            buffer = self.factory.outputBuffer
        else:
            size = expected + (expected >> 6) + OUTPUT_READ // 2
            buffer = _allocate("char[]", size)
        while True:
            read = _lib.BIO_read(source, buffer, size)
            if read <= 0:
                return
            self.transport.write(_ffi.unpack(buffer, read))
            if read < size:
                return

    def connectionLost(self, reason: Failure) -> None:
        """
        Twisted's, with the last records read as L{dataReceived} reads them.
        """
        ssl = self._rawSSL
        if not self._lostTLSConnection and ssl is not None:
            # The peer sends nothing more: OpenSSL reads the end of the stream.
            _lib.BIO_set_mem_eof_return(self._rawInto, 0)
            self._readRecords(ssl)
            self._lostTLSConnection = True
        self._rawSSL = self._rawInto = self._rawFrom = None
        reason = self._reason or reason
        self._reason = None
        self.connected = False
        ProtocolWrapper.connectionLost(self, reason)
        self._tlsConnection = None


def _unexpectedEOF(error: int) -> bool:
    """
    Whether C{SSL_get_error}'s C{error} for a read that returned 0 is the end of the
    stream without close_notify, as pyOpenSSL tells it (C{SysCallError(-1,
    "Unexpected EOF")}, which Twisted turns into C{ConnectionLost}): OpenSSL 3's
    C{SSL_R_UNEXPECTED_EOF_WHILE_READING}, or OpenSSL 1.1's syscall error with
    nothing queued.
    """
    if error == _lib.SSL_ERROR_SSL:
        return _lib.ERR_GET_REASON(_lib.ERR_peek_error()) == _EOF_REASON
    return error == _lib.SSL_ERROR_SYSCALL and _lib.ERR_peek_error() == 0


if _BINDING is not None:
    _ffi, _lib = _BINDING
    _WANT_READ = _lib.SSL_ERROR_WANT_READ
    _EOF_REASON = getattr(_lib, "SSL_R_UNEXPECTED_EOF_WHILE_READING", -1)
    _allocate = _ffi.new_allocator(should_clear_after_alloc=False)


class TLSLayerFactory(TLSMemoryBIOFactory):
    """
    Wraps a factory's protocols in L{TLSLayer}s.

    @ivar server: whether its connections are TLS servers.
    """

    protocol = TLSLayer if _BINDING is not None else PortableTLSLayer

    def __init__(self, contextFactory: Any, isClient: bool, wrappedFactory: Any, clock: Any = None) -> None:
        TLSMemoryBIOFactory.__init__(self, contextFactory, isClient, wrappedFactory, clock)
        self.server = not isClient
        self._interfaces: dict[type, Any] = {}
        if _BINDING is not None:
            #: What L{TLSLayer}s read decrypted bytes and records into (the bytes are
            #: copied out at once; one reactor thread uses them).
            self.inputBuffer = _allocate("char[]", INPUT_READ)
            self.outputBuffer = _allocate("char[]", OUTPUT_READ)

    def interfaceOf(self, transport: Any) -> Any:
        """
        The interface a TLS layer over C{transport} directly provides, as Twisted's
        layer leaves it (the last of the transport's), remembered per class.
        """
        kind = type(transport)
        try:
            return self._interfaces[kind]
        except KeyError:
            provided = list(providedBy(transport))
            found = self._interfaces[kind] = provided[-1] if provided else None
            return found
