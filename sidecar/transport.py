# -*- test-case-name: tests.test_transport -*-
"""
Optimistic writes for the hot path.

Twisted's TCP C{write()} always buffers and sends on the next poll: every response costs
an C{epoll} registration, one more reactor event and a deregistration.  Like asyncio's
transports, the writers of L{prepare} send at once when nothing is queued, and hands whatever the
kernel did not take to the transport's own C{write()}, so ordering, buffering and
producer backpressure stay Twisted's.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence, Tuple

from twisted.internet import tcp

from sidecar.compat import writeQueueEmpty

#: Bytes read per event, and the write buffer past which a producer is paused.  Twisted's
#: 64 KiB makes a 64 KiB POST two reads (head + body); 128 KiB makes it one, and halves
#: the events of a large download, while memory per connection stays bounded.
BUFFER_SIZE = 128 * 1024

Write = Callable[[bytes], None]
WriteSequence = Callable[[Sequence[bytes]], None]


def prepare(transport: Any) -> Tuple[Write, WriteSequence]:
    """
    Ready C{transport} for the hot path (no Nagle delay, L{BUFFER_SIZE} reads) and
    return C{(write, writeSequence)} for it.

    For a plain TCP connection these send directly.  For a TLS layer over TCP (mutual
    TLS), the layer's own methods are returned, and the TCP transport under it is given
    the direct sends, so that TLS records leave at once too.  Anything else (tests,
    other transports) keeps its own methods.
    """
    if isinstance(transport, tcp.Connection):
        _tune(transport)
        return _optimistic(transport)
    inner = getattr(transport, "transport", None)
    if isinstance(inner, tcp.Connection):
        _tune(inner)
        if "write" not in vars(inner):
            inner.write, inner.writeSequence = _optimistic(inner)
    return transport.write, transport.writeSequence


def _tune(transport: tcp.Connection) -> None:
    try:
        transport.setTcpNoDelay(True)
    except OSError:
        pass
    transport.bufferSize = BUFFER_SIZE


def _optimistic(transport: tcp.Connection) -> Tuple[Write, WriteSequence]:
    """
    Direct-send C{write} and C{writeSequence} for C{transport}, falling back to (and
    capturing now) the transport's own buffered methods.
    """
    sock = transport.socket
    send = sock.send
    sendmsg = sock.sendmsg
    fallback = transport.write
    fallbackSequence = transport.writeSequence

    idle = writeQueueEmpty(transport)

    # The sends take any bytes-like object (a request body may be a view of a read);
    # Twisted's own methods take bytes only, hence bytes() on the way to them (no copy
    # of what is bytes already).

    def write(data: bytes) -> None:
        if not idle():
            fallback(bytes(data))
            return
        try:
            sent = send(data)
        except BlockingIOError:
            sent = 0
        except OSError:
            # Let Twisted meet the error on its own write and close the connection.
            fallback(bytes(data))
            return
        if sent < len(data):
            fallback(bytes(data[sent:]))

    def writeSequence(parts: Sequence[bytes]) -> None:
        if not idle():
            fallbackSequence([bytes(part) for part in parts])
            return
        try:
            sent = sendmsg(parts)
        except BlockingIOError:
            sent = 0
        except OSError:
            fallbackSequence([bytes(part) for part in parts])
            return
        for part in parts:
            size = len(part)
            if sent >= size:
                sent -= size
                continue
            fallback(bytes(part[sent:] if sent else part))
            sent = 0

    return write, writeSequence


def halfClose(transport: Any) -> None:
    """
    Send a FIN on C{transport} once what is buffered is written, and keep reading
    (a TCP half-close).  A transport that cannot half-close (a TLS layer, which would
    need its own close_notify first) is closed whole, gracefully.
    """
    if isinstance(transport, tcp.Connection):
        transport.loseWriteConnection()
    else:
        transport.loseConnection()
