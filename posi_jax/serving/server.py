"""uvicorn on a socket bound before anything slow (a taken port fails at once, port 0 picks a free one), the URL
announced only once the server accepts connections, and SIGTERM / Ctrl-C handled by uvicorn's graceful shutdown:
stop accepting, let in-flight requests finish (at most `drain_timeout_s`), then stop the batcher."""
from __future__ import annotations

import asyncio
import errno
import socket
import threading
from typing import Callable

from posi_jax.errors import PosiError


def bind(host: str, port: int) -> socket.socket:
    if not 0 <= port <= 65535:
        raise PosiError(f"--port {port}: must be in 0..65535")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise PosiError(f"--host {host}: {e.strerror}") from None
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as e:
        sock.close()
        reason = "the port is already in use" if e.errno == errno.EADDRINUSE else e.strerror
        raise PosiError(f"cannot listen on {host}:{port}: {reason}") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://{'[' + host + ']' if ':' in host else host}:{port}"


def make_server(app, *, drain_timeout_s: float):
    import uvicorn

    # log_config=None: the command's logging setup applies; our own access log replaces uvicorn's (no query strings)
    config = uvicorn.Config(app, log_config=None, access_log=False, lifespan="on",
                            timeout_graceful_shutdown=drain_timeout_s, timeout_keep_alive=30)
    return uvicorn.Server(config)


async def _serve(server, sock: socket.socket, on_ready: Callable[[], None] | None) -> None:
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started and not task.done():
        await asyncio.sleep(0.02)
    if server.started and on_ready is not None:
        on_ready()
    await task


def serve(app, sock: socket.socket, *, drain_timeout_s: float, on_ready: Callable[[], None] | None = None) -> None:
    """Serve until SIGTERM / Ctrl-C (in the main thread) or `server.should_exit`, draining in-flight requests."""
    asyncio.run(_serve(make_server(app, drain_timeout_s=drain_timeout_s), sock, on_ready))


class BackgroundServer:
    """The same server in a thread (tests, scripts): `start()` returns once it accepts connections."""

    def __init__(self, app, sock: socket.socket, *, drain_timeout_s: float = 5.0):
        self.server = make_server(app, drain_timeout_s=drain_timeout_s)
        self.sock, self.url = sock, url_of(sock)
        self._ready = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(_serve(self.server, sock, self._ready.set)),
                                        daemon=True, name="posi-serve")

    def start(self, timeout_s: float = 60.0) -> "BackgroundServer":
        self._thread.start()
        if not self._ready.wait(timeout_s):
            raise RuntimeError("the server did not start")
        return self

    def stop(self, timeout_s: float = 30.0) -> None:
        self.server.should_exit = True
        self._thread.join(timeout_s)
