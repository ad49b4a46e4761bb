# -*- test-case-name: tests.test_nghttp2 -*-
"""
The HTTP/2 codec on libnghttp2 (the C library of curl, nginx's h2load and Envoy's
codec until 1.28), bound with cffi in ABI mode (C{ffi.dlopen}: no compiler, no
build step; Debian's C{libnghttp2-14} is installed with curl).

L{NgConnection} offers the part of C{h2.connection.H2Connection} that the HTTP/2
door (L{sidecar.h2door}) and upstream (L{sidecar.h2upstream}) use, and emits lean
events with the attribute names of h2's (L{RequestReceived}, L{DataReceived}...),
so both codecs serve the same doors.  Where they differ:

  - B{Sending DATA.}  h2 frames DATA when asked; nghttp2 pulls it through a data
    provider.  Here each stream keeps its outbound bytes in a Python list and one
    provider per stream copies them into nghttp2's frame buffer when nghttp2 has
    window for them; a provider with nothing to send defers and is resumed by the
    next L{NgConnection.send_data}.  Trailers wait for the provider's end (so they
    never overtake DATA), and the end of a stream rides on the last DATA frame.
    L{NgConnection.local_flow_control_window} is nghttp2's window less the bytes
    held here, so the doors' backpressure reads as with h2.
  - B{Flow control} is manual (C{nghttp2_option_set_no_auto_window_update}): a
    received DATA chunk opens its windows again only when the door calls
    L{NgConnection.acknowledge_received_data} (C{nghttp2_session_consume}), once
    the other side has taken the bytes.  nghttp2 decides when the WINDOW_UPDATE
    goes out (half the window consumed), as h2 does.
  - B{Errors.}  A connection error (nghttp2 queued a GOAWAY) raises L{NgProtocolError}
    (a subclass of h2's C{ProtocolError}, which the doors catch) after the GOAWAY
    has been serialised, so the door writes it and closes.  A stream error (a bad
    header from the peer) resets that stream in nghttp2 and is reported as a
    L{StreamReset} with C{PROTOCOL_ERROR} when the door knows the stream.
  - B{Limits.}  The header list is counted as it is decoded (RFC 9113's name +
    value + 32 per field) and a list past C{maxHeaderListSize} is a connection
    error (an HPACK bomb costs C decoding, never Python objects); nghttp2 bounds a
    header block's CONTINUATION frames (8, since the fix of CVE-2024-28182), the
    acknowledgements it queues for a peer that does not read (1,000: PING and
    SETTINGS floods), the streams past C{SETTINGS_MAX_CONCURRENT_STREAMS}, and, in
    the releases that have it, the rate of streams a client resets
    (C{nghttp2_option_set_stream_reset_rate_limit}: 1,000 at once, then 33 a second).

Cost, per frame: one cffi callback per received header field and per frame,
one per DATA chunk received, one per DATA frame sent (the chunks of one stream in
one read are merged into one L{DataReceived}, and the doors hand body bytes over
whole, up to L{NgConnection.max_outbound_frame_size}); the outbound frames of a
turn leave in one C{data_to_send()} (a loop of C{nghttp2_session_mem_send}).
Header lists go to C{nghttp2_submit_*} as one packed C{nghttp2_nv[]} built by
C{struct.pack} over one joined buffer, not field by field.

L{loadBinding} opens the library once per process (like an import: a shared
library is process-wide by nature) and returns C{None} when it cannot be loaded
or lacks a symbol the codec needs; the doors then use h2.
"""

from __future__ import annotations

import ctypes.util
import functools
import struct
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple

from h2.exceptions import ProtocolError
from hpack import NeverIndexedHeaderTuple

_CDEF = """
typedef struct nghttp2_session nghttp2_session;
typedef struct nghttp2_session_callbacks nghttp2_session_callbacks;
typedef struct nghttp2_option nghttp2_option;

typedef struct {
  uint8_t *name; uint8_t *value; size_t namelen; size_t valuelen; uint8_t flags;
} nghttp2_nv;
typedef struct {
  size_t length; int32_t stream_id; uint8_t type; uint8_t flags; uint8_t reserved;
} nghttp2_frame_hd;
typedef struct { nghttp2_frame_hd hd; uint32_t error_code; } nghttp2_rst_stream;
typedef struct {
  nghttp2_frame_hd hd; int32_t last_stream_id; uint32_t error_code;
  uint8_t *opaque_data; size_t opaque_data_len; uint8_t reserved;
} nghttp2_goaway;
typedef union {
  nghttp2_frame_hd hd; nghttp2_rst_stream rst_stream; nghttp2_goaway goaway;
} nghttp2_frame;
typedef struct { int32_t settings_id; uint32_t value; } nghttp2_settings_entry;
typedef union { int fd; void *ptr; } nghttp2_data_source;
typedef ssize_t (*nghttp2_data_source_read_callback)(
  nghttp2_session *, int32_t, uint8_t *, size_t, uint32_t *, nghttp2_data_source *, void *);
/* The callbacks as Python sees them: pointers it does not read are declared as
   pointer-sized integers (passed alike by every C ABI), so that cffi builds no cdata
   object for them on each call. */
typedef ssize_t (*sidecar_read_callback)(uintptr_t, int32_t, uint8_t *, size_t, uint32_t *, uintptr_t, uintptr_t);
typedef struct {
  nghttp2_data_source source; sidecar_read_callback read_callback;
} nghttp2_data_provider;
typedef struct { int age; int version_num; const char *version_str; const char *proto_str; } nghttp2_info;

typedef int (*nghttp2_on_header_callback)(uintptr_t, uintptr_t, const char *, size_t,
                                          const char *, size_t, uint8_t, uintptr_t);
/* The frame as its header (at the start of every frame of the union). */
typedef int (*nghttp2_on_frame_recv_callback)(uintptr_t, const nghttp2_frame_hd *, uintptr_t);
typedef int (*nghttp2_on_data_chunk_recv_callback)(uintptr_t, uint8_t, int32_t, const char *, size_t, uintptr_t);
typedef int (*nghttp2_on_stream_close_callback)(uintptr_t, int32_t, uint32_t, uintptr_t);
typedef int (*nghttp2_on_invalid_frame_recv_callback)(uintptr_t, const nghttp2_frame_hd *, int, uintptr_t);

nghttp2_info *nghttp2_version(int least_version);
const char *nghttp2_strerror(int lib_error_code);

int nghttp2_session_callbacks_new(nghttp2_session_callbacks **callbacks_ptr);
void nghttp2_session_callbacks_del(nghttp2_session_callbacks *callbacks);
void nghttp2_session_callbacks_set_on_header_callback(nghttp2_session_callbacks *, nghttp2_on_header_callback);
void nghttp2_session_callbacks_set_on_frame_recv_callback(nghttp2_session_callbacks *,
                                                          nghttp2_on_frame_recv_callback);
void nghttp2_session_callbacks_set_on_data_chunk_recv_callback(nghttp2_session_callbacks *,
                                                               nghttp2_on_data_chunk_recv_callback);
void nghttp2_session_callbacks_set_on_stream_close_callback(nghttp2_session_callbacks *,
                                                            nghttp2_on_stream_close_callback);
void nghttp2_session_callbacks_set_on_invalid_frame_recv_callback(nghttp2_session_callbacks *,
                                                                  nghttp2_on_invalid_frame_recv_callback);

int nghttp2_option_new(nghttp2_option **option_ptr);
void nghttp2_option_del(nghttp2_option *option);
void nghttp2_option_set_no_auto_window_update(nghttp2_option *option, int val);
void nghttp2_option_set_peer_max_concurrent_streams(nghttp2_option *option, uint32_t val);
void nghttp2_option_set_max_outbound_ack(nghttp2_option *option, size_t val);
void nghttp2_option_set_max_settings(nghttp2_option *option, size_t val);

int nghttp2_session_server_new2(nghttp2_session **, const nghttp2_session_callbacks *, void *,
                                const nghttp2_option *);
int nghttp2_session_client_new2(nghttp2_session **, const nghttp2_session_callbacks *, void *,
                                const nghttp2_option *);
void nghttp2_session_del(nghttp2_session *session);
ssize_t nghttp2_session_mem_recv(nghttp2_session *session, const char *in, size_t inlen);
ssize_t nghttp2_session_mem_send(nghttp2_session *session, const char **data_ptr);
int nghttp2_session_want_read(nghttp2_session *session);
int nghttp2_session_want_write(nghttp2_session *session);
int nghttp2_submit_settings(nghttp2_session *, uint8_t, const nghttp2_settings_entry *, size_t);
int32_t nghttp2_submit_request(nghttp2_session *, const void *, const nghttp2_nv *, size_t,
                               const nghttp2_data_provider *, void *);
int nghttp2_submit_response(nghttp2_session *, int32_t, const nghttp2_nv *, size_t,
                            const nghttp2_data_provider *);
int nghttp2_submit_trailer(nghttp2_session *, int32_t, const nghttp2_nv *, size_t);
int nghttp2_submit_rst_stream(nghttp2_session *, uint8_t, int32_t, uint32_t);
int nghttp2_session_terminate_session(nghttp2_session *, uint32_t);
int nghttp2_session_terminate_session2(nghttp2_session *, int32_t, uint32_t);
int nghttp2_session_resume_data(nghttp2_session *, int32_t);
int nghttp2_session_consume(nghttp2_session *, int32_t, size_t);
int nghttp2_session_set_local_window_size(nghttp2_session *, uint8_t, int32_t, int32_t);
int32_t nghttp2_session_get_stream_remote_window_size(nghttp2_session *, int32_t);
int32_t nghttp2_session_get_remote_window_size(nghttp2_session *);
uint32_t nghttp2_session_get_remote_settings(nghttp2_session *, int);
int32_t nghttp2_session_get_next_stream_id(nghttp2_session *);
"""

#: Only in the releases with the rapid-reset fix (1.57, and Debian 12's backport).
_CDEF_OPTIONAL = """
void nghttp2_option_set_stream_reset_rate_limit(nghttp2_option *option, uint64_t burst, uint64_t rate);
void nghttp2_option_set_max_continuations(nghttp2_option *option, size_t val);
"""

#: The library's names, as the packages ship it.
LIBRARY_NAMES = ("libnghttp2.so.14", "libnghttp2.so", "libnghttp2.14.dylib")

_DATA, _HEADERS, _RST_STREAM, _SETTINGS, _GOAWAY, _WINDOW_UPDATE = 0, 1, 3, 4, 7, 8
_FLAG_END_STREAM = _FLAG_ACK = 1
_DATA_FLAG_EOF, _DATA_FLAG_NO_END_STREAM = 1, 2
_ERR_DEFERRED = -508
_ERR_TEMPORAL_CALLBACK_FAILURE = -521
_ERR_CALLBACK_FAILURE = -902
_SETTINGS_ENABLE_PUSH, _SETTINGS_MAX_CONCURRENT_STREAMS, _SETTINGS_INITIAL_WINDOW_SIZE = 2, 3, 4
_SETTINGS_MAX_HEADER_LIST_SIZE = 6
_NV_FLAG_NO_INDEX = 1
_PROTOCOL_ERROR, _ENHANCE_YOUR_CALM = 1, 11

#: Header arrays a connection keeps for reuse, at most.
_NV_CACHE_SIZE = 32

#: C{nghttp2_nv}: two pointers, two lengths, a flag byte, padded to 8.
_NV = struct.Struct("@PPNNB7x")


class NeverIndexed(tuple):
    """
    A header to send as a never-indexed literal: C{NeverIndexed((name, value))}, a
    plain tuple subclass (hpack's C{NeverIndexedHeaderTuple} costs a Python
    C{__new__} per header).
    """

    __slots__ = ()


_NEVER = (NeverIndexed, NeverIndexedHeaderTuple)


class NgProtocolError(ProtocolError):
    """
    The peer broke the protocol: nghttp2 has queued a GOAWAY (L{NgConnection.data_to_send}
    returns it).
    """


class Binding:
    """
    The loaded library: C{ffi} and C{lib}, and what this release offers.

    @ivar version: the library's version, e.g. C{"1.52.0"}.
    @ivar resetRateLimit: whether C{nghttp2_option_set_stream_reset_rate_limit} exists.
    """

    def __init__(self, ffi: Any, lib: Any) -> None:
        self.ffi = ffi
        self.lib = lib
        self.version = ffi.string(lib.nghttp2_version(0).version_str).decode("ascii")
        self.resetRateLimit = _has(lib, "nghttp2_option_set_stream_reset_rate_limit")
        self.maxContinuations = _has(lib, "nghttp2_option_set_max_continuations")


def _has(lib: Any, name: str) -> bool:
    try:
        getattr(lib, name)
    except (AttributeError, NotImplementedError):
        return False
    return True


@functools.lru_cache(maxsize=None)
def loadBinding() -> Optional[Binding]:
    """
    Open libnghttp2 (once per process).

    @return: the binding, or C{None} when cffi or the library is missing, or the
        library lacks a function the codec calls.
    """
    try:
        from cffi import FFI
    except ImportError:
        return None
    ffi = FFI()
    ffi.cdef(_CDEF)
    ffi.cdef(_CDEF_OPTIONAL)
    names = list(LIBRARY_NAMES)
    found = ctypes.util.find_library("nghttp2")
    if found:
        names.append(found)
    for name in names:
        try:
            lib = ffi.dlopen(name)
        except OSError:
            continue
        try:
            for symbol in ("nghttp2_session_mem_recv", "nghttp2_session_mem_send", "nghttp2_session_consume",
                           "nghttp2_option_set_no_auto_window_update", "nghttp2_session_set_local_window_size",
                           "nghttp2_submit_trailer", "nghttp2_session_terminate_session2"):
                getattr(lib, symbol)
            return Binding(ffi, lib)
        except (AttributeError, NotImplementedError):
            return None
    return None


class RequestReceived:
    __slots__ = ("stream_id", "headers", "stream_ended")

    def __init__(self, stream_id: int, headers: List[Tuple[bytes, bytes]], stream_ended: Any) -> None:
        self.stream_id = stream_id
        self.headers = headers
        #: Not C{None} when the HEADERS ended the stream (as h2's).
        self.stream_ended = stream_ended


class ResponseReceived:
    __slots__ = ("stream_id", "headers")

    def __init__(self, stream_id: int, headers: List[Tuple[bytes, bytes]]) -> None:
        self.stream_id = stream_id
        self.headers = headers


class TrailersReceived:
    __slots__ = ("stream_id", "headers")

    def __init__(self, stream_id: int, headers: List[Tuple[bytes, bytes]]) -> None:
        self.stream_id = stream_id
        self.headers = headers


class DataReceived:
    __slots__ = ("stream_id", "data", "flow_controlled_length", "parts")

    def __init__(self, stream_id: int, data: bytes, flow_controlled_length: int) -> None:
        self.stream_id = stream_id
        self.data = data
        self.flow_controlled_length = flow_controlled_length
        #: The chunks of the DATA frames of one read merged into this event, joined
        #: into C{data} before the read returns.
        self.parts: Optional[List[bytes]] = None


class StreamEnded:
    __slots__ = ("stream_id",)

    def __init__(self, stream_id: int) -> None:
        self.stream_id = stream_id


class WindowUpdated:
    __slots__ = ("stream_id",)

    def __init__(self, stream_id: int) -> None:
        self.stream_id = stream_id


class StreamReset:
    __slots__ = ("stream_id", "error_code")

    def __init__(self, stream_id: int, error_code: int) -> None:
        self.stream_id = stream_id
        self.error_code = error_code


class RemoteSettingsChanged:
    __slots__ = ()
    stream_id = 0


class ConnectionTerminated:
    __slots__ = ("error_code", "last_stream_id")
    stream_id = 0

    def __init__(self, error_code: int, last_stream_id: int) -> None:
        self.error_code = error_code
        self.last_stream_id = last_stream_id


class _Outbound:
    """
    A stream's bytes waiting for nghttp2's data provider, and how the stream ends.
    """

    __slots__ = ("chunks", "offset", "size", "end", "trailers", "deferred", "window")

    def __init__(self) -> None:
        self.chunks: List[bytes] = []
        #: Bytes of C{chunks[0]} already framed.
        self.offset = 0
        self.size = 0
        self.end = False
        self.trailers: Optional[Sequence[Any]] = None
        #: The provider said "nothing yet": L{NgConnection.send_data} resumes it.
        self.deferred = False
        #: The peer's window for the stream as nghttp2 last said, less what was framed
        #: since; C{None} after a WINDOW_UPDATE or SETTINGS (ask again).
        self.window: Optional[int] = None


class _RemoteSettings:
    """
    The peer's settings the doors read (as h2's C{remote_settings}), updated as its
    SETTINGS arrive.
    """

    __slots__ = ("max_concurrent_streams",)

    def __init__(self, maxConcurrentStreams: int) -> None:
        self.max_concurrent_streams = maxConcurrentStreams


class NgConnection:
    """
    One HTTP/2 connection, either side, on an nghttp2 session: the subset of h2's
    C{H2Connection} the doors use (see the module docstring).

    @ivar max_outbound_frame_size: the most body bytes the doors hand over in one
        L{send_data} (nghttp2 cuts them into DATA frames of 16 KiB itself, so the
        doors need not, nor copy each piece).
    """

    max_outbound_frame_size = 1024 * 1024
    #: The never-indexed header class L{sidecar.h2wire.requestHeaders} builds.
    neverIndexed = NeverIndexed

    def __init__(self, binding: Binding, config: Any, client: bool) -> None:
        """
        @param config: the L{sidecar.config.H2Config}.
        @param client: the sidecar is the client (the upstream side).
        """
        ffi = binding.ffi
        lib = binding.lib
        self._ffi = ffi
        self._lib = lib
        self._config = config
        self.client = client
        self._events: List[Any] = []
        self._headers: List[Tuple[bytes, bytes]] = []
        self._headerBytes = 0
        self._limit = config.maxHeaderListSize
        self._out: Dict[int, _Outbound] = {}
        self._buffered = 0
        #: The peer's window for the connection, kept as for L{_Outbound.window}.
        self._connectionWindow: Optional[int] = None
        #: The peer's SETTINGS_INITIAL_WINDOW_SIZE: a new stream's window, unless the
        #: peer sent a WINDOW_UPDATE for it before its head went out (C{_early}).
        self._initialWindow = 65535
        self._early: Set[int] = set()
        #: Streams whose reset the doors know of (theirs, the peer's, or reported).
        self._reported: Set[int] = set()
        #: Resets nghttp2 made while sending (a request body shorter than its
        #: content-length): reported with the next events.
        self._late: List[Any] = []
        #: DataReceived events of this read that merged several chunks.
        self._merged: List[Any] = []
        self._nextStreamId = 1
        #: Streams whose first HEADERS (request, or final response) arrived.
        self._seen: Set[int] = set()
        self._error: Optional[str] = None
        #: Why the session failed while sending, if it did.
        self._broken: Optional[str] = None
        self._invalid = False
        self._held = b""
        #: Nothing is queued in nghttp2 for sure (the last data_to_send drained it, and
        #: nothing was submitted or received since): data_to_send need not ask.
        self._quiet = False
        #: Header lists packed lately, by their content (L{_nva}).
        self._nvCache: Dict[Tuple[Any, ...], Tuple[bytes, Any, int]] = {}
        self._pp = ffi.new("const char **")
        # cffi's C functions themselves, not the FFI methods that wrap each call.
        backend = ffi._backend
        unpack = self._unpack = backend.unpack
        memmove = backend.memmove
        self._fromBuffer = backend.from_buffer
        self._cast = backend.cast
        self._charArray = ffi.typeof("char[]")
        self._nvArray = ffi.typeof("nghttp2_nv[]")
        self._uintptr = ffi.typeof("uintptr_t")

        def header(session: Any, frame: Any, name: Any, namelen: int, value: Any, valuelen: int,
                   flags: int, user: Any) -> int:
            size = self._headerBytes + namelen + valuelen + 32
            self._headerBytes = size
            if size > self._limit:
                self._error = f"a header list larger than {self._limit} bytes"
                return _ERR_TEMPORAL_CALLBACK_FAILURE
            self._headers.append((unpack(name, namelen), unpack(value, valuelen)))
            return 0

        # No on_begin_headers callback (one fewer per HEADERS): a header block starts
        # empty because the last one was taken whole (frameRecv), or dropped (an
        # invalid frame, invalidFrame; an oversized list fails the connection).

        frameType = ffi.typeof("nghttp2_frame *")

        def frameRecv(session: Any, hd: Any, user: Any) -> int:
            kind = hd.type
            if kind == _DATA:
                if hd.flags & _FLAG_END_STREAM:
                    self._events.append(StreamEnded(hd.stream_id))
            elif kind == _HEADERS:
                sid = hd.stream_id
                headers, self._headers = self._headers, []
                self._headerBytes = 0
                end = hd.flags & _FLAG_END_STREAM
                events = self._events
                seen = self._seen
                if sid in seen:
                    events.append(TrailersReceived(sid, headers))
                elif not self.client:
                    seen.add(sid)
                    events.append(RequestReceived(sid, headers, True if end else None))
                elif headers and headers[0][1][:1] == b"1":
                    # An interim response (1xx): not passed on.
                    return 0
                else:
                    seen.add(sid)
                    events.append(ResponseReceived(sid, headers))
                if end:
                    events.append(StreamEnded(sid))
            elif kind == _WINDOW_UPDATE:
                sid = hd.stream_id
                if sid:
                    out = self._out.get(sid)
                    if out is not None:
                        out.window = None
                    else:
                        self._early.add(sid)
                else:
                    self._connectionWindow = None
                self._events.append(WindowUpdated(sid))
            elif kind == _RST_STREAM:
                self._reported.add(hd.stream_id)
                self._events.append(StreamReset(hd.stream_id, self._cast(frameType, hd).rst_stream.error_code))
            elif kind == _SETTINGS:
                if not hd.flags & _FLAG_ACK:
                    for out in self._out.values():
                        out.window = None
                    self._initialWindow = int(lib.nghttp2_session_get_remote_settings(
                        self._session, _SETTINGS_INITIAL_WINDOW_SIZE))
                    self.remote_settings.max_concurrent_streams = int(lib.nghttp2_session_get_remote_settings(
                        self._session, _SETTINGS_MAX_CONCURRENT_STREAMS))
                    self._events.append(RemoteSettingsChanged())
            elif kind == _GOAWAY:
                goaway = self._cast(frameType, hd).goaway
                self._events.append(ConnectionTerminated(goaway.error_code, goaway.last_stream_id))
            return 0

        def dataChunk(session: Any, flags: int, sid: int, data: Any, length: int, user: Any) -> int:
            events = self._events
            if events:
                last = events[-1]
                if last.__class__ is DataReceived and last.stream_id == sid:
                    # The next DATA frame of the same stream in this read (a download
                    # comes as 8 KiB frames): one event for the engine, not one each.
                    parts = last.parts
                    if parts is None:
                        parts = last.parts = [last.data]
                        self._merged.append(last)
                    parts.append(unpack(data, length))
                    last.flow_controlled_length += length
                    return 0
            events.append(DataReceived(sid, unpack(data, length), length))
            return 0

        def streamClose(session: Any, sid: int, code: int, user: Any) -> int:
            out = self._out.pop(sid, None)
            if out is not None:
                self._buffered -= out.size
            reported = self._reported
            if code and (sid in self._seen or self.client) and sid not in reported:
                # nghttp2 reset the stream on its own without telling (a body that
                # does not match its content-length): tell the door or the upstream.
                self._late.append(StreamReset(sid, code))
            reported.discard(sid)
            self._seen.discard(sid)
            self._early.discard(sid)
            return 0

        def invalidFrame(session: Any, frame: Any, code: int, user: Any) -> int:
            self._invalid = True
            self._headers = []
            self._headerBytes = 0
            sid = frame.stream_id
            if sid in self._seen or (sid and self.client):
                self._reported.add(sid)
                # nghttp2 resets the stream (a stream error, such as a header with CR,
                # LF or NUL, or a connection-specific one): tell the door, or the
                # upstream, whose stream it is even before its response.
                self._events.append(StreamReset(sid, _PROTOCOL_ERROR))
            return 0

        def read(session: Any, sid: int, buf: Any, length: int, flags: Any, source: Any, user: Any) -> int:
            out = self._out.get(sid)
            if out is None:
                flags[0] |= _DATA_FLAG_EOF
                return 0
            chunks = out.chunks
            if not chunks:
                if out.end:
                    self._finish(sid, out, flags)
                    return 0
                out.deferred = True
                return _ERR_DEFERRED
            n = 0
            while chunks and n < length:
                data = chunks[0]
                offset = out.offset
                take = len(data) - offset
                if take > length - n:
                    take = length - n
                if offset:
                    memmove(buf + n, memoryview(data)[offset:offset + take], take)
                else:
                    memmove(buf + n, data, take)
                offset += take
                if offset == len(data):
                    del chunks[0]
                    out.offset = 0
                else:
                    out.offset = offset
                n += take
            out.size -= n
            self._buffered -= n
            if out.window is not None:
                out.window -= n
            if self._connectionWindow is not None:
                self._connectionWindow -= n
            if not chunks and out.end:
                self._finish(sid, out, flags)
            return n

        # The callbacks live as long as the connection (nghttp2 keeps their addresses).
        # A Python error in one (a bug) is fatal to the session, not ignored: cffi
        # prints it and returns NGHTTP2_ERR_CALLBACK_FAILURE, and the next
        # receive_data raises, so the door closes the connection.
        fatal = _ERR_CALLBACK_FAILURE
        self._callbacks = (
            ffi.callback("nghttp2_on_header_callback", header, error=fatal),
            ffi.callback("nghttp2_on_frame_recv_callback", frameRecv, error=fatal),
            ffi.callback("nghttp2_on_data_chunk_recv_callback", dataChunk, error=fatal),
            ffi.callback("nghttp2_on_stream_close_callback", streamClose, error=fatal),
            ffi.callback("nghttp2_on_invalid_frame_recv_callback", invalidFrame, error=fatal),
            ffi.callback("sidecar_read_callback", read, error=fatal),
        )
        self._provider = ffi.new("nghttp2_data_provider *")
        self._provider.read_callback = self._callbacks[5]
        pcallbacks = ffi.new("nghttp2_session_callbacks **")
        poption = ffi.new("nghttp2_option **")
        psession = ffi.new("nghttp2_session **")
        if lib.nghttp2_session_callbacks_new(pcallbacks) or lib.nghttp2_option_new(poption):
            raise MemoryError("nghttp2: out of memory")
        callbacks, option = pcallbacks[0], poption[0]
        try:
            for setter, callback in zip((
                    lib.nghttp2_session_callbacks_set_on_header_callback,
                    lib.nghttp2_session_callbacks_set_on_frame_recv_callback,
                    lib.nghttp2_session_callbacks_set_on_data_chunk_recv_callback,
                    lib.nghttp2_session_callbacks_set_on_stream_close_callback,
                    lib.nghttp2_session_callbacks_set_on_invalid_frame_recv_callback), self._callbacks):
                setter(callbacks, callback)
            lib.nghttp2_option_set_no_auto_window_update(option, 1)
            if client:
                lib.nghttp2_option_set_peer_max_concurrent_streams(option, config.maxConcurrentStreams)
            new = lib.nghttp2_session_client_new2 if client else lib.nghttp2_session_server_new2
            if new(psession, callbacks, ffi.NULL, option):
                raise MemoryError("nghttp2: out of memory")
        finally:
            lib.nghttp2_session_callbacks_del(callbacks)
            lib.nghttp2_option_del(option)
        self._session = ffi.gc(psession[0], lib.nghttp2_session_del)
        self.remote_settings = _RemoteSettings(int(lib.nghttp2_session_get_remote_settings(
            self._session, _SETTINGS_MAX_CONCURRENT_STREAMS)))
        self._recv = lib.nghttp2_session_mem_recv
        self._send = lib.nghttp2_session_mem_send

    # -- what the doors call (h2's names) --------------------------------------------

    def initiate_connection(self) -> None:
        """
        Queue the SETTINGS (stream window, header list limit, no push, and as a server
        the concurrent streams) and open the connection's window to
        C{config.connectionWindow}.
        """
        self._quiet = False
        config = self._config
        entries = [(_SETTINGS_INITIAL_WINDOW_SIZE, config.streamWindow),
                   (_SETTINGS_MAX_HEADER_LIST_SIZE, config.maxHeaderListSize),
                   (_SETTINGS_ENABLE_PUSH, 0)]
        if not self.client:
            entries.append((_SETTINGS_MAX_CONCURRENT_STREAMS, config.maxConcurrentStreams))
        lib, session = self._lib, self._session
        self._check(lib.nghttp2_submit_settings(session, 0, self._ffi.new("nghttp2_settings_entry[]", entries),
                                                len(entries)))
        if config.connectionWindow > 65535:
            self._check(lib.nghttp2_session_set_local_window_size(session, 0, 0, config.connectionWindow))

    def receive_data(self, data: bytes) -> List[Any]:
        """
        Feed bytes from the peer.

        @return: the events they carried.
        @raise NgProtocolError: the peer broke the protocol; the GOAWAY nghttp2 queued
            is in the next L{data_to_send}.
        """
        if self._broken is not None:
            raise NgProtocolError(self._broken)
        self._quiet = False
        late = self._late
        if late:
            self._late = []
            events = self._events = late
        else:
            events = self._events = []
        rv = self._recv(self._session, data, len(data))
        if rv < 0:
            self._fail(self._ffi.string(self._lib.nghttp2_strerror(rv)).decode("ascii", "replace"))
        if self._error is not None:
            error, self._error = self._error, None
            self._fail(error, _ENHANCE_YOUR_CALM)
        merged = self._merged
        if merged:
            for event in merged:
                event.data = b"".join(event.parts)
                event.parts = None
            merged.clear()
        # Serialise now what the bytes made nghttp2 queue (acknowledgements, resets):
        # a stream it resets without a callback (a body that does not match its
        # content-length) is closed as its RST_STREAM is serialised, and so reported
        # with these events.  The door's flush writes it (no extra call into C: the
        # flush finds the session drained).
        self._held = self.data_to_send()
        if self._late:
            events += self._late
            self._late = []
        if self._invalid:
            self._invalid = False
            # A frame was invalid: if nghttp2 ended the connection, say so.
            if not self._lib.nghttp2_session_want_read(self._session):
                raise NgProtocolError("the peer broke the protocol (GOAWAY sent)")
        return events

    def data_to_send(self) -> bytes:
        """
        Every frame queued, serialised, as one string.
        """
        held = self._held
        if self._quiet and not held:
            return b""
        send, session, pp, unpack = self._send, self._session, self._pp, self._unpack
        n = send(session, pp)
        if n <= 0 and not held:
            self._quiet = n == 0
            if n < 0:
                self._broken = self._ffi.string(self._lib.nghttp2_strerror(n)).decode("ascii", "replace")
            return b""
        chunks = [held] if held else []
        self._held = b""
        while n > 0:
            chunks.append(unpack(pp[0], n))
            n = send(session, pp)
        self._quiet = True
        if n < 0:
            # Fatal (a callback failed): the session is done; the next read says so.
            self._broken = self._ffi.string(self._lib.nghttp2_strerror(n)).decode("ascii", "replace")
        return b"".join(chunks)

    def get_next_available_stream_id(self) -> int:
        """
        The id the next request will have.
        """
        return self._nextStreamId

    def send_headers(self, stream_id: int, headers: Sequence[Any], end_stream: bool = False) -> None:
        """
        The request (client) or response (server) head of a stream, or its trailers
        when the head went before (they follow the DATA queued).
        """
        self._quiet = False
        out = self._out.get(stream_id)
        if out is not None:
            out.trailers = headers
            out.end = True
            if out.deferred:
                out.deferred = False
                self._lib.nghttp2_session_resume_data(self._session, stream_id)
            return
        blob, array, count = self._nva(headers, not self.client)
        ffi = self._ffi
        provider = ffi.NULL if end_stream else self._provider
        if self.client:
            rv = self._lib.nghttp2_submit_request(self._session, ffi.NULL, array, count, provider, ffi.NULL)
            if rv > 0:
                self._nextStreamId = rv + 2
                if rv != stream_id:
                    raise NgProtocolError(f"nghttp2 opened stream {rv}, not {stream_id}")
        else:
            rv = self._lib.nghttp2_submit_response(self._session, stream_id, array, count, provider)
        self._check(rv)
        if not end_stream:
            out = self._out[stream_id] = _Outbound()
            early = self._early
            if early and stream_id in early:
                early.discard(stream_id)
            else:
                out.window = self._initialWindow

    def send_data(self, stream_id: int, data: bytes, end_stream: bool = False) -> None:
        """
        Queue body bytes (the doors send only within L{local_flow_control_window}).
        A stream nghttp2 has closed takes nothing.
        """
        out = self._out.get(stream_id)
        if out is None:
            return
        self._quiet = False
        if data:
            out.chunks.append(data)
            n = len(data)
            out.size += n
            self._buffered += n
        if end_stream:
            out.end = True
        if out.deferred:
            out.deferred = False
            self._lib.nghttp2_session_resume_data(self._session, stream_id)

    def end_stream(self, stream_id: int) -> None:
        """
        End the stream after the DATA queued.
        """
        out = self._out.get(stream_id)
        if out is None:
            raise NgProtocolError(f"stream {stream_id} is closed")
        self.send_data(stream_id, b"", True)

    def reset_stream(self, stream_id: int, error_code: int = 0) -> None:
        """
        RST_STREAM; what the stream held is dropped.
        """
        self._quiet = False
        self._reported.add(stream_id)
        out = self._out.pop(stream_id, None)
        if out is not None:
            self._buffered -= out.size
        self._check(self._lib.nghttp2_submit_rst_stream(self._session, 0, stream_id, int(error_code)))

    def acknowledge_received_data(self, acknowledged_size: int, stream_id: int) -> None:
        """
        The bytes of a DATA chunk were taken: give their window back (stream and
        connection; the connection only when the stream is gone).
        """
        self._quiet = False
        self._lib.nghttp2_session_consume(self._session, stream_id, acknowledged_size)

    def local_flow_control_window(self, stream_id: int) -> int:
        """
        How many body bytes the stream may still queue: the peer's windows (stream and
        connection) less the bytes held here.  nghttp2 is asked only after the
        windows changed otherwise than by DATA framed here.
        """
        out = self._out.get(stream_id)
        if out is None:
            # Not open for sending (closed, or its head not sent).
            return 0
        window = out.window
        if window is None:
            lib, session = self._lib, self._session
            window = lib.nghttp2_session_get_stream_remote_window_size(session, stream_id)
            if window < 0:
                # A request whose HEADERS have not gone out yet (nghttp2 opens the
                # stream then): the peer's initial window.
                window = lib.nghttp2_session_get_remote_settings(session, _SETTINGS_INITIAL_WINDOW_SIZE)
            out.window = window
        connection = self._connectionWindow
        if connection is None:
            connection = self._connectionWindow = self._lib.nghttp2_session_get_remote_window_size(self._session)
        return max(min(window - out.size, connection - self._buffered), 0)

    def close_connection(self, error_code: int = 0, last_stream_id: Optional[int] = None) -> None:
        """
        GOAWAY with C{error_code}; nghttp2 reads nothing more once it is sent.
        """
        self._quiet = False
        lib = self._lib
        if last_stream_id is None:
            self._check(lib.nghttp2_session_terminate_session(self._session, int(error_code)))
        else:
            self._check(lib.nghttp2_session_terminate_session2(self._session, last_stream_id, int(error_code)))

    # -- internals -------------------------------------------------------------------

    def _finish(self, sid: int, out: _Outbound, flags: Any) -> None:
        """
        The provider's last read: end the stream, or send the trailers that end it.
        """
        trailers = out.trailers
        if trailers is None:
            flags[0] |= _DATA_FLAG_EOF
            return
        flags[0] |= _DATA_FLAG_EOF | _DATA_FLAG_NO_END_STREAM
        blob, array, count = self._nva(trailers, True)
        self._lib.nghttp2_submit_trailer(self._session, sid, array, count)

    def _nva(self, headers: Sequence[Any], cache: bool = False) -> Tuple[bytes, Any, int]:
        """
        C{headers} as an C{nghttp2_nv[]}: the names and values joined into one
        buffer, the array packed over it.  Keep the returned buffer alive until the
        submit call returns (nghttp2 copies both).

        @param cache: keep the array for the next identical list (responses heads and
            trailers repeat: C{grpc-status: 0}; a request never does, its id is new).
        """
        if cache:
            key = tuple(headers)
            found = self._nvCache.get(key)
            if found is not None:
                return found
        parts = [part for pair in headers for part in pair]
        blob = b"".join(parts)
        position = int(self._cast(self._uintptr, self._fromBuffer(self._charArray, blob)))
        pack = _NV.pack
        fields = []
        add = fields.append
        for pair in headers:
            name, value = pair
            nameLength = len(name)
            valueLength = len(value)
            add(pack(position, position + nameLength, nameLength, valueLength,
                     0 if pair.__class__ is tuple or not isinstance(pair, _NEVER) else _NV_FLAG_NO_INDEX))
            position += nameLength + valueLength
        result = blob, self._fromBuffer(self._nvArray, b"".join(fields)), len(headers)
        if cache:
            nvCache = self._nvCache
            if len(nvCache) >= _NV_CACHE_SIZE:
                nvCache.clear()
            nvCache[key] = result
        return result

    def _check(self, rv: int) -> None:
        if rv < 0:
            raise NgProtocolError(self._ffi.string(self._lib.nghttp2_strerror(rv)).decode("ascii", "replace"))

    def _fail(self, reason: str, code: int = _PROTOCOL_ERROR) -> None:
        """
        End the connection with a GOAWAY (kept for L{data_to_send}) and raise.
        """
        self._quiet = False
        lib = self._lib
        lib.nghttp2_session_terminate_session(self._session, code)
        try:
            self._held += self.data_to_send()
        except Exception:  # pragma: no cover - after a fatal error nghttp2 may send nothing
            pass
        raise NgProtocolError(reason)


def newSession(config: Any, client: bool, binding: Optional[Binding] = None) -> NgConnection:
    """
    A new nghttp2 connection of either side.

    @raise RuntimeError: libnghttp2 cannot be loaded.
    """
    binding = binding or loadBinding()
    if binding is None:
        raise RuntimeError("libnghttp2 cannot be loaded")
    return NgConnection(binding, config, client)
