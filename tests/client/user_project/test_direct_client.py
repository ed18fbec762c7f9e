"""RemoteLabClient used directly, without the fixtures. Run it in a pytest process of its
own: a second client waits in the queue behind the fixtures' client of the same process."""

import os
from pathlib import Path

from neops_remote_lab.client import RemoteLabClient

TOPOLOGY = Path(__file__).parent / "topologies" / "pair.yml"


def test_acquire_release_destroy_close():
    client = RemoteLabClient(
        os.environ["REMOTE_LAB_URL"],
        request_timeout=int(os.environ.get("REMOTE_LAB_REQUEST_TIMEOUT", "30")),
        session_timeout=int(os.environ.get("REMOTE_LAB_SESSION_TIMEOUT", "600")),
        lab_acquisition_timeout=int(os.environ.get("REMOTE_LAB_ACQUISITION_TIMEOUT", "600")),
    )
    try:
        assert client.session_id
        devices = client.acquire(TOPOLOGY, reuse=False)
        assert [d.name for d in devices] == ["a1", "a2"]

        again = client.acquire(TOPOLOGY, reuse=True)
        assert [d.name for d in again] == ["a1", "a2"]

        client.release()
        client.release()
        client.destroy(force=True)
        # destroying again (no lab any more) is harmless
        client.destroy(force=True)
    finally:
        client.close()
    assert client.session_id == ""
    client.close()  # closing twice is harmless
