"""The federation's one typed config: TOML files, CLI flags and the Flower run config all become these dataclasses.

Each dataclass validates itself on construction (`__post_init__`), so a config built in code or changed with
dataclasses.replace is checked like one read from a file; a field assigned afterwards is checked when the
config holding it is next constructed, or by calling validate().

A config error names the key, the value it got and what is allowed, e.g.
    config error: [server] lam = -1.0: must be >= 0 (weight of the distillation term)
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from dataclasses import InitVar, dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

from deepfusion.errors import ConfigError, config_fail, toml_at
from deepfusion.pipeline_config import ClusteringConfig, DistillConfig, PretrainConfig, TuneConfig

# The paper's protocol (recipes/deepfusion.py): devices upload their trained LLM once; the server clusters,
# distils (VAA) and fuses. Its ablations and OFA-KD run the same pipeline with one part changed (ONESHOT_VARIANTS);
# fedmkt (baselines/fedmkt.py) keeps its Phase 0 and replaces Phases I-III with FedMKT's MinCE logit distillation.
ONESHOT_METHODS = ("deepfusion", "deepfusion-no-vaa", "deepfusion-logits-only", "deepfusion-no-clustering", "ofa-kd",
                   "fedmkt")
# The multi-round knowledge protocol (beyond the paper): devices send top-k predictions every round.
KNOWLEDGE_METHODS = ("multiround-views", "device-kd", "plain-fkd")
# Devices host the global MoE, or some of its experts, and send weights (baselines/hosting.py).
HOSTING_METHODS = ("fedavg-moe", "expert-subset", "fedjets")
# The server trains alone: on the proxy set (the floor) or on everyone's pooled data (the upper bound).
SERVER_METHODS = ("proxy-only", "centralized", "centralized-converged")
METHODS = (*ONESHOT_METHODS, *KNOWLEDGE_METHODS, *HOSTING_METHODS, *SERVER_METHODS, "local-only")
# The presets' names per family, so a config validates without loading torch; models.py builds them
# (tests/test_models.py checks its MOE_PRESETS and DEVICE_PRESETS have exactly these names).
MOE_SIZES = {"qwen_moe": ("tiny", "small"), "deepseek_moe": ("tiny", "small")}
DEVICE_SIZES = {"qwen2": ("tiny", "small", "base"), "llama": ("tiny", "small", "tinyllama", "base"),
                "gpt2": ("tiny", "small", "medium"), "olmo": ("tiny", "small"), "bloom": ("tiny", "small")}
GLOBAL_FAMILIES = tuple(MOE_SIZES)
DEVICE_FAMILIES = tuple(DEVICE_SIZES)
ATTACKS = ("uniform", "shifted", "inverted")
UPLOAD_DTYPES = ("float16", "bfloat16")
FINETUNES = ("full", "lora", "auto")
UPLOADS = ("merged", "adapter")
SECTIONS = ("data", "knowledge", "server", "pretrain", "clustering", "distill", "tune")


def device_at(i: int | None, device_id: Any = None) -> str:
    """The i-th (0-based) [[devices]] table counted from 1, with its id if it has one: [[devices]] #2 (id 'ghr');
    i None (a device built in code, outside a federation's list): [[devices]] (id 'ghr')."""
    return ("[[devices]]" + (f" #{i + 1}" if i is not None else "")
            + (f" (id {device_id!r})" if isinstance(device_id, str) and device_id else ""))


@dataclass
class DataConfig:
    dir: str | None = None  # data directory; None: --data-dir, $DEEPFUSION_DATA, ../shared/data, user cache
    seed: int = 0  # split seed (kept apart from the training seed so every method sees the same splits)
    proxy_frac: float = 0.2  # share of each source's documents that goes to the public proxy set
    test_frac: float = 0.1  # share held out for perplexity
    seq_len: int = 128  # tokens per training / proxy block
    proxy_blocks: int = 256  # proxy blocks, drawn equally from each domain (balanced: see DESIGN §2)
    test_blocks: int = 48  # held-out blocks per source for evaluation (fixed, so rounds are comparable)
    val_blocks: int = 32  # validation blocks per domain: proxy text left out of the proxy set (early stopping, λ tuning)
    qa_pairs: int = 64  # held-out QA pairs per source whose answers are scored (qa_log_ppl, qa_accuracy); 0: none
    tokenizer: str | None = None  # local pretrained tokenizer dir; None: train BPE on the proxy corpus
    vocab_size: int = 8192  # BPE vocabulary size when training one
    private_split: str = "even"  # devices sharing a source: "even" (round-robin) or "uneven" (Dirichlet shares)
    split_alpha: float = 1.0  # Dirichlet concentration of the uneven split (smaller: more uneven)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        for key in ("proxy_frac", "test_frac"):
            v = getattr(self, key)
            if not 0.0 < v < 0.5:
                config_fail("data", key, v, "must be in (0, 0.5)")
        if self.proxy_frac + self.test_frac >= 0.8:
            config_fail("data", "proxy_frac", self.proxy_frac, "proxy_frac + test_frac must leave devices >= 20% private data")
        for key, lo in (("seq_len", 8), ("proxy_blocks", 2), ("test_blocks", 1), ("val_blocks", 0), ("qa_pairs", 0),
                        ("vocab_size", 300)):
            if getattr(self, key) < lo:
                config_fail("data", key, getattr(self, key), f"must be >= {lo}")
        if self.private_split not in ("even", "uneven"):
            config_fail("data", "private_split", self.private_split, "allowed: even, uneven")
        if not (self.split_alpha > 0 and math.isfinite(self.split_alpha)):
            config_fail("data", "split_alpha", self.split_alpha, "must be finite and > 0")


@dataclass
class DeviceConfig:
    id: str  # unique device name, e.g. "gard"
    source: str  # private data: "medquad:gard", "tatqa:0/2", "jsonl:path", "text:dir"
    family: str = "qwen2"  # on-device LLM family: qwen2 | llama
    size: str = "small"  # preset name in DEVICE_SIZES[family] (models.DEVICE_PRESETS); "auto" picks by memory_mb
    memory_mb: int | None = None  # device memory budget, for size = "auto" and finetune = "auto" / "lora"
    domain: str | None = None  # domain label for jsonl/text sources (medquad/tatqa know theirs)
    local_steps: int = 20  # local optimiser steps per round
    batch_size: int = 8
    lr: float = 1e-3
    attack: str | None = None  # evaluation only: make this device adversarial (uniform | shifted | inverted)
    dp_noise: float = 0.0  # σ: Gaussian noise on uploads, in units of dp_clip (0: no differential privacy; privacy.py)
    dp_clip: float = 1.0  # C: L2 norm each position's distribution is clipped to (1 never clips a distribution)
    dp_delta: float = 1e-5  # δ of the (ε, δ)-DP guarantee that summary.json reports
    # The paper's protocol (Phase 0): train from the type's public checkpoint until local validation stops improving.
    checkpoint: str | None = None  # local save_pretrained dir of any causal LM (family/size then ignored); None: made from the public text
    # The device's own tokenizer (a local dir with tokenizer.json): its private text and its model use it, the
    # server aligns it with the global one (alignment.py). None: the checkpoint dir's tokenizer if it has one,
    # else the federation's. A tokenizer equal to the federation's is the federation's.
    tokenizer: str | None = None
    max_steps: int = 300  # cap on local training steps
    eval_every: int = 25  # steps between local validation checks
    patience: int = 2  # checks without a better local validation loss before training stops
    val_frac: float = 0.1  # share of the private blocks held out for local validation
    upload_dtype: str = "float16"  # the weights' dtype on the wire: float16 | bfloat16
    # Phase 0 in a memory budget (lora.py): full fine-tuning, LoRA adapters, or "auto" (full if its measured
    # peak fits memory_mb, else the largest LoRA rank that does); "adapter" uploads only the adapter
    finetune: str = "full"  # full | lora | auto
    lora_rank: int = 0  # LoRA rank; 0: the largest of lora.RANKS whose measured peak fits memory_mb
    upload: str = "merged"  # merged (the whole model) | adapter (LoRA tensors; the server adds its public base)
    at: InitVar[str | None] = None  # where its errors point (device_at); not a field: a config file cannot set it

    def __post_init__(self, at: str | None) -> None:
        self.validate(at)

    def validate(self, where: str | None = None) -> None:
        where = where or device_at(None, self.id)
        if not self.id or not self.id.replace("_", "").replace("-", "").isalnum():
            config_fail(where, "id", self.id, "must be a non-empty name of letters, digits, '-' and '_'")
        # With its own checkpoint a device's architecture is read from that directory's config.json: any
        # causal LM, so family and size are ignored (checkpoints.device_model).
        if self.checkpoint is None and self.family not in DEVICE_FAMILIES:
            config_fail(where, "family", self.family, f"allowed: {', '.join(DEVICE_FAMILIES)}")
        sizes = (*DEVICE_SIZES.get(self.family, ()), "auto")
        if self.checkpoint is None and self.size not in sizes:
            config_fail(where, "size", self.size, f"allowed for {self.family}: {', '.join(sizes)}")
        if self.checkpoint is None and self.size == "auto" and not self.memory_mb:
            config_fail(where, "memory_mb", self.memory_mb, "size = 'auto' needs a memory budget in MB")
        for key in ("local_steps", "batch_size"):
            if getattr(self, key) < 1:
                config_fail(where, key, getattr(self, key), "must be >= 1")
        if not self.lr > 0:
            config_fail(where, "lr", self.lr, "must be > 0")
        if self.attack is not None and self.attack not in ATTACKS:
            config_fail(where, "attack", self.attack, f"allowed: {', '.join(ATTACKS)}")
        if not (self.dp_noise >= 0 and math.isfinite(self.dp_noise)):
            config_fail(where, "dp_noise", self.dp_noise, "must be finite and >= 0 (0 turns differential privacy off)")
        if not (self.dp_clip > 0 and math.isfinite(self.dp_clip)):
            config_fail(where, "dp_clip", self.dp_clip, "must be finite and > 0")
        if not 0.0 < self.dp_delta < 1.0:
            config_fail(where, "dp_delta", self.dp_delta, "must be in (0, 1), well below 1 / (number of devices)")
        for key in ("max_steps", "eval_every", "patience"):
            if getattr(self, key) < 1:
                config_fail(where, key, getattr(self, key), "must be >= 1")
        if not 0.0 < self.val_frac < 0.5:
            config_fail(where, "val_frac", self.val_frac, "must be in (0, 0.5)")
        if self.upload_dtype not in UPLOAD_DTYPES:
            config_fail(where, "upload_dtype", self.upload_dtype, f"allowed: {', '.join(UPLOAD_DTYPES)}")
        self._validate_finetune(where)

    def _validate_finetune(self, where: str) -> None:
        if self.finetune not in FINETUNES:
            config_fail(where, "finetune", self.finetune, f"allowed: {', '.join(FINETUNES)}")
        if not 0 <= self.lora_rank <= 4096:
            config_fail(where, "lora_rank", self.lora_rank, "must be in [0, 4096] (0: chosen from memory_mb)")
        if self.finetune == "auto" and not self.memory_mb:
            config_fail(where, "memory_mb", self.memory_mb, "finetune = 'auto' needs a memory budget in MB")
        if self.finetune == "lora" and not self.lora_rank and not self.memory_mb:
            config_fail(where, "lora_rank", self.lora_rank, "finetune = 'lora' needs a rank, or memory_mb to choose one")
        if self.upload not in UPLOADS:
            config_fail(where, "upload", self.upload, f"allowed: {', '.join(UPLOADS)}")
        if self.upload == "adapter" and self.finetune == "full":
            config_fail(where, "upload", self.upload, "an adapter exists only with finetune = 'lora' or 'auto'")
        if self.upload == "adapter" and self.tokenizer:
            config_fail(where, "upload", self.upload, "the server rebuilds an adapter's model on the public checkpoint "
                        "it builds with the federation's tokenizer; a device with its own tokenizer uploads 'merged'")
        if self.upload == "adapter" and self.checkpoint:
            config_fail(where, "upload", self.upload, "the server rebuilds an adapter's model on the public checkpoint "
                        "it builds itself; a device's own checkpoint directory is not on the server: upload 'merged'")


@dataclass
class KnowledgeConfig:
    """[knowledge] What a device sends each round in the multi-round protocol (multiround-views, device-kd,
    plain-fkd): per proxy position, its top-k next-token probabilities at temperature T, and the tail mass.
    Devices act on these keys (a replay recording is keyed by them); the server caps uploads at topk and
    distils at the same T."""

    topk: int = 8  # k: token ids a device sends per position
    temperature: float = 1.0  # T at which devices soften their predictions (and the server its student's)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if self.topk < 1:
            config_fail("knowledge", "topk", self.topk, "must be >= 1")
        if not (self.temperature > 0 and math.isfinite(self.temperature)):
            config_fail("knowledge", "temperature", self.temperature, "must be finite and > 0")


@dataclass
class ServerConfig:
    family: str = "qwen_moe"  # global MoE family: qwen_moe | deepseek_moe
    size: str = "small"  # preset name in MOE_SIZES[family] (models.MOE_PRESETS)
    pretrained: str | None = None  # local pretrained MoE directory (overrides family/size)
    dense_base: str | None = None  # deepfusion: local directory of the MoE's dense base; None: made from the public text
    steps: int = 40  # distillation steps per round
    batch_size: int = 8  # proxy blocks per step
    lr: float = 2e-3
    lam: float = 1.0  # λ: weight of the distillation term against the proxy cross-entropy
    # multiround-views: the per-device logit views (logit_views.py)
    views_stages: int = 4  # MoE depths the views attend over (evenly spaced, the last included)
    views_heads: int = 2  # attention heads over stages
    views_dim: int = 16  # key/query width per head: small, so a view can express little but its view
    views_mix: float = 0.5  # share of each device's KD weight on its logit view (the rest on the final head)
    views_positions: float = 0.25  # share of each batch's positions the views are trained on (they are few numbers)
    views_lr_scale: float = 1.0  # the views' learning rate, as a multiple of lr
    views_final: str = "devices"  # the final-head term: per device ("devices") or vs their average ("average")
    reliability: bool = True  # weight devices by their agreement with the proxy's next tokens
    min_devices: int = 1  # a round needs at least this many valid packets to distil
    device_timeout: float = 0.0  # seconds a device may take per round before its answer is dropped (0: no limit)
    round_retries: int = 0  # below min_devices answers, ask the failed / timed-out devices again this often, then skip
    host_steps: int = 0  # hosting methods: local steps per host per round; 0: steps split over hosts (matched tokens)
    fedjets_experts: int = 0  # fedjets: routed experts per MoE layer each client gets; 0: the MoE's num_experts_per_tok
    patience: int = 3  # centralized-converged: rounds without a better validation perplexity before it stops
    max_rounds: int = 40  # centralized-converged: the most rounds it may train, converged or not

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if self.family not in GLOBAL_FAMILIES:
            config_fail("server", "family", self.family, f"allowed: {', '.join(GLOBAL_FAMILIES)}")
        if self.pretrained is None and self.size not in MOE_SIZES[self.family]:
            config_fail("server", "size", self.size, f"allowed for {self.family}: {', '.join(MOE_SIZES[self.family])}")
        for key, lo in (("steps", 0), ("batch_size", 1), ("views_stages", 1), ("views_heads", 1),
                        ("views_dim", 1), ("min_devices", 1), ("round_retries", 0), ("host_steps", 0), ("fedjets_experts", 0), ("patience", 1), ("max_rounds", 1)):
            if getattr(self, key) < lo:
                config_fail("server", key, getattr(self, key), f"must be >= {lo}")
        if not self.lr > 0:
            config_fail("server", "lr", self.lr, "must be > 0")
        if not self.lam >= 0:
            config_fail("server", "lam", self.lam, "must be >= 0 (weight of the distillation term)")
        if not 0.0 <= self.views_mix <= 1.0:
            config_fail("server", "views_mix", self.views_mix, "must be in [0, 1]")
        if not self.device_timeout >= 0:
            config_fail("server", "device_timeout", self.device_timeout, "must be >= 0 seconds (0: no limit)")
        if self.views_final not in ("devices", "average"):
            config_fail("server", "views_final", self.views_final, "allowed: devices, average")
        if not self.views_lr_scale > 0:
            config_fail("server", "views_lr_scale", self.views_lr_scale, "must be > 0 (a multiple of lr)")
        if not 0.0 < self.views_positions <= 1.0:
            config_fail("server", "views_positions", self.views_positions, "must be in (0, 1]")


@dataclass
class FederationConfig:
    name: str = "federation"
    method: str = "deepfusion"  # one of METHODS (README: Methods)
    rounds: int = 3
    seed: int = 0  # training seed (model init, batches)
    device: str = "auto"  # torch device for server and devices: auto | cpu | cuda | cuda:N
    data: DataConfig = field(default_factory=DataConfig)
    knowledge: KnowledgeConfig = field(default_factory=KnowledgeConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    clustering: ClusteringConfig = field(default_factory=ClusteringConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    devices: list[DeviceConfig] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> FederationConfig:
        """Every section and device again (one may have been assigned since it was built), then the whole."""
        if self.method not in METHODS:
            config_fail("federation", "method", self.method, f"allowed: {', '.join(METHODS)}")
        if self.rounds < 1:
            config_fail("federation", "rounds", self.rounds, "must be >= 1")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            config_fail("federation", "device", self.device, "allowed: auto, cpu, cuda, cuda:N")
        for section in (self.data, self.knowledge, self.server, self.pretrain, self.clustering, self.distill, self.tune):
            section.validate()
        if not self.devices:
            config_fail("devices", "devices", [], "a federation needs at least one [[devices]] entry")
        seen: set[str] = set()
        for i, d in enumerate(self.devices):
            d.validate(device_at(i, d.id))
            if d.id in seen:
                config_fail(device_at(i, d.id), "id", d.id, "device ids must be unique")
            seen.add(d.id)
            if d.tokenizer and self.method in HOSTING_METHODS + SERVER_METHODS:
                config_fail(device_at(i, d.id), "tokenizer", d.tokenizer, f"method {self.method!r} trains the global "
                            "MoE, which reads the federation's tokenizer; a device's own tokenizer applies where it "
                            "runs its own LLM (the one-shot and knowledge methods, local-only)")
            if d.finetune != "full" and self.method not in ONESHOT_METHODS:  # only Phase 0 acts on it
                config_fail(device_at(i, d.id), "finetune", d.finetune, "applies to the one-shot methods' Phase 0 "
                            f"({', '.join(ONESHOT_METHODS)}); method {self.method!r} trains every weight")
        if self.server.min_devices > len(self.devices):
            config_fail("server", "min_devices", self.server.min_devices, f"only {len(self.devices)} devices are configured")
        return self


def _build(cls: type, raw: Any, where: str) -> Any:
    """Build dataclass `cls` from a TOML table, rejecting unknown keys and wrong types by name."""
    if not isinstance(raw, dict):
        raise ConfigError(f"config error: {toml_at(where)} must be a table, got {type(raw).__name__}")
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise ConfigError(f"config error: {toml_at(where)} unknown key {unknown[0]!r}; allowed: {', '.join(sorted(names))}")
    kwargs = {}
    for key, value in raw.items():
        kwargs[key] = _coerce(hints[key], value, where, key)
    if cls is DeviceConfig:  # its errors name its place in the file: [[devices]] #2 (id 'ghr')
        kwargs["at"] = where
    try:
        return cls(**kwargs)
    except TypeError as e:  # a required key is missing
        missing = [f.name for f in dataclasses.fields(cls)
                   if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING and f.name not in raw]
        raise ConfigError(f"config error: {toml_at(where)} missing required key {missing[0]!r}" if missing
                          else str(e)) from None


def _coerce(hint: Any, value: Any, where: str, key: str) -> Any:
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, key)
    if hint == list[DeviceConfig]:
        if not isinstance(value, list):
            config_fail(where, key, value, "must be an array of tables [[devices]]")
        return [_build(DeviceConfig, v, device_at(i, v.get("id") if isinstance(v, dict) else None))
                for i, v in enumerate(value)]
    allowed = _allowed_types(hint)
    if isinstance(value, bool) and bool not in allowed:
        config_fail(where, key, value, f"must be {' or '.join(t.__name__ for t in allowed)}")
    if float in allowed and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, tuple(allowed)):
        config_fail(where, key, value, f"must be {' or '.join(t.__name__ for t in allowed)}")
    return value


def _allowed_types(hint: Any) -> list[type]:
    args = getattr(hint, "__args__", None)
    return [a for a in args if a is not type(None)] if args else [hint]


def load_config(path: str | Path | None = None, sets: list[str] | None = None, *, set_by: str = "--set",
                **overrides: Any) -> FederationConfig:
    """Read a TOML federation config (the shipped default when path is None), apply CLI overrides and dotted
    `sets` ("tune.loss=ce", "seed=3"; `set_by` names where they came from in an error), validate."""
    path = Path(path) if path else default_config_path("default")
    if not path.is_file():
        raise ConfigError(f"config error: file {path} not found; pass --config PATH to an existing TOML file")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"config error: {path} is not valid TOML: {e}") from None
    raw.update({k: v for k, v in overrides.items() if v is not None})
    for item in sets or []:
        apply_set(raw, item, set_by)
    return _build(FederationConfig, raw, "federation")


def apply_set(raw: dict, item: str, set_by: str = "--set") -> None:
    """One dotted override, SECTION.KEY=VALUE or KEY=VALUE; the value is read as TOML (2.0, true, "x"), else
    taken as a string. Unknown keys are refused on build, like a key in the file."""
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"config error: {set_by} {item!r}: expected SECTION.KEY=VALUE, e.g. tune.loss=ce")
    try:
        parsed = tomllib.loads(f"v = {value.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        parsed = value.strip()
    *sections, name = key.strip().split(".")
    table = raw
    for section in sections:
        if section not in SECTIONS or not isinstance(table.setdefault(section, {}), dict):
            raise ConfigError(f"config error: {set_by} {item!r}: no section [{section}]; sections: {', '.join(SECTIONS)}")
        table = table[section]
    table[name] = parsed


def default_config_path(name: str) -> Path:
    """Shipped configs live in <repo>/configs (checkout) or deepfusion/configs (installed wheel)."""
    here = Path(__file__).resolve()
    for candidate in (here.parents[2] / "configs" / f"{name}.toml", here.parent / "configs" / f"{name}.toml"):
        if candidate.is_file():
            return candidate
    return here.parents[2] / "configs" / f"{name}.toml"


def to_dict(cfg: FederationConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def from_dict(raw: dict[str, Any]) -> FederationConfig:
    """The inverse of to_dict (a resumed run reads its config back from its checkpoint, eval from summary.json)."""
    raw = {k: v for k, v in raw.items()}
    raw["devices"] = [{k: v for k, v in d.items() if v is not None} for d in raw["devices"]]
    for section in SECTIONS:
        raw[section] = {k: v for k, v in raw.get(section, {}).items() if v is not None}
    for key in ("topk", "temperature"):  # runs saved before [knowledge] was a section kept these under [server]
        if key in raw["server"]:
            raw["knowledge"].setdefault(key, raw["server"].pop(key))
    return _build(FederationConfig, raw, "federation")
