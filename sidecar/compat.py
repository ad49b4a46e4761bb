# -*- test-case-name: tests.test_compat -*-
"""
Every use the sidecar makes of Twisted's (and h2's and hyperframe's) internals, in one place.

Twisted promises nothing about attributes it does not document, so each one read
here is named with why the sidecar needs it and what happens when a Twisted
release drops it: the sidecar keeps working, only slower or with less to say.
C{setup.py}/C{pyproject.toml} bound Twisted below the next release not yet tested
(L{TESTED_TWISTED}), and C{tests.test_compat} fails on any Twisted where one of
these attributes is gone, so an upgrade that breaks them is seen in CI, not in
production.

The uses:

  - L{writeQueueEmpty}: C{FileDescriptor._tempDataLen} and
    C{FileDescriptor._writeDisconnected} (with the undocumented but public
    C{dataBuffer}, C{disconnecting} and C{connected}).  The optimistic writes of
    L{sidecar.transport} send at once only when Twisted holds nothing queued for
    the connection, or bytes would go out of order.  Twisted has no public "is
    the write buffer empty" call.  Without the attributes every write takes
    Twisted's buffered path (correct, one reactor round trip slower).  The fast
    door's close at once (C{sidecar.downstream._closeAtOnce}) reads
    C{_tempDataLen} too, to close without waiting for the socket to be writable.
  - C{tcp.Port._logger}, the class-level C{Logger} descriptor Twisted's TCP port
    reads twice per accept: L{sidecar.service.keepAcceptLogger} stores the logger
    it builds on each listening port, so that it is built once, not per accept.
    Without it the port keeps Twisted's descriptor (a little more work per accept).
  - The accept loop of L{sidecar.listen}: L{sidecar.listen.speedUp} changes the class
    of each started proxied C{tcp.Port} to C{FastPort}, a subclass whose C{doRead}
    reads the port's C{socket}, C{addressFamily}, C{factory}, C{_addressType},
    C{reactor}, C{numberAccepts} and C{sessionno} as Twisted's own loop does, and
    accepts with the listening socket's C{_accept} (CPython's private C method under
    C{socket.accept}, which returns the descriptor and the address without building
    a Python-level socket).  It builds C{FastServer} transports whose C{__init__} sets
    the attributes Twisted's three C{__init__}s set (C{_tempDataBuffer},
    C{_tempDataLen}, C{socket}, C{fileno}, C{protocol}, C{server}, C{client},
    C{sessionno}, C{hostname}, C{connected}; C{logstr} and C{repstr} formatted when
    read), that close without C{shutdown()} (C{_shouldShutdown}), and whose writers
    for the fast door read C{_tempDataLen} and C{_writeDisconnected} as
    L{writeQueueEmpty} does.  Why: Twisted's accept and transport set-up were a fifth
    of the user-space CPU of a connection that carries one request (README, "A new
    connection per request").  L{fastPortPossible} checks the port has what is read;
    without it the port stays Twisted's (correct, slower).  C{tests.test_listen}
    fails on a Twisted whose C{tcp.Server} sets attributes C{FastServer} does not.
  - L{listeningPort}: C{StreamServerEndpointService._waitingForPort}, the
    Deferred of the port a listener service opened.  The drain log names the
    addresses the proxy listens on (C{"listening on 127.0.0.1:8000"}), including
    the port the kernel chose for port 0.  Twisted's service does not expose
    its port.  Without it the address is logged as C{"?"}.

  - L{sidecar.resource.SidecarChannel}, the web door's channel, a subclass of
    L{twisted.web.http.HTTPChannel}: it overrides the C{_respondToBadRequestAndDisconnect}
    hook (twisted.web's only way to answer a malformed request) so the answer is the
    proxy's; reads C{_receivedHeaderSize} and C{_receivedHeaderCount} to answer 414/431
    before twisted.web would answer a bare 400; and reads C{_command}, C{_path} and
    C{_version} (set per request, so not listed below) at the end of a head, to render
    and stream the request before its body has arrived.  Without them the behaviour
    suite's web door tests fail.

An order relied upon, not an attribute: L{sidecar.logs.takeOverRunnerLog} replaces
C{sys.stdout} (twistd) or C{TwistOptions["logFile"]} (C{python -m twisted}) in the
plugin's C{makeService}, because both runners build their log observer from it only
afterwards (C{AppLogger.start}, C{Runner.startLogging}).  Should a release build it
earlier, twistd's log goes back to blocking writes on stdout; C{tests.test_logs}
(C{TakeOverTests} and the unread-pipe processes) fails on such a Twisted.

Uses of h2's and hyperframe's internals (python-hyper), for the HTTP/2 codec's
fallback (L{tuneH2Connection}, called on every C{H2Connection} the door and the
upstream build when they use h2 rather than libnghttp2, L{sidecar.nghttp2}, which
needs none of these):

  - C{hyperframe.frame._raw_data_repr}, replaced process-wide by L{_rawDataRepr}
    (L{trimFrameRepr}).  h2 formats C{repr(frame)} for a trace line on every frame
    it receives (C{H2Connection._receive_frame}), even when nothing logs, and
    hyperframe's helper hexlifies a DATA frame's whole body (16 KiB) before keeping
    20 characters: a tenth of the proxy's CPU on a large download.  The replacement
    writes the same text from the first bytes, so every repr reads as before.
    Without the attribute (a hyperframe that renamed it) nothing is replaced: reprs
    cost what they cost.  C{tests.test_compat} checks the text is hyperframe's.
  - C{H2Connection.encoder}, the connection's HPACK encoder, replaced by a
    L{PlainEncoder} before the first frame: literals go out without Huffman coding.
    Huffman coding is pure Python in C{hpack} and was a third of its encode time;
    on loopback to the service the few extra bytes cost less than the CPU (the
    decoders, ours and the peer's, are faster on plain literals too).  h2 calls
    C{encoder.encode(headers)} and sets C{encoder.header_table_size} on a
    SETTINGS change, both of which the subclass keeps.  Without the attribute the
    connection keeps h2's own encoder (Huffman on).

  - L{sidecar.tls.TLSLayer}, the TLS transport of every mutual-TLS connection, a
    subclass of L{twisted.protocols.tls.TLSMemoryBIOProtocol}: it replaces
    C{makeConnection}, C{dataReceived}, C{_write} and C{_flushSendBIO}, and so uses
    the instance attributes C{_tlsConnection}, C{_appSendBuffer}, C{_connectWrapped},
    C{_handshakeDone}, C{_lostTLSConnection} and C{_aborted}, the methods
    C{_checkHandshakeStatus}, C{_unbufferPendingWrites}, C{_bufferedWrite},
    C{_shutdownTLS} and C{_tlsShutdownFinished}, and the factory's
    C{_creatorCallable}, as Twisted 26.10's own C{dataReceived} and C{_write} do.
    Twisted reshaping that class would make mutual TLS fail, not slow down:
    C{tests.test_tls_layer} handshakes and moves bytes through it on every Twisted CI
    runs, and the class-level names are checked here.
    It also reads, from pyOpenSSL, a C{Connection}'s C{_ssl}, C{_into_ssl} and
    C{_from_ssl} (its C{SSL} object and memory BIOs, to call C{SSL_read}, C{SSL_write},
    C{SSL_do_handshake}, C{BIO_read} and C{BIO_write} through C{OpenSSL._util.lib}
    without pyOpenSSL's per-call wrapping) and its C{_raise_ssl_error} and
    C{_handle_bio_errors} (so that every error is still read as pyOpenSSL reads it).
    C{sidecar.tls._rawBinding} looks for all of them at import; without any, every
    connection uses C{PortableTLSLayer}, which makes the public calls: slower, not
    broken.  C{tests.test_tls_layer} runs the layer tests over both.

A use that needs none: the listeners' synchronous start-up errors
(C{_raiseSynchronously}, so that C{twistd} fails at once on a port in use) come
from the public L{twisted.application.strports.service}, which sets it.
"""

from __future__ import annotations

import binascii
from typing import Any, Callable, Optional

import hyperframe.frame
from hpack import Encoder

from twisted.application.internet import StreamServerEndpointService
from twisted.internet import tcp
from twisted.internet.abstract import FileDescriptor
from twisted.internet.defer import Deferred
from twisted.protocols.tls import TLSMemoryBIOProtocol
from twisted.web.http import HTTPChannel

from sidecar.listen import FastServer

#: (Its transports have the attributes, set by its own C{__init__}.)
_FastServer = FastServer

#: The Twisted release these uses were last checked against (C{tests.test_compat}).
#: The dependency's upper bound is the next minor release after it.
TESTED_TWISTED = (26, 10)

#: The private attributes read, by the class that has them.
PRIVATE_ATTRIBUTES: dict[type, tuple[str, ...]] = {
    FileDescriptor: ("_tempDataLen", "_writeDisconnected"),
    StreamServerEndpointService: ("_waitingForPort",),
    HTTPChannel: ("_respondToBadRequestAndDisconnect", "_receivedHeaderSize", "_receivedHeaderCount"),
    tcp.Port: ("_logger", "_addressType", "_realPortNumber", "_shouldShutdown"),
    tcp.Server: ("_getLogPrefix", "_closeSocket", "_shouldShutdown"),
    TLSMemoryBIOProtocol: ("_handshakeDone", "_lostTLSConnection", "_aborted", "_checkHandshakeStatus",
                           "_unbufferPendingWrites", "_bufferedWrite", "_shutdownTLS", "_tlsShutdownFinished"),
}


def writeQueueEmpty(transport: Any) -> Callable[[], bool]:
    """
    A check, for the hot path, of whether Twisted holds no bytes and no pending
    close for C{transport}, so that a direct C{send()} keeps the byte order.

    @param transport: a L{twisted.internet.tcp.Connection}.
    @return: a function of no arguments, true when a direct send is safe.  On a
        Twisted without the attributes it always says false: every write is
        buffered by Twisted, which is correct, only slower.
    """
    if type(transport) is not _FastServer and not all(
            hasattr(transport, name) for name in ("_tempDataLen", "_writeDisconnected", "dataBuffer")):
        return lambda: False

    def idle() -> bool:
        return not (transport._tempDataLen or transport.dataBuffer or transport.disconnecting
                    or transport._writeDisconnected or not transport.connected)

    return idle


#: What a started listening port needs for L{sidecar.listen.FastPort}'s accept loop.
_FAST_PORT_NEEDS = ("socket", "addressFamily", "factory", "_addressType", "reactor", "numberAccepts",
                    "sessionno", "_realPortNumber")


def fastPortPossible(port: Any) -> bool:
    """
    Whether a started C{tcp.Port} has what L{sidecar.listen.FastPort} reads (see
    the module docstring); if not, it keeps Twisted's accept loop.
    """
    return (all(hasattr(port, name) for name in _FAST_PORT_NEEDS)
            and callable(getattr(port.socket, "_accept", None))
            and isinstance(getattr(tcp.Server, "_shouldShutdown", None), bool))


def listeningPort(service: Any) -> Optional[Deferred[Any]]:
    """
    The port a listener service opens.

    @param service: a started L{StreamServerEndpointService}.
    @return: the Deferred that fires with its L{twisted.internet.interfaces.IListeningPort}
        (callbacks added to it must return the port), or L{None} if this
        Twisted does not keep it or the service was not started.
    """
    return getattr(service, "_waitingForPort", None)


def _rawDataRepr(data: Optional[bytes]) -> str:
    """
    hyperframe's C{_raw_data_repr}, with the same text, from the first 10 bytes only.
    """
    if not data:
        return "None"
    r = binascii.hexlify(data[:11]).decode("ascii")
    if len(r) > 20:
        r = r[:20] + "..."
    return "<hex:" + r + ">"


def trimFrameRepr(module: Any = hyperframe.frame) -> None:
    """
    Give hyperframe a frame-body repr helper that formats only the bytes it shows
    (see the module docstring).  Idempotent; the text of every repr is unchanged.

    @param module: the module holding C{_raw_data_repr} (hyperframe's, or a test's).
    """
    if hasattr(module, "_raw_data_repr") and module._raw_data_repr is not _rawDataRepr:
        module._raw_data_repr = _rawDataRepr


class PlainEncoder(Encoder):
    """
    An HPACK encoder that writes literals without Huffman coding (RFC 7541 5.2,
    H=0): the same header table and indexing as hpack's, less CPU.
    """

    def encode(self, headers: Any, huffman: bool = False) -> bytes:  # type: ignore[override]
        return super().encode(headers, huffman=False)


def tuneH2Connection(conn: Any) -> Any:
    """
    Trim a new h2 C{H2Connection}'s CPU cost (see the module docstring): the frame
    repr h2 builds per frame, and Huffman coding in its HPACK encoder.  Call it
    before the connection sends or receives anything.

    @param conn: an C{h2.connection.H2Connection}.
    @return: C{conn}.
    """
    trimFrameRepr()
    if isinstance(getattr(conn, "encoder", None), Encoder):
        conn.encoder = PlainEncoder()
    return conn
