"""DeepFusion: federated knowledge distillation from heterogeneous on-device LLMs into a global MoE."""

__version__ = "0.1.0"
