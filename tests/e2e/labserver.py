"""Harness for the Python test suites: the server under test (the one launcher), the real
netlab without containers or the fake netlab, one wait_until, and a small stdlib HTTP client.

Used by tests/e2e, tests/client and tests/observe_py. Nothing here talks to anything but
127.0.0.1.

Environment:
  NEOPS_TEST_SERVER      "rust" (default): the Rust binary; "python": the reference
                         neops-remote-lab 1.4.0 server from the test venv (for comparison runs)
  NEOPS_REMOTE_LAB_BIN   the Rust binary (default: target/debug/neops-remote-lab in the repo)
  NEOPS_TEST_VENV        the venv made by scripts/setup-test-env (default:
                         ~/.cache/neops-remote-lab/venv); its bin/netlab is the netlab used
  NEOPS_NETLAB           a netlab executable to use instead of the venv's
"""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = REPO_ROOT / "scripts"
FAKE_NETLAB = REPO_ROOT / "tests" / "fake-netlab" / "netlab"

LISTENING_RE = re.compile(r"listening on (http://127\.0\.0\.1:(\d+))")


class HarnessError(RuntimeError):
    """The test environment itself is broken (netlab or the server missing, start-up failed)."""


# --------------------------------------------------------------------------- locating things


def venv_dir() -> Path:
    env = os.environ.get("NEOPS_TEST_VENV")
    return Path(env) if env else Path.home() / ".cache" / "neops-remote-lab" / "venv"


def find_netlab() -> Path:
    """Return a working netlab executable or raise HarnessError (never a skip)."""
    if os.environ.get("NEOPS_NETLAB"):
        candidates = [Path(os.environ["NEOPS_NETLAB"])]  # explicit: no fallback
    else:
        candidates = [venv_dir() / "bin" / "netlab", Path(sys.executable).parent / "netlab"]
    for cand in candidates:
        if cand.is_file() and os.access(cand, os.X_OK):
            proc = subprocess.run(
                [str(cand), "version"],
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            if proc.returncode == 0:
                return cand.absolute()
            raise HarnessError(f"'{cand} version' exited {proc.returncode}: {proc.stderr.strip()[-2000:]}")
    tried = ", ".join(str(c) for c in candidates)
    raise HarnessError(
        f"netlab is not installed (tried {tried}). Run scripts/setup-test-env and point "
        "NEOPS_TEST_VENV at the venv it prints. These suites need the REAL netlab."
    )


def _venv_python() -> Path:
    """The interpreter that has neops-remote-lab 1.4.0 (for the reference server)."""
    cand = venv_dir() / "bin" / "python"
    return cand if cand.exists() else Path(sys.executable)


def server_kind() -> str:
    kind = os.environ.get("NEOPS_TEST_SERVER", "rust").strip().lower()
    if kind not in ("rust", "python"):
        raise HarnessError(f"NEOPS_TEST_SERVER must be 'rust' or 'python', not {kind!r}")
    return kind


def rust_binary() -> Path:
    env = os.environ.get("NEOPS_REMOTE_LAB_BIN")
    path = Path(env) if env else Path("target/debug/neops-remote-lab")
    if not path.is_absolute():
        path = REPO_ROOT / path
    if not (path.is_file() and os.access(path, os.X_OK)):
        raise HarnessError(f"server binary {path} not found: run 'cargo build' or set NEOPS_REMOTE_LAB_BIN")
    return path


def netlab_lab_name(directory_name: str) -> str:
    """The lab name netlab derives from a topology's directory when the topology sets no name:
    keep letters, digits and underscores (others become '_'), drop leading digits and (unless
    the name started with one) leading underscores, remove underscores, cut at 12 characters."""
    ident = re.sub(r"[^a-zA-Z0-9_]", "_", directory_name)
    ident = re.sub(r"^[0-9]*", "", ident)
    if ident.startswith("_") and not directory_name.startswith("_"):
        ident = re.sub(r"^_*", "", ident) or ident
    return (ident.replace("_", "") or "default")[:12]


# --------------------------------------------------------------------------- waiting


def wait_until(
    pred: Callable[[], Any] | str,
    check: Callable[[], Any] | None = None,
    limit: float | None = None,
    *,
    timeout: float = 30.0,
    interval: float = 0.1,
    what: str = "condition",
) -> Any:
    """Poll pred() until it returns something truthy; fail with `what` after `timeout` seconds.

    Also callable as wait_until(what, check, limit=15), the observe suite's order."""
    if isinstance(pred, str):
        assert check is not None, "wait_until(what, check): no check"
        what, pred = pred, check
        timeout = 15.0 if limit is None else limit
        interval = 0.05
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


# --------------------------------------------------------------------------- the sandbox


class Sandbox:
    """A shim dir (containerlab, docker, sudo that log and succeed), a fresh HOME holding
    netlab's registry, a private TMPDIR, and the environment to run netlab (or a server) in."""

    def __init__(self, root: Path, netlab: Path) -> None:
        self.root = root.resolve()
        self.netlab = netlab
        self.root.mkdir(parents=True, exist_ok=True)
        proc = subprocess.run(
            [str(SCRIPTS / "sandbox-netlab"), "--dir", str(self.root), "--shims-only"],
            capture_output=True,
            text=True,
            check=False,
        )
        if proc.returncode != 0:
            raise HarnessError(f"scripts/sandbox-netlab failed: {proc.stderr}")
        self.bin = self.root / "bin"
        self.home = self.root / "home"
        self.tmp = self.root / "tmp"
        self.tmp.mkdir(exist_ok=True)
        self.log = self.root / "shim.log"
        self.log.touch()

    # -- environment

    def env(self) -> dict[str, str]:
        # netlab's own settings and the server's NEOPS_REMOTE_LAB_* settings come only from here
        env = {k: v for k, v in os.environ.items() if not k.startswith(("NETLAB_", "NEOPS_REMOTE_LAB_"))}
        for k in ("PYTHONPATH", "PYTEST_ADDOPTS", "VIRTUAL_ENV"):
            env.pop(k, None)
        env.update(
            HOME=str(self.home),
            PATH=f"{self.bin}:{self.netlab.parent}:{os.environ.get('PATH', '/usr/bin:/bin')}",
            NETLAB_PROVIDER="clab",
            NETLAB_DEVICES_FRR_CLAB_KMODS="{}",
            COLUMNS="1000",
            NETLAB_SHIM_LOG=str(self.log),
            TMPDIR=str(self.tmp),
        )
        return env

    def run_netlab(self, *args: str, cwd: Path, stdin: str | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """Run the real netlab in the sandbox, the way the server does."""
        return subprocess.run(
            [str(self.netlab), *args],
            cwd=cwd,
            env=self.env(),
            input=stdin,
            stdin=None if stdin is not None else subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    # -- what the shims saw

    def shim_calls(self) -> list[str]:
        return self.log.read_text().splitlines()

    def count_calls(self, prefix: str) -> int:
        return sum(1 for line in self.shim_calls() if line.startswith(prefix))

    def fail_deploy(self, on: bool) -> None:
        flag = self.root / "fail-deploy"
        if on:
            flag.touch()
        else:
            flag.unlink(missing_ok=True)

    # -- netlab's registry (~/.netlab/status.yaml)

    @property
    def status_file(self) -> Path:
        return self.home / ".netlab" / "status.yaml"

    def lab_dir(self) -> Path:
        """The work directory of the lab netlab runs as its default instance (GET /lab names
        only the topology file; the Python server's full path is not relied on)."""
        where = self.registered().get("default")
        assert where, self.registered()
        return Path(where)

    def registered(self) -> dict[str, str | None]:
        """Instances registered in status.yaml: name -> their 'dir' (top-level keys only)."""
        try:
            text = self.status_file.read_text()
        except FileNotFoundError:
            return {}
        out: dict[str, str | None] = {}
        current = None
        for line in text.splitlines():
            m = re.match(r"^([A-Za-z0-9_'\"-]+):\s*(\{\})?\s*$", line)
            if m:
                current = m.group(1).strip("'\"")
                out[current] = None
                continue
            m = re.match(r"^  dir:\s*(.+?)\s*$", line)
            if m and current is not None:
                out[current] = m.group(1).strip("'\"")
        return out

    def default_registered(self) -> bool:
        return "default" in self.registered()


class FakeNetlab:
    """In place of a Sandbox: the fake netlab (tests/fake-netlab/netlab, no real netlab and no
    containers) with its directory (calls.log, control/), for suites that test the server's
    own behaviour rather than netlab's."""

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self.netlab = FAKE_NETLAB
        self.fake = self.root / "fake"
        (self.fake / "control").mkdir(parents=True, exist_ok=True)
        self.tmp = self.root / "tmp"
        self.tmp.mkdir(exist_ok=True)

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("NEOPS_REMOTE_LAB_")}
        env["FAKE_NETLAB_DIR"] = str(self.fake)
        return env

    def control(self, name: str, content: str) -> None:
        """Tell the fake netlab what to do (see the top of tests/fake-netlab/netlab)."""
        (self.fake / "control" / name).write_text(content)


# --------------------------------------------------------------------------- the server


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """The server under test as a child process in its own process group, stderr drained
    continuously into memory and into a log file. `sandbox` is a Sandbox (the real netlab) or
    a FakeNetlab; a timeout given as None is left to the server's default."""

    def __init__(
        self,
        sandbox: Sandbox | FakeNetlab,
        *,
        kind: str | None = None,
        active_timeout: float | None = 120,
        waiting_timeout: float | None = 120,
        sweep_interval: float = 1,
        extra_args: Iterable[str] = (),
    ) -> None:
        self.sandbox = sandbox
        self.kind = kind or server_kind()
        self.state_dir = sandbox.root / "state"
        self.log_path = sandbox.root / "server.log"
        self.lines: list[str] = []
        self.url = ""
        self.proc: subprocess.Popen[bytes] | None = None
        self._listening = threading.Event()
        self._reader: threading.Thread | None = None
        if isinstance(sandbox, FakeNetlab) and self.kind != "rust":
            raise HarnessError("the fake netlab runs only under the Rust server")
        if self.kind == "rust":
            timeouts = [
                *(["--active-timeout", str(active_timeout)] if active_timeout is not None else []),
                *(["--waiting-timeout", str(waiting_timeout)] if waiting_timeout is not None else []),
            ]
            self.argv = [
                str(rust_binary()),
                "--host", "127.0.0.1",
                "--port", "0",
                "--state-dir", str(self.state_dir),
                "--netlab", str(sandbox.netlab),
                *timeouts,
                "--sweep-interval", str(sweep_interval),
                "--log-level", "debug",
                *extra_args,
            ]
        else:
            self._port = _free_port()
            self.argv = [
                str(_venv_python()),
                "-m", "neops_remote_lab",
                "--host", "127.0.0.1",
                "--port", str(self._port),
                "--log-level", "DEBUG",
                *extra_args,
            ]

    @property
    def work_root(self) -> Path:
        """Where the server keeps lab work dirs (the reference server uses the temp dir)."""
        return self.state_dir if self.kind == "rust" else self.sandbox.tmp

    def _drain(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        with self.log_path.open("a", encoding="utf-8", errors="replace") as log:
            for raw in self.proc.stdout:
                line = raw.decode("utf-8", errors="replace").rstrip("\n")
                self.lines.append(line)
                log.write(line + "\n")
                log.flush()
                if not self._listening.is_set():
                    m = LISTENING_RE.search(line)
                    if m and self.kind == "rust":
                        self.url = m.group(1)
                        self._listening.set()

    def start(self, timeout: float = 60) -> ServerProcess:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            self.argv,
            cwd=self.sandbox.root,
            env=self.sandbox.env(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,  # one stream: the readiness line and all logs
            start_new_session=True,
        )
        self._reader = threading.Thread(target=self._drain, name="server-stderr", daemon=True)
        self._reader.start()
        deadline = time.monotonic() + timeout
        if self.kind == "rust":
            while not self._listening.wait(0.05):
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self._start_failed()
        else:
            self.url = f"http://127.0.0.1:{self._port}"
            while True:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self._start_failed()
                try:
                    if Client(self.url, timeout=2).get("/healthz").status == 204:
                        break
                except OSError:
                    pass
                time.sleep(0.1)
        return self

    def _start_failed(self) -> None:
        rc = self.proc.poll() if self.proc else None
        if self.proc and rc is None:
            self.kill()
        if self._reader:
            self._reader.join(5)  # its last words, once the pipe has ended
        raise HarnessError(
            f"server did not come up (exit code {rc}); argv: {' '.join(self.argv)}\n" + self.tail()
        )

    def tail(self, n: int = 60) -> str:
        return "\n".join(self.lines[-n:])

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def terminate(self, timeout: float = 60) -> int:
        """SIGTERM the server (only its own pid) and wait for it to exit; return its exit code."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"server did not exit within {timeout} s of SIGTERM\n{self.tail()}") from None
        finally:
            if self._reader:
                self._reader.join(5)

    def kill(self) -> None:
        """Last resort: SIGKILL the process group this harness created for the server."""
        if self.proc is None:
            return
        # Only while the server is unreaped: once it is, its pid (the group id) may be reused
        # by an unrelated process group.
        # start_new_session=True made the server the leader of its own group, so its pid is
        # the group id; never 0 or 1 (kill(-1) would reach every process).
        if self.proc.poll() is None and self.proc.pid > 1:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            pass

    def close(self) -> None:
        """Stop the server if still running (SIGTERM, then SIGKILL of its group)."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            try:
                self.terminate(timeout=60)
            except AssertionError:
                pass  # terminate() already killed it; the test decides what that means


# --------------------------------------------------------------------------- HTTP


class Response:
    def __init__(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
        self.status = status
        self.header_list = headers
        self.headers = {k.lower(): v for k, v in headers}
        self.body = body

    def json(self) -> Any:
        return json.loads(self.body)  # dicts keep the key order of the body

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return f"<Response {self.status} {self.body[:300]!r}>"


def multipart(parts: list[tuple[str, str | None, bytes, str | None]]) -> tuple[bytes, str]:
    """Encode (name, filename or None, content, content type or None) parts as multipart/form-data."""
    boundary = "e2e" + uuid.uuid4().hex
    chunks: list[bytes] = []
    for name, filename, content, ctype in parts:
        disp = f'form-data; name="{name}"'
        if filename is not None:
            disp += f'; filename="{filename}"'
        head = f"--{boundary}\r\nContent-Disposition: {disp}\r\n"
        if ctype:
            head += f"Content-Type: {ctype}\r\n"
        chunks.append(head.encode() + b"\r\n" + content + b"\r\n")
    chunks.append(f"--{boundary}--\r\n".encode())
    return b"".join(chunks), f"multipart/form-data; boundary={boundary}"


class Client:
    """One request per connection; plain http.client so the tests depend on nothing."""

    def __init__(self, base_url: str, *, timeout: float = 300, authorization: str | None = None) -> None:
        parsed = urllib.parse.urlsplit(base_url)
        self.host = parsed.hostname or "127.0.0.1"
        self.port = parsed.port or 80
        self.timeout = timeout
        # Sent with every request when the server wants a token (--token-file).
        self.authorization = authorization

    def request(
        self,
        method: str,
        path: str,
        *,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
        session: str | None = None,
    ) -> Response:
        hdrs = dict(headers or {})
        if self.authorization is not None:
            hdrs.setdefault("Authorization", self.authorization)
        if session is not None:
            hdrs["X-Session-ID"] = session
        conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        try:
            conn.request(method, path, body=body, headers=hdrs)
            resp = conn.getresponse()
            data = resp.read()
            return Response(resp.status, resp.getheaders(), data)
        finally:
            conn.close()

    def get(self, path: str, **kw: Any) -> Response:
        return self.request("GET", path, **kw)

    def post(self, path: str, **kw: Any) -> Response:
        return self.request("POST", path, **kw)

    def delete(self, path: str, **kw: Any) -> Response:
        return self.request("DELETE", path, **kw)

    # -- conveniences following the wire sequence of the Python client

    def new_session(self) -> tuple[str, int]:
        r = self.post("/session")
        assert r.status == 201, r
        data = r.json()
        assert list(data) == ["session_id", "position"], data
        return data["session_id"], data["position"]

    def post_lab(
        self,
        session: str,
        topology_name: str,
        topology: bytes,
        *,
        reuse: bool | str | None = None,
        extra_files: Iterable[tuple[str, bytes]] = (),
    ) -> Response:
        parts: list[tuple[str, str | None, bytes, str | None]] = [
            ("topology", topology_name, topology, "application/x-yaml")
        ]
        if reuse is not None:
            value = str(reuse).lower() if isinstance(reuse, bool) else reuse
            parts.append(("reuse", None, value.encode(), None))
        for rel, content in extra_files:
            parts.append(("extra_files", rel, content, "application/octet-stream"))
        body, ctype = multipart(parts)
        return self.post("/lab", body=body, headers={"Content-Type": ctype}, session=session)


def detail_of(resp: Response) -> str:
    data = resp.json()
    assert isinstance(data, dict) and list(data) == ["detail"], f"not a {{detail}} envelope: {resp!r}"
    return data["detail"]
