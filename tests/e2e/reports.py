"""The pytest hook that tests/e2e/conftest.py and tests/client/conftest.py both import.

Each test's reports are kept on its item (`rep_setup`, `rep_call`, `rep_teardown`), so that
a fixture's teardown can tell whether the test failed, and print the server's log then.
"""

from __future__ import annotations

import pytest


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    outcome = yield
    rep = outcome.get_result()
    setattr(item, f"rep_{rep.when}", rep)
