"""Harness for the observability suite: the Rust server with the fake netlab (no real
netlab needed), one fresh server per test, and a tiny HTTP helper. The server is launched by
the one harness of the Python suites (tests/e2e/labserver.py).

The binary comes from $NEOPS_REMOTE_LAB_BIN (scripts/run-python-suites sets it).
"""

from __future__ import annotations

import json
import sys
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "e2e"))

from labserver import FAKE_NETLAB, FakeNetlab, HarnessError, ServerProcess, rust_binary  # noqa: E402, F401
from labserver import wait_until  # noqa: E402, F401 (the tests import it from here)

ROOT = Path(__file__).resolve().parents[2]


def binary() -> Path:
    try:
        return rust_binary()
    except HarnessError as exc:
        pytest.fail(str(exc), pytrace=False)


class Server(ServerProcess):
    """A server on the fake netlab in `tmp`, with the server's own default timeouts, a fast
    sweep and `args` on its command line."""

    def __init__(self, tmp: Path, args: list[str]):
        binary()
        self.fake_netlab = FakeNetlab(tmp)
        self.tmp = tmp
        self.fake = self.fake_netlab.fake
        super().__init__(
            self.fake_netlab,
            kind="rust",
            active_timeout=None,
            waiting_timeout=None,
            sweep_interval=0.1,
            extra_args=args,
        )
        try:
            self.start(timeout=20)
        except HarnessError as exc:
            pytest.fail(str(exc), pytrace=False)

    def control(self, name: str, content: str) -> None:
        self.fake_netlab.control(name, content)

    def request(self, method: str, path: str, headers: dict[str, str] | None = None,
                body: bytes | None = None) -> tuple[int, dict[str, str], bytes]:
        # An empty body is sent as none: urllib would label b"" as a urlencoded form, which
        # the server refuses on state-changing routes (a browser form must not reach them).
        req = urllib.request.Request(self.url + path, data=body or None, method=method,
                                     headers=headers or {})
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
