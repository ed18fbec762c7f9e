"""A test on another topology: the server switches labs."""


def test_pair_of_routers(pair_lab):
    assert [d.name for d in pair_lab] == ["a1", "a2"]
    assert all(d.raw["hostname"] == f"clab-userpair-{d.name}" for d in pair_lab)
    assert all("isis" in d.raw["module"] for d in pair_lab)
