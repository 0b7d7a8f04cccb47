"""The HTTP server under the API: a listening socket, and uvicorn with the limits a server facing
careless or hostile clients needs (docs/serving.md, "Limits").

uvicorn gives a bounded request head (h11's incomplete-event limit), an idle keep-alive timeout
and a graceful-shutdown timeout. What it lacks is added here, on its h11 protocol:
- a deadline for the request head (a client sending its header one line every few seconds, or
  nothing at all, is closed after `head_timeout`), where uvicorn times out only idle keep-alive;
- 431 with a JSON error for a head over the limit (uvicorn answers a plain-text 400);
- a cap on open connections, under the process's file-descriptor limit: when it is reached, the
  connection idle the longest (no request in progress: a slow or idle socket) is closed to make
  room, so that such sockets cannot use up the descriptors and lock out a new client.
The request body's timeouts are in the app (app.py, ReadGuard), where the body is read.
"""

from __future__ import annotations

import json
import os
import resource
import socket

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
    """`wanted`, lowered to fit the descriptors this process may still open (RLIMIT_NOFILE)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return wanted
    try:
        used = len(os.listdir("/proc/self/fd"))
    except OSError:
        used = 64
    return max(1, min(wanted, soft - used - FD_RESERVE))


def guarded_protocol(head_timeout: float, max_connections: int):
    """uvicorn's h11 protocol with a head deadline, a JSON 431 and the connection cap (above)."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class GuardedH11Protocol(H11Protocol):
        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._head_timer = None
            self._arm_head_timer()
            if len(self.connections) > max_connections:
                self._make_room()

        def connection_lost(self, exc) -> None:
            self._cancel_head_timer()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self._busy():  # the head is in: the app has the request
                self._cancel_head_timer()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self._busy() and not self.transport.is_closing():
                self._arm_head_timer()  # waiting for the next request's head

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
            self._idle_since = self.loop.time()
            self._head_timer = self.loop.call_later(head_timeout, self._head_timed_out)

        def _cancel_head_timer(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_timed_out(self) -> None:
            self._head_timer = None
            if not self._busy() and not self.transport.is_closing():
                self.transport.close()

        def _make_room(self) -> None:
            """Over the cap: close the connection idle the longest, this one if none is idle."""
            idle = [c for c in self.connections if isinstance(c, GuardedH11Protocol) and not c._busy()
                    and not c.transport.is_closing()]
            victim = min(idle, key=lambda c: c._idle_since, default=self)
            victim.transport.close()

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
