# -*- test-case-name: tests.test_nghttp2 -*-
"""
The HTTP/2 codec on libnghttp2 (L{sidecar.nghttp2}), against h2 as the peer in
memory: heads, bodies, trailers and their order, flow control left to the door, the
limits, and the choice of codec.  Then the door and upstream suites
(C{tests.test_h2}, C{tests.test_grpc}) again on the h2 fallback, so that both codecs
are tested whichever one C{auto} picks on this machine.
"""

from __future__ import annotations

import os
import sys
from typing import Any, List, Optional

from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated, DataReceived, RequestReceived, ResponseReceived, StreamEnded, StreamReset,
    TrailersReceived, WindowUpdated,
)
from h2.settings import SettingCodes
from hpack import Encoder, NeverIndexedHeaderTuple
from hyperframe.frame import ContinuationFrame, Frame, GoAwayFrame, HeadersFrame, RstStreamFrame
from twisted.python import usage
from twisted.trial import unittest

from sidecar import nghttp2 as ng
from sidecar.config import H2Config
from sidecar.h2wire import CODEC_ENVIRONMENT, codecFor, newConnection, startConnection

BINDING = ng.loadBinding()
NO_LIBRARY = "needs libnghttp2 (Debian's libnghttp2-14) and cffi"

REQUEST = [(b":method", b"POST"), (b":scheme", b"http"), (b":path", b"/svc/M"), (b":authority", b"svc"),
           (b"content-type", b"application/grpc")]


def parseFrames(data: bytes) -> List[Any]:
    """
    The frames in C{data}, parsed by hyperframe.
    """
    frames = []
    while data:
        frame, length = Frame.parse_frame_header(memoryview(data[:9]))
        frame.parse_body(memoryview(data[9:9 + length]))
        frames.append(frame)
        data = data[9 + length:]
    return frames


class Pair:
    """
    An nghttp2 connection of ours and an h2 peer, with bytes pumped between them.
    """

    def __init__(self, client: bool, config: H2Config = H2Config(), peerSettings: Optional[dict] = None) -> None:
        self.ours = ng.newSession(config, client)
        self.ours.initiate_connection()
        self.peer = H2Connection(H2Configuration(client_side=not client, header_encoding=None))
        self.peer.initiate_connection()
        if peerSettings:
            self.peer.update_settings(peerSettings)
        self.ourEvents: List[Any] = []
        self.peerEvents: List[Any] = []
        self.pump()

    def pump(self) -> None:
        """
        Exchange bytes until neither side has any to send.
        """
        for _ in range(50):
            toPeer = self.ours.data_to_send()
            if toPeer:
                self.peerEvents += self.peer.receive_data(toPeer)
            toUs = self.peer.data_to_send()
            if toUs:
                self.ourEvents += self.ours.receive_data(toUs)
            if not toPeer and not toUs:
                return
        raise AssertionError("the two sides never went quiet")

    def peerOf(self, kind: type, streamId: int) -> List[Any]:
        return [e for e in self.peerEvents if isinstance(e, kind) and getattr(e, "stream_id", None) == streamId]

    def oursOf(self, kind: type, streamId: int = 0) -> List[Any]:
        return [e for e in self.ourEvents if isinstance(e, kind) and (not streamId or e.stream_id == streamId)]


class ServerTests(unittest.SynchronousTestCase):
    """
    nghttp2 as the door's codec, an h2 client as the peer.
    """

    if BINDING is None:
        skip = NO_LIBRARY

    def test_request(self) -> None:
        """
        A request's head, body and trailers arrive as h2's events would: one
        L{ng.RequestReceived} (the head in order, bytes), L{ng.DataReceived} with the
        bytes and their flow-controlled length, L{ng.TrailersReceived}, L{ng.StreamEnded}.
        """
        pair = Pair(client=False)
        pair.peer.send_headers(1, REQUEST)
        pair.peer.send_data(1, b"hello")
        pair.peer.send_headers(1, [(b"x-checksum", b"1")], end_stream=True)
        pair.pump()
        [request] = pair.oursOf(ng.RequestReceived, 1)
        self.assertEqual(request.headers, REQUEST)
        self.assertIsNone(request.stream_ended)
        self.assertEqual([(e.data, e.flow_controlled_length) for e in pair.oursOf(ng.DataReceived, 1)],
                         [(b"hello", 5)])
        self.assertEqual(pair.oursOf(ng.TrailersReceived, 1)[0].headers, [(b"x-checksum", b"1")])
        self.assertEqual(len(pair.oursOf(ng.StreamEnded, 1)), 1)

    def test_dataOfOneRead(self) -> None:
        """
        The DATA frames of one stream that arrive in one read, one after the other,
        are one L{ng.DataReceived} (their bytes joined, their lengths added); a frame
        of another stream between them keeps them apart.
        """
        pair = Pair(client=False)
        pair.peer.send_headers(1, REQUEST)
        pair.peer.send_headers(3, REQUEST)
        pair.pump()
        for sid, data in ((1, b"a" * 8192), (1, b"b" * 8192), (3, b"c"), (1, b"d"), (1, b"e")):
            pair.peer.send_data(sid, data)
        events = pair.ours.receive_data(pair.peer.data_to_send())
        self.assertEqual([(e.stream_id, e.data, e.flow_controlled_length) for e in events],
                         [(1, b"a" * 8192 + b"b" * 8192, 16384), (3, b"c", 1), (1, b"de", 2)])

    def test_endedByHeaders(self) -> None:
        """
        A request whose HEADERS end the stream says so on its event (C{stream_ended}),
        and a L{ng.StreamEnded} follows, as with h2.
        """
        pair = Pair(client=False)
        pair.peer.send_headers(1, REQUEST, end_stream=True)
        pair.pump()
        self.assertIsNotNone(pair.oursOf(ng.RequestReceived, 1)[0].stream_ended)
        self.assertEqual(len(pair.oursOf(ng.StreamEnded, 1)), 1)

    def test_responseWithTrailers(self) -> None:
        """
        A response head, body bytes given in pieces, and trailers reach the client in
        that order, the trailers ending the stream; the body's pieces may share DATA
        frames.
        """
        pair = Pair(client=False)
        pair.peer.send_headers(1, REQUEST, end_stream=True)
        pair.pump()
        pair.ours.send_headers(1, [(b":status", b"200"), (b"content-type", b"application/grpc")])
        pair.ours.send_data(1, b"\0\0\0\0\x02")
        pair.ours.send_data(1, b"hi")
        pair.ours.send_headers(1, [(b"grpc-status", b"0")], end_stream=True)
        pair.pump()
        kinds = [type(e) for e in pair.peerEvents if getattr(e, "stream_id", None) == 1]
        self.assertEqual(kinds[0], ResponseReceived)
        self.assertEqual(kinds[-2:], [TrailersReceived, StreamEnded])
        self.assertEqual(b"".join(e.data for e in pair.peerOf(DataReceived, 1)), b"\0\0\0\0\x02hi")
        self.assertEqual(pair.peerOf(TrailersReceived, 1)[0].headers, [(b"grpc-status", b"0")])

    def test_endOnLastData(self) -> None:
        """
        C{send_data(..., end_stream=True)} ends the stream on that DATA frame: no empty
        DATA frame after it.
        """
        pair = Pair(client=False)
        pair.peer.send_headers(1, REQUEST, end_stream=True)
        pair.pump()
        pair.ours.send_headers(1, [(b":status", b"200")])
        pair.ours.send_data(1, b"body", end_stream=True)
        pair.pump()
        data = pair.peerOf(DataReceived, 1)
        self.assertEqual([e.data for e in data], [b"body"])
        self.assertIsNotNone(data[0].stream_ended)

    def test_trailersWaitForData(self) -> None:
        """
        Body bytes beyond the client's window wait in the codec (nothing past the
        window is framed, and the window query says 0); trailers given meanwhile go
        out only after them, once the client opens its window.
        """
        pair = Pair(client=False, peerSettings={SettingCodes.INITIAL_WINDOW_SIZE: 10})
        pair.peer.send_headers(1, REQUEST, end_stream=True)
        pair.pump()
        pair.ours.send_headers(1, [(b":status", b"200")])
        self.assertEqual(pair.ours.local_flow_control_window(1), 10)
        pair.ours.send_data(1, b"x" * 25)
        self.assertEqual(pair.ours.local_flow_control_window(1), 0)
        pair.ours.send_headers(1, [(b"grpc-status", b"0")], end_stream=True)
        pair.pump()
        self.assertEqual(b"".join(e.data for e in pair.peerOf(DataReceived, 1)), b"x" * 10)
        self.assertEqual(pair.peerOf(TrailersReceived, 1), [])
        pair.peer.increment_flow_control_window(100, 1)
        pair.pump()
        self.assertTrue(pair.oursOf(ng.WindowUpdated, 1))
        self.assertEqual(b"".join(e.data for e in pair.peerOf(DataReceived, 1)), b"x" * 25)
        self.assertEqual(len(pair.peerOf(TrailersReceived, 1)), 1)

    def test_windowUpdatedBeforeTheHead(self) -> None:
        """
        A stream's window counts the client's initial window and a WINDOW_UPDATE it
        sent for the stream before the response head went out; a new initial window
        in SETTINGS applies to the streams open and to those to come.
        """
        pair = Pair(client=False, peerSettings={SettingCodes.INITIAL_WINDOW_SIZE: 10})
        pair.peer.send_headers(1, REQUEST, end_stream=True)
        pair.peer.send_headers(3, REQUEST, end_stream=True)
        pair.peer.increment_flow_control_window(100, 1)
        pair.pump()
        pair.ours.send_headers(1, [(b":status", b"200")])
        pair.ours.send_headers(3, [(b":status", b"200")])
        self.assertEqual((pair.ours.local_flow_control_window(1), pair.ours.local_flow_control_window(3)), (110, 10))
        pair.peer.update_settings({SettingCodes.INITIAL_WINDOW_SIZE: 50})
        pair.peer.send_headers(5, REQUEST, end_stream=True)
        pair.pump()
        pair.ours.send_headers(5, [(b":status", b"200")])
        self.assertEqual([pair.ours.local_flow_control_window(sid) for sid in (1, 3, 5)], [150, 50, 50])

    def test_windowOnlyWhenAcknowledged(self) -> None:
        """
        Received DATA does not reopen the client's windows by itself: only
        C{acknowledge_received_data} (the upstream took the bytes) does.
        """
        config = H2Config(streamWindow=65535, connectionWindow=65535)
        pair = Pair(client=False, config=config)
        pair.peer.send_headers(1, REQUEST)
        pair.peer.send_data(1, b"u" * 16384)
        pair.peer.send_data(1, b"u" * 16384)
        pair.peer.send_data(1, b"u" * 16384)
        pair.pump()
        self.assertEqual(pair.peer.local_flow_control_window(1), 65535 - 3 * 16384)
        pair.ours.acknowledge_received_data(3 * 16384, 1)
        pair.pump()
        self.assertEqual(pair.peer.local_flow_control_window(1), 65535)

    def test_reset(self) -> None:
        """
        A client's RST_STREAM is a L{ng.StreamReset} with its code; ours reaches the
        client with ours, and what the stream held is dropped.
        """
        pair = Pair(client=False, peerSettings={SettingCodes.INITIAL_WINDOW_SIZE: 0})
        pair.peer.send_headers(1, REQUEST, end_stream=True)
        pair.peer.send_headers(3, REQUEST, end_stream=True)
        pair.pump()
        pair.peer.reset_stream(1, ErrorCodes.CANCEL)
        pair.ours.send_headers(3, [(b":status", b"200")])
        pair.ours.send_data(3, b"held")
        pair.pump()
        self.assertEqual(pair.oursOf(ng.StreamReset, 1)[0].error_code, ErrorCodes.CANCEL)
        pair.ours.reset_stream(3, ErrorCodes.INTERNAL_ERROR)
        pair.pump()
        self.assertEqual(pair.peerOf(StreamReset, 3)[0].error_code, ErrorCodes.INTERNAL_ERROR)
        self.assertEqual(pair.ours._buffered, 0)

    def test_malformedHeaders(self) -> None:
        """
        A request with a connection-specific header (RFC 9113 8.2.2), an upper-case
        name, or a value with LF never reaches the door: nghttp2 resets that stream
        with PROTOCOL_ERROR, and the connection goes on.
        """
        pair = Pair(client=False)
        encoder = pair.peer.encoder
        for sid, bad in ((1, (b"connection", b"keep-alive")), (3, (b"X-Up", b"a")), (5, (b"x-a", b"a\nb"))):
            frame = HeadersFrame(sid)
            frame.data = encoder.encode(REQUEST + [bad])
            frame.flags.add("END_HEADERS")
            frame.flags.add("END_STREAM")
            self.assertEqual(pair.ours.receive_data(frame.serialize()), [])
            # The peer (h2) never saw the stream open: read our answer as frames.
            [reset] = parseFrames(pair.ours.data_to_send())
            self.assertEqual((type(reset), reset.stream_id, reset.error_code),
                             (RstStreamFrame, sid, ErrorCodes.PROTOCOL_ERROR))
        frame = HeadersFrame(7)
        frame.data = encoder.encode(REQUEST)
        frame.flags.add("END_HEADERS")
        frame.flags.add("END_STREAM")
        self.assertEqual([type(e) for e in pair.ours.receive_data(frame.serialize())],
                         [ng.RequestReceived, ng.StreamEnded])

    def test_bodyShorterThanItsLength(self) -> None:
        """
        A request body shorter than its C{content-length} makes nghttp2 reset the
        stream (PROTOCOL_ERROR) without a callback of its own; the door is told by a
        L{ng.StreamReset} among the same read's events, once, and never gets the end
        of the request.
        """
        pair = Pair(client=False)
        pair.peer.send_headers(1, REQUEST + [(b"content-length", b"5")])
        pair.peer.send_data(1, b"abc", end_stream=True)
        events = pair.ours.receive_data(pair.peer.data_to_send())
        self.assertEqual([(type(e), e.stream_id) for e in events],
                         [(ng.RequestReceived, 1), (ng.DataReceived, 1), (ng.StreamReset, 1)])
        self.assertEqual(events[-1].error_code, ErrorCodes.PROTOCOL_ERROR)
        [reset] = parseFrames(pair.ours.data_to_send())
        self.assertEqual((type(reset), reset.error_code), (RstStreamFrame, ErrorCodes.PROTOCOL_ERROR))
        pair.peer.ping(b"87654321")
        self.assertEqual(pair.ours.receive_data(pair.peer.data_to_send()), [])

    def test_noLateResetForKnownResets(self) -> None:
        """
        Streams reset by the door, or by the client, are not reported again when
        nghttp2 closes them.
        """
        pair = Pair(client=False)
        pair.peer.send_headers(1, REQUEST)
        pair.peer.send_headers(3, REQUEST)
        pair.pump()
        pair.ours.reset_stream(1, ErrorCodes.CANCEL)
        pair.peer.reset_stream(3, ErrorCodes.CANCEL)
        pair.pump()
        pair.peer.ping(b"12345678")
        pair.pump()
        self.assertEqual([e.stream_id for e in pair.oursOf(ng.StreamReset)], [3])

    def test_headerListLimit(self) -> None:
        """
        A header list larger than C{maxHeaderListSize} once decoded (an HPACK bomb) is
        a connection error: L{ng.NgProtocolError}, and a GOAWAY ENHANCE_YOUR_CALM in
        the bytes to send; no request event.
        """
        pair = Pair(client=False, config=H2Config(maxHeaderListSize=16 * 1024))
        encoder = Encoder()
        block = encoder.encode(REQUEST + [(b"x-bomb", b"b" * 4000)])
        block += encoder.encode([(b"x-bomb", b"b" * 4000)]) * 10
        frame = HeadersFrame(1)
        frame.data = block
        frame.flags.add("END_HEADERS")
        frame.flags.add("END_STREAM")
        error = self.assertRaises(ng.NgProtocolError, pair.ours.receive_data, frame.serialize())
        self.assertIn("16384", str(error))
        events = pair.peer.receive_data(pair.ours.data_to_send())
        goaway = [e for e in events if isinstance(e, ConnectionTerminated)]
        self.assertEqual(goaway[0].error_code, ErrorCodes.ENHANCE_YOUR_CALM)

    def test_continuationFlood(self) -> None:
        """
        A header block that goes on in CONTINUATION frames past nghttp2's limit (8) is
        a connection error: L{ng.NgProtocolError} and a GOAWAY PROTOCOL_ERROR, with no
        request event.
        """
        pair = Pair(client=False)
        headers = HeadersFrame(1)
        headers.data = pair.peer.encoder.encode(REQUEST)
        frames = [headers.serialize()]
        for _ in range(20):
            continuation = ContinuationFrame(1)
            continuation.data = b"\0" * 100
            frames.append(continuation.serialize())
        self.assertRaises(ng.NgProtocolError, pair.ours.receive_data, b"".join(frames))
        [goaway] = parseFrames(pair.ours.data_to_send())
        self.assertEqual((type(goaway), goaway.error_code), (GoAwayFrame, ErrorCodes.PROTOCOL_ERROR))

    def test_tooManyStreams(self) -> None:
        """
        A stream past the advertised SETTINGS_MAX_CONCURRENT_STREAMS (once the client
        has acknowledged it) is a connection error: L{ng.NgProtocolError} and a GOAWAY
        PROTOCOL_ERROR.
        """
        pair = Pair(client=False, config=H2Config(maxConcurrentStreams=2))
        encoder = pair.peer.encoder
        frames = b""
        for sid in (1, 3, 5):
            frame = HeadersFrame(sid)
            frame.data = encoder.encode(REQUEST)
            frame.flags.add("END_HEADERS")
            frames += frame.serialize()
        self.assertRaises(ng.NgProtocolError, pair.ours.receive_data, frames)
        events = pair.peer.receive_data(pair.ours.data_to_send())
        goaway = [e for e in events if isinstance(e, ConnectionTerminated)]
        self.assertEqual(goaway[0].error_code, ErrorCodes.PROTOCOL_ERROR)

    def test_callbackError(self) -> None:
        """
        An exception in a callback (a bug) is not ignored: the read raises
        L{ng.NgProtocolError}, so the door closes the connection.
        """
        pair = Pair(client=False)
        pair.peer.send_headers(1, REQUEST)
        pair.peer.send_data(1, b"body")

        def broken(*args: Any) -> Any:
            raise ZeroDivisionError()
        self.patch(ng, "DataReceived", broken)
        self.assertRaises(ng.NgProtocolError, pair.ours.receive_data, pair.peer.data_to_send())

    def test_badPreface(self) -> None:
        """
        Bytes that are not the client preface are a protocol error.
        """
        conn = ng.newSession(H2Config(), False)
        conn.initiate_connection()
        self.assertRaises(ng.NgProtocolError, conn.receive_data, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")

    def test_closeConnection(self) -> None:
        """
        C{close_connection} sends GOAWAY with the code and the last stream given.
        """
        pair = Pair(client=False)
        pair.peer.send_headers(1, REQUEST, end_stream=True)
        pair.pump()
        pair.ours.close_connection(ErrorCodes.ENHANCE_YOUR_CALM, last_stream_id=1)
        events = pair.peer.receive_data(pair.ours.data_to_send())
        goaway = [e for e in events if isinstance(e, ConnectionTerminated)][0]
        self.assertEqual((goaway.error_code, goaway.last_stream_id), (ErrorCodes.ENHANCE_YOUR_CALM, 1))


class ClientTests(unittest.SynchronousTestCase):
    """
    nghttp2 as the upstream's codec, an h2 service as the peer.
    """

    if BINDING is None:
        skip = NO_LIBRARY

    def test_requestAndResponse(self) -> None:
        """
        A request opens the stream id announced by C{get_next_available_stream_id};
        its body and end reach the service; the service's interim 100 is not passed
        on, its final head, body and trailers are.
        """
        pair = Pair(client=True)
        sid = pair.ours.get_next_available_stream_id()
        self.assertEqual(sid, 1)
        pair.ours.send_headers(sid, REQUEST)
        pair.ours.send_data(sid, b"ping")
        pair.ours.end_stream(sid)
        self.assertEqual(pair.ours.get_next_available_stream_id(), 3)
        pair.pump()
        self.assertEqual(pair.peerOf(RequestReceived, 1)[0].headers, REQUEST)
        self.assertEqual(b"".join(e.data for e in pair.peerOf(DataReceived, 1)), b"ping")
        self.assertEqual(len(pair.peerOf(StreamEnded, 1)), 1)
        pair.peer.send_headers(1, [(b":status", b"100")])
        pair.peer.send_headers(1, [(b":status", b"200"), (b"content-type", b"application/grpc")])
        pair.peer.send_data(1, b"pong")
        pair.peer.send_headers(1, [(b"grpc-status", b"0")], end_stream=True)
        pair.pump()
        [response] = pair.oursOf(ng.ResponseReceived, 1)
        self.assertEqual(response.headers[0], (b":status", b"200"))
        self.assertEqual(b"".join(e.data for e in pair.oursOf(ng.DataReceived, 1)), b"pong")
        self.assertEqual(pair.oursOf(ng.TrailersReceived, 1)[0].headers, [(b"grpc-status", b"0")])
        self.assertEqual(len(pair.oursOf(ng.StreamEnded, 1)), 1)

    def test_responseSplitting(self) -> None:
        """
        A response header value with CR or LF from the service (which the proxy would
        write into an HTTP/1.1 client's head) is never passed on: the stream is reset
        (PROTOCOL_ERROR to the service) and the upstream told by a L{ng.StreamReset}.
        """
        pair = Pair(client=True)
        pair.ours.send_headers(1, REQUEST, end_stream=True)
        pair.pump()
        frame = HeadersFrame(1)
        frame.data = pair.peer.encoder.encode([(b":status", b"200"), (b"x-a", b"a\r\nSet-Cookie: x=1")])
        frame.flags.add("END_HEADERS")
        events = pair.ours.receive_data(frame.serialize())
        self.assertEqual([(type(e), e.stream_id, e.error_code) for e in events],
                         [(ng.StreamReset, 1, ErrorCodes.PROTOCOL_ERROR)])
        self.assertEqual(pair.peer.receive_data(pair.ours.data_to_send())[0].error_code, ErrorCodes.PROTOCOL_ERROR)

    def test_neverIndexed(self) -> None:
        """
        Headers marked never-indexed (ours, or hpack's tuple) reach the service as
        never-indexed literals; the others as plain ones.
        """
        pair = Pair(client=True)
        pair.ours.send_headers(1, REQUEST + [ng.NeverIndexed((b"x-request-id", b"r-1")),
                                             NeverIndexedHeaderTuple(b"authorization", b"Bearer t"),
                                             (b"x-thing", b"1")], end_stream=True)
        pair.pump()
        headers = pair.peerOf(RequestReceived, 1)[0].headers
        never = {(h[0], h[1]) for h in headers if isinstance(h, NeverIndexedHeaderTuple)}
        self.assertEqual(never, {(b"x-request-id", b"r-1"), (b"authorization", b"Bearer t")})

    def test_windowBeforeTheStreamOpens(self) -> None:
        """
        The window of a request whose HEADERS are not out yet is the service's initial
        stream window (nghttp2 opens the stream when it sends them).
        """
        pair = Pair(client=True, peerSettings={SettingCodes.INITIAL_WINDOW_SIZE: 1000})
        pair.ours.send_headers(1, REQUEST)
        self.assertEqual(pair.ours.local_flow_control_window(1), 1000)
        pair.ours.send_data(1, b"b" * 400)
        self.assertEqual(pair.ours.local_flow_control_window(1), 600)
        pair.pump()
        self.assertEqual(pair.ours.local_flow_control_window(1), 600)

    def test_serviceSettings(self) -> None:
        """
        The service's SETTINGS_MAX_CONCURRENT_STREAMS is read as h2's
        C{remote_settings.max_concurrent_streams}, with a L{ng.RemoteSettingsChanged}.
        """
        pair = Pair(client=True, peerSettings={SettingCodes.MAX_CONCURRENT_STREAMS: 7})
        self.assertEqual(pair.ours.remote_settings.max_concurrent_streams, 7)
        self.assertTrue(pair.oursOf(ng.RemoteSettingsChanged))

    def test_goaway(self) -> None:
        """
        The service's GOAWAY is a L{ng.ConnectionTerminated} with its code and last
        stream.
        """
        pair = Pair(client=True)
        pair.peer.close_connection(ErrorCodes.NO_ERROR, last_stream_id=0)
        pair.pump()
        event = pair.oursOf(ng.ConnectionTerminated)[0]
        self.assertEqual((event.error_code, event.last_stream_id), (0, 0))


class CodecChoiceTests(unittest.SynchronousTestCase):
    """
    Which codec a connection gets.
    """

    def test_choice(self) -> None:
        """
        C{h2} is h2; C{auto} defers to C{$SIDECAR_H2_CODEC}, then is nghttp2 when the
        library loads, h2 when it does not; C{nghttp2} without the library is an error.
        """
        self.assertEqual(codecFor(H2Config(codec="h2"), {}), "h2")
        self.assertEqual(codecFor(H2Config(codec="auto"), {CODEC_ENVIRONMENT: "h2"}), "h2")
        self.assertEqual(codecFor(H2Config(codec="auto"), {}), "h2" if BINDING is None else "nghttp2")
        self.patch(ng, "loadBinding", lambda: None)
        self.assertEqual(codecFor(H2Config(codec="auto"), {}), "h2")
        self.assertRaises(RuntimeError, codecFor, H2Config(codec="nghttp2"), {})

    def test_fallbackConnection(self) -> None:
        """
        Without the library the doors get a tuned h2 connection, started with the
        sidecar's settings.
        """
        self.patch(ng, "loadBinding", lambda: None)
        conn = newConnection(H2Config(), False, lambda: H2Configuration(client_side=False, header_encoding=None))
        self.assertIsInstance(conn, H2Connection)
        startConnection(conn, H2Config(maxConcurrentStreams=7), client=False)
        self.assertEqual(conn.local_settings.max_concurrent_streams, 7)

    def test_flag(self) -> None:
        """
        C{--h2-codec} takes auto, nghttp2 or h2 (any case) into the configuration and
        refuses anything else in one sentence; C{nghttp2} without the library is refused
        at start-up.
        """
        from sidecar.tap import Options

        def parse(*argv: str) -> Any:
            options = Options()
            options.parseOptions(list(argv))
            return options["config"].h2

        self.assertEqual(parse().codec, "auto")
        self.assertEqual(parse("--h2-codec", "H2").codec, "h2")
        error = self.assertRaises(usage.UsageError, parse, "--h2-codec", "hyper")
        self.assertIn("--h2-codec", str(error))
        self.patch(ng, "loadBinding", lambda: None)
        error = self.assertRaises(usage.UsageError, parse, "--h2-codec", "nghttp2")
        self.assertIn("libnghttp2", str(error))


# -- the door and upstream suites again, on the h2 fallback --------------------------


class _OnH2:
    """
    Runs a test case with C{$SIDECAR_H2_CODEC=h2} (the doors of this process and the
    sidecars it starts then use h2).
    """

    def setUp(self) -> Any:
        old = os.environ.get(CODEC_ENVIRONMENT)
        os.environ[CODEC_ENVIRONMENT] = "h2"

        def restore() -> None:
            if old is None:
                os.environ.pop(CODEC_ENVIRONMENT, None)
            else:
                os.environ[CODEC_ENVIRONMENT] = old
        self.addCleanup(restore)  # type: ignore[attr-defined]
        return super().setUp()  # type: ignore[misc]


def _onH2(module: Any) -> None:
    """
    A subclass on h2 of each of C{module}'s test cases that uses a door or the
    upstream, named C{H2Fallback_<name>} here.
    """
    for name, case in list(vars(module).items()):
        if (isinstance(case, type) and issubclass(case, unittest.SynchronousTestCase)
                and case.__module__ == module.__name__ and name not in _PURE):
            subclass = type(f"H2Fallback_{name}", (_OnH2, case), {"__module__": __name__})
            setattr(sys.modules[__name__], subclass.__name__, subclass)


#: Test cases of pure functions: nothing to run twice.
_PURE = frozenset(["MessageCounterTests", "HeadsTests", "RecordTests", "BenchConfigTests"])

from tests import test_grpc, test_h2  # noqa: E402

_onH2(test_h2)
_onH2(test_grpc)
