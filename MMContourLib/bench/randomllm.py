"""Random-weight Llama models written exactly like a real Llama-2 folder (``save_pretrained``).

Used by the tests (a tiny model, loaded through the same code path as Llama-2-7B-chat) and by
the benchmarks (a Llama-2-7B-*shaped* model: speed does not depend on the weights).
"""
from __future__ import annotations

from pathlib import Path

CORPUS = [
    "N0, breast conserving surgery, left side", "N1mi, breast conserving surgery, right side",
    "N1, total mastectomy surgery, left side", "N2, total mastectomy surgery, right side",
    "N3, breast conserving surgery, left side; N0, total mastectomy surgery, right side",
    "cT1c pN1a age 61 IDC ILC DCIS adjuvant neoadjuvant", "the patient has breast cancer",
]

LLAMA2_7B_SHAPE = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=32000)


def make_tokenizer(vocab_size: int = 300):
    """A byte-level BPE tokenizer trained on note-like text (the ``tokenizers`` library)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 5, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def make_random_llama(folder: str | Path, seed: int = 0, hidden_size: int = 32, num_hidden_layers: int = 2,
                      intermediate_size: int | None = None, num_attention_heads: int = 4,
                      num_key_value_heads: int = 2, vocab_size: int | None = None, dtype=None) -> Path:
    """Write a random ``LlamaForCausalLM`` + tokenizer to ``folder`` and return it. ``vocab_size`` larger
    than the tokenizer's only pads the embedding matrix (as Llama-2's 32000 rows would)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = Path(folder)
    tokenizer = make_tokenizer()
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=max(vocab_size or 0, len(tokenizer)), hidden_size=hidden_size,
                         intermediate_size=intermediate_size or 2 * hidden_size, num_hidden_layers=num_hidden_layers,
                         num_attention_heads=num_attention_heads, num_key_value_heads=num_key_value_heads,
                         max_position_embeddings=512, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    if dtype is not None:
        torch.set_default_dtype(dtype)
    try:
        model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(torch.float32)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
