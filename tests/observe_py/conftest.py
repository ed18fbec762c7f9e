"""Harness for the observability suite: the Rust server with the fake netlab (no real
netlab needed), one fresh server per test, and a tiny HTTP helper.

The binary comes from $NEOPS_REMOTE_LAB_BIN (scripts/run-python-suites sets it).
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FAKE_NETLAB = ROOT / "tests" / "fake-netlab" / "netlab"


def binary() -> Path:
    path = Path(os.environ.get("NEOPS_REMOTE_LAB_BIN", ROOT / "target" / "debug" / "neops-remote-lab"))
    if not path.is_file():
        pytest.fail(f"server binary {path} not found; build it first (cargo build)", pytrace=False)
    return path


class Server:
    def __init__(self, tmp: Path, args: list[str]):
        self.tmp = tmp
        self.fake = tmp / "fake"
        (self.fake / "control").mkdir(parents=True)
        self.log_path = tmp / "server.log"
        self.proc = subprocess.Popen(
            [str(binary()), "--host", "127.0.0.1", "--port", "0", "--state-dir", str(tmp / "state"),
             "--netlab", str(FAKE_NETLAB), "--sweep-interval", "0.1", *args],
            env={**os.environ, "FAKE_NETLAB_DIR": str(self.fake)},
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        self.url = self._wait_listening()

    def _wait_listening(self) -> str:
        deadline = time.monotonic() + 20
        buf = b""
        assert self.proc.stderr is not None
        fd = self.proc.stderr.fileno()
        while time.monotonic() < deadline:
            ready, _, _ = select.select([fd], [], [], 0.2)
            if not ready:
                continue
            chunk = os.read(fd, 4096)
            if not chunk:
                break
            buf += chunk
            complete = buf.decode(errors="replace").rpartition("\n")[0]
            for line in complete.splitlines():
                if line.startswith("listening on http://"):
                    return line.split(" ", 2)[2].strip()
        self.close()
        raise RuntimeError(f"server did not start: {buf.decode(errors='replace')}")

    def control(self, name: str, content: str) -> None:
        (self.fake / "control" / name).write_text(content)

    def request(self, method: str, path: str, headers: dict[str, str] | None = None,
                body: bytes | None = None) -> tuple[int, dict[str, str], bytes]:
        req = urllib.request.Request(self.url + path, data=body, method=method, headers=headers or {})
        try:
            with urllib.request.urlopen(req, timeout=60) as resp:
                return resp.status, dict(resp.headers), resp.read()
        except urllib.error.HTTPError as err:
            return err.code, dict(err.headers), err.read()

    def json(self, path: str) -> dict:
        status, _, body = self.request("GET", path)
        assert status == 200, (path, status, body)
        return json.loads(body)

    def session(self, name: str | None = None) -> str:
        headers = {"X-Client-Name": name} if name is not None else {}
        status, _, body = self.request("POST", "/session", headers, b"")
        assert status == 201, body
        return json.loads(body)["session_id"]

    def acquire(self, sid: str, topology: str, filename: str = "topo.yml") -> tuple[int, bytes]:
        boundary = "b" + uuid.uuid4().hex
        body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"topology\"; filename=\"{filename}\"\r\n"
                f"Content-Type: application/x-yaml\r\n\r\n{topology}\r\n--{boundary}--\r\n").encode()
        status, _, out = self.request("POST", "/lab", {
            "X-Session-ID": sid, "Content-Type": f"multipart/form-data; boundary={boundary}"}, body)
        return status, out

    def heartbeat(self, sid: str) -> int:
        return self.request("POST", "/session/heartbeat", {"X-Session-ID": sid}, b"")[0]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()  # our own child, by its Popen handle (a checked pid)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def wait_until(what: str, check, limit: float = 15.0) -> None:
    deadline = time.monotonic() + limit
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@pytest.fixture
def server_factory(tmp_path: Path) -> Iterator:
    servers: list[Server] = []

    def make(*args: str) -> Server:
        s = Server(tmp_path / f"s{len(servers)}", list(args))
        servers.append(s)
        return s

    yield make
    for s in servers:
        s.close()
