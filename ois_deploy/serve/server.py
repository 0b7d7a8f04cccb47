"""The HTTP server under the API: a listening socket, and uvicorn with the limits a server facing
careless or hostile clients needs (docs/serving.md, "Limits").

uvicorn gives a bounded request head (h11's incomplete-event limit), an idle keep-alive timeout
and a graceful-shutdown timeout. What it lacks is added here, on its h11 protocol:
- a deadline for the request head (a client sending its header one line every few seconds, or
  nothing at all, is closed after `head_timeout`), where uvicorn times out only idle keep-alive;
- 431 with a JSON error for a head over the limit (uvicorn answers a plain-text 400);
- a send timeout: a client that reads its answer so slowly that the server's write buffer stays
  full for `head_timeout` seconds is closed (a reader must take about 48 KiB per `head_timeout`:
  5 KiB/s at the default 10 s; any faster download completes);
- a cap on open connections, under the process's file-descriptor limit (two per connection: a
  static file being sent holds one): when it is reached, the connection stalled the longest is
  closed to make room: one with no request in progress (idle, or sending its head), one waiting
  for its request body or one whose reader has stopped reading, each stalled for over a second;
  so that slow sockets cannot use up the descriptors and lock out a new client;
- a response that ends before its request's body was read (a refusal: 401, 413, 503...) closes
  the connection, rather than reading the rest of that body: a lingering close (the server's
  side shut, what still comes discarded for at most LINGER_S seconds and LINGER_BYTES bytes), so
  that a client still sending reads the answer rather than a reset connection.
The request body's timeouts and the head's size are in the app (app.py, BodyGuard).
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import socket
import struct

from ..errors import UserError


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (port 0: a free one), so that the URL printed is the real
    one and a port in use is a one-line error before anything is served."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise UserError(f"cannot resolve host {host!r}: {e.strerror}") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        sock.listen(2048)
    except OSError as e:
        sock.close()
        raise UserError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    sock.set_inheritable(True)
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


MAX_HEAD_BYTES = 64 * 1024  # request line and headers; browsers send a few KiB
FD_RESERVE = 32  # descriptors kept free for the model, logs and the listening socket


def connection_cap(wanted: int) -> int:
    """`wanted`, lowered to fit the descriptors this process may still open (RLIMIT_NOFILE), two
    per connection (its socket, and the file a static download reads)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return wanted
    try:
        used = len(os.listdir("/proc/self/fd"))
    except OSError:
        used = 64
    return max(1, min(wanted, (soft - used - FD_RESERVE) // 2))


LINGER_S, LINGER_BYTES = 2.0, 4 << 20
STALLED_S = 1.0  # a busy connection without progress for this long may be closed to make room


def guarded_protocol(head_timeout: float, max_connections: int):
    """uvicorn's h11 protocol with a head deadline, a send timeout, a JSON 431 and the connection
    cap (above)."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class GuardedH11Protocol(H11Protocol):
        def connection_made(self, transport) -> None:
            super().connection_made(_Lingering(transport, self))
            self._head_timer = self._send_timer = None
            self._progress_at = self.loop.time()
            self._arm_head_timer()
            if len(self.connections) > max_connections:
                self._make_room()

        def connection_lost(self, exc) -> None:
            self._cancel_head_timer()
            self._cancel_send_timer()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            if self.transport.lingering:
                self.transport.discard(len(data))
                return
            self._progress_at = self.loop.time()
            super().data_received(data)
            if self._busy():  # the head is in: the app has the request
                self._cancel_head_timer()

        def on_response_complete(self) -> None:
            self._progress_at = self.loop.time()
            if self.conn.their_state not in (h11.DONE, h11.MUST_CLOSE) and not self.transport.is_closing():
                self.transport.close()  # answered before its body was read (a refusal): the rest is not read
            super().on_response_complete()
            if not self._busy() and not self.transport.is_closing():
                self._arm_head_timer()  # waiting for the next request's head

        def pause_writing(self) -> None:
            super().pause_writing()
            self._cancel_send_timer()
            self._send_timer = self.loop.call_later(head_timeout, self._send_timed_out)

        def resume_writing(self) -> None:
            self._progress_at = self.loop.time()
            self._cancel_send_timer()
            super().resume_writing()

        def send_400_response(self, msg: str) -> None:
            """h11 refused the head: 431 when it grew over the limit, else 400; JSON, then close."""
            too_large = len(self.conn.trailing_data[0]) > MAX_HEAD_BYTES
            status = 431 if too_large else 400
            message = (f"the request head is over this server's limit of {MAX_HEAD_BYTES // 1024} KiB"
                       if too_large else "malformed HTTP request")
            body = json.dumps({"error": message}).encode()
            try:
                reason = b"Request Header Fields Too Large" if too_large else b"Bad Request"
                for event in (h11.Response(status_code=status, reason=reason, headers=[
                        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                        (b"connection", b"close")]), h11.Data(data=body), h11.EndOfMessage()):
                    self.transport.write(self.conn.send(event))
            except h11.LocalProtocolError:  # a response had already begun
                pass
            self.transport.close()

        # -- helpers ----------------------------------------------------------------------
        def _busy(self) -> bool:
            return self.cycle is not None and not self.cycle.response_complete

        def _arm_head_timer(self) -> None:
            self._cancel_head_timer()
            self._head_timer = self.loop.call_later(head_timeout, self._head_timed_out)

        def _cancel_head_timer(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _cancel_send_timer(self) -> None:
            if self._send_timer is not None:
                self._send_timer.cancel()
                self._send_timer = None

        def _send_timed_out(self) -> None:
            self._send_timer = None
            if self.flow.write_paused and not self.transport.is_closing():
                self._reset()  # the client stopped reading: nothing more will be sent

        def _reset(self) -> None:
            """Close at once, dropping what the kernel still buffers for the client (a reset: a
            plain close would leave it sending the buffered megabytes at the client's pace)."""
            sock = self.transport.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.transport.abort()

        def _stalled_since(self) -> float | None:
            """When it last made progress, if it may be closed to make room: no request in progress,
            or one stalled (waiting for its body, or for its reader) for over STALLED_S."""
            if self.transport.is_closing():
                return None
            if not self._busy():
                return self._progress_at
            waiting = self.conn.their_state is h11.SEND_BODY or self.flow.write_paused
            return self._progress_at if waiting and self.loop.time() - self._progress_at > STALLED_S else None

        def _head_timed_out(self) -> None:
            self._head_timer = None
            if not self._busy() and not self.transport.is_closing():
                self.transport.close()

        def _make_room(self) -> None:
            """Over the cap: close the connection stalled the longest, this one if none is."""
            stalled = [(since, c) for c in self.connections if c is not self and isinstance(c, GuardedH11Protocol)
                       and (since := c._stalled_since()) is not None]
            victim = min(stalled, key=lambda pair: pair[0], default=(None, self))[1]
            if victim._busy():
                victim._reset()
            else:
                victim.transport.close()

    class _Lingering:
        """The connection's transport as uvicorn sees it, with a lingering close() (see above)
        when the request's body is still coming."""

        def __init__(self, transport, protocol):
            self._transport, self._protocol = transport, protocol
            self.lingering, self._discarded = False, 0

        def __getattr__(self, name):
            return getattr(self._transport, name)

        def is_closing(self) -> bool:
            return self.lingering or self._transport.is_closing()

        def close(self) -> None:
            transport = self._transport
            if self.is_closing():
                return
            if self._protocol.conn.their_state is not h11.SEND_BODY or not transport.can_write_eof():
                return transport.close()
            self.lingering = True
            transport.write_eof()  # after the answer: the client reads it, then the end
            transport.resume_reading()
            self._protocol.loop.call_later(LINGER_S, transport.close)

        def discard(self, n: int) -> None:
            self._discarded += n
            if self._discarded > LINGER_BYTES:
                self._transport.close()

    return GuardedH11Protocol


def run_uvicorn(asgi_app, sock: socket.socket, *, head_timeout: float = 10, keep_alive_timeout: float = 5,
                max_connections: int = 1000, graceful_timeout: float = 30) -> None:
    """Serve until SIGINT/SIGTERM; uvicorn then stops accepting and finishes requests in flight."""
    import signal

    import uvicorn

    # uvicorn handles SIGINT/SIGTERM while it runs, then re-raises the signal under the handlers it
    # found: these make that a clean return (exit 0 after a graceful stop) instead of a kill.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    config = uvicorn.Config(
        asgi_app, log_level="warning", access_log=False, ws="none",  # no WebSocket routes: no upgrades
        http=guarded_protocol(head_timeout, connection_cap(max_connections)),
        h11_max_incomplete_event_size=MAX_HEAD_BYTES,
        timeout_keep_alive=max(1, round(keep_alive_timeout)), timeout_graceful_shutdown=round(graceful_timeout))
    uvicorn.Server(config).run(sockets=[sock])
