"""The neops-remote-lab 1.4.0 Python client and pytest fixture, unchanged, against our server.

Each test runs the user-style project in user_project/ (its own conftest declares the lab
fixtures with remote_lab_fixture) in separate pytest processes, as CI jobs would.
"""

from __future__ import annotations

import re

import pytest

from client_harness import HealthWatcher, Lab
from labserver import Client, wait_until

pytestmark = pytest.mark.usefixtures("dump_on_failure")


def passed(output: str, n: int) -> bool:
    return re.search(rf"\b{n} passed\b", output) is not None and " failed" not in output.splitlines()[-1]


def test_shared_lab_then_another_topology(lab: Lab) -> None:
    """Two tests share the OSPF lab (reuse_lab=True): one `netlab up`; then a test on another
    topology: the server switches labs."""
    deploys = lab.sandbox.count_calls("containerlab deploy")
    destroys = lab.sandbox.count_calls("containerlab destroy")

    rc, out = lab.user_pytest("test_ospf_lab.py", "test_pair_lab.py", name="shared").wait()
    assert rc == 0, out
    assert passed(out, 3), out
    # one deploy for the two OSPF tests, one for the pair
    assert lab.sandbox.count_calls("containerlab deploy") - deploys == 2
    assert lab.sandbox.count_calls("containerlab destroy") - destroys >= 1
    # the plugin ordered the tests by fixture, the OSPF ones first
    order = re.findall(r"^(test_\w+\.py::test_\w+) ", out, re.M)
    assert [o.split("::")[1] for o in order[:3]] == [
        "test_routers_and_host",
        "test_management_addresses",
        "test_pair_of_routers",
    ], order


def test_two_jobs_at_once_queue_up(lab: Lab) -> None:
    """Two CI jobs start together: the second one waits in the queue until the first ends
    its session, then gets the lab."""
    first = lab.user_pytest("test_ospf_lab.py", name="first")
    # let the first job take the head of the queue before the second arrives
    wait_until(lambda: lab.api.get("/active-session").status == 200, timeout=60, what="the first job's session")
    with HealthWatcher(lab.api) as watch:
        second = lab.user_pytest("test_pair_lab.py", name="second")
        rc1, out1 = first.wait()
        rc2, out2 = second.wait()
    assert rc1 == 0, out1
    assert rc2 == 0, out2
    assert passed(out1, 2), out1
    assert passed(out2, 1), out2
    assert watch.max_queue >= 2, "the second job never waited behind the first"
    assert "in queue at position 1" in out2, out2
    # the first job closed its session at exit; nothing is left in the queue
    wait_until(lambda: lab.api.get("/active-session").status == 404, timeout=30, what="an empty queue")


def test_remote_lab_client_directly(lab: Lab) -> None:
    """RemoteLabClient without the fixtures: acquire, reacquire, release, destroy, close."""
    deploys = lab.sandbox.count_calls("containerlab deploy")
    rc, out = lab.user_pytest("test_direct_client.py", name="direct").wait()
    assert rc == 0, out
    assert passed(out, 1), out
    assert lab.sandbox.count_calls("containerlab deploy") - deploys == 1  # the reacquire reused it
    # destroy() tore the lab down (asynchronously), close() ended the session
    wait_until(lambda: not lab.sandbox.default_registered(), timeout=30, what="the destroyed lab to be gone")
    assert lab.api.get("/active-session").status == 404
    assert "Failed to" not in out, out  # the client logs, never raises, on release/destroy errors


def test_tokens_come_from_netrc_and_are_needed(lab: Lab) -> None:
    """With --token-file (NEOPS_TEST_TOKENS=1): the sessions above were created under the
    token's name, which the client sent from $NETRC by itself; without the netrc entry the
    unchanged client is refused with 401 and its tests fail."""
    if lab.netrc is None:
        pytest.skip("the server runs without tokens (NEOPS_TEST_TOKENS is not 1)")
    assert any('created by "ci"' in line for line in lab.server.lines), lab.server.tail()
    anonymous = Client(lab.server.url)
    assert anonymous.get("/active-session").status == 401
    rc, out = lab.user_pytest("test_pair_lab.py", name="no-token", netrc=False).wait()
    assert rc != 0, out
    assert "401" in out, out


def test_server_shutdown_leaves_no_lab(lab: Lab) -> None:
    """Last: bring a lab up with the fixture, then SIGTERM the server; netlab's registry is empty."""
    rc, out = lab.user_pytest("test_pair_lab.py", name="last").wait()
    assert rc == 0, out
    # The job has ended its session (the lab stays up, idle, for the next one).
    wait_until(lambda: lab.api.get("/active-session").status == 404, timeout=30, what="an empty queue")
    code = lab.server.terminate(timeout=60)
    assert code == 0, lab.server.tail()
    assert not lab.sandbox.default_registered()
