"""Stand-in HTTP servers for the tests: `answer(path, body)` (body None for a GET) returns what to
send back, JSON or bytes, served from a thread on a loopback port."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@contextmanager
def stand_in(answer: Callable[[str, dict | None], object]):
    """Yield (base URL, stop); after stop() connections are refused, as from a dead server."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            self.reply(answer(self.path, None))

        def do_POST(self):
            self.reply(answer(self.path, json.loads(self.rfile.read(int(self.headers["Content-Length"])))))

        def reply(self, obj):
            data = obj if isinstance(obj, bytes) else json.dumps(obj).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()

    def stop():
        server.shutdown()
        server.server_close()

    try:
        yield f"http://127.0.0.1:{server.server_port}", stop
    finally:
        stop()
