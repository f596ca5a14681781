"""A real HTTP server on 127.0.0.1 that misbehaves on cue: error statuses, dropped connections,
an HTML page instead of the file, stalls. Used by the download tests."""

from __future__ import annotations

import functools
import http.server
import threading
import time
import urllib.parse

HTML_PAGE = b"<!DOCTYPE html><html><head><title>Sign in</title></head><body>Please sign in to continue.</body></html>\n"


class FaultyServer:
    """Serves ``files`` (path -> bytes) with Range support. ``plan(path, *actions)`` scripts the next
    requests for a path, one action each, then it behaves:

    - ``("status", code)`` or ``("status", code, retry_after)``: that status, empty body;
    - ``("drop", n)``: announce the whole (remaining) file, send ``n`` bytes, close the connection;
    - ``("html",)``: 200 with an HTML page (a captive portal or proxy answering for the file);
    - ``("stall", n, seconds)``: send ``n`` bytes, then nothing for ``seconds``.

    ``log`` holds (path, Range header) of every request.
    """

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.plans: dict[str, list[tuple]] = {}
        self.log: list[tuple[str, str | None]] = []
        self.lock = threading.Lock()
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Handler, self))
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"

    def plan(self, path: str, *actions: tuple) -> None:
        with self.lock:
            self.plans.setdefault(path, []).extend(actions)

    def requests(self, path: str) -> list[str | None]:
        """The Range headers of the requests for ``path``, in order (None: no Range)."""
        with self.lock:
            return [rng for p, rng in self.log if p == path]

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class _Handler(http.server.BaseHTTPRequestHandler):
    def __init__(self, state: FaultyServer, *args, **kwargs) -> None:
        self.state = state
        super().__init__(*args, **kwargs)

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        path = urllib.parse.urlsplit(self.path).path
        header = self.headers.get("Range")
        with self.state.lock:
            self.state.log.append((path, header))
            plan = self.state.plans.get(path)
            action = plan.pop(0) if plan else ("ok",)
        if action[0] == "status":
            self.send_response(action[1])
            if len(action) > 2:
                self.send_header("Retry-After", str(action[2]))
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if action[0] == "html":
            self._send(
                200, {"Content-Type": "text/html; charset=utf-8", "Content-Length": str(len(HTML_PAGE))}, HTML_PAGE
            )
            return
        data = self.state.files.get(path)
        if data is None:
            self._send(404, {"Content-Length": "0"}, b"")
            return
        start = int(header.removeprefix("bytes=").split("-")[0]) if header else 0
        if start >= len(data) and header:
            self._send(416, {"Content-Range": f"bytes */{len(data)}", "Content-Length": "0"}, b"")
            return
        headers = {"Content-Type": "application/octet-stream", "Content-Length": str(len(data) - start)}
        if header:
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        body = data[start:]
        if action[0] == "drop":
            self._send(206 if header else 200, headers, body[: action[1]])
            self.close_connection = True
            return
        if action[0] == "stall":
            self._send(206 if header else 200, headers, body[: action[1]])
            time.sleep(action[2])
            return
        self._send(206 if header else 200, headers, body)

    def _send(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        try:
            self.wfile.write(body)
            self.wfile.flush()
        except OSError:  # the client gave up (a timeout test)
            pass
