"""Hand-written parameter-efficient fine-tuning: LoRA, prefix tuning and prompt tuning (App. B).

Math (θ = the frozen model; only the adapter is tuned, by ZO or by back-prop):
  LoRA    W' = W + (α/r)·B·A on the chosen projections (eq. A1; q and v by default, r 8, α 16).
          A ∈ ℝ^{r×n} Kaiming-uniform(a=√5), B ∈ ℝ^{m×r} zero, so W' = W at init.
  Prefix  every attention layer also attends to P learned keys and values (eq. A3, where
          "K + C_k" means concatenation): softmax(Q·[C_k; K]ᵀ/√d)·[C_v; V]. C_k, C_v have the
          layer's kv_heads heads (GQA) and start as the model's own keys/values of P random real
          tokens (post-projection, post-RoPE). The prefix acts as a past context: real tokens take
          positions P…P+T−1, so at init a causal model computes exactly as if those P tokens
          preceded the input (the semantics of HF peft; RoPE angles of keys and queries agree).
  Prompt  x̂ = [P; E(x)], P ∈ ℝ^{N×d} initialised from N random real token embeddings (eq. A2).
          The N virtual positions are cut from the output, so hidden states and logits stay
          aligned with input_ids.
Adapter tensors stay fp32 whatever the base dtype (a ZO step of ~1e-7 vanishes in fp16/bf16) and
are cast to the activation dtype at use. Each is an nn.Parameter read only inside its own module's
forward, so the ZO estimator can swap in θ+μz around that call without writing the weights.
Prefix and prompt enter through forward hooks on the transformer stack (no modeling file edited):
the prefix as a read-only KV cache that HF's attention concatenates and sizes masks/positions by.

References:
  1. Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", arXiv:2106.09685.
  2. Li & Liang, "Prefix-Tuning: Optimizing Continuous Prompts for Generation", arXiv:2101.00190.
  3. Lester et al., "The Power of Scale for Parameter-Efficient Prompt Tuning", arXiv:2104.08691.
  4. Zhang et al., "Revisiting Zeroth-Order Optimization for Memory-Efficient LLM Fine-Tuning",
     arXiv:2402.11592, App. B.
Not here: perturbation and estimate (rge.py), updates (optimizers.py), CLI and --save (train.py).
"""
import json
import math
import os
from typing import NamedTuple

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicCache

import models

METHODS = ("ft", "lora", "prefix", "prompt")


class Adapted(NamedTuple):
    attention: str       # the self-attention module inside one transformer layer (prefixes)
    lora_targets: tuple  # default LoRA targets: the q and v projections


FAMILIES = {  # the model types our adapters know; models.py has their stack and layers
    "opt": Adapted("self_attn", ("q_proj", "v_proj")),
    "roberta": Adapted("attention.self", ("query", "value")),
    "llama": Adapted("self_attn", ("q_proj", "v_proj")),
    "mistral": Adapted("self_attn", ("q_proj", "v_proj")),
}
CONFIG, WEIGHTS = "zo_adapter.json", "zo_adapter.safetensors"


# ---- adapter modules: each owns its tensors and reads them only in forward()

class LoRALinear(nn.Module):
    """y = W x + b + (α/r)·B A x around a frozen nn.Linear, whose bias is kept as it is (eq. A1)."""

    def __init__(self, base_layer, r, alpha, generator):
        super().__init__()
        self.base_layer, self.scaling = base_layer, alpha / r
        A = torch.empty(r, base_layer.in_features)
        nn.init.kaiming_uniform_(A, a=math.sqrt(5), generator=generator)  # as nn.Linear and peft
        device = base_layer.weight.device
        self.lora_A = nn.Parameter(A.to(device))                                    # r×in, fp32
        self.lora_B = nn.Parameter(torch.zeros(base_layer.out_features, r, device=device))

    def forward(self, x):
        delta = F.linear(F.linear(x, self.lora_A.to(x.dtype)), self.lora_B.to(x.dtype))
        return self.base_layer(x) + self.scaling * delta


class Prefix(nn.Module):
    """One attention layer's learned keys C_k and values C_v, each kv_heads×P×head_dim, fp32."""

    def __init__(self, key, value):
        super().__init__()
        self.key = nn.Parameter(key.detach().float().clone())
        self.value = nn.Parameter(value.detach().float().clone())

    def forward(self, batch_size, dtype):
        return (self.key.to(dtype).expand(batch_size, -1, -1, -1),
                self.value.to(dtype).expand(batch_size, -1, -1, -1))


class Prompt(nn.Module):
    """N learned input embeddings (fp32), prepended by `prepend` and cut again by `strip`."""

    def __init__(self, embeddings):
        super().__init__()
        self.embedding = nn.Parameter(embeddings.detach().float().clone())            # N×d
        self.num_tokens = embeddings.shape[0]

    def forward(self, dtype):
        return self.embedding.to(dtype)

    def prepend(self, stack, args, kwargs):
        """Forward pre-hook of the stack: inputs_embeds ← [P; E(x)], mask ← [1…1; mask]."""
        kwargs = _widen(args, kwargs, self.num_tokens)
        ids = kwargs.pop("input_ids", None)
        embeds = kwargs["inputs_embeds"] if ids is None else stack.get_input_embeddings()(ids)
        prompt = self(embeds.dtype).expand(embeds.shape[0], -1, -1)
        kwargs["inputs_embeds"] = torch.cat([prompt, embeds], dim=1)
        return (), kwargs

    def strip(self, stack, args, output):
        """Forward hook of the stack: drop the N virtual positions so outputs align with ids."""
        output.last_hidden_state = output.last_hidden_state[:, self.num_tokens:]
        if output.get("hidden_states") is not None:
            output.hidden_states = tuple(h[:, self.num_tokens:] for h in output.hidden_states)
        return output


class _PrefixLayer(CacheLayerMixin):
    """One layer of PrefixCache: returns [C_k; K], [C_v; V] and stores nothing."""

    is_sliding = False

    def __init__(self, prefix):
        super().__init__()
        self.prefix, self.length = prefix, prefix.key.shape[1]

    def lazy_initialization(self, key_states, value_states):
        pass

    def update(self, key_states, value_states, *args, **kwargs):
        key, value = self.prefix(key_states.shape[0], key_states.dtype)    # Prefix.forward, B×h×P×d
        return torch.cat([key, key_states], dim=-2), torch.cat([value, value_states], dim=-2)

    def get_seq_length(self):
        return self.length

    def get_mask_sizes(self, query_length):
        return self.length + query_length, 0

    def get_max_length(self):
        return -1


class PrefixCache(Cache):
    """A read-only KV cache of every layer's prefix. HF's attention calls its update() with the
    real K/V, and the model derives positions (P…) and mask sizes (P+T) from its length."""

    def __init__(self, prefixes):
        super().__init__(layers=[_PrefixLayer(p) for p in prefixes])

    def inject(self, stack, args, kwargs):
        """Forward pre-hook of the stack: pass this cache and a mask widened by P ones."""
        kwargs = _widen(args, kwargs, self.layers[0].length)
        kwargs["cache"] = self           # transformers 5 name; past_key_values is deprecated
        return (), kwargs


# ---- helpers

def _widen(args, kwargs, n):
    """The stack's call as keywords with n ones prepended to the 2-D padding mask, so every real
    token sees the n prefix/prompt slots. An incoming KV cache (generation) is refused."""
    if len(args) > 1:
        raise ValueError("peft: pass everything but input_ids by keyword")
    kwargs = dict(kwargs, input_ids=args[0]) if args else dict(kwargs)
    if kwargs.pop("past_key_values", None) is not None or kwargs.get("cache") is not None:
        raise ValueError("peft: prefix and prompt tuning take no KV cache (no generation)")
    x = kwargs["input_ids"] if kwargs.get("input_ids") is not None else kwargs["inputs_embeds"]
    mask = kwargs.get("attention_mask")
    if mask is None:
        mask = torch.ones(x.shape[:2], dtype=torch.long, device=x.device)
    if mask.dim() != 2:
        raise ValueError("peft: prefix and prompt tuning need a 2-D padding mask")
    kwargs["attention_mask"] = torch.cat([mask.new_ones(mask.shape[0], n), mask], dim=1)
    return kwargs


def _real_token_ids(model, n, seed):
    """n distinct vocabulary ids drawn with `seed`, special tokens excluded (atypical rows)."""
    cfg = model.config
    special = {cfg.pad_token_id, cfg.bos_token_id, cfg.eos_token_id}
    order = torch.randperm(cfg.vocab_size, generator=torch.Generator().manual_seed(seed))
    return torch.tensor([i for i in order.tolist() if i not in special][:n])


def _settings(model):
    """What apply() recorded on the model."""
    if not hasattr(model, "zo_peft"):
        raise ValueError("peft: call apply(model, method) first")
    return model.zo_peft


def _adapter_state(model):
    """name → parameter for every tensor owned by one of our adapter modules."""
    return {f"{name}.{k}": p for name, m in model.named_modules()
            if isinstance(m, (LoRALinear, Prefix, Prompt))
            for k, p in m.named_parameters(recurse=False)}


def _add_lora(model, family, hp):
    generator, found = torch.Generator().manual_seed(hp["seed"]), set()
    for name, module in list(model.named_modules()):
        parent, _, leaf = name.rpartition(".")
        if leaf in hp["lora_targets"] and isinstance(module, nn.Linear):
            lora = LoRALinear(module, hp["lora_r"], hp["lora_alpha"], generator)
            setattr(model.get_submodule(parent), leaf, lora)
            found.add(leaf)
    if missing := set(hp["lora_targets"]) - found:
        raise ValueError(f"peft: no nn.Linear named {sorted(missing)} in this {family} model")


def _add_prefix(model, family, hp):
    stack = models.stack(model)
    ids = _real_token_ids(model, hp["num_prefix"], hp["seed"])
    kv, training = DynamicCache(), model.training
    model.eval()                      # no dropout in the activations we copy
    with torch.no_grad():             # one run on the real tokens fills kv (post-RoPE keys)
        stack(input_ids=ids[None].to(model.get_input_embeddings().weight.device), cache=kv)
    model.train(training)
    prefixes = []
    for i, layer in enumerate(models.layers(model)):
        attention = layer.get_submodule(FAMILIES[family].attention)
        attention.prefix = Prefix(kv.layers[i].keys[0], kv.layers[i].values[0])
        prefixes.append(attention.prefix)
    # bound methods as hooks: a deep copy of the model gets hooks bound to its own copies
    stack.register_forward_pre_hook(PrefixCache(prefixes).inject, with_kwargs=True)


def _add_prompt(model, family, hp):
    stack = models.stack(model)
    table = model.get_input_embeddings().weight
    ids = _real_token_ids(model, hp["num_virtual_tokens"], hp["seed"]).to(table.device)
    stack.prompt = Prompt(table[ids])
    stack.register_forward_pre_hook(stack.prompt.prepend, with_kwargs=True)
    stack.register_forward_hook(stack.prompt.strip)


# ---- public entry points

def apply(model, method: str, *, lora_r: int = 8, lora_alpha: float = 16,
          lora_targets: tuple[str, ...] | str | None = None, num_prefix: int = 5,
          num_virtual_tokens: int = 10, seed: int = 0) -> list[torch.nn.Parameter]:
    """Freeze `model`, add the adapter of `method` in place, return the trainable parameters
    (ft: all). lora_targets: module names, e.g. ("q_proj", "v_proj") or "q_proj,v_proj"."""
    if method not in METHODS:
        raise ValueError(f"peft: unknown method {method!r}; choose one of {METHODS}")
    family = model.config.model_type
    if method != "ft" and family not in FAMILIES:
        raise ValueError(f"peft: {method} supports model types {tuple(FAMILIES)}, not {family!r}")
    if hasattr(model, "zo_peft"):
        raise ValueError("peft: apply() was already called on this model")
    if isinstance(lora_targets, str):
        lora_targets = lora_targets.split(",")
    default_targets = FAMILIES[family].lora_targets if family in FAMILIES else ()
    hp = dict(method=method, model_type=family, lora_r=lora_r, lora_alpha=lora_alpha,
              lora_targets=list(lora_targets or default_targets),
              num_prefix=num_prefix, num_virtual_tokens=num_virtual_tokens, seed=seed)
    model.requires_grad_(method == "ft")
    ADAPTERS[method](model, family, hp)
    for p in _adapter_state(model).values():
        p.requires_grad_(True)
    model.zo_peft = hp
    return [p for p in model.parameters() if p.requires_grad]


def save(model, path: str) -> None:
    """Write the adapter (zo_adapter.safetensors + zo_adapter.json) into directory `path`;
    ft writes the whole model with save_pretrained instead."""
    settings = _settings(model)
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, CONFIG), "w") as f:
        json.dump(settings, f, indent=2)
    if settings["method"] == "ft":
        model.save_pretrained(path)
    else:
        tensors = {k: p.detach().contiguous().cpu() for k, p in _adapter_state(model).items()}
        save_file(tensors, os.path.join(path, WEIGHTS))


def load(model, path: str) -> None:
    """Load an adapter written by save() into a model that had apply() with the same method."""
    with open(os.path.join(path, CONFIG)) as f:
        saved = json.load(f)
    method = _settings(model)["method"]
    if saved["method"] != method:
        raise ValueError(f"peft: {path} holds a {saved['method']} adapter; this model has {method}")
    if method == "ft":
        raise ValueError(f"peft: ft saved the whole model; load it with from_pretrained({path!r})")
    tensors, state = load_file(os.path.join(path, WEIGHTS)), _adapter_state(model)
    if tensors.keys() != state.keys():
        raise ValueError(f"peft: the adapter in {path} does not match this model's adapter")
    with torch.no_grad():
        for name, p in state.items():
            p.copy_(tensors[name])


def export_peft(model, path: str, base_model_name_or_path: str) -> None:
    """Write the adapter in the Hugging Face peft format (adapter_config.json and
    adapter_model.safetensors): LoRA for every family, prefix and prompt for the causal ones."""
    hp, state = _settings(model), _adapter_state(model)
    causal = hp["model_type"] != "roberta"
    config = dict(base_model_name_or_path=base_model_name_or_path, inference_mode=True,
                  task_type="CAUSAL_LM" if causal else None)
    if hp["method"] == "lora":
        config.update(peft_type="LORA", r=hp["lora_r"], lora_alpha=hp["lora_alpha"], bias="none",
                      target_modules=hp["lora_targets"], lora_dropout=0.0)
        tensors = {f"base_model.model.{k}.weight": p for k, p in state.items()}
    elif hp["method"] == "prefix" and causal:
        # peft's layout: per virtual token, [K_0 | V_0 | K_1 | V_1 | …], each flattened kv_heads·d
        ps = [p.transpose(0, 1).flatten(1) for p in state.values()]     # Prefix: key, then value
        heads, P, _ = next(iter(state.values())).shape
        config.update(peft_type="PREFIX_TUNING", num_virtual_tokens=P, num_layers=len(ps) // 2,
                      token_dim=ps[0].shape[1], num_attention_heads=heads, prefix_projection=False)
        tensors = {"prompt_embeddings": torch.cat(ps, dim=1)}
    elif hp["method"] == "prompt" and causal:
        embedding = next(iter(state.values()))
        config.update(peft_type="PROMPT_TUNING", num_virtual_tokens=embedding.shape[0],
                      token_dim=embedding.shape[1], prompt_tuning_init="RANDOM")
        tensors = {"prompt_embeddings": embedding}
    else:
        raise ValueError(f"peft: no peft export for {hp['method']} on {hp['model_type']}")
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "adapter_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    tensors = {k: t.detach().contiguous().cpu() for k, t in tensors.items()}
    save_file(tensors, os.path.join(path, "adapter_model.safetensors"))


ADAPTERS = {"ft": lambda model, family, hp: None,     # nothing to add: every weight is trained
            "lora": _add_lora, "prefix": _add_prefix, "prompt": _add_prompt}
