"""Server start-up and shutdown against the REAL netlab."""

from __future__ import annotations

import shutil
from collections.abc import Callable

from labserver import Client, Sandbox, ServerProcess, wait_until


def test_stale_default_registration_is_cleared_at_startup(
    start_server: Callable[..., ServerProcess], sandbox: Sandbox, topo, tmp_path
) -> None:
    # A lab started by hand whose directory was deleted afterwards (a crashed job, a wiped
    # temp dir): netlab still registers `default` there, and `netlab down` cannot cd into it.
    gone = tmp_path / "gone-lab"
    gone.mkdir()
    (gone / "ospf.yml").write_bytes(topo("ospf.yml"))
    up = sandbox.run_netlab("up", "ospf.yml", cwd=gone)
    assert up.returncode == 0, up.stderr
    shutil.rmtree(gone)
    assert sandbox.registered().get("default") == str(gone)
    down = sandbox.run_netlab("down", "--instance", "default", "--cleanup", cwd=tmp_path)
    assert down.returncode == 1 and "Cannot change directory" in down.stderr, down

    server = start_server()
    wait_until(lambda: not sandbox.default_registered(), timeout=30, what="the stale registration to be cleared")

    api = Client(server.url)
    sid, _ = api.new_session()
    r = api.post_lab(sid, "ospf.yml", topo("ospf.yml"))
    assert r.status == 200, r
    assert [d["name"] for d in r.json()["devices"]] == ["r1", "r2", "h1"]


def test_a_lab_outside_our_state_dir_is_left_alone_unless_asked(
    start_server: Callable[..., ServerProcess], sandbox: Sandbox, topo, tmp_path
) -> None:
    # A lab running in a directory that is not this server's (another server's, or one a
    # person started): the server leaves it alone and refuses to start a lab over it
    # (it is not ours); with --cleanup-foreign it tears it down at start, as it used to.
    left = tmp_path / "left-behind"
    left.mkdir()
    (left / "pair.yml").write_bytes(topo("pair.yml"))
    assert sandbox.run_netlab("up", "pair.yml", cwd=left).returncode == 0
    assert sandbox.registered().get("default") == str(left)

    server = start_server()
    api = Client(server.url)
    sid, _ = api.new_session()
    r = api.post_lab(sid, "ospf.yml", topo("ospf.yml"))
    assert r.status == 409, r
    assert "running in " + str(left) in r.json()["detail"], r
    assert sandbox.registered().get("default") == str(left)
    assert sandbox.count_calls("containerlab destroy") == 0
    server.terminate(timeout=60)

    start_server(extra_args=["--cleanup-foreign"])
    wait_until(lambda: not sandbox.default_registered(), timeout=30, what="the left-over lab to be torn down")
    assert sandbox.count_calls("containerlab destroy") == 1


def test_sigterm_with_a_lab_up_tears_it_down(
    start_server: Callable[..., ServerProcess], sandbox: Sandbox, topo
) -> None:
    server = start_server()
    api = Client(server.url)
    sid, _ = api.new_session()
    r = api.post_lab(sid, "ospf.yml", topo("ospf.yml"))
    assert r.status == 200, r
    assert sandbox.default_registered()

    rc = server.terminate(timeout=60)
    assert rc == 0, f"exit code {rc}\n{server.tail()}"
    assert not sandbox.default_registered(), sandbox.status_file.read_text()
    assert sandbox.count_calls("containerlab destroy") == 1
