"""The public checkpoints: every device type and the MoE's dense base, pretrained on the public text, cached.

In the paper every device starts from the public checkpoint of its model type (GPT-2, GPT-2 Medium,
TinyLlama, OLMo, BLOOM), and the server's dense base (the LLM the MoE is upcycled from) is pretrained too.
There is no hub here, so we make them: a model type's preset, trained with next-token cross-entropy on the
federation's public blocks, written with save_pretrained. Phase I averages same-type devices' weights,
which means something only if they fine-tuned the *same* checkpoint, so a build must be bit-identical
whoever runs it (a Flower node builds its own):

    key    = hash of everything that determines the weights: the model config, the public blocks' bytes,
             [pretrain] settings and seed, the torch / transformers versions, the backend (cpu | cuda)
    seed   = the same hash with format and versions held at SEED_BASIS: an upgrade rebuilds, same draw
    cache  = <cache root>/<key>/ {config.json, model.safetensors, record.json}; root defaults to
             $XDG_CACHE_HOME/deepfusion/checkpoints
    build  = under an exclusive file lock (<key>.lock): one builder per key, the others wait and read it;
             written into a temp dir and renamed, so a killed build never leaves a half entry
    reuse  = record.json's sha256 of model.safetensors must match the file; anything else is rebuilt

A user may instead give a local directory (DeviceConfig.checkpoint, ServerConfig.dense_base): `load_public`
loads it with the Auto classes and checks its family, vocabulary and tensor shapes against the preset.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedConfig, PreTrainedModel

from deepfusion.config import device_at
from deepfusion.device import lm_loss
from deepfusion.errors import ConfigError, DataError
from deepfusion.models import autocast, n_params
from deepfusion.pipeline_config import PretrainConfig

log = logging.getLogger("deepfusion")

FORMAT = "public-checkpoint-v2"  # bump when the recipe below changes, so old cache entries are not reused
# v2: the seed no longer follows the installed versions (SEED_BASIS)
# CPU LayerNorm backward (GPT-2, BLOOM) splits its reduction by thread count: the same build on 1, 2 or 4
# threads gives different bits (measured). Pinning the count makes a build the same on every machine.
THREADS = 2
WARMUP = 0.1  # share of the steps with a linear learning-rate warmup; then cosine decay to lr * FINAL_LR
FINAL_LR = 0.1
WEIGHT_DECAY = 0.01
WEIGHTS = "model.safetensors"
RECORD = "record.json"


# ---- the content key ----------------------------------------------------------------------------

# The versions the build's seed is drawn under, whatever is installed. The seed used to be the key itself, so a
# library upgrade redrew every checkpoint's initial weights and batches: transformers 5.24.0 -> 5.25.0 moved
# DeepFusion's medical N = 16 seed-0 test log-ppl from 6.549 to 6.378, with no change in the library's own
# numerics (issue 10). Now an upgrade still rebuilds the entry (its key changes) but with the same draw. These
# are the format and versions the committed tables were made under, so their draws stay the same.
SEED_BASIS = {"format": "public-checkpoint-v1", "torch": "2.13.0+cpu", "transformers": "5.24.0"}


def checkpoint_key(config: PreTrainedConfig, public: torch.Tensor, pre: PretrainConfig,
                   backend: str = "cpu", basis: dict[str, str] | None = None) -> str:
    """'<model_type>-<20 hex>': the sha256 of everything the checkpoint's weights depend on (basis: FORMAT and
    the installed torch and transformers unless given)."""
    basis = basis or {"format": FORMAT, "torch": torch.__version__, "transformers": transformers.__version__}
    h = hashlib.sha256()

    def part(name: str, data: bytes) -> None:  # length-prefixed, so parts cannot run into each other
        h.update(name.encode() + len(data).to_bytes(8, "big") + data)

    described = {k: v for k, v in config.to_dict().items() if k != "_name_or_path"}  # where it was read from
    if "transformers_version" in described:  # to_dict stamps the installed version
        described["transformers_version"] = basis["transformers"]
    blocks = public.detach().cpu().contiguous()
    part("format", f"{basis['format']}:threads={THREADS}".encode())
    part("config", json.dumps(described, sort_keys=True).encode())
    part("public", f"{tuple(blocks.shape)}:{blocks.dtype}".encode())
    part("public-bytes", blocks.numpy().tobytes())
    part("pretrain", json.dumps(asdict(pre), sort_keys=True).encode())
    part("versions", f"torch={basis['torch']};transformers={basis['transformers']}".encode())
    part("backend", backend.encode())  # a CUDA build's bits differ from a CPU build's
    return f"{config.model_type}-{h.hexdigest()[:20]}"


def build_seed(config: PreTrainedConfig, public: torch.Tensor, pre: PretrainConfig, backend: str = "cpu") -> int:
    """The build's seed: the key under SEED_BASIS, so it follows pre.seed and what the checkpoint is, never
    the installed libraries."""
    key = checkpoint_key(config, public, pre, backend, SEED_BASIS)
    return int(key.rsplit("-", 1)[1][:15], 16)


# ---- training -----------------------------------------------------------------------------------

def _lr(step: int, pre: PretrainConfig) -> float:
    warm = max(1, int(WARMUP * pre.steps))
    if step < warm:
        return pre.lr * (step + 1) / warm
    progress = (step - warm) / max(1, pre.steps - warm)
    return pre.lr * (FINAL_LR + (1 - FINAL_LR) * 0.5 * (1 + math.cos(math.pi * progress)))


def pretrain(model: PreTrainedModel, public: torch.Tensor, pre: PretrainConfig,
             torch_device: str | torch.device = "cpu", seed: int | None = None) -> list[float]:
    """pre.steps AdamW steps of next-token cross-entropy on random rows of public (N, T); the loss curve."""
    torch_device = torch.device(torch_device)
    generator = torch.Generator().manual_seed(pre.seed if seed is None else seed)  # batch draws only
    model.to(torch_device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=pre.lr, betas=(0.9, 0.95), weight_decay=WEIGHT_DECAY)
    curve = []
    for step in range(pre.steps):
        for group in optimizer.param_groups:
            group["lr"] = _lr(step, pre)
        rows = torch.randint(len(public), (pre.batch_size,), generator=generator)
        batch = public[rows].to(torch_device)  # (B, T)
        with autocast(torch_device):
            loss = lm_loss(model, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        curve.append(loss.item())
        if (step + 1) % 50 == 0 or step + 1 == pre.steps:
            log.info("pretrain: step %d/%d loss %.3f", step + 1, pre.steps, curve[-1])
    return curve


@torch.no_grad()
def mean_loss(model: PreTrainedModel, blocks: torch.Tensor, torch_device: str | torch.device = "cpu",
              batch: int = 16) -> float:
    """Mean next-token cross-entropy over (N, T) blocks, in eval mode."""
    torch_device = torch.device(torch_device)
    model.to(torch_device).eval()
    total = 0.0
    for s in range(0, len(blocks), batch):
        b = blocks[s:s + batch].to(torch_device)  # (B, T)
        with autocast(torch_device):
            total += lm_loss(model, b).item() * len(b)
    return total / len(blocks)


@contextlib.contextmanager
def _deterministic(torch_device: torch.device):
    """Fixed CPU threads (THREADS); on CUDA, deterministic kernels. Restored afterwards."""
    threads = torch.get_num_threads()
    cuda = torch_device.type == "cuda"
    was = torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(THREADS)
    if cuda:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        if cuda:
            torch.use_deterministic_algorithms(was)


# ---- the cache ----------------------------------------------------------------------------------

def default_cache() -> Path:
    from deepfusion.federation import cache_dir  # late: federation pulls in the data loaders

    return cache_dir() / "checkpoints"


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def problem(entry: Path, key: str) -> str | None:
    """Why the cache entry is not a complete build of `key` (None: it is). Hashes the weights (MBs: fast)."""
    if not entry.is_dir():
        return "missing"
    try:
        record = json.loads((entry / RECORD).read_text())
    except (OSError, ValueError):
        return f"no readable {RECORD}"
    if not isinstance(record, dict) or record.get("key") != key:
        return f"{RECORD} is for key {record.get('key') if isinstance(record, dict) else None!r}"
    if not (entry / "config.json").is_file():
        return "no config.json"
    if not (entry / WEIGHTS).is_file():
        return f"no {WEIGHTS}"
    if _sha256(entry / WEIGHTS) != record.get("weights_sha256"):
        return f"{WEIGHTS} does not match its recorded sha256 (garbled or truncated)"
    return None


@contextlib.contextmanager
def _lock(path: Path):
    """An exclusive flock on path: concurrent builders of one key take turns (released if the holder dies)."""
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("pretrain: another process is building %s; waiting for it", path.stem)
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def fetch_or_build(config: PreTrainedConfig, public: torch.Tensor, pre: PretrainConfig, cache: Path | None = None,
                   torch_device: str | torch.device = "cpu", name: str = "") -> tuple[Path, bool]:
    """The save_pretrained directory of (config, public, pre), and whether this call trained it."""
    _check_public(public, config, name)
    torch_device = torch.device(torch_device)
    root = Path(cache) if cache is not None else default_cache()
    key = checkpoint_key(config, public, pre, torch_device.type)
    entry = root / key
    if problem(entry, key) is None:
        return entry, False
    root.mkdir(parents=True, exist_ok=True)
    with _lock(root / f"{key}.lock"):
        why = problem(entry, key)
        if why is None:  # another process built it while we waited
            return entry, False
        if why != "missing":
            log.warning("pretrain: cache entry %s is broken (%s); rebuilding it", entry, why)
            _remove(entry, root, key)
        for stale in root.glob(f".{key}-*"):  # temp dirs of killed builders: we hold the lock, none is live
            shutil.rmtree(stale, ignore_errors=True)
        _build(config, public, pre, torch_device, name, key, root)
    return entry, True


def public_checkpoint(config: PreTrainedConfig, public: torch.Tensor, pre: PretrainConfig, cache: Path | None = None,
                      torch_device: str | torch.device = "cpu", name: str = "") -> Path:
    """Build or reuse the public checkpoint; returns its save_pretrained directory."""
    return fetch_or_build(config, public, pre, cache, torch_device, name)[0]


def _check_public(public: torch.Tensor, config: PreTrainedConfig, name: str) -> None:
    what = name or config.model_type
    if public.dim() != 2 or len(public) == 0 or public.dtype.is_floating_point or public.shape[1] < 2:
        raise DataError(f"pretrain {what}: got public blocks of shape {tuple(public.shape)} and dtype "
                        f"{public.dtype}; pretraining needs (N >= 1, T >= 2) integer token ids; pass token blocks")
    top = int(public.max())
    if top >= config.vocab_size or int(public.min()) < 0:
        raise DataError(f"pretrain {what}: public blocks hold token id {top}, outside the model's vocabulary of "
                        f"{config.vocab_size}; build the model with the federation's tokenizer size")


def _remove(entry: Path, root: Path, key: str) -> None:
    trash = root / f".{key}-broken-{os.getpid()}"  # rename first: the entry disappears at once, never half
    os.replace(entry, trash)
    shutil.rmtree(trash, ignore_errors=True)


def _build(config: PreTrainedConfig, public: torch.Tensor, pre: PretrainConfig, torch_device: torch.device,
           name: str, key: str, root: Path) -> None:
    start = time.perf_counter()
    what = name or config.model_type
    log.info("pretrain: %s (%s), %d steps x %d blocks of %d tokens on %s", what, key, pre.steps, pre.batch_size,
             public.shape[1], torch_device)
    seed = build_seed(config, public, pre, torch_device.type)
    with _deterministic(torch_device):
        torch.manual_seed(seed)  # the initial weights
        model = AutoModelForCausalLM.from_config(copy.deepcopy(config))
        curve = pretrain(model, public, pre, torch_device, seed=seed)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{key}-"))
    try:
        model.to("cpu").save_pretrained(tmp)
        seconds = time.perf_counter() - start
        record = {
            "what": what, "key": key, "format": FORMAT, "model_type": config.model_type,
            "architecture": type(model).__name__, "params": n_params(model),
            "public": {"shape": list(public.shape), "dtype": str(public.dtype),
                       "sha256": hashlib.sha256(public.cpu().contiguous().numpy().tobytes()).hexdigest()},
            "pretrain": asdict(pre), "seed": seed, "backend": torch_device.type, "threads": THREADS,
            "torch": torch.__version__, "transformers": transformers.__version__,
            "final_loss": final_loss(curve), "curve": [round(x, 4) for x in curve],
            "seconds": round(seconds, 2), "weights_sha256": _sha256(tmp / WEIGHTS),
        }
        (tmp / RECORD).write_text(json.dumps(record, indent=1))
        os.replace(tmp, root / key)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already after a successful rename
    log.info("pretrain: %s done in %.1f s, loss %.3f -> %.3f", what, seconds, curve[0], record["final_loss"])


def final_loss(curve: list[float]) -> float:
    """The mean of the last 10 steps' losses: one batch's loss is noisy."""
    tail = curve[-10:]
    return round(sum(tail) / len(tail), 4)


def read_record(path: Path) -> dict:
    return json.loads((Path(path) / RECORD).read_text())


# ---- loading (cache entries and users' directories) ---------------------------------------------

def load_public(path: Path, expect: PreTrainedConfig | None = None, where: str = "",
                shapes: bool = True) -> PreTrainedModel:
    """A save_pretrained causal LM from a local directory, checked against `expect` (the preset's config):
    its family (model_type), its vocabulary size and, with shapes, every tensor's shape."""
    path = Path(path)
    label = f"{where} = {str(path)!r}" if where else f"checkpoint {str(path)!r}"

    def fail(why: str) -> None:
        raise ConfigError(f"config error: {label}: {why}")

    if not (path / "config.json").is_file():
        fail("no config.json there, so it is not a save_pretrained model directory; point it at one "
             "(or leave the key unset to pretrain one on the public text)")
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:
        fail(f"unreadable config.json ({_first_line(e)}); rewrite it with save_pretrained")
    if expect is not None:
        if config.model_type != expect.model_type:
            fail(f"model type {config.model_type!r} != expected {expect.model_type!r}; give a checkpoint of the "
                 "configured family, or change the family to match it")
        if config.vocab_size != expect.vocab_size:
            fail(f"vocab {config.vocab_size} != federation vocab {expect.vocab_size}; every model is trained and "
                 "distilled on the federation's token ids, so it must use its tokenizer (set data.tokenizer to "
                 "this model's tokenizer directory, or pretrain on the federation's)")
    try:
        model, info = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, output_loading_info=True)
    except Exception as e:  # missing or garbled weights raise many types (OSError, SafetensorError, ...)
        fail(f"cannot load its weights ({type(e).__name__}: {_first_line(e)}); it needs {WEIGHTS} from "
             "save_pretrained")
    if info["missing_keys"]:
        missing = sorted(info["missing_keys"])
        fail(f"{len(missing)} weight tensors missing (e.g. {missing[0]!r}); they would start random")
    if expect is not None and shapes:
        _check_shapes(model, expect, fail)
    return model


def _check_shapes(model: PreTrainedModel, expect: PreTrainedConfig, fail) -> None:
    with torch.device("meta"):  # shapes only: no memory, no init
        reference = AutoModelForCausalLM.from_config(copy.deepcopy(expect))
    want = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    for k in sorted(set(want) | set(got)):
        if want.get(k) != got.get(k):
            fail(f"tensor {k!r} has shape {got.get(k, 'absent')}, the configured preset has "
                 f"{want.get(k, 'absent')}; give a checkpoint of the configured size (or a preset of its size)")


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else type(e).__name__


# ---- what a federation needs --------------------------------------------------------------------

def device_model(family: str, size: str, vocab_size: int, public: torch.Tensor, pre: PretrainConfig,
                 checkpoint: str | None = None, where: str = "", cache: Path | None = None,
                 torch_device: str | torch.device = "cpu", own_tokenizer: bool = False) -> PreTrainedModel:
    """A device's starting model: its own directory (DeviceConfig.checkpoint: any causal LM, its architecture
    read from config.json, family and size ignored), else its type's public one. vocab_size is its
    tokenizer's (own_tokenizer: the device's own, which its model may pad past)."""
    from deepfusion.models import DEVICE_PRESETS

    if checkpoint:
        label = f"{where} checkpoint" if where else "checkpoint"
        model = load_public(Path(checkpoint), None, label)
        _check_device_vocab(model.config, vocab_size, f"{label} = {str(checkpoint)!r}", own_tokenizer)
        return model
    config = DEVICE_PRESETS[family][size](vocab_size)
    return load_public(public_checkpoint(config, public, pre, cache, torch_device, f"{family}/{size}"), config)


def _own_tokenizer(directory: Path, global_tokenizer):
    """The tokenizer saved in a device's checkpoint directory, if it is not the federation's (else None)."""
    from deepfusion.alignment import same_vocabulary
    from deepfusion.data.tokenizer import load_tokenizer

    if not (directory / "tokenizer.json").is_file():
        return None
    own = load_tokenizer(directory)
    return None if same_vocabulary(own, global_tokenizer) else own


def _check_device_vocab(config: PreTrainedConfig, vocab_size: int, label: str, own_tokenizer: bool) -> None:
    """A checkpoint read with the federation's tokenizer has exactly its vocabulary; one with its own tokenizer
    (saved beside it, or [[devices]] tokenizer) at least that tokenizer's ids (models pad their embeddings)."""
    vocab = config.get_text_config().vocab_size
    if own_tokenizer and vocab < vocab_size:
        raise ConfigError(f"config error: {label}: the device's model has vocab {vocab}, fewer than its own "
                          f"tokenizer's {vocab_size} ids; give the tokenizer the model was trained with")
    if not own_tokenizer and vocab != vocab_size:
        raise ConfigError(f"config error: {label}: the device's model has vocab {vocab}, the federation's "
                          f"tokenizer {vocab_size}; save the device's own tokenizer in its checkpoint directory "
                          "(or set [[devices]] tokenizer) so the server can align the two (alignment.py)")


def arch_label(family: str, size: str, checkpoint: str | None, config: PreTrainedConfig) -> str:
    """A device's architecture label (Phase I averages devices with equal labels): family/size for a preset,
    model_type:directory name for its own checkpoint (read from config.json, not from family/size)."""
    return f"{config.model_type}:{Path(checkpoint).name}" if checkpoint else f"{family}/{size}"


# The fields a dense base must share with its MoE, in the order a mismatch is reported: the rest of the
# architecture is then checked tensor by tensor (_check_shapes).
DENSE_FIELDS = ("model_type", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "intermediate_size", "hidden_act", "tie_word_embeddings",
                "attention_bias", "rms_norm_eps", "rope_parameters", "sliding_window", "kv_lora_rank",
                "q_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")


def check_dense_base(config: PreTrainedConfig, expect: PreTrainedConfig, moe: PreTrainedConfig, label: str) -> None:
    """One ConfigError naming the first field in which the given dense base differs from the MoE's."""
    for key in DENSE_FIELDS:
        want, got = getattr(expect, key, None), getattr(config, key, None)
        if want != got:
            raise ConfigError(f"config error: {label}: {key} = {got!r}, but the MoE ({moe.model_type}) needs "
                              f"{want!r} in its dense base; give the dense model the MoE was (or would be) upcycled "
                              f"from: its {expect.model_type} sibling with the MoE's attention, vocabulary and depth, "
                              "and an FFN as wide as the MoE's dense width")


def _check_given_dense(moe: PreTrainedConfig, expect: PreTrainedConfig, given: str) -> None:
    path = Path(given) / "config.json"
    if not path.is_file():
        return  # load_public names what is missing
    try:
        got = AutoConfig.from_pretrained(path.parent, local_files_only=True)
    except (OSError, ValueError):
        return  # load_public reports it
    check_dense_base(got, expect, moe, f"[server] dense_base = {str(given)!r}")


def dense_base_model(moe: PreTrainedConfig, public: torch.Tensor, pre: PretrainConfig, given: str | None = None,
                     cache: Path | None = None, torch_device: str | torch.device = "cpu",
                     name: str = "dense base") -> PreTrainedModel:
    """The MoE's dense base (Phase II's student): its own directory (ServerConfig.dense_base), else pretrained
    on the public text like the device types."""
    from deepfusion.models import dense_base_config

    config = dense_base_config(moe)
    if given:
        _check_given_dense(moe, config, given)
        return load_public(Path(given), config, "[server] dense_base")
    return load_public(public_checkpoint(config, public, pre, cache, torch_device, name), config)


def federation_checkpoints(cfg, data, cache: Path | None = None,
                           torch_device: str | torch.device = "cpu") -> dict[str, dict]:
    """Every starting checkpoint cfg needs, built or reused: each distinct device type and the MoE's dense
    base. Returns {type: {path, params, seconds, final_loss, cached, ...}} (`deepfusion pretrain` prints it)."""
    from deepfusion.device import choose_size
    from deepfusion.federation import device_tokenizer
    from deepfusion.models import DEVICE_PRESETS, dense_base_config, server_moe_config

    vocab, torch_device = len(data.tokenizer), torch.device(torch_device)
    wanted = {}  # type -> (config, the user's directory or None, where, a preset's own tokenizer or None)
    for i, dc in enumerate(cfg.devices):
        if dc.checkpoint:  # its own directory: the architecture is whatever config.json says
            wanted.setdefault(f"checkpoint:{dc.checkpoint}",
                              (None, dc.checkpoint, f"{device_at(i, dc.id)} checkpoint", None))
            continue
        own = device_tokenizer(cfg, dc.id, data.tokenizer)  # a preset with its own tokenizer: as the run builds it
        size = dc.size if dc.size != "auto" else choose_size(dc, len(own), cfg.data.seq_len, torch_device)
        name = f"{dc.family}/{size}" + (f" (tokenizer {dc.tokenizer})" if own is not data.tokenizer else "")
        wanted.setdefault(name, (DEVICE_PRESETS[dc.family][size](len(own)), None, "",
                                 None if own is data.tokenizer else own))
    s = cfg.server
    moe = server_moe_config(s, vocab)
    if s.dense_base:
        _check_given_dense(moe, dense_base_config(moe), s.dense_base)
    wanted[f"dense_base({s.family}/{s.size})"] = (dense_base_config(moe), s.dense_base, "[server] dense_base", None)
    return {name: _obtain(name, config, given, where, data, own, cfg.pretrain, cache, torch_device)
            for name, (config, given, where, own) in wanted.items()}


def _obtain(name: str, config: PreTrainedConfig, given: str | None, where: str, data, own,
            pre: PretrainConfig, cache: Path | None, torch_device: torch.device) -> dict:
    """One checkpoint built, reused or checked; `own` is a preset's own tokenizer (None: the federation's)."""
    from deepfusion.federation import public_blocks

    start = time.perf_counter()
    if given and config is None:  # a device's own checkpoint, with its own tokenizer if saved beside it
        model = load_public(Path(given), None, where)
        own = _own_tokenizer(Path(given), data.tokenizer)
        _check_device_vocab(model.config, len(own or data.tokenizer), f"{where} = {str(given)!r}", own is not None)
        entry = {"path": given, "given": True, "cached": True, "final_loss": None}
    elif given:
        model = load_public(Path(given), config, where)
        entry = {"path": given, "given": True, "cached": True, "final_loss": None}
    else:
        public = public_blocks(data.tokenizer, own, data.proxy)
        path, built = fetch_or_build(config, public, pre, cache, torch_device, name)
        model, record = load_public(path, config), read_record(path)
        entry = {"path": str(path), "cached": not built, "final_loss": record["final_loss"],
                 "built_seconds": record["seconds"]}
    entry["seconds"] = round(time.perf_counter() - start, 2)
    entry["params"] = n_params(model)
    # public text never trained on: does the checkpoint generalise beyond the proxy set it saw?
    # (in the model's own tokenizer when it has one: the same text, cut its way)
    entry["val_loss"] = {dom: round(mean_loss(model, public_blocks(data.tokenizer, own, blocks), torch_device), 4)
                         for dom, (_, blocks) in sorted(data.validation.items())}
    log.info("pretrain: %s %s in %.1f s, validation loss %s", name,
             "given" if given else ("reused" if entry["cached"] else "built"), entry["seconds"], entry["val_loss"])
    return entry
