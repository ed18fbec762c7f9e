"""Helpers for the client suite: run the user-style project in user_project/ as CI jobs,
and watch the server's queue while they run."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "e2e"))

from labserver import Client, HarnessError, Sandbox, ServerProcess, venv_dir  # noqa: E402

USER_PROJECT = Path(__file__).resolve().parent / "user_project"


@dataclass
class Lab:
    server: ServerProcess
    sandbox: Sandbox
    api: Client
    python: Path
    runs: list[Path] = field(default_factory=list)
    # With NEOPS_TEST_TOKENS=1: the netrc file the unchanged client reads its token from.
    netrc: Path | None = None

    def user_pytest(self, *args: str, name: str, netrc: bool = True) -> Job:
        """Start `pytest ARGS` in user_project/ as a user's CI job would run it (with the
        token in $NETRC when the server wants one, unless `netrc` is false)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "REMOTE_LAB_", "NETRC"))}
        if self.netrc is not None and netrc:
            env["NETRC"] = str(self.netrc)
        elif self.netrc is not None:
            env["NETRC"] = os.devnull
        env.update(
            REMOTE_LAB_URL=self.server.url,
            REMOTE_LAB_REQUEST_TIMEOUT="30",
            REMOTE_LAB_SESSION_TIMEOUT="180",
            REMOTE_LAB_ACQUISITION_TIMEOUT="180",
            PYTHONDONTWRITEBYTECODE="1",
        )
        log = self.sandbox.root / f"job-{name}.log"
        self.runs.append(log)
        argv = [
            str(self.python), "-m", "pytest",
            "-p", "no:cacheprovider",
            "--confcutdir", str(USER_PROJECT),
            "-o", "log_cli=true", "--log-cli-level=INFO",
            "-v", *args,
        ]
        with log.open("w") as out:
            proc = subprocess.Popen(
                argv, cwd=USER_PROJECT, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT
            )
        return Job(name, proc, log)


@dataclass
class Job:
    name: str
    proc: subprocess.Popen[bytes]
    log: Path

    def wait(self, timeout: float = 240) -> tuple[int, str]:
        """Wait for the job; return its exit code and its output."""
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            rc = -1
        return rc, self.log.read_text()


def find_venv_python() -> Path:
    python = venv_dir() / "bin" / "python"
    if not python.exists():
        python = Path(sys.executable)
    check = subprocess.run(
        [str(python), "-c", "import neops_remote_lab.testing.fixture, pytest"],
        capture_output=True,
        text=True,
        check=False,
    )
    if check.returncode != 0:
        raise HarnessError(
            f"{python} cannot import neops_remote_lab and pytest; run scripts/setup-test-env "
            f"(and set NEOPS_TEST_VENV to its venv): {check.stderr.strip()[-500:]}"
        )
    return python


class HealthWatcher:
    """Polls GET /debug/health in the background and remembers the longest queue seen."""

    def __init__(self, api: Client) -> None:
        self.api = api
        self.max_queue = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                r = self.api.get("/debug/health")
                if r.status == 200:
                    self.max_queue = max(self.max_queue, int(r.json()["queue_length"]))
            except OSError:
                pass
            time.sleep(0.2)

    def __enter__(self) -> HealthWatcher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
