"""Two tests sharing one OSPF lab."""

import ipaddress


def test_routers_and_host(ospf_lab):
    assert [d.name for d in ospf_lab] == ["r1", "r2", "h1"]
    boxes = {d.name: d.raw["box"] for d in ospf_lab}
    assert boxes["r1"].startswith("quay.io/frrouting/frr")
    assert boxes["h1"] != boxes["r1"]


def test_management_addresses(ospf_lab):
    for device in ospf_lab:
        assert device.raw["hostname"] == f"clab-userlab-{device.name}"
        ipaddress.IPv4Address(device.raw["mgmt"]["ipv4"])
    r1 = next(d for d in ospf_lab if d.name == "r1")
    assert "ospf" in r1.raw["module"]
