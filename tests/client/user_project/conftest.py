"""Lab fixtures, declared the way users of neops-remote-lab declare them."""

from pathlib import Path

from neops_remote_lab.testing.fixture import remote_lab_fixture

TOPOLOGIES = Path(__file__).parent / "topologies"

# Tests using ospf_lab share one running lab (reuse_lab=True).
ospf_lab = remote_lab_fixture(TOPOLOGIES / "ospf.yml", name="ospf_lab", reuse_lab=True)

# pair_lab asks for a lab of its own.
pair_lab = remote_lab_fixture(TOPOLOGIES / "pair.yml", name="pair_lab")
