"""optuna-dashboard over a sweep's study (journal file or PostgreSQL), served on the login node.

The server binds 127.0.0.1 only: the dashboard can write to the study (notes, trial states), so
it must not be reachable by the login node's other users on a public port; the user reaches it
through their own ssh tunnel (``ssh -L PORT:localhost:PORT``). Another local user could still
connect to a loopback port: see the docs' Security page."""

from __future__ import annotations

import getpass
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from hpcdl.hpo.storage import open_storage
from hpcdl.util import get_logger

log = get_logger(__name__)


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True  # a browser's open connection never keeps Ctrl-C waiting


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        log.debug("dashboard: " + format, *args)


@contextmanager
def serve(sweep: Any, port: int = 0) -> Iterator[int]:
    """Serve the dashboard of ``sweep`` (an :class:`hpcdl.hpo.Sweep`) on 127.0.0.1:``port``
    (0: a free port) in a background thread; yields the bound port, stops on leaving."""
    from optuna_dashboard import wsgi

    app = wsgi(open_storage(sweep.spec, sweep.paths.root, sweep.source))
    try:
        server = make_server("127.0.0.1", port, app, _Server, _QuietHandler)
    except OSError as exc:
        from hpcdl.errors import HpcdlError

        raise HpcdlError(
            f"--port {port}: cannot listen on 127.0.0.1:{port}: {exc.strerror}"
        ) from None
    thread = threading.Thread(target=server.serve_forever, name="dashboard", daemon=True)
    thread.start()
    try:
        yield server.server_port
    finally:
        server.shutdown()
        server.server_close()


def tunnel_line(port: int) -> str:
    """The ssh command that forwards ``port`` on the user's machine to this node's loopback."""
    return f"ssh -N -L {port}:localhost:{port} {getpass.getuser()}@{socket.getfqdn()}"
