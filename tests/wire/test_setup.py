"""The setup: the federation's public parts, once to every node; canonical bytes, refused from another version."""

import dataclasses

import pytest
import torch

from deepfusion import __version__
from deepfusion.config import default_config_path, load_config
from deepfusion.wire import PacketError
from deepfusion.wire.setup import Setup


def setup_of(version: str = __version__) -> Setup:
    cfg = load_config(default_config_path("smoke-multiround"))
    return Setup(cfg, {"tokenizer.json": '{"version": "1.0"}', "tokenizer_config.json": "{}"},
                 torch.randint(512, (4, 32)))


def test_setup_round_trips_and_packs_token_ids_narrowly():
    setup = setup_of()
    data = setup.to_bytes()
    back = Setup.from_bytes(data)
    assert dataclasses.asdict(back.config) == dataclasses.asdict(setup.config)
    assert back.tokenizer_files == setup.tokenizer_files and torch.equal(back.proxy, setup.proxy)
    assert len(data) < 4 * 32 * 2 + 4096  # uint16 ids (vocab 512) + config and tokenizer metadata


def test_setup_from_another_deepfusion_version_is_refused_with_what_to_do(monkeypatch):
    import deepfusion.wire.setup

    data = setup_of().to_bytes()
    monkeypatch.setattr(deepfusion.wire.setup, "__version__", "9.9.9")
    with pytest.raises(ValueError, match=f"server runs deepfusion {__version__}, this node 9.9.9.*install"):
        Setup.from_bytes(data)
    with pytest.raises(ValueError, match="malformed setup"):
        Setup.from_bytes(b"not a setup")


def test_equal_setups_are_equal_bytes_whatever_the_order_of_their_files():
    """Setup was the one message whose header followed safetensors' hash-map order; now every message is canonical."""
    a = setup_of()
    b = dataclasses.replace(a, tokenizer_files=dict(reversed(list(a.tokenizer_files.items()))))
    blobs = {a.to_bytes() for _ in range(10)} | {b.to_bytes()}
    assert len(blobs) == 1


def test_the_moe_architecture_travels_and_its_absence_is_refused_where_needed():
    setup = dataclasses.replace(setup_of(), moe='{"model_type": "qwen2_moe", "experts_implementation": "eager"}')
    back = Setup.from_bytes(setup.to_bytes())
    assert back.moe == setup.moe and back.global_config().model_type == "qwen2_moe"
    assert back.global_config()._experts_implementation == "eager"
    with pytest.raises(ValueError, match="carries no MoE architecture"):
        Setup.from_bytes(setup_of().to_bytes()).global_config()


@pytest.mark.parametrize("blob", [b"", b"\x00" * 16, setup_of().to_bytes()[:-5], setup_of().to_bytes()[:100]])
def test_damaged_bytes_are_a_packet_error(blob):
    with pytest.raises(PacketError, match="malformed setup"):
        Setup.from_bytes(blob)
