"""A device on its own node is the device the local engine builds: same model, same views, same packet bytes."""

import torch

from deepfusion.wire.instruction import Instruction


def test_a_node_builds_a_device_with_its_own_tokenizer_as_the_local_engine_does(smoke_config, data_dir,
                                                                                byo_tokenizers, shared_prepare_data):
    from deepfusion.device import run_round
    from deepfusion.engines import local
    from deepfusion.engines.flower.node import start_device
    from deepfusion.wire.setup import make_setup

    smoke_config.devices[0].tokenizer = str(byo_tokenizers["unigram"])
    data = local.prepare_data(smoke_config)
    node = start_device(make_setup(smoke_config, data), "cdc", str(data_dir))
    here = local.setup_devices(smoke_config, data, torch.device("cpu"))["cdc"]
    assert node.device.own is not None and node.device.own.vocab == here.own.vocab
    assert node.device.model.get_output_embeddings().weight.shape[0] == len(node.device.own.vocab_map)
    assert len(data.tokenizer) <= int(node.test.max()) < len(node.device.own.vocab_map)  # held out in its own ids
    instruction = Instruction(1, [0, 5, 7], 2, 4, 1e-2, 4, 1.0)
    assert run_round(node.device, instruction).to_bytes() == run_round(here, instruction).to_bytes()
