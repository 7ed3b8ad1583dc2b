import copy

import pytest
import torch

from deepfusion.config import KnowledgeConfig, ServerConfig
from deepfusion.server import (aggregate, build_server, distill, evaluate, receive, reliability_weights,
                               load_server_state, server_round, server_state, stack_targets)
from deepfusion.wire.knowledge import encode_knowledge

V, P, T = 64, 6, 9
DEVICES = ["a", "b", "c"]


def make_server(method="multiround-views", **cfg):
    proxy = torch.randint(V, (P, T), generator=torch.Generator().manual_seed(0))
    config = ServerConfig(**{"family": "qwen_moe", "size": "tiny", "steps": 2, "batch_size": 2, **cfg})
    return build_server(config, method, V, proxy, DEVICES, 0, torch.device("cpu"), KnowledgeConfig(topk=4))


def packet_for(server, device_id, logits=None, round=1, k=4):
    n = P * (T - 1)
    logits = torch.randn(n, V) if logits is None else logits
    return encode_knowledge(logits, k, 1.0, device_id=device_id, round=round, arch="qwen2/tiny",
                            tokens_trained=100, local_loss=3.0)


def oracle_logits(server, sharpness=8.0):
    """Logits that put most mass on each proxy position's real next token (a device that knows the text)."""
    logits = torch.zeros(P * (T - 1), V)
    logits[torch.arange(P * (T - 1)), server.proxy[:, 1:].flatten()] = sharpness
    return logits


def test_receive_accepts_valid_and_rejects_bad_uploads_with_reasons():
    server = make_server()
    payloads = {
        "a": packet_for(server, "a").to_bytes(),
        "b": b"not a packet",
        "c": packet_for(server, "c", round=5).to_bytes(),
        "intruder": packet_for(server, "intruder").to_bytes(),
    }
    accepted, rejected = receive(server, payloads, round=1)
    assert list(accepted) == ["a"]
    assert set(rejected) == {"b", "c", "intruder"}
    assert "round" in rejected["c"] and "intruder" in rejected["intruder"]


def test_a_packet_sent_under_another_name_is_rejected():
    server = make_server()
    accepted, rejected = receive(server, {"b": packet_for(server, "a").to_bytes()}, round=1)
    assert not accepted and "claims device 'a'" in rejected["b"]


def test_reliability_trusts_the_device_that_explains_the_proxy():
    server = make_server()
    packets = {"a": packet_for(server, "a", oracle_logits(server)), "b": packet_for(server, "b")}
    targets = stack_targets(server, packets)
    w = reliability_weights(server, targets)
    assert w.shape == (2, P)
    torch.testing.assert_close(w.sum(0), torch.ones(P))
    assert (w[0] > 0.9).all()
    torch.testing.assert_close(reliability_weights(server, targets, enabled=False), torch.full((2, P), 0.5))


def test_aggregate_of_identical_devices_is_that_device():
    server = make_server()
    logits = oracle_logits(server, 3.0) + torch.randn(P * (T - 1), V) * 0.1
    packets = {d: packet_for(server, d, logits) for d in ("a", "b")}
    targets = stack_targets(server, packets)
    agg = aggregate(targets, torch.full((2, P), 0.5), V, 4)
    assert agg.ids.shape == (1, P, T - 1, 4)
    torch.testing.assert_close(agg.probs[0], targets.probs[0], atol=2e-3, rtol=0)
    assert torch.equal(agg.ids[0].sort(-1).values, targets.ids[0].sort(-1).values)


@pytest.mark.parametrize("method", ["multiround-views", "device-kd", "plain-fkd", "proxy-only"])
def test_server_round_trains_every_method(method):
    server = make_server(method)
    before = {k: v.clone() for k, v in server.model.state_dict().items()}
    payloads = {d: packet_for(server, d, oracle_logits(server)).to_bytes() for d in DEVICES}
    result = server_round(server, payloads, 1)
    assert all(torch.isfinite(torch.tensor(v)) for v in result["losses"].values())
    changed = [k for k, v in server.model.state_dict().items() if not torch.equal(v, before[k])]
    assert changed
    if method in ("multiround-views", "device-kd"):
        assert result["losses"]["kd"] > 0 and set(result["device_weight"]) == set(DEVICES)
    if method == "multiround-views":
        assert set(result["views"]) == set(DEVICES)


def test_distillation_moves_the_moe_towards_the_devices():
    """With devices that know the proxy text, KD lowers the MoE's proxy loss faster than the KD-free floor."""
    torch.manual_seed(0)
    for method in ("device-kd", "multiround-views"):
        server = make_server(method, lam=1.0, lr=1e-2)
        packets = {d: packet_for(server, d, oracle_logits(server)) for d in DEVICES}
        targets = stack_targets(server, packets)
        weights = reliability_weights(server, targets)
        first = distill(server, targets, weights, 1)["kd"]
        last = distill(server, targets, weights, 30)["kd"]
        assert last < first * 0.8


def test_too_few_valid_packets_skip_distillation():
    server = make_server(min_devices=2)
    before = {k: v.clone() for k, v in server.model.state_dict().items()}
    result = server_round(server, {"a": packet_for(server, "a").to_bytes(), "b": b"junk"}, 1)
    assert result["skipped"] and "b" in result["rejected"]
    assert all(torch.equal(v, before[k]) for k, v in server.model.state_dict().items())


def test_evaluate_reports_per_source_and_token_weighted_domain_ppl():
    server = make_server()
    g = torch.Generator().manual_seed(1)
    sets = {"s1": ("medical", torch.randint(V, (3, T), generator=g)),
            "s2": ("medical", torch.randint(V, (1, T), generator=g)),
            "s3": ("finance", torch.randint(V, (2, T), generator=g))}
    res = evaluate(server.model, sets, torch.device("cpu"))
    assert set(res["ppl"]) == {"medical", "finance"} and set(res["ppl_by_source"]) == {"s1", "s2", "s3"}
    lo, hi = sorted([res["ppl_by_source"]["s1"], res["ppl_by_source"]["s2"]])
    assert lo <= res["ppl"]["medical"] <= hi
    assert 0.5 * V < res["ppl"]["finance"] < 2 * V  # an untrained model is near uniform


def test_server_state_round_trips_to_identical_training():
    a, b = make_server(), make_server()
    payloads = {d: packet_for(a, d, oracle_logits(a)).to_bytes() for d in DEVICES}
    server_round(a, payloads, 1)
    load_server_state(b, copy.deepcopy(server_state(a)))  # as through torch.save / torch.load
    server_round(a, payloads, 1)
    server_round(b, payloads, 1)
    for (name, x), y in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        assert torch.equal(x, y), name
    assert torch.equal(a.views.gate, b.views.gate)


def test_views_final_average_puts_plain_fkds_teacher_on_the_final_head():
    """With views_final = "average" and no weight on the views, multiround-views' loss is plain-fkd's."""
    from deepfusion.server import kd_loss

    df = make_server("multiround-views", views_final="average", views_mix=0.0)
    fkd = make_server("plain-fkd")
    packets = {d: packet_for(df, d) for d in DEVICES}
    targets = stack_targets(df, packets)
    weights = reliability_weights(df, targets)
    single = aggregate(targets, weights, V, 4)
    targets.final = aggregate(targets, weights, V, 4)
    idx = torch.tensor([0, 3])
    out = df.model(input_ids=df.proxy[idx], output_hidden_states=True)
    mixed = kd_loss(df, out, idx, targets, weights)
    alone = kd_loss(fkd, out, idx, single, torch.ones(1, P))
    assert torch.allclose(mixed, alone)
    targets.final = None  # per device again: a different loss
    assert not torch.allclose(kd_loss(df, out, idx, targets, weights), alone)


# ---- devices with their own tokenizer: knowledge only where they align ------------------------------------

def masked(packet, aligned, vocab="own-vocab"):
    """The packet as a device with its own tokenizer sends it: aligned (N,) marks where it carries knowledge."""
    import dataclasses

    import numpy as np

    return dataclasses.replace(packet, aligned=np.asarray(aligned, np.uint8), vocab=vocab)


def test_truth_log_likelihood_averages_over_the_positions_a_device_aligns():
    from deepfusion.server import truth_log_likelihood

    proxy = torch.tensor([[1, 2, 3], [4, 5, 6]])  # next tokens (2, 3), (5, 6)
    ids = torch.tensor([[[[2, 0], [9, 0]], [[5, 0], [6, 0]]]])  # (K=1, P=2, T-1=2, k=2): a miss at (0, 1)
    probs = torch.tensor([[[[0.5, 0.1], [0.5, 0.1]], [[0.8, 0.1], [0.4, 0.1]]]])
    tail = 1 - probs.sum(-1)
    everywhere = truth_log_likelihood(ids, probs, tail, proxy, 10)
    torch.testing.assert_close(truth_log_likelihood(ids, probs, tail, proxy, 10, torch.ones(1, 2, 2, dtype=torch.bool)),
                               everywhere)
    aligned = torch.tensor([[[True, False], [False, False]]])  # block 0: only its hit; block 1: nowhere
    score = truth_log_likelihood(ids, probs, tail, proxy, 10, aligned)
    assert score[0, 0] == pytest.approx(torch.tensor(0.5).log().item()) and score[0, 1] == -torch.inf


def test_aggregate_mixes_the_devices_that_align_a_position_and_teaches_the_truth_where_none_does():
    server = make_server("plain-fkd")
    n = P * (T - 1)
    a, b = packet_for(server, "a"), packet_for(server, "b")
    only_a = torch.arange(n) % 3 == 0
    both = torch.arange(n) % 3 == 1
    packets = {"a": masked(a, only_a | both), "b": masked(b, both)}  # positions % 3 == 2: nobody
    targets = stack_targets(server, packets)
    assert targets.aligned.shape == (2, P, T - 1)
    weights = reliability_weights(server, targets)
    agg = aggregate(targets, weights, V, 4, proxy=server.proxy)
    shared = aggregate(stack_targets(server, {"a": a, "b": b}), weights, V, 4)
    alone = aggregate(stack_targets(server, {"a": a}), torch.ones(1, P), V, 4)
    flat = lambda t: t.flatten(0, 2)  # noqa: E731  (1, P, T-1, ...) -> (N, ...)
    torch.testing.assert_close(flat(agg.probs)[only_a], flat(alone.probs)[only_a], atol=1e-5, rtol=0)
    torch.testing.assert_close(flat(agg.probs)[both], flat(shared.probs)[both], atol=1e-5, rtol=0)
    nobody = ~(only_a | both)
    assert torch.equal(flat(agg.ids)[nobody][:, 0], server.proxy[:, 1:].flatten()[nobody])
    assert (flat(agg.probs)[nobody][:, 0] == 1).all() and (flat(agg.tail)[nobody] == 0).all()


def test_a_device_carries_no_weight_where_it_does_not_align():
    from deepfusion.server import _batch

    server = make_server("device-kd")
    n = P * (T - 1)
    first_half = torch.arange(n) < n // 2
    packets = {"a": masked(packet_for(server, "a"), first_half), "b": packet_for(server, "b")}
    targets = stack_targets(server, packets)
    weights = reliability_weights(server, targets)
    *_, w = _batch(targets, weights, torch.arange(P), torch.device("cpu"))  # (K, N)
    assert (w[0][~first_half] == 0).all() and (w[1][~first_half] == 1).all()
    torch.testing.assert_close(w.sum(0), torch.ones(n))  # each position: a mixture over who aligns it


@pytest.mark.parametrize("method", ["multiround-views", "device-kd", "plain-fkd"])
def test_server_round_trains_on_masked_packets(method):
    server = make_server(method)
    n = P * (T - 1)
    payloads = {d: masked(packet_for(server, d, oracle_logits(server)), torch.arange(n) % (i + 2) == 0).to_bytes()
                for i, d in enumerate(DEVICES)}
    result = server_round(server, payloads, 1)
    assert result["accepted"] == DEVICES and all(torch.isfinite(torch.tensor(v)) for v in result["losses"].values())


def test_a_device_keeps_its_vocabulary_across_rounds():
    server = make_server()
    n = P * (T - 1)
    mask = torch.ones(n)
    first = {"a": masked(packet_for(server, "a"), mask, "vocab-1").to_bytes(), "b": packet_for(server, "b").to_bytes()}
    assert set(receive(server, first, 1)[0]) == {"a", "b"}
    again = {"a": masked(packet_for(server, "a", round=2), mask, "vocab-1").to_bytes(),
             "b": masked(packet_for(server, "b", round=2), mask, "vocab-2").to_bytes()}
    accepted, rejected = receive(server, again, 2)
    assert list(accepted) == ["a"] and "earlier packets spoke None" in rejected["b"]
    switched = {"a": masked(packet_for(server, "a", round=3), mask, "vocab-3").to_bytes()}
    assert "vocab 'vocab-3', but its earlier packets spoke 'vocab-1'" in receive(server, switched, 3)[1]["a"]
    restored = make_server()
    load_server_state(restored, copy.deepcopy(server_state(server)))  # a resumed server remembers
    assert restored.vocabs == {"a": "vocab-1", "b": None}
