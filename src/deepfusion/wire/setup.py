"""The setup: what the server sends every node once, before its first round (the Flower engine).

The federation's public parts: its config, its tokenizer and its proxy blocks; for the hosting methods
(fedavg-moe, expert-subset) also the global MoE's architecture. No private data, no model weights.

Why the server sends the tokenizer and the proxy blocks instead of every node rebuilding them: the
tokenizer is trained on the proxy documents of *every* source, and a node holds only its own source.
Rebuilding would mean shipping every source's proxy text to every node anyway, plus a BPE training per
node; one Setup message is smaller, faster and cannot drift between tokenizer versions.

Wire format (wire/safetensors.py, canonical: equal setups, equal bytes): one tensor `proxy` (P, T) in the
narrowest unsigned int dtype, and string metadata `version` (deepfusion's own: the node must build devices
exactly as the server's engine would), `config` (the federation config as JSON), `moe` (the global MoE's
architecture as JSON, "" for the knowledge methods) and `tokenizer/<file>` (the tokenizer's saved files).
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from transformers import AutoConfig, PretrainedConfig, PreTrainedModel

from deepfusion import __version__
from deepfusion.config import FederationConfig, from_dict, to_dict
from deepfusion.data import load_tokenizer
from deepfusion.wire import PacketError
from deepfusion.wire import safetensors as st
from deepfusion.wire.knowledge import id_dtype

if TYPE_CHECKING:
    from deepfusion.federation import FederationData

TOKENIZER = "tokenizer/"  # metadata keys under it are the tokenizer's files
FIELDS = {"version": str, "config": "json", "moe": str}
MAX_BYTES = 1 << 30  # the proxy blocks (a few hundred kB) and the tokenizer's files (about 1 MB)
MAX_HEADER = 64 << 20  # the tokenizer's files travel in the header


@dataclass
class Setup:
    """Server -> every node, once: the federation's public parts."""

    config: FederationConfig
    tokenizer_files: dict[str, str]  # file name -> text, as written by save_pretrained
    proxy: torch.Tensor  # (P, T) long, the public proxy blocks every device labels
    moe: str = ""  # hosting methods: the global MoE's config as JSON (+ its experts kernel); "" otherwise

    def to_bytes(self) -> bytes:
        vocab = int(self.proxy.max()) + 1 if self.proxy.numel() else 1
        meta = {"version": __version__, "config": st.to_str(to_dict(self.config), "json"), "moe": self.moe,
                **{TOKENIZER + name: text for name, text in self.tokenizer_files.items()}}
        return st.write({"proxy": self.proxy.numpy().astype(id_dtype(vocab))}, meta)

    @classmethod
    def from_bytes(cls, data: bytes) -> Setup:
        arrays, meta = st.read(data, "setup", version=__version__, fields=FIELDS, prefix=TOKENIZER,
                               tensors={"proxy": ("U8", "U16", "U32")}, max_bytes=MAX_BYTES, max_header=MAX_HEADER,
                               mismatch="the server runs deepfusion {got}, this node {want}; the packet format and "
                                        "device recipe must match: install the server's version on this node")
        if arrays["proxy"].ndim != 2 or not isinstance(meta["config"], dict):
            raise PacketError(f"malformed setup: proxy must be (P, T) and config a JSON object, got proxy "
                              f"{arrays['proxy'].shape}; server and node must run the same deepfusion version")
        files = {k.removeprefix(TOKENIZER): v for k, v in meta.items() if k.startswith(TOKENIZER)}
        proxy = torch.from_numpy(arrays["proxy"].astype(np.int64))  # (P, T)
        return cls(from_dict(meta["config"]), files, proxy, meta["moe"])

    def tokenizer(self):
        """Load the shared tokenizer through the same loader as the server (eos/pad set the same way)."""
        with tempfile.TemporaryDirectory(prefix="deepfusion-tok-") as tmp:
            for name, text in self.tokenizer_files.items():
                (Path(tmp) / name).write_text(text, encoding="utf-8")
            return load_tokenizer(Path(tmp))

    def global_config(self) -> PretrainedConfig:
        """The global MoE's architecture (hosting methods), as the server's model has it, experts kernel included."""
        if not self.moe:
            raise ValueError(f"method {self.config.method!r}: this setup carries no MoE architecture; "
                             "only the hosting methods (fedavg-moe, expert-subset, fedjets) send one")
        described = json.loads(self.moe)
        kernel = described.pop("experts_implementation", None)
        config = AutoConfig.for_model(**described)
        if kernel:
            config._experts_implementation = kernel
        return config


def make_setup(cfg: FederationConfig, data: FederationData, moe: PreTrainedModel | None = None) -> Setup:
    """The server's Setup: its config, its tokenizer's files, its proxy blocks; and, for a method whose
    devices host the global MoE, its architecture (no weights: those come every round)."""
    with tempfile.TemporaryDirectory(prefix="deepfusion-tok-") as tmp:
        data.tokenizer.save_pretrained(tmp)
        files = {p.name: p.read_text(encoding="utf-8") for p in sorted(Path(tmp).iterdir()) if p.is_file()}
    described = ""
    if moe is not None:  # to_json_string leaves out the experts kernel, which decides the host's numerics
        kernel = getattr(moe.config, "_experts_implementation", None)
        described = json.dumps({**json.loads(moe.config.to_json_string()), "experts_implementation": kernel})
    return Setup(cfg, files, data.proxy, described)
