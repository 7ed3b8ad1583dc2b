"""The paper pipeline's phases, one config section each: [pretrain] the public checkpoints, [clustering]
Phase I, [distill] Phase II, [tune] Phase III (recipes/deepfusion.py). The rest of the federation's config
(data, devices, knowledge, server) and the loading of files is config.py; these sections validate themselves
on construction as every section there does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from deepfusion.errors import config_fail

CLUSTER_METHODS = ("kmeans", "random")
FEATURE_KD = ("vaa", "ofa", "none")
TUNE_LOSSES = ("keep", "ce")
ROUTER_INITS = ("domains", "random")
SHARED_RULES = ("auto", "mean", "zero")


@dataclass
class PretrainConfig:
    """[pretrain] The public checkpoints (paper §V-A: devices start from GPT-2, TinyLlama, ...): every device
    type and the MoE's dense base, trained on the public text and cached by content hash (checkpoints.py)."""

    steps: int = 200  # optimiser steps per model
    batch_size: int = 16
    lr: float = 3e-3
    seed: int = 0  # fixed apart from the training seed: a public checkpoint is the same for every run

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        for key in ("steps", "batch_size"):
            if getattr(self, key) < 1:
                config_fail("pretrain", key, getattr(self, key), "must be >= 1")
        if not self.lr > 0:
            config_fail("pretrain", "lr", self.lr, "must be > 0")


@dataclass
class ClusteringConfig:
    """[clustering] Phase I (paper §IV-B, Eq. 6): the devices' data embeddings, clustered into K domains."""

    domains: int = 0  # K; 0: the MoE's routed experts / fine-grained experts per dense FFN (upcycling.py)
    method: str = "kmeans"  # kmeans (Eq. 6) | random (the no-clustering ablation: same K, devices dealt at random)
    embed_dim: int = 32  # e_n's dimensions: the encoder's output projected on the public text's principal axes
    embed_texts: int = 64  # private documents a device embeds (their mean is e_n)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if self.domains < 0:
            config_fail("clustering", "domains", self.domains, "must be >= 0 (0: from the MoE's experts)")
        if self.method not in CLUSTER_METHODS:
            config_fail("clustering", "method", self.method, f"allowed: {', '.join(CLUSTER_METHODS)}")
        for key, lo in (("embed_dim", 2), ("embed_texts", 1)):
            if getattr(self, key) < lo:
                config_fail("clustering", key, getattr(self, key), f"must be >= {lo}")


@dataclass
class DistillConfig:
    """[distill] Phase II (paper §IV-C, Eqs. 7-11): per domain, L = CE + α Σ_j MSE(F_j^T, F_j^S') + β KL."""

    steps: int = 200  # optimiser steps per domain
    batch_size: int = 8  # public blocks per step
    lr: float = 1e-3
    alpha: float = 1.0  # α: weight of the feature term (VAA's MSE, or OFA's per-stage loss)
    beta: float = 1.0  # β: weight of the logit KL
    ce: bool = True  # keep L_CE (false: the logits-only ablation)
    temperature: float = 1.0  # T of the logit KL
    features: str = "vaa"  # vaa (Fig. 5) | ofa (OFA-KD's stage branches into logit space) | none
    stages: int = 4  # J: representation stages of teacher and student
    patches: int = 32  # P_q: stage-patches VAA attends over, P_q / J per stage
    dim: int = 64  # d: VAA's attention width
    heads: int = 4  # VAA's attention heads
    causal: bool = True  # a patch attends only to patches of its own or earlier positions (the LM is causal)
    ofa_gamma: float = 1.0  # OFA-KD's modulating exponent on the target class

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        for key, lo in (("steps", 0), ("batch_size", 1), ("stages", 1), ("patches", 1), ("dim", 1), ("heads", 1)):
            if getattr(self, key) < lo:
                config_fail("distill", key, getattr(self, key), f"must be >= {lo}")
        for key in ("alpha", "beta"):
            if not (getattr(self, key) >= 0 and math.isfinite(getattr(self, key))):
                config_fail("distill", key, getattr(self, key), "must be finite and >= 0")
        for key in ("lr", "temperature", "ofa_gamma"):
            if not getattr(self, key) > 0:
                config_fail("distill", key, getattr(self, key), "must be > 0")
        if self.features not in FEATURE_KD:
            config_fail("distill", "features", self.features, f"allowed: {', '.join(FEATURE_KD)}")
        if self.patches % self.stages:
            config_fail("distill", "patches", self.patches, f"must be a multiple of stages = {self.stages} (P_q / J per stage)")
        if self.dim % self.heads:
            config_fail("distill", "dim", self.dim, f"must be a multiple of heads = {self.heads}")


@dataclass
class TuneConfig:
    """[tune] Phase III (paper §IV-D, Eqs. 12-13): fuse the K students into the MoE, then tune with the experts
    frozen (embeddings, attention, router, norms, output) on the public data."""

    steps: int = 300  # most tuning steps (early stopping on validation may end it sooner)
    batch_size: int = 8
    lr: float = 5e-4
    loss: str = "keep"  # ce: the paper's (cross-entropy + router loss); keep: + λ KL to the domain teachers
    kl_weight: float = 1.0  # λ of the knowledge-keeping KL
    topk: int = 32  # the teachers' mixture is kept as top-k + tail per position (losses.topk_kl)
    eval_every: int = 25  # steps between validation checks
    patience: int = 4  # checks without a better validation perplexity before tuning stops
    router_init: str = "domains"  # domains: each domain's experts answer its text | random
    shared: str = "auto"  # shared expert: mean (of the students' FFNs) | zero | auto (mean when widths allow)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        for key, lo in (("steps", 0), ("batch_size", 1), ("topk", 1), ("eval_every", 1), ("patience", 1)):
            if getattr(self, key) < lo:
                config_fail("tune", key, getattr(self, key), f"must be >= {lo}")
        if not self.lr > 0:
            config_fail("tune", "lr", self.lr, "must be > 0")
        if not (self.kl_weight >= 0 and math.isfinite(self.kl_weight)):
            config_fail("tune", "kl_weight", self.kl_weight, "must be finite and >= 0")
        for key, allowed in (("loss", TUNE_LOSSES), ("router_init", ROUTER_INITS), ("shared", SHARED_RULES)):
            if getattr(self, key) not in allowed:
                config_fail("tune", key, getattr(self, key), f"allowed: {', '.join(allowed)}")
