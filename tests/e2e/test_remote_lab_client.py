"""`remote-lab run` against the server driving the REAL netlab (containers faked by the shims).

The client binary is found next to the server's (target/debug/remote-lab), or at
$NEOPS_REMOTE_LAB_CLIENT.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from labserver import REPO_ROOT, Client, HarnessError, Sandbox, ServerProcess, rust_binary

TOPOLOGY = Path(__file__).resolve().parent / "topologies" / "ospf.yml"

CHECK_DEVICES = """
import json, os, sys
devices = json.load(open(os.environ["REMOTE_LAB_DEVICES"]))
names = [d["name"] for d in devices]
assert names == ["r1", "r2", "h1"], names
assert all(isinstance(d["raw"], dict) and d["raw"] for d in devices), devices
assert os.environ["REMOTE_LAB_REUSED"] == sys.argv[1], os.environ["REMOTE_LAB_REUSED"]
assert len(os.environ["REMOTE_LAB_SESSION_ID"]) == 36
print("devices ok:", " ".join(names))
"""


def client_binary() -> Path:
    env = os.environ.get("NEOPS_REMOTE_LAB_CLIENT")
    if env:
        path = Path(env)
    else:
        try:
            path = rust_binary().parent / "remote-lab"
        except HarnessError:
            path = REPO_ROOT / "target/debug/remote-lab"
    if not (path.is_file() and os.access(path, os.X_OK)):
        pytest.fail(f"client binary {path} not found: run 'cargo build' or set NEOPS_REMOTE_LAB_CLIENT", pytrace=False)
    return path


def run_client(sandbox: Sandbox, url: str, tmp_path: Path, reused: str) -> subprocess.CompletedProcess[str]:
    script = tmp_path / "check_devices.py"
    script.write_text(CHECK_DEVICES)
    env = sandbox.env()
    env.pop("REMOTE_LAB_TOKEN", None)
    env["NETRC"] = str(tmp_path / "no-netrc")
    return subprocess.run(
        [str(client_binary()), "run", "--url", url, "--topology", str(TOPOLOGY), "--name", "e2e",
         "--", sys.executable, str(script), reused],
        env=env, capture_output=True, text=True, timeout=600,
    )


def test_remote_lab_run_gives_the_command_the_labs_devices(
    server: ServerProcess, sandbox: Sandbox, tmp_path: Path
) -> None:
    first = run_client(sandbox, server.url, tmp_path, "false")
    assert first.returncode == 0, f"exit {first.returncode}\nstdout:\n{first.stdout}\nstderr:\n{first.stderr}"
    assert "devices ok: r1 r2 h1" in first.stdout
    assert sandbox.count_calls("containerlab deploy") == 1
    # Released and ended: no session left, the lab idle and up for the next run.
    health = Client(server.url).get("/debug/health").json()
    assert health["sessions"] == 0, health
    if server.kind == "python":
        # The Python server tears the lab down with every session (fixed here): no reuse
        # to check. That the client ran at all there shows its fallbacks (no long-poll, no
        # queue view) work.
        return
    assert sandbox.default_registered()

    second = run_client(sandbox, server.url, tmp_path, "true")
    assert second.returncode == 0, f"exit {second.returncode}\nstderr:\n{second.stderr}"
    assert "lab reused" in second.stderr
    assert sandbox.count_calls("containerlab deploy") == 1
