# -*- test-case-name: tests.test_listen -*-
"""
The listening ports' accept loop and the transport of an accepted connection, with
what Twisted does per connection that the sidecar does not need taken out.

Twisted's C{tcp.Port} accepts through a generator inside a log-buffering context
(a new C{Logger} per wake-up), converts the socket's family and type to enums
per accept, builds the transport through three C{__init__}s that format two strings
(a log prefix found through C{zope.interface} and C{reflect.qual}, and a C{repr}),
and sets the new socket non-blocking once more.  On a connection that carries one
request, that is a fifth of the proxy's user-space CPU.  Here:

  - L{FastPort} accepts in a plain loop (C{socket._accept}, the listening socket's
    own C call), builds each socket with the family known, as the C type
    C{_socket.socket} (the methods every transport uses, without the Python
    subclass's two extra frames at creation and at close), and hands every error
    other than "no more clients" (C{EAGAIN}) to Twisted's own loop, which logs it
    and recovers as it always has (C{EMFILE}, C{ECONNABORTED}, C{EPERM}...);
  - L{FastServer}, its transport, is a C{tcp.Server} whose log prefix and C{repr}
    are formatted when read (never, in practice), whose C{TCP_NODELAY} is inherited
    from the listening socket (Linux copies it to every accepted socket: one
    C{setsockopt} per connection fewer), and whose close is one C{close()} without
    a C{shutdown()} first (every accepted socket is C{SOCK_CLOEXEC} and never
    duplicated, so C{close()} sends the FIN, as Envoy's does).

The listening ports stay the ports Twisted's endpoints open (C{tcp:}, C{tcp6:},
C{systemd:}, the adopted sockets of C{--workers}): L{speedUp} changes the class of a
started port to L{FastPort} (a subclass with no state of its own), so the backlog,
C{SO_REUSEPORT}, IPv6, drain (C{stopListening}) are all Twisted's.  That, and the
attributes L{FastServer} sets in place of Twisted's C{__init__}, are Twisted
internals: L{sidecar.compat} says why and what happens without them.
"""

from __future__ import annotations

import _socket
import socket
import sys
from errno import EWOULDBLOCK
from typing import Any, Callable, Sequence, Tuple

from twisted.internet import address, error, main, tcp
from twisted.logger import Logger

log = Logger()

_TCP_NODELAY = (socket.IPPROTO_TCP, socket.TCP_NODELAY)


class FastServer(tcp.Server):
    """
    A server-side TCP transport built without the strings and calls Twisted's
    C{tcp.Server} makes per connection (see the module docstring); otherwise a
    C{tcp.Server}.
    """

    # The close is the socket's close() alone (see the module docstring).
    _shouldShutdown = False
    #: Whether the socket has TCP_NODELAY from its listening socket.
    _noDelayInherited = False

    def __init__(self, sock: socket.socket, protocol: Any, client: tuple, server: Any, sessionno: int,
                 reactor: Any) -> None:
        # What FileDescriptor.__init__, Connection.__init__ and Server.__init__ set
        # (tests.test_listen compares the attributes with a stock tcp.Server's).
        self.reactor = reactor
        self._tempDataBuffer: list = []
        self._tempDataLen = 0
        self.socket = sock
        sock.setblocking(False)
        self.fileno = sock.fileno  # type: ignore[method-assign]
        self.protocol = protocol
        if len(client) != 2:
            self._addressType = address.IPv6Address
        self.server = server
        self.client = client
        self.sessionno = sessionno
        self.hostname = client[0]
        reactor.addReader(self)
        self.connected = 1

    @property  # type: ignore[override]
    def logstr(self) -> str:
        """
        Twisted's log prefix for the connection, formatted when asked for.
        """
        return f"{self._getLogPrefix(self.protocol)},{self.sessionno},{self.hostname}"

    @property
    def repstr(self) -> str:
        """
        Twisted's C{repr} of the connection, formatted when asked for.
        """
        return f"<{self.protocol.__class__.__name__} #{self.sessionno} on {self.server._realPortNumber}>"

    def setTcpNoDelay(self, enabled: bool) -> None:
        """
        Set C{TCP_NODELAY}, unless it is on already as the listening socket's copy.
        """
        if enabled and self.server.noDelay:
            return
        tcp.Server.setTcpNoDelay(self, enabled)

    def writers(self, bufferSize: int) -> Tuple[Callable[[bytes], None], Callable[[Sequence[bytes]], None]]:
        """
        Ready the connection for the fast door's hot path, as
        L{sidecar.transport.prepare} does (no Nagle delay, C{bufferSize} reads), and
        return its writers that send at once when nothing is queued: methods, not
        three closures built per connection.
        """
        if not self.server.noDelay:
            self.setTcpNoDelay(True)
        self.bufferSize = bufferSize
        return self.writeNow, self.writeSequenceNow

    def writeNow(self, data: bytes) -> None:
        """
        Send C{data} now when Twisted holds nothing queued for the connection (the
        order is kept), else, or for what the kernel did not take, Twisted's
        buffered C{write} (L{sidecar.transport}'s optimistic write).
        """
        if (self._tempDataLen or self.dataBuffer or self.disconnecting or self._writeDisconnected
                or not self.connected or self.TLS):
            self.write(data)
            return
        try:
            sent = self.socket.send(data)
        except BlockingIOError:
            sent = 0
        except OSError:
            # Twisted meets the error on its own write and closes the connection.
            self.write(data)
            return
        if sent < len(data):
            self.write(data[sent:])

    def writeSequenceNow(self, parts: Sequence[bytes]) -> None:
        """
        L{writeNow} for several buffers, in one C{sendmsg}.
        """
        if (self._tempDataLen or self.dataBuffer or self.disconnecting or self._writeDisconnected
                or not self.connected or self.TLS):
            self.writeSequence(parts)
            return
        try:
            sent = self.socket.sendmsg(parts)
        except BlockingIOError:
            sent = 0
        except OSError:
            self.writeSequence(parts)
            return
        for part in parts:
            size = len(part)
            if sent >= size:
                sent -= size
                continue
            self.write(part[sent:] if sent else part)
            sent = 0

    def doRead(self) -> Any:
        """
        Twisted's C{tcp.Connection.doRead} and C{_dataReceived} in one call.
        """
        try:
            data = self.socket.recv(self.bufferSize)
        except OSError as se:
            if se.args[0] == EWOULDBLOCK:
                return None
            return main.CONNECTION_LOST
        if not data:
            return main.CONNECTION_DONE
        self.protocol.dataReceived(data)
        return None

    def connectionLost(self, reason: Any) -> None:
        """
        Twisted's C{tcp.Connection.connectionLost}, with the abort told by the
        reason's type instead of C{Failure.check}, and the orderly close inline.
        """
        try:
            sock = self.socket
        except AttributeError:
            # Called again (as Twisted's own connectionLost allows).
            return
        self.disconnected = 1
        self.connected = 0
        producer = self.producer
        if producer is not None:
            producer.stopProducing()
            self.producer = None
        forget = getattr(self.reactor, "forget", None)
        if forget is not None:
            # Out of the reactor without an epoll_ctl (sidecar.reactor).
            forget(self)
        else:
            self.stopReading()
            self.stopWriting()
        if issubclass(reason.type, error.ConnectionAborted):
            # An abort: Twisted's reset (SO_LINGER 0, then close).
            self._closeSocket(False)
        else:
            # Orderly: close() sends the FIN (no shutdown(), see the module docstring).
            try:
                sock.close()
            except OSError:
                pass
        protocol = self.protocol
        del self.protocol
        del self.socket
        del self.fileno
        protocol.connectionLost(reason)


class FastPort(tcp.Port):
    """
    A listening TCP port whose accept loop is the sidecar's (see the module
    docstring); L{speedUp} makes a started C{tcp.Port} one.

    @ivar noDelay: C{TCP_NODELAY} is set on the listening socket, so every accepted
        socket has it.
    """

    transport = FastServer
    noDelay = False

    def doRead(self) -> None:
        """
        Accept every client waiting (at most C{numberAccepts}, grown as Twisted's
        loop grows it), and give each its protocol and transport.
        """
        try:
            listening = self.socket
            accept = listening._accept
            family = self.addressFamily
            proto = listening.proto
            build = self.factory.buildProtocol
            addressType = self._addressType
            reactor = self.reactor
            transport = self.transport
            limit = self.numberAccepts
            accepted = 0
            while accepted < limit:
                try:
                    fd, addr = accept()
                except BlockingIOError:
                    break
                except OSError:
                    # An error to log or recover from: Twisted's loop meets it again.
                    tcp.Port.doRead(self)
                    return
                accepted += 1
                try:
                    skt = _socket.socket(family, socket.SOCK_STREAM, proto, fd)
                except BaseException:
                    _closeDescriptor(fd)
                    raise
                if len(addr) == 4:
                    # IPv6: the scope id in the host, as Twisted's loop gives it.
                    host = socket.getnameinfo(addr, socket.NI_NUMERICHOST | socket.NI_NUMERICSERV)
                    addr = (host[0],) + addr[1:]
                protocol = build(addressType("TCP", *addr))
                if protocol is None:
                    skt.close()
                    continue
                s = self.sessionno
                self.sessionno = s + 1
                protocol.makeConnection(transport(skt, protocol, addr, self, s, reactor))
            if accepted == limit:
                self.numberAccepts = limit + 20
            else:
                self.numberAccepts = accepted or 1
        except BaseException:
            log.failure("accepting a connection on {port!r}", port=self)


def _closeDescriptor(fd: int) -> None:
    import os

    try:
        os.close(fd)
    except OSError:
        pass


def speedUp(port: Any) -> Any:
    """
    Make a started Twisted TCP port a L{FastPort}, with C{TCP_NODELAY} on its
    listening socket for its connections to inherit.  Any other port (a UNIX
    socket, a subclass of Twisted's, a Twisted whose port lacks what L{FastPort}
    reads) is left alone.

    @param port: the listening port.
    @return: C{port}.
    """
    from sidecar.compat import fastPortPossible

    if type(port) is not tcp.Port or not fastPortPossible(port):
        return port
    port.__class__ = FastPort
    if sys.platform.startswith("linux"):
        try:
            port.socket.setsockopt(*_TCP_NODELAY, 1)
            port.noDelay = bool(port.socket.getsockopt(*_TCP_NODELAY))
        except OSError:
            pass
    return port


#: The transports that are plain TCP connections accepted by a listening port (the
#: fast door's close at once and the detector's read at accept take them).
SERVERS = frozenset([tcp.Server, FastServer])
