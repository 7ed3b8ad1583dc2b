"""federation.py: the public blocks as a device with (or without) its own tokenizer sees them."""

import torch

from deepfusion.federation import public_blocks
from deepfusion.data import load_tokenizer
from tests.byo import corpus_texts


def test_public_blocks_are_the_same_text_cut_by_an_own_tokenizer_and_untouched_without_one(byo_tokenizers):
    fed, own = (load_tokenizer(byo_tokenizers[name]) for name in ("bpe", "unigram"))
    ids = fed(" ".join(corpus_texts()[:40]))["input_ids"]
    public = torch.tensor(ids[: 8 * 32]).view(8, 32)

    assert public_blocks(fed, None, public) is public
    assert public_blocks(fed, fed, public) is public
    cut = public_blocks(fed, own, public)
    assert cut.shape[1] == 32 and 0 < len(cut) and not torch.equal(cut[:1], public[:1])
    words = lambda text: "".join(text.split())  # each tokenizer spaces its decoding its own way
    assert words(fed.decode(public.flatten().tolist())).startswith(words(own.decode(cut[0].tolist())))
