# -*- test-case-name: tests.test_reactor -*-
"""
The sidecar's reactor: Twisted's epoll reactor without the cost it adds to every event.

Twisted wraps each ready socket's read or write in C{log.callWithLogger}, which asks the
transport for its C{logPrefix()} and runs the call inside a legacy log context
(C{callWithContext}): 8.5% of the CPU of a small proxied GET, for a C{system} field that
only Twisted's legacy C{log.msg} calls read (the sidecar logs with C{twisted.logger},
whose events carry their own namespace). Here the event is dispatched to
C{_doReadOrWrite} directly, and the commonest event, bytes to read and nothing else,
to the transport's C{doRead} (what C{_doReadOrWrite} does for it, without its
C{fileno()} check and other cases).  Running a TCP connection's C{doRead} inline as
well (two Python calls fewer per read) saved 0.8% of a small GET's instructions, but
only without the check that a L{sidecar.tcp.KernelPath} has not put its own
C{doRead} on the transport; with it, nothing: not kept. That method already catches and logs what a transport's
C{doRead}/C{doWrite} raises and disconnects it; anything raised outside those is caught
and logged here, so one bad connection never stops the loop.

A connection about to close leaves the reactor in one step (L{SidecarReactor.forget}):
no C{EPOLL_CTL_DEL}, since closing the socket removes it from the epoll set.

Reading the clock once per turn instead (C{reactor.seconds()} is called seven times per
proxied request) was measured and not kept: a Python-level C{seconds()} returning a
cached reading costs more per call than C{time.time()}, a C call on the vDSO.

It is still an C{EPollReactor} (every Twisted interface, C{--reactor} still chooses
another).  L{installIfNone} is what L{sidecar.tap} calls: it installs this reactor
only when no reactor has been installed yet and epoll exists.
"""

from __future__ import annotations

import errno
import sys
from select import EPOLLIN
from typing import Any, Optional

from twisted.internet.epollreactor import EPollReactor
from twisted.logger import Logger

log = Logger()


class SidecarReactor(EPollReactor):
    """
    An L{EPollReactor} that dispatches events without a log context.
    """

    def doPoll(self, timeout: Optional[float]) -> None:
        """
        Wait for events and handle each with no log context around it.
        """
        if timeout is None:
            timeout = -1
        try:
            events = self._poller.poll(timeout, len(self._selectables))
        except OSError as e:
            if e.errno == errno.EINTR:
                return
            raise
        selectables = self._selectables
        handle = self._doReadOrWrite
        for fd, event in events:
            selectable = selectables.get(fd)
            if selectable is None:
                continue
            try:
                if event == EPOLLIN:
                    # The common event, bytes to read and nothing else: what
                    # _doReadOrWrite does for it, without its other cases.
                    try:
                        why = selectable.doRead()
                    except KeyboardInterrupt:
                        raise
                    except BaseException as e:
                        log.failure("error reading from {selectable!r}", selectable=selectable)
                        why = e
                    if why:
                        self._disconnectSelectable(selectable, why, True)
                else:
                    handle(selectable, fd, event)
            except KeyboardInterrupt:
                raise
            except BaseException:
                log.failure("unhandled error handling an event on {selectable!r}", selectable=selectable)

    doIteration = doPoll  # type: ignore[assignment]

    def forget(self, selectable: Any) -> None:
        """
        Stop watching C{selectable} both ways, just before its descriptor is closed:
        the reactor's own sets only, with no C{epoll_ctl}, since closing the last
        reference to a socket takes it out of the epoll set (the sockets given here
        are C{SOCK_CLOEXEC} and never duplicated).  A selectable the reactor does not
        hold, or holds in another way (continuous polling), is removed as usual.

        @param selectable: an epoll-able descriptor about to be closed.
        """
        fd = selectable.fileno()
        if self._selectables.get(fd) is selectable:
            del self._selectables[fd]
            self._reads.discard(fd)
            self._writes.discard(fd)
        else:
            self.removeReader(selectable)
            self.removeWriter(selectable)


def installIfNone() -> Optional[Any]:
    """
    Install L{SidecarReactor} as the global reactor, unless a reactor is installed
    already (C{twistd --reactor}, C{twist --reactor}, a test runner) or this system has
    no epoll.

    @return: the reactor installed, or L{None} when nothing was done.
    """
    if "twisted.internet.reactor" in sys.modules:
        return None
    try:
        import select

        select.epoll
    except AttributeError:
        return None
    from twisted.internet.main import installReactor

    reactor = SidecarReactor()
    installReactor(reactor)
    return reactor


#: The young generation's threshold: net container allocations between two collections
#: (CPython's default is 700).  With many requests in flight, 700 is reached by the
#: objects of the requests still open, so every few hundred requests the collector
#: walks them and promotes them to the older generations, which it then walks too
#: (measured: 9.4% of the CPU at 1,000 connections, none at 16).  At 10,000 no
#: collection happens in steady state even at 1,000 connections; reference cycles are
#: still collected, later.
YOUNG_THRESHOLD = 10_000


def tuneCollector() -> None:
    """
    Tune CPython's cyclic garbage collector for a long-running proxy, once start-up is
    over: collect, move every object that exists now (modules, classes, the
    configuration, the listeners) to the permanent generation (C{gc.freeze}) so that
    full collections never walk them again, and raise the young generation's threshold
    to L{YOUNG_THRESHOLD}.
    """
    import gc

    gc.collect()
    gc.freeze()
    gc.set_threshold(YOUNG_THRESHOLD, 10, 10)
