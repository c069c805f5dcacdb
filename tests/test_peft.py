"""peft.py against independent oracles on tiny models of the four families: LoRA = merged weights,
prefix = the unmodified model run on a real context before the input, prompt = concatenated
inputs_embeds; closed-form parameter counts; the ZO estimator's functional perturbation; fp16/bf16;
gradients; save/load; export to the Hugging Face peft format.
Run: python -m pytest tests/test_peft.py -q
"""
import contextlib
import copy
import importlib.machinery
import importlib.util
import os
import sys

import pytest
import torch
from torch.testing import assert_close
from transformers import DynamicCache, GPT2Config, GPT2LMHeadModel

import peft
from tiny import FAMILIES, tiny_model, make_optimizer

ADAPTERS = ("lora", "prefix", "prompt")
CAUSAL = ("opt", "llama", "mistral")


@pytest.fixture(autouse=True)
def no_grad():
    """Forwards without autograd; the gradient test turns it back on."""
    with torch.no_grad():
        yield


def model_of(family, dtype=torch.float32):
    """tiny_model with 10× its ≥2-D weights (std 0.2, not 0.02): attention then mixes tokens
    strongly, so a wrong mask, position or key cannot hide below the tolerances."""
    model = tiny_model(family)
    for p in model.parameters():
        if p.dim() >= 2:
            p.mul_(10)
    return model.to(dtype)


def batch(model, seed=0):
    """Two right-padded rows of random ids (lengths 7 and 4) and their padding mask."""
    ids = torch.randint(3, 1000, (2, 7), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0
    ids[1, 4:] = model.config.pad_token_id
    return ids, mask


def logits(model, ids, mask):
    """Logits at the real (unpadded) positions, n_real×V: the positions tasks score."""
    return model(input_ids=ids, attention_mask=mask).logits[mask.bool()]


def randomize_(params, seed=0, std=0.1):
    """Add seeded noise to every adapter tensor (LoRA's B is no longer zero)."""
    g = torch.Generator().manual_seed(seed)
    for p in params:
        p.add_(std * torch.randn(p.shape, generator=g))


def prepended(base, context, ids, mask, blind_context=False):
    """Oracle: the unmodified model on [context; ids], logits of the ids part. blind_context: the
    context may not attend to the input (a bidirectional model's KV prefix cannot either)."""
    B, P = ids.shape[0], len(context)
    full = torch.cat([context.expand(B, -1), ids], dim=1)
    full_mask = torch.cat([torch.ones(B, P, dtype=mask.dtype), mask], dim=1)
    if blind_context:
        n = full.shape[1]
        q, k = torch.arange(n)[:, None], torch.arange(n)[None]
        allowed = ((k < P) | (q >= P)) & full_mask[:, None, :].bool()        # B×n×n
        full_mask = torch.where(allowed, 0.0, torch.finfo(torch.float32).min)[:, None]
    return base(input_ids=full, attention_mask=full_mask).logits[:, P:][mask.bool()]


def kv_of(base, ids):
    """Each layer's (key, value), kv_heads×P×d, of the unmodified model run on `ids` alone."""
    cache = DynamicCache()
    base.base_model(input_ids=ids[None], cache=cache)
    return [(layer.keys[0], layer.values[0]) for layer in cache.layers]


@contextlib.contextmanager
def offset_hooks(params, c):
    """Global hooks that swap each tensor of `params` for tensor + c around its owner's forward,
    exactly as the ZO estimator perturbs (it never writes the weights)."""
    wanted, saved = {id(p) for p in params}, []

    def pre(module, args):
        for name, p in module._parameters.items():
            if p is not None and id(p) in wanted:
                saved.append((module, name, p))
                module._parameters[name] = p + c

    def post(module, args, output):
        for entry in [e for e in saved if e[0] is module]:
            module._parameters[entry[1]] = entry[2]
            saved.remove(entry)

    hooks = [torch.nn.modules.module.register_module_forward_pre_hook(pre),
             torch.nn.modules.module.register_module_forward_hook(post)]
    try:
        yield
    finally:
        for h in hooks:
            h.remove()


_HF = {}


@contextlib.contextmanager
def hf_peft():
    """The Hugging Face `peft` package, which our peft.py shadows on sys.path, for the block."""
    ours = sys.modules["peft"]
    try:
        if "module" not in _HF:
            root = os.path.dirname(os.path.abspath(ours.__file__))
            path = [p for p in sys.path if os.path.abspath(p or ".") != root]
            spec = importlib.machinery.PathFinder.find_spec("peft", path)
            if spec is None:
                pytest.skip("the Hugging Face peft package is not installed")
            sys.modules["peft"] = importlib.util.module_from_spec(spec)
            try:
                spec.loader.exec_module(sys.modules["peft"])
            except ImportError as error:
                pytest.skip(f"the Hugging Face peft package does not import: {error}")
            _HF["module"] = sys.modules["peft"]
        sys.modules["peft"] = _HF["module"]
        yield _HF["module"]
    finally:
        sys.modules["peft"] = ours


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_equals_merged_weights(family):
    """LoRA = the base model at init (bitwise), and = W + (α/r)·B·A merged into a copy after."""
    base, model = model_of(family), model_of(family)
    params = peft.apply(model, "lora", lora_r=4, lora_alpha=12)
    ids, mask = batch(base)
    assert torch.equal(logits(model, ids, mask), logits(base, ids, mask))
    randomize_(params)
    for name, module in model.named_modules():
        if isinstance(module, peft.LoRALinear):
            base.get_submodule(name).weight += (12 / 4) * module.lora_B @ module.lora_A
    assert_close(logits(model, ids, mask), logits(base, ids, mask), rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_prefix_equals_prepended_context(family):
    """Prefix = the unmodified model with P real tokens before the input: the init tokens at
    init, then other tokens after copying their keys/values into the prefix."""
    base, model = model_of(family), model_of(family)
    peft.apply(model, "prefix", num_prefix=5, seed=3)
    ids, mask = batch(base)
    blind = family == "roberta"
    init = peft._real_token_ids(model, 5, 3)
    assert_close(logits(model, ids, mask), prepended(base, init, ids, mask, blind),
                 rtol=0, atol=1e-5)
    other = torch.randint(3, 1000, (5,), generator=torch.Generator().manual_seed(1))
    prefixes = [m for m in model.modules() if isinstance(m, peft.Prefix)]
    for prefix, (key, value) in zip(prefixes, kv_of(base, other), strict=True):
        prefix.key.copy_(key)
        prefix.value.copy_(value)
    assert_close(logits(model, ids, mask), prepended(base, other, ids, mask, blind),
                 rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_prompt_equals_concatenated_embeddings(family):
    """Prompt = the model on the init tokens prepended at init, and = the unmodified model on
    inputs_embeds [P; E(x)] with the virtual positions cut, after P is changed."""
    base, model = model_of(family), model_of(family)
    params = peft.apply(model, "prompt", num_virtual_tokens=10, seed=3)
    ids, mask = batch(base)
    init = peft._real_token_ids(model, 10, 3)
    assert_close(logits(model, ids, mask), prepended(base, init, ids, mask), rtol=0, atol=1e-5)
    randomize_(params)
    embeds = torch.cat([params[0].expand(2, -1, -1), base.get_input_embeddings()(ids)], dim=1)
    full_mask = torch.cat([torch.ones(2, 10, dtype=mask.dtype), mask], dim=1)
    oracle = base(inputs_embeds=embeds, attention_mask=full_mask).logits[:, 10:][mask.bool()]
    assert_close(logits(model, ids, mask), oracle, rtol=0, atol=1e-5)


@pytest.mark.parametrize("method", peft.METHODS)
@pytest.mark.parametrize("family", FAMILIES)
def test_scored_positions_stay_aligned(family, method):
    """base_model(...).last_hidden_state is B×T×H and lm_head on it gives model(...).logits."""
    model = model_of(family)
    randomize_(peft.apply(model, method))
    ids, mask = batch(model)
    h = model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
    assert h.shape == (*ids.shape, model.config.hidden_size)
    assert_close(model.lm_head(h[mask.bool()]), logits(model, ids, mask), rtol=0, atol=1e-6)


@pytest.mark.parametrize("method", peft.METHODS)
@pytest.mark.parametrize("family", FAMILIES)
def test_trainable_counts_match_closed_form(family, method):
    """LoRA Σ r·(in+out) over q, v; prefix L·2·P·kv_heads·d_head; prompt N·hidden; ft all."""
    cfg = model_of(family).config
    L, d, H = cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads
    kv, head = getattr(cfg, "num_key_value_heads", None) or H, cfg.hidden_size // H
    expected = {"ft": sum(p.numel() for p in model_of(family).parameters()),
                "lora": L * 8 * ((d + H * head) + (d + kv * head)),
                "prefix": L * 2 * 5 * kv * head, "prompt": 10 * d}[method]
    model = model_of(family)
    params = peft.apply(model, method)
    assert sum(p.numel() for p in params) == expected
    assert {id(p) for p in params} == {id(p) for p in model.parameters() if p.requires_grad}


@pytest.mark.parametrize("method", peft.METHODS)
@pytest.mark.parametrize("family", FAMILIES)
def test_functional_perturbation_equals_inplace(family, method):
    """Swapping each trainable tensor for tensor + c around its owner's forward (the ZO
    estimator's way) = adding c in place, and leaves the weights bitwise untouched."""
    model = model_of(family)
    params = peft.apply(model, method)
    ids, mask = batch(model)
    before, clean = [p.clone() for p in params], logits(model, ids, mask)
    with offset_hooks(params, 0.01):
        swapped = logits(model, ids, mask)
    assert all(torch.equal(p, q) for p, q in zip(params, before))
    for p in params:
        p.add_(0.01)
    assert torch.equal(swapped, logits(model, ids, mask))
    assert not torch.allclose(swapped, clean)


@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16))
@pytest.mark.parametrize("method", ADAPTERS)
@pytest.mark.parametrize("family", FAMILIES)
def test_half_precision_base(family, method, dtype):
    """With fp16/bf16 weights the adapter stays fp32 and the forward matches the fp32 model."""
    half, full = model_of(family, dtype), model_of(family)
    params = peft.apply(half, method)
    randomize_(params)
    randomize_(peft.apply(full, method))
    assert all(p.dtype == torch.float32 for p in params)
    ids, mask = batch(full)
    out, ref = logits(half, ids, mask), logits(full, ids, mask)
    assert out.dtype == dtype
    # rounding only: a few units in the last place of the largest logit
    assert_close(out.float(), ref, rtol=0, atol=8 * torch.finfo(dtype).eps * ref.abs().max())


@pytest.mark.parametrize("method", ADAPTERS)
@pytest.mark.parametrize("family", FAMILIES)
def test_backward_reaches_only_the_adapter(family, method):
    """Back-prop gives gradients to exactly the adapter tensors (LoRA's A: zero at init)."""
    model = model_of(family)
    params = peft.apply(model, method)
    ids, mask = batch(model)
    with torch.enable_grad():
        logits(model, ids, mask).pow(2).mean().backward()
    for name, p in model.named_parameters():
        assert (p.grad is not None) == p.requires_grad, name
        if p.requires_grad and not name.endswith("lora_A"):
            assert p.grad.abs().sum() > 0, name
    assert params


@pytest.mark.parametrize("method", ADAPTERS)
@pytest.mark.parametrize("family", FAMILIES)
def test_save_load_round_trip(tmp_path, family, method):
    """save → load into a model with a different init reproduces the outputs bitwise."""
    model, other = model_of(family), model_of(family)
    randomize_(peft.apply(model, method, seed=1))
    peft.save(model, tmp_path)
    peft.apply(other, method, seed=2)
    ids, mask = batch(model)
    assert not torch.equal(logits(other, ids, mask), logits(model, ids, mask))
    peft.load(other, tmp_path)
    assert torch.equal(logits(other, ids, mask), logits(model, ids, mask))


@pytest.mark.parametrize("family,method", [(f, "lora") for f in FAMILIES]
                         + [(f, m) for f in CAUSAL for m in ("prefix", "prompt")])
def test_export_loads_in_hf_peft(tmp_path, family, method):
    """Our export, loaded with peft.PeftModel.from_pretrained onto the base model, gives our
    outputs (peft keeps the prompt's virtual positions in its logits: cut here)."""
    model = model_of(family)
    randomize_(peft.apply(model, method))
    peft.export_peft(model, tmp_path, "tiny-" + family)
    ids, mask = batch(model)
    with hf_peft() as hf:
        loaded = hf.PeftModel.from_pretrained(model_of(family), str(tmp_path)).eval()
        out = loaded(input_ids=ids, attention_mask=mask).logits
    out = out[:, 10:] if method == "prompt" else out
    assert not torch.allclose(out[mask.bool()], logits(model_of(family), ids, mask))
    assert_close(out[mask.bool()], logits(model, ids, mask), rtol=0, atol=1e-5)


@pytest.mark.parametrize("method", ("prefix", "prompt"))
def test_deep_copy_owns_its_adapter(method):
    """Hooks are bound to the adapter modules, so a deep copy uses its own adapter."""
    model = model_of("llama")
    peft.apply(model, method)
    twin = copy.deepcopy(model)
    ids, mask = batch(model)
    before = logits(model, ids, mask)
    randomize_([p for p in twin.parameters() if p.requires_grad])
    assert torch.equal(logits(model, ids, mask), before)
    assert not torch.allclose(logits(twin, ids, mask), before)


def test_bad_input_fails_with_one_clear_line(tmp_path):
    """Unknown method or family, missing LoRA target, second apply, mismatched load, ft load."""
    with pytest.raises(ValueError, match="'ft', 'lora', 'prefix', 'prompt'"):
        peft.apply(model_of("opt"), "adapter")
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=100))
    with pytest.raises(ValueError, match="not 'gpt2'"):
        peft.apply(gpt2, "lora")
    with pytest.raises(ValueError, match="query"):
        peft.apply(model_of("llama"), "lora", lora_targets=("q_proj", "query"))
    model = model_of("opt")
    peft.apply(model, "lora")
    with pytest.raises(ValueError, match="already"):
        peft.apply(model, "prefix")
    peft.save(model, tmp_path / "lora")
    prefixed = model_of("opt")
    peft.apply(prefixed, "prefix")
    with pytest.raises(ValueError, match="holds a lora adapter"):
        peft.load(prefixed, tmp_path / "lora")
    full = model_of("opt")
    peft.apply(full, "ft")
    peft.save(full, tmp_path / "ft")
    assert os.path.exists(tmp_path / "ft" / "config.json")
    with pytest.raises(ValueError, match="from_pretrained"):
        peft.load(full, tmp_path / "ft")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("method", ADAPTERS)
@pytest.mark.parametrize("family", FAMILIES)
def test_zero_lr_zo_sgd_leaves_adapter_and_base_bitwise(family, method, dtype):
    """3 ZO-SGD steps with lr = 0: adapter and base weights keep every bit; the estimate moved."""
    import optimizers
    model = model_of(family, dtype)
    params = peft.apply(model, method)
    ids, mask = batch(model)
    before = {n: p.clone() for n, p in model.named_parameters()}
    opt = make_optimizer("zo_sgd", params, lr=0.0, mu=1e-2)
    for _ in range(3):
        opt.step(lambda: logits(model, ids, mask).float().logsumexp(-1).mean())
    assert opt.projected_grad != 0.0
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
