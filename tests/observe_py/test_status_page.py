"""The status page in a real browser: Debian's chromium, headless, loads GET / against a
server with a running lab and a queue of three named clients, runs the page's scripts
(a virtual time budget lets the 2 s refresh happen), and the DOM it dumps shows the holder,
the two waiters in order, the devices and the latest event; an attacker's name is text, not
markup. A screenshot is taken in the same run (copied to $NEOPS_SCREENSHOT_OUT when set).

Skipped when chromium is missing, unless $NEOPS_REQUIRE_BROWSER=1 (CI sets it and installs
chromium)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from html.parser import HTMLParser

import pytest

TOPO = "nodes: [r1, r2, spine1]\n"
EVIL = "<img src=x onerror=document.title='pwned'>"


def chromium() -> str:
    for name in ["chromium", "chromium-browser", "google-chrome"]:
        path = shutil.which(name)
        if path:
            return path
    if os.environ.get("NEOPS_REQUIRE_BROWSER") == "1":
        pytest.fail("chromium is not installed (apt-get install -y chromium)", pytrace=False)
    pytest.skip("chromium is not installed")


def run_chromium(args: list[str]) -> subprocess.CompletedProcess:
    profile = tempfile.mkdtemp(prefix="neops-chromium-")
    try:
        return subprocess.run(
            [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={profile}", *args],
            capture_output=True, timeout=120, check=False,
        )
    finally:
        shutil.rmtree(profile, ignore_errors=True)


class Dom(HTMLParser):
    """Collects the text of elements by id and by class, and every tag seen."""

    VOID = {"meta", "link", "br", "img", "input", "hr", "col", "area", "base", "embed", "source", "wbr"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[tuple[str, dict]] = []
        self.open: list[list] = []  # [tag, attrs, text parts]
        self.by_id: dict[str, str] = {}
        self.by_class: dict[str, list[str]] = {}
        self.tags: list[str] = []
        self.body_attrs: dict = {}

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        attrs = dict(attrs)
        if tag == "body":
            self.body_attrs = attrs
        if tag in self.VOID:
            return
        self.open.append([tag, attrs, []])

    def handle_endtag(self, tag):
        while self.open:
            t, attrs, parts = self.open.pop()
            text = "".join(parts)
            if "id" in attrs:
                self.by_id[attrs["id"]] = text
            for cls in (attrs.get("class") or "").split():
                self.by_class.setdefault(cls, []).append(text)
            if self.open:
                self.open[-1][2].append(text)
            if t == tag:
                break

    def handle_data(self, data):
        if self.open:
            self.open[-1][2].append(data)


def test_the_page_in_a_real_browser(server_factory, tmp_path):
    chromium()
    s = server_factory()
    holder = s.session("alice@ci (pipeline 42)")
    status, body = s.acquire(holder, TOPO)
    assert status == 200, body
    bob = s.session("bob-nightly")
    evil = s.session(EVIL)
    latest = s.json("/events?limit=1")["events"][0]
    assert latest["kind"] == "session_created" and latest["client"] == EVIL

    url = s.url + "/"
    dumped = run_chromium(["--virtual-time-budget=5000", "--dump-dom", url])
    assert dumped.returncode == 0, dumped.stderr.decode(errors="replace")[-3000:]
    dom = Dom()
    dom.feed(dumped.stdout.decode())
    # The scripts ran and re-rendered from /queue and /events.
    assert int(dom.body_attrs.get("data-refreshed", "0")) >= 1, dumped.stdout[:2000]
    assert dom.body_attrs.get("data-events-refreshed") == "true"
    assert dom.by_class["holder-name"] == [f"alice@ci (pipeline 42) ({holder[:8]})"]
    assert dom.by_class["client-name"] == ["alice@ci (pipeline 42)", "bob-nightly", EVIL]
    assert dom.by_class["device-name"] == ["r1", "r2", "spine1"]
    # Each device's management address and type, from netlab's data (the fake's).
    assert dom.by_class["device-mgmt"] == ["192.168.121.101", "192.168.121.102", "192.168.121.103"]
    assert dom.by_class["device-type"] == ["frr · fake/frr"] * 3
    assert "UP" in dom.by_id["lab"]
    first_event = dom.by_class["event"][0]
    assert "session_created" in first_event and EVIL in first_event and evil[:8] in first_event
    # The attacker's name is text: no image element, no script run from it.
    assert "img" not in dom.tags
    assert dom.by_id.get("version") == s.json("/queue")["version"]
    for sid in [holder, bob, evil]:
        assert sid not in dumped.stdout.decode()

    shot = tmp_path / "status-page.png"
    taken = run_chromium(["--virtual-time-budget=5000", "--window-size=1280,900", "--hide-scrollbars",
                          f"--screenshot={shot}", url])
    assert taken.returncode == 0, taken.stderr.decode(errors="replace")[-3000:]
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    out = os.environ.get("NEOPS_SCREENSHOT_OUT")
    if out:
        shutil.copyfile(shot, out)
    json.dumps({})  # keep the import honest for future DOM snapshots
