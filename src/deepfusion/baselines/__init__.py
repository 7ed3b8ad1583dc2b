"""The baselines DeepFusion is measured against, each a plain recipe over the core's parts.

    centralized.py   the global MoE on every device's private data pooled with the proxy set (upper bound),
                     at the federated methods' step budget, and trained to convergence (early stopping)
    hosting.py       federated MoE: devices host the global MoE (`fedavg-moe`) or the shared layers plus the
                     routed experts that fit their memory (`expert-subset`), or FedJETS' fixed few chosen by
                     the gate on their data (`fedjets`); the server averages weights
                     (their weights travel as wire/weights.py's WeightsPacket)
    fedmkt.py        FedMKT (Fan et al. 2025) after the paper pipeline's Phase 0: the devices' top-k knowledge on
                     the public data, the minimum-cross-entropy device per block as teacher, distilled into the
                     MoE upcycled from the public dense base
    local-only       needs no module: each device's own model on its own domain (engines/local.py)

`proxy-only`, `plain-fkd` and `device-kd` are server-side variants of the multi-round knowledge protocol's round
(`multiround-views`, server.py).
"""
