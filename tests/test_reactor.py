# -*- test-case-name: tests.test_reactor -*-
"""
The sidecar's reactor: events dispatched without a log context, errors still caught,
and installed only when no reactor is.
"""

from __future__ import annotations

import socket
import subprocess
import sys
from typing import List

from twisted.internet.abstract import FileDescriptor
from twisted.internet.main import CONNECTION_DONE
from twisted.python import context
from twisted.trial import unittest

from sidecar.reactor import SidecarReactor, installIfNone
from tests.support import subprocessEnv

try:
    import select

    select.epoll
except AttributeError:  # pragma: no cover
    EPOLL = False
else:
    EPOLL = True


class _Reader(FileDescriptor):
    """
    One end of a socket pair, read by the reactor under test.
    """

    def __init__(self, reactor: SidecarReactor, sock: socket.socket, explode: str = "") -> None:
        FileDescriptor.__init__(self, reactor)
        self.sock = sock
        self.explode = explode
        self.read: List[bytes] = []
        self.systems: List[object] = []
        self.lost: List[object] = []

    def fileno(self) -> int:
        return self.sock.fileno()

    def logPrefix(self) -> str:
        return "reader"

    def doRead(self):
        self.systems.append(context.get("system"))
        data = self.sock.recv(100)
        if self.explode == "read":
            raise RuntimeError("doRead failed")
        if not data:
            return CONNECTION_DONE
        self.read.append(data)
        return None

    def connectionLost(self, reason):
        self.lost.append(reason)
        self.sock.close()
        if self.explode == "lost":
            raise RuntimeError("connectionLost failed")


class SidecarReactorTests(unittest.TestCase):
    """
    L{SidecarReactor}, driven one turn at a time (not installed, not run).
    """

    if not EPOLL:
        skip = "needs epoll (Linux)"

    def setUp(self):
        self.reactor = SidecarReactor()
        self.addCleanup(self.closeReactor)

    def closeReactor(self):
        r = self.reactor
        r.removeReader(r.waker)
        r.waker.connectionLost(None)
        r._poller.close()

    def pair(self, explode: str = ""):
        mine, theirs = socket.socketpair()
        self.addCleanup(theirs.close)
        self.addCleanup(mine.close)
        reader = _Reader(self.reactor, mine, explode)
        self.reactor.addReader(reader)
        self.addCleanup(lambda: reader.sock.fileno() != -1 and self.reactor.removeReader(reader))
        return reader, theirs

    def test_dispatchWithoutLogContext(self):
        """
        A ready socket is read in the next turn, with no legacy log context around the
        read (Twisted's epoll reactor sets C{system} to the transport's log prefix,
        here C{"reader"}).
        """
        reader, peer = self.pair()
        peer.send(b"hello")
        self.reactor.doIteration(1)
        self.assertEqual(reader.read, [b"hello"])
        self.assertEqual(reader.systems, [None])

    def test_readErrorDisconnects(self):
        """
        A C{doRead} that raises is logged and its descriptor disconnected; another ready
        descriptor in the same turn is still read.
        """
        bad, badPeer = self.pair(explode="read")
        good, goodPeer = self.pair()
        badPeer.send(b"x")
        goodPeer.send(b"y")
        self.reactor.doIteration(1)
        self.assertEqual(good.read, [b"y"])
        self.assertEqual(len(bad.lost), 1)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_errorOutsideReadCaught(self):
        """
        An error raised while disconnecting (in C{connectionLost}, outside C{doRead})
        is logged and the turn goes on with the next event.
        """
        bad, badPeer = self.pair(explode="lost")
        good, goodPeer = self.pair()
        badPeer.close()
        goodPeer.send(b"y")
        self.reactor.doIteration(1)
        self.assertEqual(good.read, [b"y"])
        self.assertEqual(len(bad.lost), 1)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)


    def test_forget(self):
        """
        A selectable forgotten before its socket is closed leaves the reactor's sets,
        and the closed socket gives no event (closing it took it out of the epoll
        set, with no C{EPOLL_CTL_DEL}).
        """
        reader, peer = self.pair()
        self.reactor.addWriter(reader)
        peer.send(b"unread")
        fd = reader.fileno()
        self.reactor.forget(reader)
        self.assertNotIn(reader, self.reactor.getReaders())
        self.assertNotIn(reader, self.reactor.getWriters())
        self.assertNotIn(fd, self.reactor._selectables)
        reader.sock.close()
        self.assertEqual(self.reactor._poller.poll(0), [])
        self.reactor.doIteration(0)
        self.assertEqual(reader.read, [])

    def test_forgetNotHeld(self):
        """
        Forgetting a selectable the reactor does not hold under its descriptor changes
        nothing else.
        """
        reader, peer = self.pair()
        other, _ = self.pair()
        self.reactor.removeReader(other)
        self.reactor.forget(other)
        self.assertIn(reader, self.reactor.getReaders())
        peer.send(b"x")
        self.reactor.doIteration(1)
        self.assertEqual(reader.read, [b"x"])


class InstallTests(unittest.TestCase):
    """
    The sidecar's command line installs L{SidecarReactor} unless a reactor is installed.
    """

    def test_notWhenInstalled(self):
        """
        Under trial a reactor is installed: nothing is done.
        """
        self.assertIsNone(installIfNone())

    def run_(self, argv: List[str]) -> str:
        script = (
            "import sys, runpy\n"
            "import sidecar.service as s\n"
            "def made(config, reactor):\n"
            "    print('REACTOR', type(reactor).__name__, flush=True)\n"
            "    raise SystemExit(0)\n"
            "s.makeService = made\n"
            "sys.argv = sys.argv[1:]\n"
            "if sys.argv[0] == 'twist':\n"
            "    runpy.run_module('twisted', run_name='__main__')\n"
            "else:\n"
            "    from twisted.scripts.twistd import run; run()\n"
        )
        tail = ["--listen", "tcp:0:interface=127.0.0.1", "--admin", "none", "--health", "none",
                "--access-log", "none"]
        out = subprocess.run([sys.executable, "-c", script, *argv, *tail], capture_output=True, text=True,
                             env=subprocessEnv(), timeout=60)
        lines = [line for line in out.stdout.splitlines() if line.startswith("REACTOR")]
        self.assertEqual(len(lines), 1, out.stdout + out.stderr)
        return lines[0].split()[1]

    def test_commandLines(self):
        """
        C{python -m twisted sidecar} and C{twistd -n sidecar} run on L{SidecarReactor};
        C{--reactor} of either still chooses another.
        """
        if not EPOLL:
            raise unittest.SkipTest("needs epoll (Linux)")
        self.assertEqual(self.run_(["twist", "sidecar"]), "SidecarReactor")
        self.assertEqual(self.run_(["twist", "--reactor", "poll", "sidecar"]), "PollReactor")
        self.assertEqual(self.run_(["twistd", "-n", "sidecar"]), "SidecarReactor")
        self.assertEqual(self.run_(["twistd", "-n", "--reactor", "select", "sidecar"]), "SelectReactor")


class CollectorTests(unittest.TestCase):
    """
    The garbage collector's tuning, in a process of its own (it is process-wide).
    """

    def test_tuned(self):
        """
        L{tuneCollector} freezes what exists and raises the young threshold to
        L{YOUNG_THRESHOLD}; objects made afterwards are still collected.
        """
        script = (
            "import gc\n"
            "from sidecar.reactor import tuneCollector, YOUNG_THRESHOLD\n"
            "tuneCollector()\n"
            "assert gc.get_threshold()[0] == YOUNG_THRESHOLD, gc.get_threshold()\n"
            "assert gc.get_freeze_count() > 1000, gc.get_freeze_count()\n"
            "class Cycle: pass\n"
            "for _ in range(50000):\n"
            "    c = Cycle(); c.me = c\n"
            "del c\n"
            "assert sum(type(o) is Cycle for o in gc.get_objects()) < 2 * YOUNG_THRESHOLD\n"
            "print('tuned')\n"
        )
        out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                             env=subprocessEnv(), timeout=60)
        self.assertEqual(out.stdout.strip(), "tuned", out.stderr)
