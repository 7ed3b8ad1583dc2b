import numpy as np
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


# ---- a device with its own tokenizer ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def global_world(tmp_path_factory):
    """A global byte-level BPE (data.train_tokenizer, 512 ids) and 4 proxy blocks of 24 of its ids, EOS-separated
    documents of the real corpora, as data.pack_blocks cuts them."""
    from deepfusion.data import train_tokenizer
    from tests.byo import corpus_texts

    texts = list(corpus_texts())
    tok = train_tokenizer(texts[:120], 512, tmp_path_factory.mktemp("global-tokenizer"))
    stream = [i for text in texts[:8] for i in tok(text)["input_ids"] + [tok.eos_token_id]]
    return tok, torch.tensor(stream[:4 * 24]).view(4, 24)


def own_device(global_world, byo_tokenizers, kind, **cfg):
    from deepfusion.data import load_tokenizer

    glob, proxy = global_world
    own = load_tokenizer(byo_tokenizers[kind])  # as federation.device_tokenizer loads it (WordPiece: [SEP] ends)
    g = torch.Generator().manual_seed(0)
    config = DeviceConfig(id="own", source="medquad:cdc", family="llama", size="tiny", lr=1e-2, **cfg)
    return build_device(config, "tiny", len(own), torch.randint(len(own), (8, 24), generator=g), proxy, 0,
                        torch.device("cpu"), global_tokenizer=glob, tokenizer=own), own


@pytest.mark.parametrize("kind", ["bpe", "unigram", "wordpiece"])
def test_a_device_with_its_own_tokenizer_answers_in_the_global_vocabulary_where_it_aligns(global_world,
                                                                                         byo_tokenizers, kind):
    from deepfusion import alignment
    from deepfusion.device import label_proxy
    from deepfusion.wire.knowledge import validate_packet

    device, own = own_device(global_world, byo_tokenizers, kind)
    glob, proxy = global_world
    packet = label_proxy(device, [2, 0], 5, 1.0, 1, 0.0)
    N = 2 * (proxy.shape[1] - 1)
    assert (packet.vocab_size, packet.n_positions, packet.vocab) == (len(glob), N, alignment.vocab_digest(own))
    validate_packet(packet, round=1, known_devices={"own"}, n_positions=N, vocab_size=len(glob), topk=5)
    assert KnowledgePacket.from_bytes(packet.to_bytes()) == packet
    aligned = packet.aligned.astype(bool)
    assert 0.3 < aligned.mean() < 1.0  # word ends align; positions inside a word one side splits do not
    # Each block alone, unbatched: the device's distribution projected onto the global vocabulary at the
    # global position ending each aligned span. The packet's top-1 is its argmax there.
    for b, block in enumerate([2, 0]):
        view = device.own.views[block]
        with torch.no_grad():
            probs = device.model(input_ids=view.ids[None]).logits[0].softmax(-1)
        moved, mask = alignment.at_global_positions(probs, view.alignment)
        want = alignment.project_probs(moved, device.own.vocab_map, len(glob))[:N // 2]
        rows = slice(b * N // 2, (b + 1) * N // 2)
        assert torch.equal(mask[:N // 2], torch.from_numpy(aligned[rows]))
        top1 = torch.from_numpy(packet.ids[rows, 0].astype(np.int64))
        on = mask[:N // 2]
        got = want[on].gather(1, top1[on, None]).squeeze(1)
        torch.testing.assert_close(got, want[on].max(-1).values, rtol=0, atol=1e-6)
        torch.testing.assert_close(torch.from_numpy(packet.probs[rows, 0][on.numpy()].astype(np.float32)), got,
                                   rtol=2e-3, atol=1e-4)  # fp16 on the wire
        # where it does not align, a uniform row: well-formed, and the mask says it carries nothing
        off = np.flatnonzero(~aligned[rows]) + b * N // 2
        assert np.allclose(packet.probs[off].astype(np.float32), 1 / len(glob), rtol=1e-2)


def test_a_dp_device_with_its_own_tokenizer_noises_the_projected_distribution(global_world, byo_tokenizers):
    from deepfusion.device import label_proxy
    from deepfusion.wire.knowledge import validate_packet

    device, _ = own_device(global_world, byo_tokenizers, "unigram", dp_noise=0.5, dp_clip=1.0)
    packet = label_proxy(device, [1], 3, 1.0, 1, 2.0)
    validate_packet(packet, round=1, known_devices={"own"}, n_positions=23, vocab_size=512, topk=3)
    assert packet.local_loss == 0.0 and packet.aligned is not None and device.dp_uploads == 1


def test_a_device_sharing_the_global_tokenizer_sends_no_mask():
    packet = run_round(make_device(), instruction())
    assert packet.aligned is None and packet.vocab is None
    assert b"aligned" not in packet.to_bytes() and b'"vocab"' not in packet.to_bytes()
