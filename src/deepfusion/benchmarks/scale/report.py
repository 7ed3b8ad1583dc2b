"""SCALE.md: the scale projection's tables and how each number was obtained. Pure presentation of project.py's
settings, model rows, method rows and budget rows: nothing here builds a model."""

from __future__ import annotations

from deepfusion.benchmarks.scale.cards import DEVICE_COUNTS, KD_METHODS


def human_bytes(n: float) -> str:
    """Decimal units, as network traffic is counted: 1 MB = 10^6 bytes."""
    for unit in ("B", "kB", "MB", "GB", "TB", "PB", "EB"):
        if abs(n) < 1000 or unit == "EB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.3g} {unit}"
        n /= 1000


def human_gib(n: float) -> str:
    """Binary GiB, as device memory is sold."""
    return f"{n / 2**30:.1f} GiB"


def human_params(n: float) -> str:
    return f"{n / 1e9:.3f} B" if n >= 1e9 else f"{n / 1e6:.1f} M"


def _table(header: list[str], lines: list[list[str]]) -> str:
    rule = "|" + "|".join("---" for _ in header) + "|"
    return "\n".join(["| " + " | ".join(header) + " |", rule] + ["| " + " | ".join(line) + " |" for line in lines])


def _model_table(models: list[dict]) -> str:
    lines, seen = [], set()
    for m in models:  # an on-device LLM appears once per federation vocabulary
        if (m["model"], m["vocab_size"]) in seen:
            continue
        seen.add((m["model"], m["vocab_size"]))
        moe = bool(m["experts"])
        activated = f"{human_params(m['activated_params'])} (published {human_params(m['published_activated'] or 0)})"
        lines.append([m["model"], f"`{m['class']}`", f"{m['vocab_size']:,}", human_params(m["params"]),
                      human_params(m["card_vocab_params"]), human_params(m["published_params"]),
                      f"{m['card_vs_published_pct']:+.2f}%", human_params(m["routed_expert_params"]) if moe else "-",
                      human_params(m["non_expert_params"]) if moe else "-", activated if moe else "-"])
    return _table(["model", "class", "vocab (built)", "params (built)", "params (card's vocab)", "published", "diff",
                   "routed experts", "non-expert", "activated / token"], lines)


def _label(row: dict) -> str:
    return "multiround-views = device-kd = plain-fkd" if row["method"] in KD_METHODS else row["method"]


def _per_device_table(rows: list[dict]) -> str:
    lines = [[r["global_model"], _label(r), r["variant"], human_params(r["device_params"]), human_bytes(r["down_bytes"]),
              human_bytes(r["up_bytes"]), human_bytes(r["round_bytes"]), human_bytes(r["round_bytes_bf16"]),
              human_gib(r["device_memory_bytes"])]
             for r in rows if r["method"] not in KD_METHODS[1:]]  # the three KD methods share every number
    return _table(["global MoE", "method", "device hosts", "params on device", "down", "up", "round (fp32)",
                   "round (bf16)", "device memory to take part"], lines)


def _totals_table(rows: list[dict]) -> str:
    lines, kd_seen = [], set()
    for r in rows:  # KD bytes do not depend on the device's LLM: one line per global MoE
        if r["method"] in KD_METHODS and (r["global_model"] in kd_seen or not kd_seen.add(r["global_model"])):
            continue
        hosts = "any on-device LLM" if r["method"] in KD_METHODS else r["variant"]
        lines.append([r["global_model"], _label(r), hosts] + [human_bytes(r[f"total_bytes_{n}"]) for n in DEVICE_COUNTS])
    return _table(["global MoE", "method", "device hosts", *[f"N = {n:,}" for n in DEVICE_COUNTS]], lines)


def _budget_table(budgets: list[dict]) -> str:
    lines = [[b["global_model"], f"{b['budget_gib']} GiB", str(b["expert_subset_m"] or "does not fit"),
              ", ".join(b["kd_devices_that_fit"]) or "none"] for b in budgets]
    return _table(["global MoE", "budget", "expert-subset: m (experts per layer)",
                   "multiround-views: on-device LLMs that fit"], lines)


def _headline(rows: list[dict]) -> str:
    """One sentence per global MoE: bytes and memory of the three families of methods."""
    out = []
    for g in dict.fromkeys(r["global_model"] for r in rows):
        mine = [r for r in rows if r["global_model"] == g]
        fed = next(r for r in mine if r["method"] == "fedavg-moe")
        sub = min((r for r in mine if r["method"] == "expert-subset"), key=lambda r: r["device_params"])
        kd = [r for r in mine if r["method"] == KD_METHODS[0]]
        out.append(f"- **{g}**: per device per round, fedavg-moe moves {human_bytes(fed['round_bytes'])} and needs "
                   f"{human_gib(fed['device_memory_bytes'])}; expert-subset with the fewest experts ({sub['variant']}) "
                   f"{human_bytes(sub['round_bytes'])} and {human_gib(sub['device_memory_bytes'])}; multiround-views "
                   f"{human_bytes(kd[0]['round_bytes'])} ({100 * kd[0]['round_bytes'] / fed['round_bytes']:.4f}% of "
                   f"fedavg-moe) and {human_gib(min(r['device_memory_bytes'] for r in kd))} to "
                   f"{human_gib(max(r['device_memory_bytes'] for r in kd))}, the on-device LLM's training step.")
    return "\n".join(out)


def markdown(settings: dict, models: list[dict], rows: list[dict], budgets: list[dict]) -> str:
    s = settings
    kd = next(r for r in rows if r["method"] == KD_METHODS[0])
    return f"""# Scale projection: the paper's global MoEs, measured on the meta device

Command: `{s['command']}`
Machine: {s['machine']}. Models are built on PyTorch's `meta` device (real shapes, no storage), so no number
below depends on the machine. torch {s['torch']}, transformers {s['transformers']}.
Federation: `{s['config']}`: proxy set {s['proxy_blocks']} blocks x {s['seq_len']} tokens = {s['positions']:,} positions
with a next token, top-k {s['topk']}; a device's training step is one batch of {s['device_batch']} x {s['seq_len']} tokens.
Bytes in decimal units (1 MB = 10^6 B), device memory in GiB (2^30 B).

{_headline(rows)}

## Models (built from configs/scale/*.json by the real transformers classes)

{_model_table(models)}

On-device LLMs are built with the federation's vocabulary (the global MoE's): packets carry token ids, so every
device speaks the federation's tokenizer. "params (card's vocab)" is the same class built with the card's own
vocabulary, which is what the published figure and the diff describe. DeepSeek-MoE-16B is built by
`Glm4MoeForCausalLM` (configs/scale/README.md says why): the same modules and shapes; its router scores experts
with a sigmoid where DeepSeek-MoE uses a softmax, which changes no count and no byte.

## Per device per round

{_per_device_table(rows)}

## The server's traffic per round: N x (down + up), fp32 weights (bf16 halves the weight methods: scale.json)

{_totals_table(rows)}

## What fits a device memory budget

{_budget_table(budgets)}

An expert-subset device must hold every non-routed-expert parameter plus at least top-k experts per MoE layer
(a token is routed to top-k distinct experts), and train them with AdamW.

## How each number was obtained

- **Parameters**: summed over `named_parameters()` of the real class built on meta from the shipped config.json.
  Routed experts are the 3-D tensors of each `*Experts` module (one slice per expert); everything else
  (embeddings, attention, norms, routers, shared experts, dense layers, lm_head) is non-expert.
  Activated = non-expert + top-k x (one expert in every MoE layer).
- **Weights on the wire** (`fedavg-moe`, `expert-subset`): the exact size of `safetensors.torch.save` of the
  trainable tensors (header + data), computed from names and shapes and checked byte for byte against the library
  on a real model (tests/benchmarks/test_scale.py). fp32 as our runs ship, and bf16. Expert-subset hosts every
  non-routed-expert tensor plus m routed experts per MoE layer, and ships exactly those, both ways.
- **Instruction** ({human_bytes(kd['down_bytes'])} down, KD methods): `len(wire.instruction.Instruction.for_device(...).to_bytes())`, built as
  `engines/local.py` builds it for the multi-round federation (it lists the {s['proxy_blocks']} proxy block indices).
- **KnowledgePacket** ({human_bytes(kd['up_bytes'])} up, KD methods): `len(packet.to_bytes())` of a real packet of
  {s['positions']:,} positions made by `wire.knowledge.encode_knowledge` from random logits of the MoE's vocabulary (64
  positions encoded, their rows repeated: the size depends on shapes, not values). Per position: k ids in the
  narrowest unsigned int for the vocabulary (uint32 here: both vocabularies exceed 65,536), k fp16 probabilities, one
  fp16 tail: 50 bytes; the rest is the safetensors header.
- **Device memory to take part**: one training step of what the device trains, run on meta by `memory.step_memory`,
  the estimator every device of a federation run measures its own peak with: `device.lm_loss` forward, backward,
  `torch.optim.AdamW.step()`. Weights + gradients + AdamW state as allocated (16 bytes per parameter in fp32), plus
  activations: every storage autograd saves for backward (saved_tensors_hooks, deduplicated by storage, weights
  excluded; the loss's log-softmax over the vocabulary among them). Attention is measured with the fused SDPA kernel
  real runs use; on tiny models the meta measurement equals a real CPU step's (tests/test_memory.py).
  Expert-subset: hosted parameters x the MoE step's 16 bytes per parameter + the MoE step's activations (the device
  keeps the full router, and a token still goes through top-k experts).
- **Totals**: N x (down + up) per round, the bytes through the server.

## Known approximations

- The peak is a sum of what is alive together, not an allocator trace: it leaves out transients (the logits and the
  loss's other vocabulary-sized temporaries, backward scratch, allocator fragmentation, a CUDA context) and counts
  activations as alive while all gradients exist (backward frees them as it goes). fp32 throughout; bf16 autocast on a GPU would
  roughly halve the activations, not the 16 bytes per parameter of fp32 AdamW.
- One batch of {s['device_batch']} x {s['seq_len']} tokens: activations grow linearly with tokens, the rest does not.
- DeepSeek-MoE-16B is built by `Glm4MoeForCausalLM`: identical shapes, different router scoring (no effect on counts
  or bytes). Qwen1.5-MoE-A2.7B and the on-device LLMs are built by their own classes.
- Weight bytes are the tensors' safetensors blob without string metadata: a transport's own metadata (device, round,
  the hosted-expert list) adds well under a kilobyte to a multi-gigabyte message.
- Expert-subset as defined for the projection: the device hosts every non-routed-expert tensor, full routers
  included, and ships exactly those. A runnable variant may cut the router to the m hosted rows, send the full router
  rows down for usage counting and counts (E per layer) up: (E - m) x hidden per layer either way, under 0.1% of the
  bytes. Its memory takes the full MoE step's activations (the expert computation per token is the same top-k).
- Every step uses the plain next-token loss (`device.lm_loss`); an MoE's router load-balancing term adds
  (tokens x E) floats per layer, a fraction of a percent of the activations.
"""
