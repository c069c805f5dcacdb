"""Models: the paper's five families, their layer structure, and how to build or load them.

The benchmark (arXiv:2402.11592 §4.1) fine-tunes RoBERTa-large (a masked LM, scored at its mask
token) and the causal LMs OPT (1.3B, 13B), LLaMA-2-7B, Vicuna-7B and Mistral-7B. Every file that
needs to know a model's shape asks here:

- `layers(model)`: the transformer layers, the unit of the memory model (Tab. 5: max_l |x_l|),
  of block-wise ZO and of the hybrid split (§5, Tab. 6–7), and where prefixes live (App. B);
- `FAMILIES[model_type].stack`: the module every forward passes through (prompt/prefix hooks);
- `is_masked_lm(config)`: whether candidates are scored at a mask token (RoBERTa) or after the
  prompt (causal LMs);
- `CONFIGS`: the paper's architectures from their released config.json files, so memory and speed
  can be measured on random weights of the real shapes (no download), and `config(name)`.

Weights come from `from_pretrained` (a hub id or a local directory; train.py) or `from_config`
(random, created directly on the device; the benchmarks and tests).
Not here: adapters (peft.py), which tensors are trained and how (optimizers.py, variants.py).
"""
import os
from typing import NamedTuple

import torch
import transformers

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
MLM_TYPES = ("roberta", "xlm-roberta")     # model types scored as masked LMs


class Family(NamedTuple):
    stack: str     # under model.base_model, the module every forward passes through
                   # (OPTForCausalLM calls model.decoder, skipping OPTModel)
    layers: str    # under model.base_model, the list of transformer layers


FAMILIES = {
    "opt": Family("decoder", "decoder.layers"),
    "roberta": Family("", "encoder.layer"),
    "llama": Family("", "layers"),
    "mistral": Family("", "layers"),
}

_LLAMA = dict(vocab_size=32000, hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
              intermediate_size=11008, max_position_embeddings=4096, rms_norm_eps=1e-5)
_OPT_SIZES = [  # size, hidden, layers, heads, fields that differ from the rest
    ("125m", 768, 12, 12, {}),
    ("350m", 1024, 24, 16, dict(word_embed_proj_dim=512, do_layer_norm_before=False)),
    ("1.3b", 2048, 24, 32, {}), ("2.7b", 2560, 32, 32, {}), ("6.7b", 4096, 32, 32, {}),
    ("13b", 5120, 40, 40, {}),
]
CONFIGS = {  # name: (transformers config class, fields from the released config.json)
    "roberta-large": ("RobertaConfig", dict(vocab_size=50265, hidden_size=1024, pad_token_id=1,
                      num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                      max_position_embeddings=514, type_vocab_size=1, layer_norm_eps=1e-5)),
    **{f"opt-{size}": ("OPTConfig", dict(vocab_size=50272, max_position_embeddings=2048,
                       hidden_size=h, num_hidden_layers=n, num_attention_heads=heads,
                       ffn_dim=4 * h, word_embed_proj_dim=h) | extra)
       for size, h, n, heads, extra in _OPT_SIZES},
    "llama-2-7b": ("LlamaConfig", _LLAMA), "vicuna-7b": ("LlamaConfig", _LLAMA),
    "mistral-7b": ("MistralConfig", _LLAMA | dict(num_key_value_heads=8, sliding_window=4096,
                   intermediate_size=14336, max_position_embeddings=32768)),
}
HUB_IDS = {"facebook/opt-" + s: "opt-" + s for s, *_ in _OPT_SIZES} | {
    "FacebookAI/roberta-large": "roberta-large", "roberta-large": "roberta-large",
    "meta-llama/Llama-2-7b-hf": "llama-2-7b", "lmsys/vicuna-7b-v1.5": "vicuna-7b",
    "mistralai/Mistral-7B-v0.1": "mistral-7b"}


def config(name: str):
    """The config of a paper model (by our short name or its hub id), or of a local directory;
    ValueError for anything else (no download)."""
    name = HUB_IDS.get(name, name)
    if name in CONFIGS:
        cls, fields = CONFIGS[name]
        return getattr(transformers, cls)(**fields)
    if os.path.isdir(name):
        return transformers.AutoConfig.from_pretrained(name)
    raise ValueError(f"unknown --model '{name}'; choose from: {', '.join(CONFIGS)} (or their "
                     "hub ids, e.g. facebook/opt-125m), or a local config directory")


def is_masked_lm(config) -> bool:
    return config.model_type in MLM_TYPES


def auto_class(config):
    """The transformers auto class that builds `config` with its LM head."""
    masked = is_masked_lm(config)
    return transformers.AutoModelForMaskedLM if masked else transformers.AutoModelForCausalLM


def from_config(config, dtype=torch.float32, device="cpu", eager=False):
    """A randomly initialised model of `config` in eval mode, created on `device` directly."""
    kw = {"attn_implementation": "eager"} if eager else {}   # forward-mode AD needs it
    with torch.device(device):
        return auto_class(config).from_config(config, dtype=dtype, **kw).eval()


def layers(model) -> torch.nn.ModuleList:
    """The transformer layers: the family's list (OPT decoder.layers, LLaMA/Mistral layers,
    RoBERTa encoder.layer), else the first non-empty nn.ModuleList of another architecture."""
    config = getattr(model, "config", None)
    family = FAMILIES.get(getattr(config, "model_type", None))
    if family is not None:
        return model.base_model.get_submodule(family.layers)
    return next(m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m))


def stack(model) -> torch.nn.Module:
    """The module that every forward of a known family passes through (prompt/prefix hooks)."""
    return model.base_model.get_submodule(FAMILIES[model.config.model_type].stack)
