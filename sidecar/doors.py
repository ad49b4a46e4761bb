# -*- test-case-name: tests.test_exchange -*-
"""
The registry of open client connections, of every front door.

A registered connection (an L{OpenDoor}) counts its reads and says whether it is in
the middle of a request head or busy with a request; one sweep about once a second
closes the idle ones and answers 408 to the slow heads (slowloris), instead of a timer
per request.  Drain finds the connections to close here too.
"""

from __future__ import annotations

from typing import Any, Iterator, Optional, Protocol, Set


class OpenDoor(Protocol):
    """
    What the registry needs of a client connection.

    @ivar activity: reads so far (any counter that moves when the client sends).
    @ivar sweptActivity: what the sweep last saw of C{activity}.
    @ivar idleSince: since when (as the sweep saw it) nothing was read.
    @ivar inHead: a request head has begun and not ended.
    @ivar headSince: since when (as the sweep saw it) C{inHead} has held.
    """

    activity: int
    sweptActivity: int
    idleSince: Optional[float]
    inHead: bool
    headSince: Optional[float]
    transport: Any

    def busy(self) -> bool:
        """Whether a request or a tunnel is in progress."""

    def answering(self) -> bool:
        """Whether a request already accepted is being answered (a head that starts
        behind it is not slow: the client waits for its answer)."""

    def headTimedOut(self) -> None:
        """The request head did not arrive in time: answer 408 and close."""

    def closeIdle(self) -> None:
        """Close the connection: it has been idle too long."""


class Doors:
    """
    The open client connections of one sidecar.
    """

    def __init__(self) -> None:
        self._open: Set[OpenDoor] = set()

    def add(self, door: OpenDoor) -> None:
        """
        A client connection opened.
        """
        self._open.add(door)

    def discard(self, door: OpenDoor) -> None:
        """
        A client connection closed.
        """
        self._open.discard(door)

    def update(self, doors: Any) -> None:
        """
        Register several connections at once.
        """
        self._open.update(doors)

    def __iter__(self) -> Iterator[OpenDoor]:
        return iter(list(self._open))

    def __len__(self) -> int:
        return len(self._open)

    def sweep(self, now: float, idleTimeout: Optional[float], headTimeout: Optional[float]) -> None:
        """
        Close client connections idle longer than C{idleTimeout}, and answer 408 on those
        whose request head has taken longer than C{headTimeout} (slowloris).  Called
        about once a second.
        """
        sweepDoors(self._open, now, idleTimeout, headTimeout)


def sweepDoors(doors: Any, now: float, idleTimeout: Optional[float], headTimeout: Optional[float]) -> None:
    """
    One pass over C{doors}: see L{Doors.sweep}.
    """
    for door in list(doors):
        if door.activity != door.sweptActivity:
            door.sweptActivity = door.activity
            door.idleSince = now
        if door.inHead and not door.answering():
            if door.headSince is None:
                door.headSince = now
            elif headTimeout is not None and now - door.headSince >= headTimeout:
                door.headTimedOut()
                continue
        if idleTimeout is not None and not door.busy() and door.idleSince is not None:
            if now - door.idleSince >= idleTimeout:
                door.closeIdle()
