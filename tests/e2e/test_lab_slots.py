"""Lab slots against the REAL netlab: with --slots 2 the server runs two labs at once, each a
numbered instance of netlab's multilab plugin in its own work dir and management subnet, and
tears both down when it stops."""

from __future__ import annotations

import ipaddress
import json
import re
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from labserver import Client, Response, Sandbox, ServerProcess


def registered_instances(sandbox: Sandbox, cwd: Path) -> dict[str, Any]:
    """`netlab status --all --format json` in the server's environment: instances by id.
    With none registered netlab exits 1 and answers only a warning: that is `{}` here."""
    proc = sandbox.run_netlab("status", "--all", "--format", "json", cwd=cwd)
    data = json.loads(proc.stdout)
    if proc.returncode == 1 and data == {"warning": "No netlab-managed labs"}:
        return {}
    assert proc.returncode == 0, proc
    return data


def test_two_slots_run_two_labs_at_once_and_both_are_torn_down(
    start_server: Callable[..., ServerProcess], sandbox: Sandbox, topo, tmp_path: Path
) -> None:
    server = start_server(extra_args=["--slots", "2", "--on-exit", "teardown"])
    api = Client(server.url)
    s1, p1 = api.new_session()
    s2, p2 = api.new_session()
    # Two slots: both sessions are active at once, none waits.
    assert (p1, p2) == (0, 0)
    for sid in (s1, s2):
        r = api.get(f"/session/{sid}")
        assert (r.status, r.json()) == (200, {"status": "active", "position": 0}), r

    # Two different topologies, started at the same moment.
    jobs = {s1: ("pair.yml", topo("pair.yml")), s2: ("duo.yml", topo("duo.yml"))}
    answers: dict[str, Response] = {}
    barrier = threading.Barrier(len(jobs))

    def acquire(sid: str, name: str, content: bytes) -> None:
        barrier.wait()
        answers[sid] = api.post_lab(sid, name, content)

    threads = [threading.Thread(target=acquire, args=(sid, *job)) for sid, job in jobs.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join(240)
    assert not any(t.is_alive() for t in threads), "a POST /lab did not answer"
    for sid, r in answers.items():
        assert r.status == 200, (jobs[sid][0], r)
    assert len(answers) == 2

    # Each lab is the multilab instance `ml-N`: its devices' container names say N, and their
    # management addresses are in 192.168.N.0/24, N differing between the two labs.
    ids: dict[str, str] = {}
    nodes = {"pair.yml": ["a1", "a2"], "duo.yml": ["d1", "d2"]}
    for sid, r in answers.items():
        devices = r.json()["devices"]
        assert [d["name"] for d in devices] == nodes[jobs[sid][0]], devices
        lab_ids = set()
        for dev in devices:
            m = re.fullmatch(r"clab-ml-(\d+)-" + dev["name"], dev["raw"]["hostname"])
            assert m, dev["raw"]["hostname"]
            lab_ids.add(m.group(1))
            addr = ipaddress.IPv4Address(dev["raw"]["mgmt"]["ipv4"])
            assert addr in ipaddress.IPv4Network(f"192.168.{m.group(1)}.0/24"), (dev["name"], addr)
        assert len(lab_ids) == 1, lab_ids
        ids[sid] = lab_ids.pop()
    assert sorted(ids.values()) == ["1", "2"], ids  # --multilab-ids defaults to 1-2

    # netlab registers both, by id, each in its own work dir under the server's state dir.
    instances = registered_instances(sandbox, tmp_path)
    assert sorted(instances) == ["1", "2"], instances  # and no `default`
    dirs = {Path(instances[n]["dir"]) for n in instances}
    assert len(dirs) == 2, instances
    for sid, n in ids.items():
        work = Path(instances[n]["dir"])
        assert work.is_relative_to(server.work_root.resolve()), work
        assert (work / jobs[sid][0]).read_bytes() == jobs[sid][1]
        assert instances[n]["name"] == f"ml-{n}", instances[n]
    # The configuration steps went to both instances' containers.
    calls = sandbox.shim_calls()
    for n in ("1", "2"):
        assert any(line.startswith(f"docker exec clab-ml-{n}-") for line in calls), calls

    # Each session sees only its own lab.
    for sid, r in answers.items():
        mine = api.get("/lab/devices", session=sid)
        assert mine.status == 200, mine
        assert [d["name"] for d in mine.json()] == nodes[jobs[sid][0]], mine

    # Released and their sessions ended, both labs stay up, idle, for a later job to reuse.
    for sid in (s1, s2):
        assert api.post("/lab/release", session=sid).status == 204
        assert api.delete(f"/session/{sid}").status == 204
    assert sorted(registered_instances(sandbox, tmp_path)) == ["1", "2"]
    assert sandbox.count_calls("containerlab destroy") == 0

    # SIGTERM with --on-exit teardown: both instances are brought down before the exit.
    rc = server.terminate(timeout=120)
    assert rc == 0, f"exit code {rc}\n{server.tail()}"
    assert registered_instances(sandbox, tmp_path) == {}
    assert sandbox.registered() == {}, sandbox.status_file.read_text()
    assert sandbox.count_calls("containerlab destroy") == 2, sandbox.shim_calls()
