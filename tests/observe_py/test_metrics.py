"""GET /metrics after a scripted scenario, parsed with prometheus_client's text parser (a
real Prometheus exposition parser, not string matching): three sessions, a start, a reuse,
a topology netlab rejects (422), a client name refused (422), a reaped session."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from conftest import wait_until

TOPO = "nodes: [r1, r2]\n"


def scrape(server) -> dict:
    status, headers, body = server.request("GET", "/metrics")
    assert status == 200
    assert headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
    families = {f.name: f for f in text_string_to_metric_families(body.decode())}
    return families


def value(families: dict, family: str, sample: str | None = None, **labels: str) -> float:
    fam = families[family]
    name = sample or family
    found = [s.value for s in fam.samples if s.name == name and s.labels == labels]
    assert len(found) == 1, (family, name, labels, [(s.name, s.labels) for s in fam.samples])
    return found[0]


def test_metrics_after_a_scripted_scenario(server_factory):
    s = server_factory("--active-timeout", "2")
    a = s.session("job-a")
    b = s.session("job-b")
    c = s.session()
    status, body = s.acquire(a, "nodes: [r1]\nfake: reject\n")
    assert status == 422, body
    assert s.acquire(a, TOPO)[0] == 200
    assert s.acquire(a, TOPO)[0] == 200  # reuse
    assert s.request("POST", "/session", {"X-Client-Name": "x" * 201}, b"")[0] == 422
    # a goes silent and is reaped (holding two references: its lab is torn down); b and c
    # keep polling.
    def a_reaped() -> bool:
        assert s.heartbeat(b) == 204 and s.heartbeat(c) == 204
        q = s.json("/queue")
        return q["total"] == 2 and q["teardowns_pending"] == 0 and q["operation"] is None
    wait_until("a reaped and its lab torn down", a_reaped)

    f = scrape(s)
    p = "neops_remote_lab_"
    assert value(f, p + "sessions", status="active") == 1
    assert value(f, p + "sessions", status="waiting") == 1
    assert value(f, p + "lab_up") == 0
    assert value(f, p + "lab_references") == 0
    assert value(f, p + "lab_start_in_progress") == 0
    assert value(f, p + "active_timeout_seconds") == 2
    assert value(f, p + "waiting_timeout_seconds") == 600
    q = s.json("/queue")
    # b is active since a was reaped; c has waited since its creation.
    assert 0 <= value(f, p + "active_session_seconds") <= q["time"] - q["sessions"][0]["active_since"] + 1
    assert value(f, p + "oldest_waiting_seconds") >= 2  # c waited out a's active timeout
    assert f[p + "sessions_created"].type == "counter"
    assert value(f, p + "sessions_created", p + "sessions_created_total") == 3
    ended = {r: value(f, p + "sessions_ended", p + "sessions_ended_total", reason=r)
             for r in ["deleted", "reaped_active", "reaped_waiting", "refused"]}
    assert ended == {"deleted": 0, "reaped_active": 1, "reaped_waiting": 0, "refused": 0}
    outcomes = {o: value(f, p + "lab_acquisitions", p + "lab_acquisitions_total", outcome=o)
                for o in ["started", "reused", "rejected", "conflict", "failed", "timeout", "busy", "cancelled"]}
    assert outcomes == {"started": 1, "reused": 1, "rejected": 1, "conflict": 0, "failed": 0,
                        "timeout": 0, "busy": 0, "cancelled": 0}
    cmds = p + "netlab_commands"
    assert value(f, cmds, cmds + "_total", command="up", result="success") == 1
    assert value(f, cmds, cmds + "_total", command="up", result="failure") == 1
    # The teardown of the reaped session's lab (the start's clean-ups are --instance ones).
    assert value(f, cmds, cmds + "_total", command="down", result="success") >= 1
    http = p + "http_requests"
    assert value(f, http, http + "_total", route="/session", code="2xx") == 3
    assert value(f, http, http + "_total", route="/session", code="4xx") == 1
    assert value(f, http, http + "_total", route="/lab", code="2xx") == 2
    assert value(f, http, http + "_total", route="/lab", code="4xx") == 1
    assert value(f, http, http + "_total", route="/session/heartbeat", code="2xx") >= 2
    assert value(f, p + "state_file_writes", p + "state_file_writes_total", result="ok") >= 5
    assert value(f, p + "state_file_writes", p + "state_file_writes_total", result="error") == 0

    # Histograms: a was active at once, b was promoted when a was reaped (2 waits); one hold.
    hist = p + "queue_wait_seconds"
    assert f[hist].type == "histogram"
    assert value(f, hist, hist + "_count") == 2
    assert value(f, hist, hist + "_bucket", le="+Inf") == 2
    hold = p + "lab_hold_seconds"
    assert value(f, hold, hold + "_count") == 1
    assert value(f, hold, hold + "_sum") >= 2.0  # held at least the active timeout
    acq = p + "lab_acquire_duration_seconds"
    for outcome, n in [("started", 1), ("reused", 1), ("rejected", 1), ("failed", 0)]:
        assert value(f, acq, acq + "_count", outcome=outcome) == n
    dur = p + "netlab_command_duration_seconds"
    assert value(f, dur, dur + "_count", command="up") == 2
    buckets = [sm for sm in f[dur].samples if sm.name == dur + "_bucket" and sm.labels["command"] == "up"]
    counts = [sm.value for sm in buckets]
    assert counts == sorted(counts) and counts[-1] == 2
    assert value(f, p + "state_file_write_duration_seconds", p + "state_file_write_duration_seconds_count") >= 5

    assert value(f, p + "build_info", version=s.json("/queue")["version"]) == 1
    assert value(f, "process_resident_memory_bytes") > 1_000_000
    assert value(f, "process_open_fds") >= 3
    assert value(f, "process_threads") >= 4
    assert value(f, "process_cpu_seconds", "process_cpu_seconds_total") > 0
    assert value(f, "process_start_time_seconds") > 1.7e9
    # Every sample name carries the prefix or is a standard process metric.
    for fam in f.values():
        assert fam.name.startswith(p) or fam.name.startswith("process_"), fam.name
