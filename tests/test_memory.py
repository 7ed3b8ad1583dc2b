"""The one training-peak estimator: a meta step holds what a real CPU step holds; measuring leaves the model alone."""

import pytest
import torch

from deepfusion.device import lm_loss
from deepfusion.memory import step_memory, train_peak_bytes
from deepfusion.models import build_device_model, build_global_moe


@pytest.fixture
def one_thread():
    """Tiny real steps: one thread is fastest, and on a shared machine two threads can wait on each other."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("build", [lambda: build_global_moe("qwen_moe", "tiny", 512),
                                   lambda: build_device_model("llama", "small", 512)], ids=["qwen_moe", "llama"])
def test_a_meta_step_holds_what_a_real_cpu_step_holds(build, one_thread):
    torch.manual_seed(0)
    real = build().train()
    with torch.device("meta"):
        on_meta = type(real)(real.config)
    blocks = torch.zeros(8, 32, dtype=torch.long)  # (B, T)
    a, b = step_memory(real, blocks, lm_loss), step_memory(on_meta, blocks.to("meta"), lm_loss)
    assert (a.params, a.weights, a.gradients, a.optimizer) == (b.params, b.weights, b.gradients, b.optimizer)
    # the real grouped_mm keeps its (E,) int32 offsets as saved tensors, the fallback op keeps them on ctx
    assert 0 <= a.activations - b.activations <= 64 and b.activations > 0
    assert abs(b.resident_per_param_bytes - 16) < 1e-3  # fp32 weight + gradient + AdamW's two moments
    assert train_peak_bytes(real, blocks, lm_loss) == a.total


def test_the_log_softmax_over_the_vocabulary_is_counted_once(one_thread):
    """Activations hold cross-entropy's saved (B*(T-1), V) log-probabilities; a larger vocabulary adds exactly
    those bytes and the embedding and lm_head's resident state, nothing else."""
    blocks = torch.zeros(2, 16, dtype=torch.long)  # (B, T)
    small, large = (step_memory(build_device_model("llama", "tiny", v), blocks, lm_loss) for v in (256, 512))
    assert large.activations - small.activations == 2 * 15 * 256 * 4


def test_measuring_leaves_the_model_and_the_random_stream_alone(one_thread):
    model = build_device_model("qwen2", "tiny", 256)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    torch.manual_seed(3)
    train_peak_bytes(model, torch.randint(256, (4, 16)), lm_loss)
    after = torch.rand(1)
    torch.manual_seed(3)
    torch.randint(256, (4, 16))
    assert torch.equal(after, torch.rand(1))  # the step drew nothing from the global generator
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())
