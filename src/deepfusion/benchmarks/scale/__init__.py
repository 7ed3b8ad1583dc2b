"""Scale projection: what each method costs a device and the server, at the paper's model sizes.

    deepfusion bench --profile scale --out benchmarks/scale

The paper's global MoEs (Qwen1.5-MoE-A2.7B, DeepSeek-MoE-16B) cannot train on this machine, but their
arithmetic can be measured. Their config.json files (configs/scale/, sources in its README) build the
real `transformers` classes on PyTorch's `meta` device: every tensor has its real shape and dtype and no
storage, so a 16-billion-parameter model "trains" one step in about a second on any CPU.

  cards.py     the shipped configs -> real transformers classes on meta; parameters by role (routed experts
               vs everything else)
  project.py   the training peak of one device step (memory.step_memory, as every device measures its own),
               bytes on the wire (safetensors of the weights, the real Instruction and KnowledgePacket), rows
               per method, N-device totals, memory budgets; scale.json, scale.csv
  report.py    SCALE.md
"""
