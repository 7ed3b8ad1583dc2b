"""Messages on the wire: what crosses between the server and a device, as bytes (docs/WIRE_FORMAT.md).

    safetensors.py  the one reader/writer: tensors + string metadata, canonical bytes, bounded reading
    knowledge.py    KnowledgePacket   device -> server, every round (multi-round knowledge methods)
    instruction.py  Instruction       server -> device, every round (multi-round knowledge methods)
    weights.py      WeightsPacket     both ways, every round (fedavg-moe, expert-subset)
    upload.py       Task, Upload      server -> device, then device -> server, once (the paper's pipeline)
    setup.py        Setup             server -> every node, once (the Flower engine)

Every defect a receiver finds is a PacketError (below) with one reason; the receiver leaves that message
out and goes on. This file imports nothing, so every wire module, the server and the engines can use it.
"""


class PacketError(ValueError):
    """A message on the wire is malformed or invalid. The message is one clear reason."""
