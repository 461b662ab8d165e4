"""``hpcdl serve files``: a folder asked for without its slash is redirected within the token."""

from __future__ import annotations

import functools
import http.client
import http.server
import threading

from hpcdl.cli.serve_task import _TokenFiles


def _get(port: int, path: str) -> http.client.HTTPResponse:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", path)
    return conn.getresponse()


def test_a_folder_without_its_slash_is_redirected_with_the_token(tmp_path):
    (tmp_path / "runs" / "a").mkdir(parents=True)
    (tmp_path / "runs" / "a" / "log.txt").write_text("hello")
    handler = functools.partial(type("H", (_TokenFiles,), {"token": "TOK"}), directory=tmp_path)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    port = server.server_address[1]
    try:
        for asked, where in [("/TOK/runs/a", "/TOK/runs/a/"), ("/TOK", "/TOK/"),
                             ("/TOK/runs?x=1", "/TOK/runs/?x=1")]:  # fmt: skip
            r = _get(port, asked)
            assert (r.status, r.getheader("Location")) == (301, where), asked
        assert _get(port, "/TOK/runs/a/").status == 200  # the listing, within the token
        assert _get(port, "/TOK/runs/a/log.txt").read() == b"hello"
        assert _get(port, "/runs/a/").status == 403
        assert _get(port, "/WRONG/runs/a/").status == 403
    finally:
        server.shutdown()
        server.server_close()
