"""What ``hpcdl serve`` runs on the compute node: ``python -m hpcdl.cli.serve_task KIND INFO [ARG]``.

It takes a port (the one asked for, or a free one the kernel picks), writes where it serves to
the file INFO (``{"node", "port", "token"}``, or ``{"error"}``; mode 0600 in the caller's private
folder, so the token is never on a command line nor in the batch script), then runs the server
until the job ends. ``hpcdl serve`` waits for that file and for the server's first answer."""

from __future__ import annotations

import functools
import http.server
import json
import os
import secrets
import socket
import sys
import urllib.parse
from pathlib import Path
from typing import Any

KINDS = ("jupyter", "tensorboard", "dashboard", "files")
# Listen on every interface of the node: the login node's ``ssh -L`` reaches it by node name.
HOST = "0.0.0.0"


def _write(info: Path, data: dict[str, Any]) -> None:
    tmp = info.with_name(info.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f)
    os.replace(tmp, info)  # the waiting CLI sees the whole file or none


def _bind(port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((HOST, port))
    return sock


class _TokenFiles(http.server.SimpleHTTPRequestHandler):
    """Files under a folder, only below ``/TOKEN/``: the port is reachable by every user of the
    cluster network, the token (in the INFO file, 0600) is what keeps them out."""

    token = ""

    def send_head(self) -> Any:
        prefix = f"/{self.token}/"
        if not (self.path + "/").startswith(prefix):
            self.send_error(403, "token required")
            return None
        within = "/" + self.path[len(prefix) :]
        asked = urllib.parse.urlsplit(self.path).path
        if not asked.endswith("/") and os.path.isdir(self.translate_path(within)):
            # the base class redirects a folder to PATH/ itself, but from the path without the
            # token, which is then refused: the browser had to add the token again by hand
            parts = urllib.parse.urlsplit(self.path)
            self.send_response(301)
            self.send_header(
                "Location", urllib.parse.urlunsplit(parts._replace(path=parts.path + "/"))
            )
            self.send_header("Content-Length", "0")
            self.end_headers()
            return None
        self.path = within
        return super().send_head()

    def log_message(self, format: str, *args: Any) -> None:  # no token in the job's log
        sys.stderr.write(
            f"{self.command} {self.client_address[0]} -> {args[1] if len(args) > 1 else ''}\n"
        )


def _serve_files(sock: socket.socket, folder: str, token: str) -> None:
    handler = functools.partial(type("H", (_TokenFiles,), {"token": token}), directory=folder)
    server = http.server.ThreadingHTTPServer((HOST, sock.getsockname()[1]), handler,
                                             bind_and_activate=False)  # fmt: skip
    server.socket.close()
    server.socket = sock
    sock.listen(16)
    server.serve_forever()


def _serve_dashboard(port: int, sweep: str, token: str) -> None:
    """optuna-dashboard behind the token (``hpcdl.hpo.dashboard.TokenGate``: ``?token=`` once,
    then a cookie): the dashboard can change the study (notes, trial states), and the port is
    reachable by every user of the cluster network."""
    from wsgiref.simple_server import make_server

    from optuna_dashboard import wsgi

    from hpcdl.hpo import Sweep
    from hpcdl.hpo.dashboard import TokenGate
    from hpcdl.hpo.storage import open_storage

    s = Sweep.load(sweep)
    app = TokenGate(wsgi(open_storage(s.spec, s.paths.root)), token, port)
    make_server(HOST, port, app).serve_forever()


def main(argv: list[str]) -> int:
    kind, info, arg, want = argv[0], Path(argv[1]), argv[2], int(argv[3])
    node = os.environ.get("SLURMD_NODENAME") or socket.gethostname()
    try:
        sock = _bind(want)
    except OSError as exc:
        _write(info, {"error": f"port {want} is in use on {node} ({exc.strerror})"})
        return 1
    port = sock.getsockname()[1]
    token = secrets.token_urlsafe(24) if kind in ("jupyter", "files", "dashboard") else ""
    if kind != "files":  # the server binds it itself: free it just before (a small race)
        sock.close()
    _write(info, {"node": node, "port": port, "token": token, "kind": kind})
    if kind == "files":
        _serve_files(sock, arg, token)
    elif kind == "dashboard":
        _serve_dashboard(port, arg, token)
    elif kind == "jupyter":  # the token by environment, never on a command line (ps shows those)
        env = {**os.environ, "JUPYTER_TOKEN": token}
        # port_retries=0: jupyter would otherwise move to another port than the one announced
        os.execvpe("jupyter", ["jupyter", "lab", "--no-browser", f"--ip={HOST}", f"--port={port}",
                               "--ServerApp.port_retries=0", f"--notebook-dir={arg}"], env)  # fmt: skip
    elif kind == "tensorboard":
        os.execvp("tensorboard", ["tensorboard", "--logdir", arg, "--host", HOST,
                                  "--port", str(port)])  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
