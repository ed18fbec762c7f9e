"""Fixtures for the end-to-end suite: the server under test driving the REAL netlab.

Nothing here skips: when netlab or the server binary is missing, every test fails with a
message saying what to install or build.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from labserver import Client, HarnessError, Sandbox, ServerProcess, find_netlab, rust_binary, server_kind  # noqa: E402
from reports import pytest_runtest_makereport  # noqa: E402, F401 (a hook: rep_call for start_server)

TOPOLOGIES = Path(__file__).resolve().parent / "topologies"


def pytest_report_header(config: pytest.Config) -> str:
    return f"neops-remote-lab e2e: server kind = {server_kind()}"


@pytest.fixture(scope="session")
def netlab_bin() -> Path:
    try:
        path = find_netlab()
        if server_kind() == "rust":
            rust_binary()
    except HarnessError as exc:
        problem = str(exc)
    else:
        return path
    pytest.fail(problem, pytrace=False)


@pytest.fixture
def sandbox(tmp_path: Path, netlab_bin: Path) -> Sandbox:
    return Sandbox(tmp_path / "sb", netlab_bin)


@pytest.fixture
def start_server(request: pytest.FixtureRequest, sandbox: Sandbox) -> Iterator[Callable[..., ServerProcess]]:
    """Factory: start_server(**kw) boots a server in the test's sandbox. Stopped at teardown;
    on failure the server's log tail and the shim log are printed."""
    servers: list[ServerProcess] = []

    def start(**kw: object) -> ServerProcess:
        try:
            srv = ServerProcess(sandbox, **kw).start()  # type: ignore[arg-type]
        except HarnessError as exc:
            problem = str(exc)
        else:
            servers.append(srv)
            return srv
        pytest.fail(problem, pytrace=False)

    yield start
    for srv in servers:
        srv.close()
    rep = getattr(request.node, "rep_call", None)
    if rep is not None and rep.failed:
        for srv in servers:
            print(f"\n----- server log tail ({srv.kind}, {srv.log_path}) -----\n{srv.tail(80)}")
        print(f"\n----- shim log ({sandbox.log}) -----\n" + "\n".join(sandbox.shim_calls()[-60:]))


@pytest.fixture
def server(start_server: Callable[..., ServerProcess]) -> ServerProcess:
    return start_server()


@pytest.fixture
def api(server: ServerProcess) -> Client:
    return Client(server.url)


@pytest.fixture
def topo() -> Callable[[str], bytes]:
    def read(name: str) -> bytes:
        return (TOPOLOGIES / name).read_bytes()

    return read
