"""The paper's protocol on Flower's simulation: one train message per device, the same exported weights as the
local engine."""

import hashlib
import json

import pytest

from deepfusion.cli import main
from deepfusion.config import default_config_path

pytestmark = pytest.mark.slow


def test_flower_and_local_export_identical_weights(tmp_path, data_dir, smoke_deepfusion):
    """The local engine's run is the suite's shared one of configs/smoke.toml (tests/conftest.py)."""
    outs = {"local": smoke_deepfusion.out, "flower": tmp_path / "flower"}
    assert main(["run", "--engine", "flower", "--config", str(default_config_path("smoke")), "--data-dir",
                 str(data_dir), "--out", str(outs["flower"]), "--no-progress"]) == 0
    digest = {e: hashlib.sha256((o / "model" / "model.safetensors").read_bytes()).hexdigest() for e, o in outs.items()}
    assert digest["local"] == digest["flower"]
    for upload in (outs["local"] / "checkpoint" / "uploads").iterdir():  # every device sent the same bytes
        assert upload.read_bytes() == (outs["flower"] / "checkpoint" / "uploads" / upload.name).read_bytes()
    local, flower = (json.loads((o / "summary.json").read_text()) for o in outs.values())
    assert flower["engine"] == "flower" and flower["ppl"] == local["ppl"] and flower["clustering"] == local["clustering"]
    # the payload is the local engine's bytes; Flower's message bytes are counted beside it
    assert flower["comm_bytes"]["up"] == local["comm_bytes"]["up"]
    per_device = flower["flower_comm_bytes"]["per_device"]
    assert all(entry["rounds"][0]["up_message"] > entry["rounds"][0]["up"] > 0 for entry in per_device.values())
