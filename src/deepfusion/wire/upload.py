"""The paper's one round of communication (§IV-A): a task down to each device, its trained LLM up, once.

    Task    server -> device   the public basis the data embedding is projected on (a few kB, public)
    Upload  device -> server   the device's trained weights (fp16 or bf16), its architecture, and e_n,
                               the data embedding of its private text (tens of bytes)

Both are one safetensors blob: tensors plus string metadata, header keys sorted (equal messages, equal
bytes: engines compare them byte for byte). The upload's length is |m_n| of the paper's Eq. 5, the
communication cost F = Σ_n |m_n|.

The server trusts nothing it receives: `receive_upload` parses and checks every field (version, device,
architecture family and description, vocabulary, the exact parameter names and shapes that architecture
has, dtype, finite values, the embedding's size, a byte cap) and raises UploadError with one reason. The
recipe then leaves that device out and goes on.

A LoRA device may upload only its adapter (info upload = "adapter", lora.py): then the tensors are the peft
lora_A / lora_B names and shapes that the info's rank and target modules give on the architecture, and the
byte cap is the adapter's; the recipe merges it onto its own copy of the type's public checkpoint.
"""

from __future__ import annotations

import functools

import math
from dataclasses import dataclass, field

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedConfig

from deepfusion import lora
from deepfusion.wire import PacketError
from deepfusion.wire import safetensors as st

VERSION = 1
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
MODEL_TYPES = ("gpt2", "llama", "olmo", "bloom", "qwen2")  # the presets' families (models.py)


def accepted_model_type(model_type) -> bool:
    """Any causal LM built into transformers (a device may bring its own checkpoint: Auto classes, no remote
    code); a name outside that list could not be built without running someone else's code."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return isinstance(model_type, str) and model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
EMBEDDING = "__embedding__"  # the tensor holding e_n's bytes (uint8) inside an upload
TOKENIZER = "__tokenizer__"  # a device's own tokenizer (uint8, wire_tokenizer), absent when it uses the federation's
BASIS = "__basis__"  # the tensor holding the public basis' bytes (uint8) inside a task
HEADER_ROOM = 64 << 10  # safetensors header + metadata: a few kB for a model's names and config, ample room
TASK_FIELDS = {"version": str, "device_id": str}
UPLOAD_FIELDS = {"version": str, "device_id": str, "arch": str, "config": "json", "info": "json"}


class UploadError(PacketError):
    """A message on the one-shot wire is malformed or does not fit what the server expects."""


@dataclass
class Task:
    """Server -> device: the one train message of Phase 0."""

    device_id: str
    basis: bytes  # embedding.Basis.to_bytes(): the public axes e_n is projected on

    def to_bytes(self) -> bytes:
        tensors = {BASIS: torch.frombuffer(bytearray(self.basis), dtype=torch.uint8)}
        return st.write(tensors, {"version": str(VERSION), "device_id": self.device_id})

    @classmethod
    def from_bytes(cls, data: bytes) -> Task:
        tensors, meta = st.read(data, "task", version=str(VERSION), fields=TASK_FIELDS, tensors={BASIS: ("U8",)},
                                max_bytes=1 << 26, backend="torch", error=UploadError)
        return cls(meta["device_id"], tensors[BASIS].numpy().tobytes())


@dataclass
class Upload:
    """Device -> server, once: its trained on-device LLM and its data embedding."""

    device_id: str
    arch: str  # the device type, e.g. "gpt2/small": devices of one type averaged in a domain (Fig. 4)
    config: dict  # the model's transformers config (to_dict): the architecture descriptor
    tensors: dict[str, torch.Tensor]  # parameter name -> weight in the upload dtype (tied weights once)
    embedding: bytes  # e_n (embedding.py)
    info: dict = field(default_factory=dict)  # numbers the server only reports: steps, val_loss, peak memory, ...
    tokenizer: bytes = b""  # the device's own tokenizer (wire_tokenizer), b"": the federation's

    def to_bytes(self) -> bytes:
        tensors = {**{k: v.detach().cpu().contiguous() for k, v in self.tensors.items()},
                   EMBEDDING: torch.frombuffer(bytearray(self.embedding), dtype=torch.uint8)}
        if self.tokenizer:
            tensors[TOKENIZER] = torch.frombuffer(bytearray(self.tokenizer), dtype=torch.uint8)
        meta = {"version": str(VERSION), "device_id": self.device_id, "arch": self.arch,
                "config": st.to_str(self.config, "json"), "info": st.to_str(self.info, "json")}
        return st.write(tensors, meta)

    @classmethod
    def from_bytes(cls, data: bytes, max_bytes: int = 1 << 32) -> Upload:
        tensors, meta = st.read(data, "upload", version=str(VERSION), fields=UPLOAD_FIELDS, max_bytes=max_bytes,
                                backend="torch", error=UploadError)
        embedding, tok = tensors.pop(EMBEDDING, None), tensors.pop(TOKENIZER, None)
        if embedding is None or embedding.dtype != torch.uint8 or embedding.ndim != 1:
            raise UploadError(f"malformed upload: it must carry e_n as a 1-D uint8 tensor {EMBEDDING!r}")
        if tok is not None and (tok.dtype != torch.uint8 or tok.ndim != 1):
            raise UploadError(f"malformed upload: its tokenizer {TOKENIZER!r} must be a 1-D uint8 tensor")
        if not isinstance(meta["config"], dict) or not isinstance(meta["info"], dict):
            raise UploadError("malformed upload: its config and info must be JSON objects")
        return cls(meta["device_id"], meta["arch"], meta["config"], tensors, embedding.numpy().tobytes(), meta["info"],
                   b"" if tok is None else tok.numpy().tobytes())

    def dtype(self) -> torch.dtype:
        dtypes = {t.dtype for t in self.tensors.values()}
        return dtypes.pop() if len(dtypes) == 1 else torch.float32  # mixed dtypes are rejected below

    def n_bytes(self) -> int:
        return len(self.to_bytes())


# ---- the server's checks -------------------------------------------------------------------------

def expected_parameters(config: PreTrainedConfig) -> dict[str, torch.Size]:
    """The parameter names and shapes of the architecture `config` describes (built on the meta device: no
    memory, no init); tied weights appear once, as named_parameters lists them."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return {name: p.shape for name, p in model.named_parameters()}


def describe(config: dict) -> PreTrainedConfig:
    """The transformers config an upload describes, for an accepted on-device family only."""
    model_type = config.get("model_type")
    if not accepted_model_type(model_type):
        raise UploadError(f"architecture {model_type!r} is not a causal LM built into transformers, which is "
                          f"what this server accepts (e.g. {', '.join(MODEL_TYPES)})")
    try:
        return AutoConfig.for_model(**config)
    except Exception as e:  # transformers raises many types on a bad config
        raise UploadError(f"architecture description does not build a {model_type} config "
                          f"({type(e).__name__}: {str(e)[:120]})") from None


def receive_upload(data: bytes, sender: str, *, devices: set[str], vocab_size: int, embedding_bytes: int,
                   max_bytes: int = 1 << 32) -> tuple[Upload, PreTrainedConfig]:
    """Parse and check one device's upload; returns it with its architecture, or raises UploadError."""
    upload = Upload.from_bytes(data, max_bytes)
    if upload.device_id != sender:
        raise UploadError(f"upload claims device {upload.device_id!r} but came from {sender!r}")
    if sender not in devices:
        raise UploadError(f"device {sender!r} is not in this federation")
    config = describe(upload.config)
    vocab = config.get_text_config().vocab_size
    if upload.tokenizer:
        own = len(read_tokenizer(upload.tokenizer))
        if vocab < own:
            raise UploadError(f"vocab {vocab} is smaller than its own tokenizer's {own} ids: the model cannot "
                              "read every token its tokenizer makes")
    elif vocab != vocab_size:
        raise UploadError(f"vocab {vocab} != federation vocab {vocab_size}, and the upload carries no tokenizer of "
                          "its own: a device uses the federation's tokenizer or sends its own with the model")
    if len(upload.embedding) != embedding_bytes:
        raise UploadError(f"data embedding is {len(upload.embedding)} bytes, expected {embedding_bytes}")
    expected = expected_adapter(upload, config) if lora.is_adapter(upload.info) else expected_parameters(config)
    _check_tensors(upload, expected)
    cap = sum(math.prod(s) for s in expected.values()) * 2 + embedding_bytes + len(upload.tokenizer) + HEADER_ROOM
    if len(data) > cap:
        raise UploadError(f"upload is {len(data)} bytes, more than its architecture's {cap} in 16-bit weights")
    return upload, config


def expected_adapter(upload: Upload, config: PreTrainedConfig) -> dict[str, torch.Size]:
    """A LoRA adapter upload (info upload = "adapter"): the tensor names and shapes its claimed rank and target
    modules give on this architecture. Its base is checked by the recipe, which holds the public checkpoints."""
    try:
        return lora.expected_adapter(config, upload.info)
    except ValueError as e:
        raise UploadError(f"LoRA adapter upload: {e}") from None


def _check_tensors(upload: Upload, expected: dict[str, torch.Size]) -> None:
    if set(upload.tensors) != set(expected):
        missing, extra = sorted(set(expected) - set(upload.tensors)), sorted(set(upload.tensors) - set(expected))
        raise UploadError(f"parameter names differ from the architecture's: missing {missing[:3]}, "
                          f"unexpected {extra[:3]}")
    for name, t in upload.tensors.items():
        if t.dtype not in DTYPES.values():
            raise UploadError(f"{name} is {t.dtype}; uploads carry float16 or bfloat16 weights")
        if t.shape != expected[name]:
            raise UploadError(f"{name} has shape {tuple(t.shape)}, the architecture has {tuple(expected[name])}")
        if not torch.isfinite(t).all():
            raise UploadError(f"{name} holds NaN or inf")
    if len({t.dtype for t in upload.tensors.values()}) > 1:
        raise UploadError("weights mix dtypes; an upload uses one of float16, bfloat16")


def load_uploaded(upload: Upload, config: PreTrainedConfig) -> dict[str, torch.Tensor]:
    """The upload's weights as an fp32 state dict (the server averages and distils in fp32)."""
    return {k: v.float() for k, v in upload.tensors.items()}


# ---- a device's own tokenizer on the wire ---------------------------------------------------------------

# The roles a PreTrainedTokenizerFast keeps outside tokenizer.json: without them the server could not tell
# which id ends a document (alignment maps specials by role).
_ROLES = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")


def wire_tokenizer(tokenizer) -> bytes:
    """A fast tokenizer as bytes: its tokenizer.json and its special tokens' roles, zlib-compressed (a 50k-id
    BPE is ~0.5 MB this way, a few % of the smallest model it comes with; counted in the upload's bytes)."""
    import json
    import zlib

    roles = {r: getattr(tokenizer, r) for r in _ROLES if isinstance(getattr(tokenizer, r, None), str)}
    body = json.dumps({"tokenizer": tokenizer.backend_tokenizer.to_str(), "roles": roles}, sort_keys=True)
    return zlib.compress(body.encode("utf-8"), 9)


@functools.lru_cache(maxsize=64)
def read_tokenizer(data: bytes):
    """The inverse of wire_tokenizer, checked: UploadError naming what is wrong. Cached on the bytes: the server
    reads each upload's tokenizer when it checks it, groups it and reports on it, and the devices of one type
    send the same one (errors are not cached: a bad one fails every time). Callers only read the tokenizer."""
    import json
    import zlib

    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    try:
        body = json.loads(zlib.decompress(data, bufsize=1 << 20).decode("utf-8"))
        roles = {r: v for r, v in body["roles"].items() if r in _ROLES and isinstance(v, str)}
        tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(body["tokenizer"]), **roles)
    except Exception as e:  # zlib, json, KeyError, tokenizers' own exceptions: all say the same thing
        raise UploadError(f"malformed upload: its tokenizer does not load ({type(e).__name__}: "
                          f"{str(e)[:120]})") from None
    if tok.eos_token is None:
        raise UploadError("malformed upload: its tokenizer names no eos token; the server aligns documents on it")
    return tok
