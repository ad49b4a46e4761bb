# -*- test-case-name: tests.test_compat -*-
"""
Every use the sidecar makes of Twisted's internals, in one place.

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
    Twisted's buffered path (correct, one reactor round trip slower).
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

A use that needs none: the listeners' synchronous start-up errors
(C{_raiseSynchronously}, so that C{twistd} fails at once on a port in use) come
from the public L{twisted.application.strports.service}, which sets it.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from twisted.application.internet import StreamServerEndpointService
from twisted.internet.abstract import FileDescriptor
from twisted.internet.defer import Deferred
from twisted.web.http import HTTPChannel

#: The Twisted release these uses were last checked against (C{tests.test_compat}).
#: The dependency's upper bound is the next minor release after it.
TESTED_TWISTED = (26, 10)

#: The private attributes read, by the class that has them.
PRIVATE_ATTRIBUTES: dict[type, tuple[str, ...]] = {
    FileDescriptor: ("_tempDataLen", "_writeDisconnected"),
    StreamServerEndpointService: ("_waitingForPort",),
    HTTPChannel: ("_respondToBadRequestAndDisconnect", "_receivedHeaderSize", "_receivedHeaderCount"),
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
    if not all(hasattr(transport, name) for name in ("_tempDataLen", "_writeDisconnected", "dataBuffer")):
        return lambda: False

    def idle() -> bool:
        return not (transport._tempDataLen or transport.dataBuffer or transport.disconnecting
                    or transport._writeDisconnected or not transport.connected)

    return idle


def listeningPort(service: Any) -> Optional[Deferred[Any]]:
    """
    The port a listener service opens.

    @param service: a started L{StreamServerEndpointService}.
    @return: the Deferred that fires with its L{twisted.internet.interfaces.IListeningPort}
        (callbacks added to it must return the port), or L{None} if this
        Twisted does not keep it or the service was not started.
    """
    return getattr(service, "_waitingForPort", None)
