"""An HTTP/1.1 upstream for the HTTP forwarding tests, plus a WebSocket echo server.

    python tests/http_upstream.py   → prints "<http port> <websocket port>", serves until stdin closes

GET /headers        the request's headers as a JSON list of [name, value] (repeats kept)
GET /bytes/N        N bytes, streamed with a Content-Length
GET /chunked        three parts, chunked, a pause between them
GET /slow           answers after 3 s
POST|PUT /digest    reads the body as it comes (Content-Length or chunked): "<sha256> <length>"
POST /naive         reads Content-Length bytes of body and ignores Transfer-Encoding, as a naive app would
GET /seen           every request served so far, as a JSON list of {"path", "headers"}
"""

import hashlib
import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

CHUNK = b"z" * (1 << 16)
SEEN = []  # every request served: what a smuggled request would leave behind


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # it writes a head, then a body: with Nagle, each answer waits for a delayed ACK

    def log_message(self, *args):
        pass

    def _send(self, body: bytes, status: int = 200, kind: str = "text/plain") -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def parse_request(self):
        ok = super().parse_request()
        if ok and self.path != "/seen":
            SEEN.append({"path": self.path, "headers": [[k.lower(), v] for k, v in self.headers.items()]})
        return ok

    def do_GET(self):
        if self.path == "/seen":
            self._send(json.dumps(SEEN).encode(), kind="application/json")
        elif self.path == "/headers":
            self._send(json.dumps([[k.lower(), v] for k, v in self.headers.items()]).encode(), kind="application/json")
        elif self.path.startswith("/bytes/"):
            n = int(self.path.split("/")[2])
            self.send_response(200)
            self.send_header("Content-Length", str(n))
            self.end_headers()
            while n > 0:
                part = CHUNK[:min(n, len(CHUNK))]
                self.wfile.write(part)
                n -= len(part)
        elif self.path == "/chunked":
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for part in (b"first,", b"second,", b"third"):
                self.wfile.write(b"%x\r\n%s\r\n" % (len(part), part))
                self.wfile.flush()
                time.sleep(0.2)
            self.wfile.write(b"0\r\n\r\n")
        elif self.path == "/slow":
            time.sleep(3)
            self._send(b"late\n")
        else:
            self._send(b"no such page\n", 404)

    def _body(self):
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            while True:
                size = int(self.rfile.readline().split(b";")[0], 16)
                if size == 0:
                    self.rfile.readline()
                    return
                left = size
                while left:
                    data = self.rfile.read(min(left, 1 << 16))
                    left -= len(data)
                    yield data
                self.rfile.readline()
        left = int(self.headers.get("Content-Length", "0"))
        while left:
            data = self.rfile.read(min(left, 1 << 16))
            left -= len(data)
            yield data

    def do_POST(self):
        if self.path.startswith("/naive"):
            self.rfile.read(int(self.headers.get("Content-Length", "0")))
            self._send(b"naive\n")
            return
        digest, length = hashlib.sha256(), 0
        for data in self._body():
            digest.update(data)
            length += len(data)
        self._send(f"{digest.hexdigest()} {length}\n".encode())

    do_PUT = do_POST


def websocket_server():
    from websockets.sync.server import serve

    def echo(ws):
        for message in ws:
            ws.send(message)

    server = serve(echo, "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server.socket.getsockname()[1]


class Server(ThreadingHTTPServer):
    def handle_error(self, request, client_address):
        if not isinstance(sys.exc_info()[1], ConnectionError):  # a client that left mid-request: no traceback
            super().handle_error(request, client_address)


def main():
    http = Server(("127.0.0.1", 0), Handler)
    http.daemon_threads = True
    threading.Thread(target=http.serve_forever, daemon=True).start()
    print(http.server_address[1], websocket_server(), flush=True)
    sys.stdin.read()


if __name__ == "__main__":
    main()
