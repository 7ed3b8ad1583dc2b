"""One poisoned device of six: reliability weighting must keep it from moving what the MoE is taught.

Six devices that know the proxy text (their logits favour each position's real next token), one of them
replaced by an adversarial upload (`device.poison`: well-formed, so validation cannot catch it). The measure
is what the federation teaches: the probability the weighted teacher (`server.aggregate`, plain-fkd's
teacher; the per-device methods weight each device's KL the same way) gives the real next token. The
end-to-end perplexity damage is measured by `deepfusion bench poison` (docs/RELIABILITY.md).
"""

import pytest
import torch

from deepfusion.config import ATTACKS, KnowledgeConfig, ServerConfig
from deepfusion.device import poison
from deepfusion.server import aggregate, build_server, reliability_weights, stack_targets
from deepfusion.wire.knowledge import encode_knowledge

V, P, T, K = 64, 8, 17, 8
DEVICES = [f"d{i}" for i in range(6)]
SERVER = build_server(ServerConfig(family="qwen_moe", size="tiny"), "device-kd", V,
                      torch.randint(V, (P, T), generator=torch.Generator().manual_seed(0)), DEVICES, 0,
                      torch.device("cpu"), KnowledgeConfig(topk=K))


def honest_packets():
    g = torch.Generator().manual_seed(1)
    packets = {}
    for d in DEVICES:
        logits = torch.randn(P * (T - 1), V, generator=g)  # (N, V) a device that knows the text, imperfectly
        logits[torch.arange(P * (T - 1)), SERVER.proxy[:, 1:].flatten()] += 2.5
        packets[d] = encode_knowledge(logits, K, 1.0, device_id=d, round=1, arch="qwen2/tiny", tokens_trained=0,
                                      local_loss=1.0)
    return packets


def p_truth(targets) -> float:
    """Mean probability the (aggregated) teacher gives each proxy position's real next token."""
    truth = SERVER.proxy[:, 1:].unsqueeze(0).unsqueeze(-1)  # (1, P, T-1, 1)
    hit = targets.ids == truth
    return torch.where(hit.any(-1), (targets.probs * hit).sum(-1), targets.tail / (V - K)).mean().item()


def teacher(packets, reliability: bool):
    targets = stack_targets(SERVER, packets)
    weights = reliability_weights(SERVER, targets, reliability)
    return aggregate(targets, weights, V, K), weights


@pytest.mark.parametrize("attack", ATTACKS)
def test_reliability_weighting_bounds_what_one_poisoned_device_of_six_does(attack):
    packets = honest_packets()
    clean = p_truth(teacher({d: p for d, p in packets.items() if d != "d0"}, True)[0])
    packets["d0"] = poison(packets["d0"], attack, torch.Generator().manual_seed(2))
    weighted, w = teacher(packets, True)
    plain, _ = teacher(packets, False)
    damage_weighted = 1 - p_truth(weighted) / clean
    damage_plain = 1 - p_truth(plain) / clean
    assert damage_plain > 0.10  # the attack matters when every device counts the same ...
    assert damage_weighted < 0.06 and damage_weighted < 0.4 * damage_plain  # ... and little with weighting
    assert w[0].mean() < 0.5 / len(DEVICES)  # the poisoned device earns under half an honest share
