"""Tiny in-process models for tests: a word-level tokenizer and a 2-layer Llama of hidden 64."""

from __future__ import annotations

import torch


def word_tokenizer(titles: list[str], extra_words: str = ""):
    """A word-level fast tokenizer over the fixture titles and the prompt templates' words."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from ilora_cli.llm.prompt import HISTORY_TEMPLATE_SETS, TEMPLATE_SETS

    templates = " ".join(t for sets in (TEMPLATE_SETS, HISTORY_TEMPLATE_SETS) for ts in sets.values() for t in ts)
    text = " ".join(titles) + " " + templates + " " + extra_words
    pre = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    words = sorted({w for w, _ in pre.pre_tokenize_str(text)})
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3}
    for w in words:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )


def tiny_llama(vocab_size: int, seed: int = 0, hidden: int = 64, layers: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
    )
    return LlamaForCausalLM(cfg).eval()
