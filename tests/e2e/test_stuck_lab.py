"""A lab the REAL netlab cannot tear down, and the netlab commands the runbook relies on.

netlab 26.10 without containerlab: `netlab down` prints `Fatal error in netlab:
Containerlab is not installed` and exits 0. The server must count that as a failure, keep
the lab's work directory (clab.yml, the snapshot) and retry until netlab succeeds.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from labserver import Client, Sandbox, ServerProcess, server_kind, wait_until

pytestmark = pytest.mark.skipif(
    server_kind() != "rust", reason="teardown retries and /debug/health 'teardowns' are the Rust server's"
)


def health_teardowns(api: Client) -> list[dict]:
    r = api.get("/debug/health")
    assert r.status == 200, r
    return r.json()["teardowns"]


def test_a_teardown_netlab_fails_with_exit_0_is_kept_and_retried(
    start_server: Callable[..., ServerProcess], sandbox: Sandbox, topo
) -> None:
    server = start_server(sweep_interval=0.2)
    api = Client(server.url)
    sid, _ = api.new_session()
    r = api.post_lab(sid, "pair.yml", topo("pair.yml"))
    assert r.status == 200, r
    assert api.get("/lab", session=sid).json()["running"] is True
    work = sandbox.lab_dir()
    assert (work / "clab.yml").is_file()

    shim = sandbox.bin / "containerlab"
    hidden = sandbox.bin / "containerlab.hidden"
    shim.rename(hidden)
    try:
        r = api.delete("/lab", session=sid)
        assert (r.status, r.body) == (202, b""), r
        wait_until(
            lambda: any(t["attempts"] >= 1 for t in health_teardowns(api)),
            timeout=60,
            what="the failed teardown in /debug/health",
        )
        [t] = health_teardowns(api)
        assert t["work_dir"] == str(work)
        assert t["error"].startswith("netlab down --cleanup failed ("), t
        assert "Containerlab is not installed" in t["error"], t
        # Kept: the files a human needs, and netlab's registration.
        assert (work / "clab.yml").is_file()
        assert (work / "netlab.snapshot.pickle").is_file()
        assert sandbox.default_registered()
        errors = [line for line in server.lines if "[ERROR]" in line]
        assert len(errors) == 1 and "teardown of" in errors[0], errors
    finally:
        hidden.rename(shim)
    # Once containerlab is back, a retry finishes the job.
    wait_until(
        lambda: not work.exists() and health_teardowns(api) == [],
        timeout=60,
        what="the retried teardown",
    )
    assert not sandbox.default_registered()
    assert any("succeeded after" in line for line in server.lines), server.tail(40)


def test_the_runbooks_netlab_status_commands(
    start_server: Callable[..., ServerProcess], sandbox: Sandbox, topo
) -> None:
    """`netlab status` (without --all) fails outside the lab's directory; `--all` cuts the
    directory at 80 columns when piped unless COLUMNS is set: the runbook sets it."""
    server = start_server()
    api = Client(server.url)
    sid, _ = api.new_session()
    r = api.post_lab(sid, "pair.yml", topo("pair.yml"))
    assert r.status == 200, r
    work = str(sandbox.lab_dir())

    def status(*args: str, columns: str | None) -> subprocess.CompletedProcess[str]:
        env = sandbox.env()
        env.pop("COLUMNS", None)
        if columns is not None:
            env["COLUMNS"] = columns
        return subprocess.run(
            [str(sandbox.netlab), "status", *args],
            cwd=sandbox.root,
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    plain = status(columns="200")
    assert plain.returncode != 0, plain
    full = status("--all", columns="200")
    assert full.returncode == 0, full
    assert work in full.stdout.replace("\n", ""), full.stdout
    assert any(work in line for line in full.stdout.splitlines()), full.stdout
    if len(work) > 60:
        cut = status("--all", columns=None)
        assert not any(work in line for line in cut.stdout.splitlines()), cut.stdout
    assert os.path.isdir(work)


def _lab_without_snapshot(api: Client, sandbox: Sandbox, topo) -> tuple[str, Path]:
    """A running sandbox lab whose netlab.snapshot.pickle was deleted by hand."""
    sid, _ = api.new_session()
    r = api.post_lab(sid, "pair.yml", topo("pair.yml"))
    assert r.status == 200, r
    work = sandbox.lab_dir()
    (work / "netlab.snapshot.pickle").unlink()
    assert (work / "clab.yml").is_file()
    return sid, work


def test_a_lab_without_snapshot_is_destroyed_with_containerlab(
    start_server: Callable[..., ServerProcess], sandbox: Sandbox, topo
) -> None:
    """Real netlab's `down` exits 1 without the snapshot: the server runs `containerlab
    destroy` from clab.yml itself, and only then deletes the work directory."""
    server = start_server(sweep_interval=0.2)
    api = Client(server.url)
    sid, work = _lab_without_snapshot(api, sandbox, topo)
    before = sandbox.count_calls("containerlab destroy")
    r = api.delete("/lab?force=true", session=sid)
    assert (r.status, r.body) == (202, b""), r
    wait_until(lambda: not work.exists(), timeout=60, what="the teardown")
    assert health_teardowns(api) == []
    assert sandbox.count_calls("containerlab destroy --cleanup -t clab.yml") == before + 1, sandbox.shim_calls()
    assert any("its snapshot is gone" in line for line in server.lines), server.tail(40)


def test_cleanup_destroys_a_lab_without_snapshot_with_containerlab(
    start_server: Callable[..., ServerProcess], sandbox: Sandbox, topo
) -> None:
    server = start_server(extra_args=["--on-exit", "keep"])
    api = Client(server.url)
    _, work = _lab_without_snapshot(api, sandbox, topo)
    assert server.terminate() == 0
    assert work.is_dir() and sandbox.default_registered()
    before = sandbox.count_calls("containerlab destroy")
    out = subprocess.run(
        [server.argv[0], "cleanup", "--state-dir", str(server.state_dir), "--netlab", str(sandbox.netlab)],
        cwd=sandbox.root,
        env=sandbox.env(),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert "cleanup done" in out.stderr, out.stderr
    assert sandbox.count_calls("containerlab destroy --cleanup -t clab.yml") == before + 1, sandbox.shim_calls()
    assert not work.exists()
    # netlab's registration of the directory that is gone is dropped too.
    assert not sandbox.default_registered()
