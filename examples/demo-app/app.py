"""Wakegate's demo app: a tiny web app with a page, a health check, a streamed
response and a WebSocket echo, using only Python's standard library."""
import base64
import hashlib
import json
import os
import struct
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

HERE = os.path.dirname(os.path.abspath(__file__))
with open(os.path.join(HERE, "content.html"), encoding="utf-8") as f:
    CONTENT = f.read()
WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # one buffered write per response and no Nagle: otherwise headers and body go out
    # as two small segments and the client's delayed ACK adds ~40 ms to every request
    wbufsize = 64 * 1024
    disable_nagle_algorithm = True

    def log_message(self, fmt, *args):
        pass

    def send_body(self, status, body, ctype):
        data = body.encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        if self.path == "/health":
            return self.send_body(200, "ok", "text/plain")
        if self.path == "/headers":
            return self.send_body(200, json.dumps({k.lower(): v for k, v in self.headers.items()}), "application/json")
        if self.path == "/api/hello":
            return self.send_body(200, json.dumps({"hello": "from the demo app", "preview_url": os.environ.get("PREVIEW_URL"), "preview_urls": os.environ.get("PREVIEW_URLS")}), "application/json")
        if self.path == "/stream":
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            self.wfile.flush()
            for i in range(5):
                chunk = f"chunk {i}\n".encode()
                self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                self.wfile.flush()
                time.sleep(0.05)
            self.wfile.write(b"0\r\n\r\n")
            return None
        if self.path == "/ws" and self.headers.get("Upgrade", "").lower() == "websocket":
            return self.websocket()
        page = "<!doctype html><html><head><title>Demo app</title></head><body>" + CONTENT + "</body></html>"
        return self.send_body(200, page, "text/html; charset=utf-8")

    def do_POST(self):
        n = int(self.headers.get("Content-Length", "0"))
        body = self.rfile.read(n)
        return self.send_body(200, json.dumps({"received": len(body), "sha256": hashlib.sha256(body).hexdigest()}), "application/json")

    def websocket(self):
        accept = base64.b64encode(hashlib.sha1((self.headers["Sec-WebSocket-Key"] + WS_GUID).encode()).digest()).decode()
        self.send_response(101)
        self.send_header("Upgrade", "websocket")
        self.send_header("Connection", "Upgrade")
        self.send_header("Sec-WebSocket-Accept", accept)
        self.end_headers()
        self.wfile.flush()
        while True:
            head = self.rfile.read(2)
            if len(head) < 2:
                return
            opcode, n = head[0] & 0x0F, head[1] & 0x7F
            if n == 126:
                n = struct.unpack(">H", self.rfile.read(2))[0]
            elif n == 127:
                n = struct.unpack(">Q", self.rfile.read(8))[0]
            mask = self.rfile.read(4) if head[1] & 0x80 else b"\0\0\0\0"
            data = bytes(b ^ mask[i % 4] for i, b in enumerate(self.rfile.read(n)))
            if opcode == 8:
                self.wfile.write(b"\x88\x00")
                return
            if opcode in (1, 2):
                out = bytes([0x80 | opcode])
                out += bytes([len(data)]) if len(data) < 126 else b"\x7e" + struct.pack(">H", len(data))
                self.wfile.write(out + data)
                self.wfile.flush()


if __name__ == "__main__":
    port = int(os.environ["PORT"])
    host = os.environ.get("HOST", "127.0.0.1")
    server = ThreadingHTTPServer((host, port), Handler)
    print(f"demo app listening on {host}:{port}", flush=True)
    server.serve_forever()
