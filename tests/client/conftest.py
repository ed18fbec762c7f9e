"""Harness for the client suite: one server (real netlab, container layer shimmed) for the
whole suite, and a helper that runs the user-style project in user_project/ with the
neops-remote-lab 1.4.0 pytest plugin, REMOTE_LAB_URL pointing at that server.

user_project/ is not collected by this (outer) pytest run: it is what a user of the Python
package would write, and runs in pytest processes of its own.
"""

from __future__ import annotations

import os
import secrets
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "e2e"))

from client_harness import Lab, find_venv_python  # noqa: E402
from labserver import Client, HarnessError, Sandbox, ServerProcess, find_netlab, rust_binary, server_kind  # noqa: E402
from reports import pytest_runtest_makereport  # noqa: E402, F401 (a hook: rep_call for dump_on_failure)

collect_ignore = ["user_project"]


def tokens_mode() -> bool:
    """NEOPS_TEST_TOKENS=1: the server runs with --token-file and the unchanged client finds
    its token in a netrc file (NETRC), as requests does by itself."""
    return os.environ.get("NEOPS_TEST_TOKENS") == "1"


def pytest_report_header(config: pytest.Config) -> str:
    mode = "with access tokens (netrc)" if tokens_mode() else "open"
    return f"neops-remote-lab client suite: server kind = {server_kind()}, {mode}"


@pytest.fixture(scope="session")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    try:
        netlab = find_netlab()
        if server_kind() == "rust":
            rust_binary()
        python = find_venv_python()
        sandbox = Sandbox(tmp_path_factory.mktemp("client") / "sb", netlab)
        extra_args: list[str] = []
        netrc = None
        authorization = None
        if tokens_mode():
            token = secrets.token_urlsafe(32)
            tokens = sandbox.root / "tokens"
            tokens.write_text(f"ci:{token}\nops:{secrets.token_urlsafe(32)}:admin\n")
            tokens.chmod(0o600)
            netrc = sandbox.root / "netrc"
            netrc.write_text(f"machine 127.0.0.1\nlogin ci\npassword {token}\n")
            netrc.chmod(0o600)
            extra_args = ["--token-file", str(tokens)]
            authorization = f"Bearer {token}"
        server = ServerProcess(sandbox, extra_args=extra_args).start()
    except HarnessError as exc:
        problem = str(exc)
    else:
        problem = ""
    if problem:
        pytest.fail(problem, pytrace=False)
    lab = Lab(
        server=server,
        sandbox=sandbox,
        api=Client(server.url, authorization=authorization),
        python=python,
        netrc=netrc,
    )
    try:
        yield lab
    finally:
        server.close()


@pytest.fixture
def dump_on_failure(request: pytest.FixtureRequest, lab: Lab) -> Iterator[None]:
    start = len(lab.runs)
    yield
    rep = getattr(request.node, "rep_call", None)
    if rep is not None and rep.failed:
        for path in lab.runs[start:]:
            print(f"\n----- {path.name} -----\n{path.read_text()[-6000:]}")
        print(f"\n----- server log tail -----\n{lab.server.tail(60)}")
