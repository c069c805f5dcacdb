"""Tiny random models of the four families and the real tokenizers, for tests (no network).

Each family is built from its Hugging Face config with a handful of dimensions, so a forward
pass takes milliseconds; LLaMA and Mistral use grouped-query attention (4 query heads, 2
key/value heads). `save_tiny` writes model and tokenizer with `save_pretrained`, so tests
exercise the real `from_pretrained` path. The tokenizers come from ../shared/tokenizers; tests
skip when it is absent.
"""
import os

import pytest
import torch
from transformers import (AutoTokenizer, GPT2Tokenizer, LlamaConfig, LlamaForCausalLM,
                          MistralConfig, MistralForCausalLM, OPTConfig, OPTForCausalLM,
                          RobertaConfig, RobertaForMaskedLM)

SHARED = os.path.join(os.path.dirname(__file__), "..", "..", "shared")
TOKENIZERS = os.path.join(SHARED, "tokenizers")
DATA = os.path.join(SHARED, "data")
FAMILIES = ("opt", "roberta", "llama", "mistral")

needs_shared = pytest.mark.skipif(not os.path.isdir(TOKENIZERS), reason="../shared is absent")


def tiny_config(family, vocab_size=None):
    """A 2-layer, 16-wide config of `family`; vocab matches the real tokenizer unless given."""
    if family == "opt":
        return OPTConfig(vocab_size=vocab_size or 50272, hidden_size=16, num_hidden_layers=2,
                         ffn_dim=32, num_attention_heads=4, max_position_embeddings=512,
                         word_embed_proj_dim=16, dropout=0.0, attention_dropout=0.0)
    if family == "roberta":
        return RobertaConfig(vocab_size=vocab_size or 50265, hidden_size=16, num_hidden_layers=2,
                             intermediate_size=32, num_attention_heads=4,
                             max_position_embeddings=514, hidden_dropout_prob=0.0,
                             attention_probs_dropout_prob=0.0, pad_token_id=1)
    kw = dict(vocab_size=vocab_size or 32000, hidden_size=16, num_hidden_layers=2,
              intermediate_size=32, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=512, pad_token_id=0)
    return LlamaConfig(**kw) if family == "llama" else MistralConfig(**kw)


MODEL_CLASSES = {"opt": OPTForCausalLM, "roberta": RobertaForMaskedLM,
                 "llama": LlamaForCausalLM, "mistral": MistralForCausalLM}


def tiny_model(family, dtype=torch.float32, seed=0, vocab_size=None):
    """A freshly initialised tiny model in eval mode (no dropout), weights in `dtype`."""
    torch.manual_seed(seed)
    model = MODEL_CLASSES[family](tiny_config(family, vocab_size))
    return model.to(dtype).eval()


def real_tokenizer(family):
    """The real tokenizer of `family` from ../shared/tokenizers (OPT's BOS is </s>, id 2)."""
    if family == "opt":
        return GPT2Tokenizer.from_pretrained(
            os.path.join(TOKENIZERS, "roberta-opt"), bos_token="</s>", eos_token="</s>",
            unk_token="<unk>", pad_token="<pad>", add_bos_token=True)
    if family == "roberta":
        return AutoTokenizer.from_pretrained(os.path.join(TOKENIZERS, "roberta-opt"),
                                             tokenizer_type="roberta")
    tok = AutoTokenizer.from_pretrained(os.path.join(TOKENIZERS, "llama"))
    tok.pad_token = tok.unk_token
    return tok


def save_tiny(family, path, dtype=torch.float32):
    """Save a tiny model of `family` with its real tokenizer to `path`; returns `path`."""
    tiny_model(family, dtype).save_pretrained(path)
    real_tokenizer(family).save_pretrained(path)
    return path


ZO_ONLY = ("mu", "q", "seed")


def make_optimizer(name, params, **hparams):
    """Optimizer `name` over `params`; the ZO-only arguments are dropped for back-prop ones, so
    one parametrized test can pass the same arguments to every optimizer."""
    import optimizers
    if issubclass(optimizers.OPTIMIZERS[name], optimizers.BackProp):
        hparams = {k: v for k, v in hparams.items() if k not in ZO_ONLY}
    return optimizers.OPTIMIZERS[name](params, **hparams)


def fast_first(cases, keep=1):
    """Parametrize cases where the first `keep` run in the fast tier (`-m "not slow"`) and the
    rest only in the full suite; a tuple case is several arguments."""
    def param(case, i):
        args = case if isinstance(case, tuple) else (case,)
        return pytest.param(*args, marks=() if i < keep else pytest.mark.slow)
    return [param(case, i) for i, case in enumerate(cases)]
