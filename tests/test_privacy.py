"""Differential privacy on uploads: the mechanism's properties, its accountant, and a device that uses it."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from deepfusion import privacy
from deepfusion.wire.knowledge import encode_knowledge, validate_packet

FAST = settings(max_examples=40, deadline=None)


def distributions(n, v, seed, sharpness=3.0):
    return torch.softmax(torch.randn(n, v, generator=torch.Generator().manual_seed(seed)) * sharpness, -1)


# ---- the mechanism ---------------------------------------------------------------------------------

@FAST
@given(n=st.integers(1, 8), v=st.integers(2, 50), seed=st.integers(0, 10**6), clip=st.floats(0.01, 2.0),
       sharpness=st.floats(0.0, 20.0))
def test_clipped_rows_lie_in_the_ball_and_small_rows_are_untouched(n, v, seed, clip, sharpness):
    p = distributions(n, v, seed, sharpness)
    c = privacy.clip_rows(p, clip)
    assert (c.norm(dim=-1) <= clip * (1 + 1e-5)).all()
    inside = p.norm(dim=-1) <= clip
    torch.testing.assert_close(c[inside], p[inside])
    torch.testing.assert_close(privacy.clip_rows(p, 1.0), p)  # ||p||_2 <= ||p||_1 = 1: C = 1 never clips


@FAST
@given(n=st.integers(1, 8), v=st.integers(2, 50), seeds=st.tuples(st.integers(0, 10**6), st.integers(0, 10**6)),
       clip=st.floats(0.01, 2.0), sharp=st.tuples(st.floats(0.0, 30.0), st.floats(0.0, 30.0)))
def test_replacing_a_dataset_moves_an_upload_by_at_most_the_stated_sensitivity(n, v, seeds, clip, sharp):
    """Any two devices' clipped uploads differ by <= C sqrt(2N): the Δ the accountant assumes."""
    a = privacy.clip_rows(distributions(n, v, seeds[0], sharp[0]), clip)
    b = privacy.clip_rows(distributions(n, v, seeds[1], sharp[1]), clip)
    assert (a - b).norm() <= privacy.sensitivity(n, clip) * (1 + 1e-5)
    one_hot = torch.eye(v)[:2] * clip  # the bound is tight: disjoint one-hot rows at the ball's edge
    assert math.isclose((one_hot[0] - one_hot[1]).norm().item(), privacy.sensitivity(1, clip), rel_tol=1e-5)


def test_noise_has_the_stated_scale_on_every_entry():
    p = distributions(64, 500, 0)
    clip, sigma = 0.5, 0.8
    noise = privacy.gaussian_mechanism(p, clip, sigma, torch.Generator().manual_seed(0)) - privacy.clip_rows(p, clip)
    assert abs(noise.mean().item()) < 0.01
    assert noise.std().item() == pytest.approx(sigma * clip, rel=0.01)
    assert (noise != 0).float().mean() > 0.999  # every vocabulary entry, not just the top-k


def test_without_noise_the_mechanism_is_the_plain_top_k():
    logits = torch.randn(30, 40, generator=torch.Generator().manual_seed(1)) * 3
    ids, probs, tail = privacy.privatize(logits, 5, 1.5, 1.0, 0.0, torch.Generator())
    plain = encode_knowledge(logits, 5, 1.5, device_id="d", round=1, arch="a", tokens_trained=0, local_loss=0.0)
    assert (ids.numpy() == plain.ids).all()
    torch.testing.assert_close(probs, torch.from_numpy(plain.probs).float(), atol=1e-3, rtol=0)
    torch.testing.assert_close(tail, torch.from_numpy(plain.tail).float(), atol=1e-3, rtol=0)


@FAST
@given(sigma=st.sampled_from([0.0, 1e-3, 0.05, 0.5, 5.0, 1e3]), clip=st.sampled_from([0.05, 0.3, 1.0, 3.0]),
       temperature=st.sampled_from([0.5, 1.0, 2.0]), k=st.integers(1, 8), seed=st.integers(0, 100))
def test_a_private_packet_is_always_a_valid_packet(sigma, clip, temperature, k, seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(24, 64, generator=g) * 4
    packet = privacy.encode_private(logits, k, temperature, clip=clip, noise_multiplier=sigma, generator=g,
                                    device_id="d", round=2, arch="qwen2/tiny", tokens_trained=7)
    validate_packet(packet, round=2, known_devices={"d"}, n_positions=24, vocab_size=64, topk=8)
    assert packet.local_loss == privacy.WITHHELD_LOSS  # the real loss is a function of the private data


def test_at_high_noise_a_packet_says_it_does_not_know():
    """No prediction clears the noise floor: the mass goes to the tail instead of onto random ids."""
    logits = torch.randn(200, 512, generator=torch.Generator().manual_seed(0)) * 3
    _, probs, tail = privacy.privatize(logits, 8, 1.0, 1.0, 10.0, torch.Generator().manual_seed(1))
    assert tail.mean() > 0.99 and (probs.sum(-1) > 0).float().mean() <= 5 * privacy.FALSE_MASS
    _, probs, tail = privacy.privatize(logits * 10, 8, 1.0, 1.0, 0.01, torch.Generator().manual_seed(1))
    assert probs[:, 0].mean() > 0.8  # at low noise a confident prediction survives


def test_the_noise_cannot_be_replayed_from_the_run_seed():
    a, b = privacy.noise_generator(), privacy.noise_generator()
    assert not torch.equal(torch.randn(8, generator=a), torch.randn(8, generator=b))


# ---- the accountant --------------------------------------------------------------------------------

def test_rho_is_positions_over_sigma_squared_and_composes_by_addition():
    assert privacy.upload_rho(744, 10.0) == pytest.approx(7.44)
    # the Gaussian mechanism's ρ = Δ² / (2 (σC)²), whatever C is
    for clip in (0.1, 1.0, 7.0):
        assert privacy.sensitivity(744, clip) ** 2 / (2 * (10.0 * clip) ** 2) == pytest.approx(7.44)
    assert privacy.upload_rho(744, 0.0) == math.inf


def test_epsilon_from_zcdp():
    assert privacy.epsilon(1.0, 1e-5) == pytest.approx(1 + 2 * math.sqrt(math.log(1e5)))
    assert privacy.epsilon(0.0, 1e-5) == 0.0
    rounds = [privacy.epsilon(r * privacy.upload_rho(744, 30.0), 1e-5) for r in (1, 2, 4)]
    assert rounds == sorted(rounds)  # more uploads spend more
    sigmas = [privacy.epsilon(privacy.upload_rho(744, s), 1e-5) for s in (1, 10, 100)]
    assert sigmas == sorted(sigmas, reverse=True)  # more noise spends less
    with pytest.raises(ValueError, match="delta"):
        privacy.epsilon(1.0, 0.0)


def test_reports():
    r = privacy.report(10.0, 1.0, 1e-5, rho=2 * 7.44, uploads=2, positions_per_upload=744)
    assert r["epsilon"] == pytest.approx(privacy.epsilon(14.88, 1e-5), rel=1e-3)
    assert r["epsilon_per_upload"] == pytest.approx(privacy.epsilon(7.44, 1e-5), rel=1e-3)
    fed = privacy.federation_report({"a": r, "b": {**r, "epsilon": 3.0}})
    assert fed["epsilon"] == r["epsilon"] and fed["devices_without_dp"] == []
    fed = privacy.federation_report({"a": r, "c": None})
    assert fed["epsilon"] is None and fed["devices_without_dp"] == ["c"]


# ---- a device that uses it -------------------------------------------------------------------------

def make_device(**dp):
    from deepfusion.config import DeviceConfig
    from deepfusion.device import build_device

    g = torch.Generator().manual_seed(0)
    cfg = DeviceConfig(id="d", source="text:x", family="qwen2", size="tiny", local_steps=1, batch_size=2, **dp)
    return build_device(cfg, "tiny", 64, torch.randint(64, (6, 9), generator=g), torch.randint(64, (4, 9), generator=g),
                        0, torch.device("cpu"))


def test_a_dp_device_noises_its_uploads_withholds_its_loss_and_counts_what_it_spent():
    from deepfusion.device import describe, device_state, load_device_state, run_round
    from deepfusion.wire.instruction import Instruction

    device = make_device(dp_noise=2.0, dp_clip=0.5, dp_delta=1e-6)
    ask = Instruction(round=1, proxy_indices=[0, 1, 2, 3], local_steps=1, batch_size=2, lr=1e-3, topk=4,
                      temperature=1.0)
    packets = [run_round(device, ask), run_round(device, ask)]
    n = 4 * 8
    assert all(p.local_loss == privacy.WITHHELD_LOSS and p.n_positions == n for p in packets)
    spent = describe(device)["privacy"]
    assert spent["uploads"] == 2 and spent["rho"] == pytest.approx(2 * n / 4.0)
    assert spent["epsilon"] == pytest.approx(privacy.epsilon(2 * n / 4.0, 1e-6), rel=1e-3)
    assert spent["delta"] == 1e-6 and spent["clip"] == 0.5
    again = make_device(dp_noise=2.0, dp_clip=0.5, dp_delta=1e-6)
    load_device_state(again, device_state(device))  # a resumed device keeps counting from where it was
    assert describe(again)["privacy"] == spent
    assert torch.equal(torch.randn(4, generator=again.noise_generator), torch.randn(4, generator=device.noise_generator))
    assert describe(make_device())["privacy"] is None  # off by default


@pytest.mark.parametrize("key, value", [("dp_noise", -1.0), ("dp_noise", float("inf")), ("dp_clip", 0.0),
                                        ("dp_delta", 1.0), ("dp_delta", 0.0)])
def test_dp_settings_are_validated(tmp_path, key, value):
    from deepfusion.config import load_config
    from deepfusion.errors import ConfigError

    path = tmp_path / "c.toml"
    path.write_text(f'[[devices]]\nid = "a"\nsource = "medquad:cdc"\n{key} = {value!r}\n'.replace("'", '"'))
    with pytest.raises(ConfigError, match=key):
        load_config(path)


# ---- the whole federation, every message intercepted -------------------------------------------------

def grams(rows, n=8):
    """Every n-token window of the rows, as tuples."""
    return {tuple(row[i:i + n]) for row in rows for i in range(len(row) - n + 1)}


def byte_windows(blob: bytes, width: int) -> set[bytes]:
    return {blob[i:i + width] for i in range(len(blob) - width + 1)}


@pytest.mark.slow
@pytest.mark.parametrize("dp_noise", [0.0, 0.5])
def test_no_private_text_or_token_sequence_leaves_a_device(smoke_config, tmp_path, monkeypatch, dp_noise,
                                                          shared_prepare_data):
    """Intercept every message of a federation at the boundary (the bytes a device gets, the bytes the server
    gets); only instructions and packets of predictions at public proxy positions may pass."""
    import json

    import numpy as np

    import deepfusion.engines.local as local
    from deepfusion.federation import prepare_data
    from deepfusion.wire.instruction import Instruction
    from deepfusion.wire.knowledge import KnowledgePacket

    messages = []
    real_from, real_round = Instruction.from_bytes, local.server_round

    def spy_from(data):
        messages.append(("down", bytes(data)))
        return real_from(data)

    def spy_round(server, payloads, r):
        messages.extend(("up", bytes(blob)) for blob in payloads.values())
        return real_round(server, payloads, r)

    monkeypatch.setattr(Instruction, "from_bytes", staticmethod(spy_from))
    monkeypatch.setattr(local, "server_round", spy_round)
    for d in smoke_config.devices:
        d.dp_noise = dp_noise
    summary = local.run(smoke_config, tmp_path, progress=False)

    data = prepare_data(smoke_config)
    n_proxy = data.proxy.shape[0] * (data.proxy.shape[1] - 1)
    public = grams(data.proxy.tolist())
    private = set().union(*(grams(blocks[:1000].tolist()) for blocks in data.private.values())) - public
    snippets = [data.tokenizer.decode(row[:12]).strip() for blocks in data.private.values() for row in blocks[:100]]
    as_bytes = {dt: {np.array(g, dt).tobytes() for g in private} for dt in ("<u2", "<u4", "<i8")}
    ids = {d.id for d in smoke_config.devices}
    assert len(messages) == 2 * len(ids) * smoke_config.rounds
    for direction, blob in messages:
        assert not any(s.encode() in blob for s in snippets)  # no private text
        for dt, wanted in as_bytes.items():  # no private token-id sequence, in any integer encoding
            assert not byte_windows(blob, len(next(iter(wanted)))) & wanted, dt
        if direction == "down":
            assert set(json.loads(blob)) == set(Instruction.__dataclass_fields__)
            continue
        packet = KnowledgePacket.from_bytes(blob)
        assert packet.device_id in ids and packet.n_positions == n_proxy  # predictions at public positions only
        for column in packet.ids.T.astype(np.int64).tolist():  # nor as a sequence of predictions
            assert not grams([column]) & private
        dc = next(d for d in smoke_config.devices if d.id == packet.device_id)
        assert packet.tokens_trained == packet.round * dc.local_steps * dc.batch_size * smoke_config.data.seq_len
        if dp_noise:
            assert packet.local_loss == privacy.WITHHELD_LOSS
    spent = summary["privacy"]
    if dp_noise:
        want = privacy.epsilon(smoke_config.rounds * n_proxy / dp_noise ** 2, 1e-5)
        assert spent["epsilon"] == pytest.approx(want, rel=1e-3) and spent["delta"] == 1e-5
        assert all(summary["devices"][d]["privacy"]["uploads"] == smoke_config.rounds for d in ids)
    else:
        assert spent["epsilon"] is None and spent["devices_without_dp"] == sorted(ids)
