# -*- test-case-name: tests.test_reactor -*-
"""
The sidecar's reactor: Twisted's epoll reactor with two costs of every event removed.

  - Twisted wraps each ready socket's read or write in C{log.callWithLogger}, which
    asks the transport for its C{logPrefix()} and runs the call inside a legacy log
    context (C{callWithContext}): 8.5% of the CPU of a small proxied GET, for a
    C{system} field that only Twisted's legacy C{log.msg} calls read (the sidecar logs
    with C{twisted.logger}, whose events carry their own namespace).  Here the event
    is dispatched to C{_doReadOrWrite} directly.  That method already catches and
    logs what a transport's C{doRead}/C{doWrite} raises and disconnects it; anything
    raised outside those is caught and logged here, so one bad connection never stops
    the loop.
  - C{reactor.seconds()} reads the wall clock on every call (eleven times per proxied
    request).  Here it is read once when the poll returns and once before the timers
    run, and C{seconds()} answers with that reading for the rest of the turn, as
    Envoy's dispatcher does with its approximate time.  Durations and timers are
    therefore exact to within one reactor turn's work (microseconds to a few
    milliseconds under load).

It is still an C{EPollReactor} (every Twisted interface, C{--reactor} still chooses
another).  L{installIfNone} is what L{sidecar.tap} calls: it installs this reactor
only when no reactor has been installed yet and epoll exists.
"""

from __future__ import annotations

import errno
import sys
from time import time
from typing import Any, Optional

from twisted.internet.epollreactor import EPollReactor
from twisted.logger import Logger

log = Logger()


class SidecarReactor(EPollReactor):
    """
    An L{EPollReactor} that dispatches events without a log context and reads the
    clock once per turn.
    """

    def __init__(self) -> None:
        #: The clock's reading for this turn; L{None} outside the loop's turns (before
        #: C{run}, after it), where L{seconds} reads the clock itself.
        self._now: Optional[float] = None
        EPollReactor.__init__(self)

    def seconds(self) -> float:  # type: ignore[override]
        """
        The time read at the start of this reactor turn (after the poll, or before the
        timers run); outside the loop, the time now.
        """
        now = self._now
        return time() if now is None else now

    def runUntilCurrent(self) -> None:
        """
        Read the clock, then run the timers that are due (the reading holds until the
        poll, for L{timeout}).
        """
        self._now = time()
        EPollReactor.runUntilCurrent(self)

    def doPoll(self, timeout: Optional[float]) -> None:
        """
        Wait for events, read the clock once, and handle each event with no log
        context around it.
        """
        if timeout is None:
            timeout = -1
        try:
            events = self._poller.poll(timeout, len(self._selectables))
        except OSError as e:
            if e.errno == errno.EINTR:
                return
            raise
        self._now = time()
        selectables = self._selectables
        handle = self._doReadOrWrite
        try:
            for fd, event in events:
                selectable = selectables.get(fd)
                if selectable is None:
                    continue
                try:
                    handle(selectable, fd, event)
                except KeyboardInterrupt:
                    raise
                except BaseException:
                    log.failure("unhandled error handling an event on {selectable!r}", selectable=selectable)
        finally:
            self._now = None

    doIteration = doPoll  # type: ignore[assignment]


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
