import pytest
import torch

from deepfusion.config import DeviceConfig
from deepfusion.errors import ConfigError
from deepfusion.device import build_device, choose_size, evaluate_device, local_train, measure_train_peak, run_round
from deepfusion.wire.instruction import Instruction
from deepfusion.wire.knowledge import KnowledgePacket

V, T = 120, 12


def make_device(family="qwen2", size="tiny", seed=0):
    g = torch.Generator().manual_seed(seed)
    private = torch.randint(V, (32, T), generator=g)
    proxy = torch.randint(V, (6, T), generator=g)
    cfg = DeviceConfig(id="dev", source="medquad:cdc", family=family, size=size, lr=1e-2)
    return build_device(cfg, size, V, private, proxy, seed, torch.device("cpu"))


def instruction(r=1, indices=(0, 1, 2, 3, 4, 5)):
    return Instruction(round=r, proxy_indices=list(indices), local_steps=3, batch_size=4, lr=1e-2, topk=5,
                       temperature=2.0)


def test_round_trains_and_labels_every_requested_position():
    device = make_device()
    packet = run_round(device, instruction(indices=(4, 1)))
    assert packet.n_positions == 2 * (T - 1) and packet.k == 5
    assert (packet.device_id, packet.round, packet.arch, packet.temperature) == ("dev", 1, "qwen2/tiny", 2.0)
    assert packet.tokens_trained == 3 * 4 * T
    assert KnowledgePacket.from_bytes(packet.to_bytes()) == packet
    assert device.peak_mem_bytes > sum(p.numel() * 4 for p in device.model.parameters())


def test_model_persists_and_learns_across_rounds():
    device = make_device("llama")
    before = evaluate_device(device, device.private[:8])
    first = device.model
    for r in (1, 2, 3):
        run_round(device, Instruction(r, [0], 10, 8, 1e-2, 3, 1.0))
    assert device.model is first and device.tokens_trained == 3 * 10 * 8 * T
    assert evaluate_device(device, device.private[:8]) < before  # it trained on its private blocks


def test_same_seed_same_packet():
    a = run_round(make_device(seed=3), instruction()).to_bytes()
    b = run_round(make_device(seed=3), instruction()).to_bytes()
    assert a == b


def test_peak_memory_grows_with_batch():
    device = make_device("qwen2", "small")
    assert measure_train_peak(device, 8) > measure_train_peak(device, 1)


def test_auto_size_picks_the_largest_preset_that_fits():
    base = dict(id="d", source="x", family="qwen2", size="auto", batch_size=2)  # size auto needs memory_mb to build
    big = choose_size(DeviceConfig(**{**base, "memory_mb": 4096}), V, T, torch.device("cpu"))
    small = choose_size(DeviceConfig(**{**base, "memory_mb": 1}), V, T, torch.device("cpu"))
    assert big == "base" and small == "tiny"
    with pytest.raises(ConfigError, match="memory_mb = 1 fits no qwen2 preset"):  # a 20k vocab alone needs more
        choose_size(DeviceConfig(**{**base, "memory_mb": 1}), 20000, T, torch.device("cpu"))


@pytest.mark.parametrize("attack", ["uniform", "shifted", "inverted"])
def test_poisoned_packets_are_well_formed_but_wrong(attack):
    from deepfusion.device import label_proxy, poison
    from deepfusion.wire.knowledge import validate_packet

    device = make_device()
    honest = label_proxy(device, [0, 1], 5, 1.0, 1, 0.0)
    bad = poison(honest, attack, torch.Generator().manual_seed(0))
    validate_packet(bad, round=1, known_devices={"dev"}, n_positions=2 * (T - 1), vocab_size=V, topk=5)
    assert not (bad.ids == honest.ids).all() or not (bad.probs == honest.probs).all()
