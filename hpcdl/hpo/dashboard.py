"""optuna-dashboard over a sweep's study (journal file or PostgreSQL), served on the login node.

The dashboard reads and can change the study (notes, trial states), and optuna-dashboard has no
login of its own, so two gates keep it its user's: the server binds 127.0.0.1 only (no other
machine reaches it; the user comes through their own ``ssh -L PORT:localhost:PORT``), and every
request needs a random token, since any user of the login node can connect to a loopback port.
The printed URL carries the token once; the answer sets it as an HttpOnly cookie (named after
the port: cookies are per host, not per port) and redirects to the same page without it."""

from __future__ import annotations

import getpass
import hmac
import secrets
import socket
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.cookies import SimpleCookie
from socketserver import ThreadingMixIn
from typing import Any
from urllib.parse import parse_qsl, urlencode
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from hpcdl.hpo.storage import open_storage
from hpcdl.util import get_logger

log = get_logger(__name__)


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True  # a browser's open connection never keeps Ctrl-C waiting


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        log.debug("dashboard: " + format, *args)


class TokenGate:
    """WSGI middleware: a request passes with the token's cookie; one with ``?token=TOKEN`` gets
    the cookie and a redirect to the same page without the token; any other gets 403."""

    def __init__(self, app: Callable[..., Any], token: str, port: int):
        self.app, self.token, self.cookie = app, token, f"hpcdl_dashboard_{port}"

    def __call__(self, environ: dict[str, Any], start: Callable[..., Any]) -> Iterable[bytes]:
        query = parse_qsl(environ.get("QUERY_STRING", ""), keep_blank_values=True)
        given = next((v for k, v in query if k == "token"), None)
        if given is not None and hmac.compare_digest(given.encode(), self.token.encode()):
            rest = urlencode([(k, v) for k, v in query if k != "token"])
            where = environ.get("PATH_INFO", "/") + (f"?{rest}" if rest else "")
            start("303 See Other", [("Location", where), ("Set-Cookie", f"{self.cookie}="
                  f"{self.token}; Path=/; HttpOnly; SameSite=Strict")])  # fmt: skip
            return [b""]
        jar = SimpleCookie(environ.get("HTTP_COOKIE", ""))
        held = jar[self.cookie].value if self.cookie in jar else ""
        if hmac.compare_digest(held.encode(), self.token.encode()):
            return self.app(environ, start)  # type: ignore[no-any-return]
        start("403 Forbidden", [("Content-Type", "text/plain")])
        return [b"hpcdl sweep dashboard: open the URL it printed (with its token)\n"]


@dataclass(frozen=True)
class Served:
    port: int
    token: str

    @property
    def path(self) -> str:
        """The dashboard's first page with the token (host left to the caller)."""
        return f"/dashboard/?token={self.token}"


@contextmanager
def serve(sweep: Any, port: int = 0) -> Iterator[Served]:
    """Serve the dashboard of ``sweep`` (an :class:`hpcdl.hpo.Sweep`) on 127.0.0.1:``port``
    (0: a free port) in a background thread, behind a new token; stops on leaving."""
    from optuna_dashboard import wsgi

    app = wsgi(open_storage(sweep.spec, sweep.paths.root, sweep.source))
    try:
        server = make_server("127.0.0.1", port, _refuse, _Server, _QuietHandler)
    except OSError as exc:
        from hpcdl.errors import HpcdlError

        raise HpcdlError(
            f"--port {port}: cannot listen on 127.0.0.1:{port}: {exc.strerror}"
        ) from None
    token = secrets.token_urlsafe(24)
    server.set_app(TokenGate(app, token, server.server_port))  # the port names the cookie
    thread = threading.Thread(
        target=server.serve_forever, args=(0.1,), name="dashboard", daemon=True
    )  # a short poll: Ctrl-C (shutdown) returns at once
    thread.start()
    try:
        yield Served(server.server_port, token)
    finally:
        server.shutdown()
        server.server_close()


def _refuse(environ: dict[str, Any], start: Callable[..., Any]) -> Iterable[bytes]:
    start("503 Service Unavailable", [])  # never reached: the gate is set before serving
    return [b""]


def tunnel_line(port: int) -> str:
    """The ssh command that forwards ``port`` on the user's machine to this node's loopback."""
    return f"ssh -N -L {port}:localhost:{port} {getpass.getuser()}@{socket.getfqdn()}"
