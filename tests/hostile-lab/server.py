#!/usr/bin/env python3
"""A lab host that attacks its client: for the `remote-lab` tests.

    server.py MODE      prints "PORT\n" on stdout once it listens on 127.0.0.1.

MODE escapes: every field the client prints carries terminal escape sequences (OSC title,
OSC 52 clipboard, clear screen, C1 CSI, bidi override), `/lab/log` sends invalid UTF-8 and
one line of ENDLESS_LINE bytes without a newline, the release answers 500 with a hostile
detail. The session waits one poll, then is active.
MODE heartbeat429: the session is active at once, the active timeout 0.5 s, and every
heartbeat is answered 429 (as a throttle would): the client must count the session lost.
MODE unhealthy: `/queue` says the host is unhealthy, with a hostile reason.
"""
import json
import sys
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

MODE = sys.argv[1]
ENDLESS_LINE = 24 * 1024 * 1024
EVIL = ("\x1b]0;pwned\x07\x1b]52;c;ZWNobyBwd25lZA==\x07\x1b[2J\u009b31m\u202ereversed"
        "\x1b[?1049h\x7f")
SESSION = str(uuid.uuid4())
polls = {"n": 0}
log_served = threading.Event()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def send(self, status, body=None, headers=()):
        data = b"" if body is None else json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in headers:
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def body(self):
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length)

    def queue(self):
        view = {
            "time": 1000.0, "version": EVIL, "active_timeout": 0.5 if MODE == "heartbeat429" else 30,
            "waiting_timeout": 30, "total": 2, "truncated": False,
            "lab": {"running": True, "topology": "/x/" + EVIL + "topo.yml", "ref_count": 1},
            "sessions": [{"position": 0, "status": "active", "id": "1234" + EVIL,
                          "client_name": "holder" + EVIL, "active_since": 990.0}],
        }
        if MODE == "unhealthy":
            view["host_state"] = "unhealthy"
            view["host_state_reason"] = "containerlab failed" + EVIL
            view["slots"] = [{"slot": 1, "instance": "1" + EVIL, "state": "running" + EVIL,
                              "topology": EVIL, "hash": None, "holder": "abcd" + EVIL,
                              "holder_name": "slot-holder" + EVIL, "ref_count": 1}]
        return view

    def do_GET(self):
        path = self.path.split("?")[0]
        if path == "/queue":
            return self.send(200, self.queue())
        if path == "/debug/health":
            return self.send(200, {"status": "ok", "queue_length": 1})
        if path.startswith("/session/"):
            polls["n"] += 1
            if MODE == "escapes" and polls["n"] == 1:
                return self.send(200, {"status": "waiting", "position": 1})
            return self.send(200, {"status": "active", "position": 0})
        if path == "/lab/log":
            if log_served.is_set():
                data = b""
            else:
                log_served.set()
                data = None
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("X-Log-Offset", "999999999")
            self.send_header("X-Log-Done", "false")
            if data is not None:
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            head = ("deploying " + EVIL + "\n").encode() + b"bad \xff\xfe bytes \xc3\n"
            self.send_header("Content-Length", str(len(head) + ENDLESS_LINE))
            self.end_headers()
            self.wfile.write(head)
            chunk = b"A" * (1024 * 1024)
            for _ in range(ENDLESS_LINE // len(chunk)):
                self.wfile.write(chunk)
            return
        return self.send(404, {"detail": "Not Found" + EVIL})

    def do_POST(self):
        self.body()
        if self.path == "/session":
            position = 1 if MODE == "escapes" else 0
            return self.send(201, {"session_id": SESSION, "position": position})
        if self.path == "/session/heartbeat":
            if MODE == "heartbeat429":
                return self.send(429, {"detail": "Too many failures" + EVIL})
            return self.send(204)
        if self.path == "/lab":
            log_served.wait(5)
            return self.send(200, {"reused": False, "devices": [{"name": "r1" + EVIL, "raw": {}}]})
        if self.path == "/lab/release":
            return self.send(500, {"detail": "release failed" + EVIL})
        return self.send(404, {"detail": "Not Found" + EVIL})

    def do_DELETE(self):
        return self.send(204)


server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
print(server.server_address[1], flush=True)
server.serve_forever()
