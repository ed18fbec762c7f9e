"""The lab lifecycle against the REAL netlab (container layer faked by the shims).

Each test boots its own server in its own sandbox (HOME, shim log, state dir), so tests
are independent and can run in any order.
"""

from __future__ import annotations

import ipaddress
import json
import re
from pathlib import Path
from typing import Any

from labserver import Client, Sandbox, ServerProcess, detail_of, netlab_lab_name, wait_until

TOPOLOGY_DIR = Path(__file__).resolve().parent / "topologies"
OSPF_NODES = ["r1", "r2", "h1"]
PAIR_NODES = ["a1", "a2"]
TEARDOWN_DEADLINE = 30.0


# --------------------------------------------------------------------------- helpers


def acquire(api: Client, sid: str, topo: bytes, name: str, **kw: Any) -> dict[str, Any]:
    r = api.post_lab(sid, name, topo, **kw)
    assert r.status == 200, r
    assert r.headers.get("content-type", "").startswith("application/json"), r.headers
    data = r.json()
    assert list(data) == ["reused", "devices"], data
    return data


def lab_info(api: Client, sid: str) -> dict[str, Any]:
    r = api.get("/lab", session=sid)
    assert r.status == 200, r
    data = r.json()
    assert list(data) == ["running", "topology", "ref_count", "devices", "netlab_status"], data
    return data


def work_dir(api: Client, sid: str, sandbox: Sandbox) -> Path:
    """The session's lab's work directory, from netlab's registry; the topology GET /lab
    names is in it."""
    info = lab_info(api, sid)
    assert info["running"] is True and info["topology"], info
    wd = sandbox.lab_dir()
    assert (wd / Path(info["topology"]).name).is_file(), (info, wd)
    return wd


def release(api: Client, sid: str) -> None:
    r = api.post("/lab/release", session=sid)
    assert r.status == 204, r
    assert r.body == b""


def wait_torn_down(sandbox: Sandbox, destroys_before: int) -> None:
    """A teardown is asynchronous: wait until netlab's registry no longer has `default`
    and the shim log shows one more `containerlab destroy`."""
    wait_until(
        lambda: not sandbox.default_registered() and sandbox.count_calls("containerlab destroy") > destroys_before,
        timeout=TEARDOWN_DEADLINE,
        what="the lab teardown (status.yaml without 'default' and a new 'containerlab destroy')",
    )


def assert_devices(devices: list[dict[str, Any]], names: list[str], lab_name: str) -> None:
    assert [d["name"] for d in devices] == names
    for dev in devices:
        assert list(dev) == ["name", "raw"], dev
        raw = dev["raw"]
        assert raw["hostname"] == f"clab-{lab_name}-{dev['name']}", raw["hostname"]
        ipaddress.IPv4Address(raw["mgmt"]["ipv4"])  # present and an address


# --------------------------------------------------------------------------- tests


def test_acquire_with_extra_file(api: Client, server: ServerProcess, sandbox: Sandbox, topo) -> None:
    """An frr+linux topology with links and the ospf module. configs/marker.j2 is only
    uploaded as an extra file; the topology names it as a custom config template of r1, so
    netlab must find it next to the topology and render it."""
    sid, pos = api.new_session()
    assert pos == 0
    template = (TOPOLOGY_DIR / "configs" / "marker.j2").read_bytes()

    data = acquire(
        api, sid, topo("ospf-marker.yml"), "ospf-marker.yml", extra_files=[("configs/marker.j2", template)]
    )
    assert data["reused"] is False
    assert_devices(data["devices"], OSPF_NODES, "e2em")
    by_name = {d["name"]: d["raw"] for d in data["devices"]}
    assert by_name["r1"]["box"].startswith("quay.io/frrouting/frr")
    assert "ospf" in by_name["r1"]["module"]
    assert by_name["h1"]["box"] != by_name["r1"]["box"]  # linux host, not an frr image
    assert "configs/marker.j2" in by_name["r1"].get("config", []), by_name["r1"]

    calls = sandbox.shim_calls()
    assert sum(c.startswith("containerlab deploy") for c in calls) == 1, calls
    assert any(c.startswith("docker exec clab-e2em-r1 ") for c in calls), calls

    # GET /lab and /lab/devices describe the same lab; the work dir is the one netlab registered
    info = lab_info(api, sid)
    assert info["running"] is True
    assert info["ref_count"] == 1
    assert info["devices"] == data["devices"]
    assert info["netlab_status"] is None
    # The Rust server names the file only; the Python server gives its path.
    assert Path(info["topology"]).name == "ospf-marker.yml"
    if server.kind == "rust":
        assert info["topology"] == "ospf-marker.yml", info
    wd = sandbox.lab_dir()
    topo_path = wd / "ospf-marker.yml"
    assert topo_path.read_bytes() == topo("ospf-marker.yml")
    assert wd.resolve().is_relative_to(server.work_root.resolve()), (topo_path, server.work_root)
    assert (wd / "clab.yml").is_file()

    r = api.get("/lab/devices", session=sid)
    assert r.status == 200, r
    assert r.json() == data["devices"]

    # the extra file was saved under its relative path next to the topology ...
    assert (wd / "configs" / "marker.j2").read_bytes() == template
    # ... netlab rendered it for r1 ...
    rendered = (wd / "node_files" / "r1" / "configs" / "marker.j2").read_text()
    assert "# e2e marker for r1: E2E-EXTRA-FILE-MARKER" in rendered, rendered
    assert 'echo "configured clab-e2em-r1"' in rendered, rendered
    # ... and ran it on r1 as one more config step
    assert any(re.match(r"docker exec clab-e2em-r1 \S*configs/marker\S*", c) for c in calls), calls


def test_node_data_is_what_inspect_node_prints(api: Client, server: ServerProcess, sandbox: Sandbox, topo) -> None:
    """Every device's `raw` is exactly what `netlab inspect --node NAME --format json`
    prints for that node (the Python client and recorded replays rely on it), for several
    device types, in netlab's node order. Our server reads all of it in one netlab call."""
    sid, _ = api.new_session()
    data = acquire(api, sid, topo("devices.yml"), "devices.yml")
    wd = work_dir(api, sid, sandbox)

    listing = sandbox.run_netlab(
        "inspect", "-q", "--instance", "default", "--format", "json", "list(nodes.keys())", cwd=wd
    )
    assert listing.returncode == 0, listing.stderr
    names = re.findall(r"'([^']+)'", listing.stdout)
    assert names == ["r1", "r2", "h1", "b1"], listing.stdout
    assert [d["name"] for d in data["devices"]] == names

    kinds = set()
    for device in data["devices"]:
        one = sandbox.run_netlab(
            "inspect", "-q", "--instance", "default", "--node", device["name"], "--format", "json", cwd=wd
        )
        assert one.returncode == 0, one.stderr
        expected = json.loads(one.stdout)
        assert device["raw"] == expected, device["name"]
        kinds.add(expected["ansible_network_os"])
    assert kinds == {"frr", "linux"}, kinds  # bird runs on a linux container

    if server.kind == "rust":
        log = server.log_path.read_text()
        assert "__import__('box').BoxList(" in log, "the one-call read did not run"
        assert "--node" not in log, "the server fell back to one call per node"


def test_reuse_same_content_under_another_name(api: Client, server: ServerProcess, sandbox: Sandbox, topo) -> None:
    sid, _ = api.new_session()
    first = acquire(api, sid, topo("ospf.yml"), "ospf.yml")
    assert first["reused"] is False
    wd = work_dir(api, sid, sandbox)

    # same bytes, another file name and suffix: the identity is the content hash
    second = acquire(api, sid, topo("ospf.yml"), "Renamed-Copy.YAML", reuse=True)
    assert second["reused"] is True
    assert second["devices"] == first["devices"]
    assert sandbox.count_calls("containerlab deploy") == 1
    assert lab_info(api, sid)["ref_count"] == 2
    assert work_dir(api, sid, sandbox) == wd

    # reuse defaults to true
    third = acquire(api, sid, topo("ospf.yml"), "ospf.yml")
    assert third["reused"] is True
    assert lab_info(api, sid)["ref_count"] == 3

    for expected in (2, 1, 0, 0):  # a release at 0 is still 204
        release(api, sid)
        assert lab_info(api, sid)["ref_count"] == expected
    # idle, but still up
    info = lab_info(api, sid)
    assert info["running"] is True
    assert sandbox.default_registered()
    assert sandbox.count_calls("containerlab destroy") == 0

    # an idle lab is reattached with reuse=true, without a new netlab up
    again = acquire(api, sid, topo("ospf.yml"), "ospf.yml", reuse=True)
    assert again["reused"] is True
    assert sandbox.count_calls("containerlab deploy") == 1
    assert lab_info(api, sid)["ref_count"] == 1


def test_restart_with_reuse_false(api: Client, server: ServerProcess, sandbox: Sandbox, topo) -> None:
    sid, _ = api.new_session()
    acquire(api, sid, topo("ospf.yml"), "ospf.yml")
    old_wd = work_dir(api, sid, sandbox)

    # held: an exclusive request is refused
    r = api.post_lab(sid, "ospf.yml", topo("ospf.yml"), reuse=False)
    assert (r.status, r.body) == (423, b'{"detail":"Lab currently busy"}'), r
    assert sandbox.count_calls("containerlab deploy") == 1

    release(api, sid)
    data = acquire(api, sid, topo("ospf.yml"), "ospf.yml", reuse=False)
    assert data["reused"] is False
    assert_devices(data["devices"], OSPF_NODES, "e2ea")
    assert sandbox.count_calls("containerlab destroy") == 1
    assert sandbox.count_calls("containerlab deploy") == 2
    new_wd = work_dir(api, sid, sandbox)
    assert sandbox.registered().get("default") == str(new_wd)
    assert lab_info(api, sid)["ref_count"] == 1
    if new_wd != old_wd:
        assert not old_wd.exists(), "the old work dir should be removed after its teardown"


def test_switch_to_another_topology(api: Client, server: ServerProcess, sandbox: Sandbox, topo) -> None:
    sid, _ = api.new_session()
    acquire(api, sid, topo("ospf.yml"), "ospf.yml")
    old_wd = work_dir(api, sid, sandbox)

    r = api.post_lab(sid, "pair.yml", topo("pair.yml"))
    assert (r.status, r.body) == (423, b'{"detail":"Lab currently busy"}'), r

    release(api, sid)
    data = acquire(api, sid, topo("pair.yml"), "pair.yml")
    assert data["reused"] is False
    new_wd = work_dir(api, sid, sandbox)
    assert_devices(data["devices"], PAIR_NODES, netlab_lab_name(new_wd.resolve().name))
    assert sandbox.count_calls("containerlab destroy") == 1
    assert sandbox.count_calls("containerlab deploy") == 2
    assert sandbox.registered().get("default") == str(new_wd)
    assert Path(lab_info(api, sid)["topology"]).name == "pair.yml"
    assert not old_wd.exists(), "the old work dir should be removed after its teardown"


def test_delete_lab(api: Client, server: ServerProcess, sandbox: Sandbox, topo) -> None:
    sid, _ = api.new_session()
    acquire(api, sid, topo("ospf.yml"), "ospf.yml")

    r = api.delete("/lab?force=false", session=sid)
    assert (r.status, r.body) == (409, b'{"detail":"Lab still in use"}'), r
    assert sandbox.default_registered()

    r = api.delete("/lab", session=sid)  # force defaults to true
    assert r.status == 202, r
    assert r.body == b""
    info = lab_info(api, sid)
    assert (info["running"], info["topology"], info["ref_count"], info["devices"]) == (False, None, 0, [])
    wait_torn_down(sandbox, 0)

    r = api.delete("/lab", session=sid)
    assert (r.status, r.body) == (204, b""), r
    r = api.get("/lab/devices", session=sid)
    assert (r.status, r.body) == (404, b'{"detail":"No lab running"}'), r
    r = api.post("/lab/release", session=sid)
    assert (r.status, r.body) == (404, b'{"detail":"No lab running"}'), r

    # and a new lab starts cleanly afterwards
    data = acquire(api, sid, topo("pair.yml"), "pair.yml")
    assert [d["name"] for d in data["devices"]] == PAIR_NODES


def test_ending_the_active_session_with_a_reference_tears_down(
    api: Client, server: ServerProcess, sandbox: Sandbox, topo
) -> None:
    s1, _ = api.new_session()
    acquire(api, s1, topo("ospf.yml"), "ospf.yml")
    s2, pos = api.new_session()
    assert pos == 1
    r = api.get(f"/session/{s2}")
    assert r.json() == {"status": "waiting", "position": 1}

    r = api.delete(f"/session/{s1}")
    assert (r.status, r.body) == (204, b""), r
    # the next session is promoted at once, not after the teardown
    r = api.get(f"/session/{s2}")
    assert (r.status, r.body) == (200, b'{"status":"active","position":0}'), r
    wait_torn_down(sandbox, 0)
    info = lab_info(api, s2)
    assert (info["running"], info["topology"]) == (False, None)


def test_released_lab_survives_its_session_until_sigterm(
    api: Client, server: ServerProcess, sandbox: Sandbox, topo
) -> None:
    """Fixed here (the Python server gets it wrong): a lab released properly (ref_count 0) stays up when its session ends,
    so the next session attaches with reuse=true. SIGTERM tears an idle lab down too."""
    s1, _ = api.new_session()
    acquire(api, s1, topo("ospf.yml"), "ospf.yml")
    release(api, s1)
    r = api.delete(f"/session/{s1}")
    assert r.status == 204, r

    s2, pos = api.new_session()
    assert pos == 0
    data = acquire(api, s2, topo("ospf.yml"), "ospf.yml", reuse=True)
    assert data["reused"] is True
    assert sandbox.count_calls("containerlab deploy") == 1
    assert sandbox.count_calls("containerlab destroy") == 0
    assert sandbox.default_registered()

    # idle again and nobody's: SIGTERM still tears it down
    release(api, s2)
    assert api.delete(f"/session/{s2}").status == 204
    assert sandbox.default_registered()
    rc = server.terminate(timeout=60)
    assert rc == 0, f"exit code {rc}\n{server.tail()}"
    assert not sandbox.default_registered()
    assert sandbox.count_calls("containerlab destroy") == 1


def test_malformed_topology_is_422_with_netlabs_words(api: Client, server: ServerProcess, sandbox: Sandbox, topo) -> None:
    sid, _ = api.new_session()
    for name, words in (
        ("bad-yaml.yml", "Cannot read YAML"),
        ("bad-module.yml", "attribute module has invalid value(s): nosuchmodule"),
    ):
        r = api.post_lab(sid, name, topo(name))
        assert r.status == 422, r
        detail = detail_of(r)
        assert detail.startswith("netlab rejected the topology: "), detail
        assert words in detail, detail
        # nothing left behind, the session is still the active one
        info = lab_info(api, sid)
        assert (info["running"], info["topology"], info["ref_count"]) == (False, None, 0)
        assert not sandbox.default_registered()
        assert api.get(f"/session/{sid}").json() == {"status": "active", "position": 0}
    assert sandbox.count_calls("containerlab deploy") == 0

    data = acquire(api, sid, topo("ospf.yml"), "ospf.yml")
    assert data["reused"] is False
    assert [d["name"] for d in data["devices"]] == OSPF_NODES


def test_failed_netlab_up_is_500_and_cleans_up(api: Client, server: ServerProcess, sandbox: Sandbox, topo) -> None:
    """netlab gets past its checks, then the (shimmed) containerlab deploy fails."""
    sid, _ = api.new_session()
    sandbox.fail_deploy(True)
    r = api.post_lab(sid, "ospf.yml", topo("ospf.yml"))
    sandbox.fail_deploy(False)
    assert r.status == 500, r
    detail = detail_of(r)
    assert detail.startswith("netlab up failed (exit code 1): "), detail
    assert "containerlab deploy" in detail, detail

    info = lab_info(api, sid)
    assert (info["running"], info["topology"]) == (False, None)
    wait_until(lambda: not sandbox.default_registered(), timeout=TEARDOWN_DEADLINE, what="the failed lab to be unregistered")
    leftovers = list(server.work_root.rglob("netlab.snapshot.pickle"))
    assert leftovers == [], f"work dir of the failed lab not cleaned up: {leftovers}"

    data = acquire(api, sid, topo("ospf.yml"), "ospf.yml")
    assert data["reused"] is False
