"""Phase I on the server: local knowledge clustering (paper §IV-B, Eq. 6, Fig. 4).

  1. similarity      : Π, the cosine similarity of the devices' data embeddings e_n (Eq. 6), N x N
  2. cluster         : the devices grouped into K knowledge domains: "kmeans" (the paper) or "random"
                       (the no-clustering ablation: same K, devices dealt at random in balanced groups)
  3. proxy_groups    : domain -> device type -> members; every (domain, type) group is one teacher
  4. average_state_dicts : Fig. 4's weight average of one group into its local-knowledge proxy model m̄_i
  5. recovery        : adjusted Rand index of the domains against the devices' true sources

"kmeans" clusters the rows of Π: each device is described by its similarity profile to every device, the
literal reading of "based on this similarity matrix Π ... using KMeans". space="embedding" runs KMeans on
the L2-normalised embeddings instead (Euclidean KMeans on the unit sphere, the usual stand-in for spherical
KMeans). Measured on the real corpora (4 sources = 3 MedQuAD institutions + TAT-QA, each dealt unevenly to
its devices, K = 4, seeds 0-2): at 16 devices, over all 35 such sets, mean ARI 0.985 (Π rows) vs 0.983
(embeddings) at embed_dim 32 and 64 texts, 0.982 vs 0.969 at 8 texts; of 630 paired runs 594 tie, Π rows
win 27 and lose 9. At 32 devices (7 sets) the embeddings won 7 of 30 paired runs and lost none; at 64 they
split 2-2. Every miss misplaced one or two devices; at 64 texts, only devices holding 1-2 documents. The
literal reading stays the default; space="embedding" is there for federations of 32 devices and more.
Averaging is meaningful only because devices of one type fine-tune the same public checkpoint; a domain
holding several types keeps one proxy model per type, each a teacher of that domain's student.
"""

from __future__ import annotations

import numpy as np
import torch

from deepfusion.pipeline_config import CLUSTER_METHODS

SPACES = ("similarity", "embedding")


class ClusteringError(ValueError):
    """A Phase I problem; the message says what was got, why it fails and what to do."""


# -----------------------------------------------------------------------------
# 1. Eq. 6


def similarity(E: torch.Tensor) -> torch.Tensor:
    """(N, d) embeddings -> (N, N) float64 Π with π_ab = e_a·e_b / (|e_a| |e_b|); symmetric, unit diagonal."""
    E = torch.as_tensor(E).double()
    if E.ndim != 2 or len(E) == 0:
        raise ClusteringError(f"got embeddings of shape {tuple(E.shape)}; expected (N devices, embed_dim)")
    norms = E.norm(dim=1)  # (N,)
    if (zero := (norms == 0).nonzero().flatten().tolist()):
        raise ClusteringError(f"devices {zero} have an all-zero embedding, whose cosine is undefined; "
                              "their upload is broken: drop them or ask for a new embedding")
    unit = E / norms[:, None]  # (N, d)
    sim = unit @ unit.T  # (N, N)
    sim = (sim + sim.T) / 2  # exactly symmetric, whatever the matmul's rounding
    sim.fill_diagonal_(1.0)
    return sim


# -----------------------------------------------------------------------------
# 2. Domains


def cluster(E: torch.Tensor, K: int, method: str = "kmeans", seed: int = 0, space: str = "similarity") -> list[int]:
    """Domain label in 0..K-1 for each of the N devices; every domain non-empty; domain 0 holds device 0,
    and domains are numbered in order of their first device (so equal inputs give equal labels)."""
    E = torch.as_tensor(E)
    N = len(E)
    if not 1 <= K <= N:
        raise ClusteringError(f"got K={K} domains for {N} devices; K must be in 1..{N} (each domain needs a "
                              "device); lower clustering.domains or add devices")
    if method == "random":
        labels = _deal(N, K, seed)
    elif method == "kmeans":
        if space not in SPACES:
            raise ClusteringError(f"got space={space!r}; allowed: {', '.join(SPACES)}")
        sim = similarity(E)
        x = sim if space == "similarity" else (E.double() / E.double().norm(dim=1, keepdim=True))
        labels = _kmeans(x.numpy(), K, seed)
    else:
        raise ClusteringError(f"got method={method!r}; allowed: {', '.join(CLUSTER_METHODS)}")
    return _canonical(labels)


def _deal(N: int, K: int, seed: int) -> np.ndarray:
    """Devices in a seeded random order, dealt round-robin: group sizes differ by at most one."""
    order = np.random.default_rng(seed).permutation(N)
    labels = np.empty(N, dtype=np.int64)
    labels[order] = np.arange(N) % K
    return labels


def _kmeans(x: np.ndarray, K: int, seed: int) -> np.ndarray:
    import warnings

    from sklearn.cluster import KMeans
    from sklearn.exceptions import ConvergenceWarning

    with warnings.catch_warnings():
        # Fewer distinct rows than K (duplicated uploads) warns; _fill_empty handles that case below.
        warnings.simplefilter("ignore", ConvergenceWarning)
        km = KMeans(n_clusters=K, n_init=10, random_state=seed).fit(x)
    return _fill_empty(km.labels_.astype(np.int64), np.linalg.norm(x - km.cluster_centers_[km.labels_], axis=1), K)


def _fill_empty(labels: np.ndarray, dist: np.ndarray, K: int) -> np.ndarray:
    """KMeans leaves a domain empty when fewer than K distinct embeddings exist; each empty domain takes the
    device farthest from its centroid in the largest domain (lowest index on ties), so all K get a teacher."""
    labels = labels.copy()
    for empty in sorted(set(range(K)) - set(labels.tolist())):
        largest = np.bincount(labels, minlength=K).argmax()
        members = np.flatnonzero(labels == largest)
        labels[members[np.argmax(dist[members])]] = empty  # argmax returns the first maximum
    return labels


def _canonical(labels: np.ndarray) -> list[int]:
    """Renumber domains by their first device: KMeans's ids are arbitrary, ours are reproducible."""
    first: dict[int, int] = {}
    return [first.setdefault(int(lab), len(first)) for lab in labels]


# -----------------------------------------------------------------------------
# 3. Teachers per domain, and 4. Fig. 4's proxy model


def proxy_groups(labels: list[int], types: list[str]) -> dict[int, dict[str, list[int]]]:
    """domain -> device type -> member indices (ascending); each (domain, type) is averaged into one teacher."""
    if len(labels) != len(types):
        raise ClusteringError(f"got {len(labels)} labels and {len(types)} device types; give one of each per device")
    groups: dict[int, dict[str, list[int]]] = {}
    for i, (lab, typ) in enumerate(zip(labels, types)):
        groups.setdefault(int(lab), {}).setdefault(typ, []).append(i)
    return {d: dict(sorted(groups[d].items())) for d in sorted(groups)}


def average_state_dicts(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """m̄_i = (1/|C_i|) Σ m_n, tensor by tensor. Floating tensors come back fp32, accumulated in fp64 (so
    n copies of one model give it back bit-for-bit); integer and bool buffers must agree and are kept."""
    if not states:
        raise ClusteringError("got no state dicts to average; a domain's group needs at least one model")
    keys = list(states[0])
    for n, sd in enumerate(states[1:], 1):
        if set(sd) != set(keys):
            missing, extra = sorted(set(keys) - set(sd)), sorted(set(sd) - set(keys))
            raise ClusteringError(f"model {n} has different tensors from model 0 (missing {missing[:5]}, extra "
                                  f"{extra[:5]}); only models of one type (one architecture) can be averaged")
    out = {}
    for key in keys:
        ts = [sd[key] for sd in states]
        for n, t in enumerate(ts[1:], 1):
            if t.shape != ts[0].shape:
                raise ClusteringError(f"tensor {key!r}: model {n} has shape {tuple(t.shape)}, model 0 has "
                                      f"{tuple(ts[0].shape)}; only models of one preset can be averaged")
        if ts[0].is_floating_point():
            acc = torch.zeros(ts[0].shape, dtype=torch.float64)
            for t in ts:
                acc += t.detach().to(torch.float64)
            out[key] = (acc / len(ts)).to(torch.float32)
        elif all(torch.equal(t, ts[0]) for t in ts[1:]):
            out[key] = ts[0].clone()
        else:
            raise ClusteringError(f"tensor {key!r} ({ts[0].dtype}) differs between models; integer buffers "
                                  "cannot be averaged and must be equal across one type")
    return out


# -----------------------------------------------------------------------------
# 5. How well the domains recover the devices' sources


def recovery(labels: list[int], true_sources: list[str]) -> float:
    """Adjusted Rand index: 1 = the domains are the sources exactly, ~0 = no better than chance."""
    from sklearn.metrics import adjusted_rand_score

    if len(labels) != len(true_sources):
        raise ClusteringError(f"got {len(labels)} labels and {len(true_sources)} sources; one of each per device")
    return float(adjusted_rand_score(true_sources, labels))
