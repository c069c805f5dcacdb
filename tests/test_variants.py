"""The §5 variants: block-wise ZO (Tab. 6), hybrid ZO-FO (Tab. 7), sparse ZO (Tab. 8).

    python -m pytest tests/test_variants.py -q
"""
import copy
import json
import os
import re

import pytest
import torch
from transformers import LlamaForCausalLM

import models
import optimizers
import rge
import variants
from tiny import DATA, needs_shared, save_tiny, tiny_config, tiny_model, fast_first

VARIANTS = {"block": dict(block=True), "hybrid": dict(zo_layers=1), "sparse": dict(sparsity=0.3),
            "all three": dict(block=True, zo_layers=1, sparsity=0.3)}


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread, and shared cores do not thrash."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_lm(dtype=torch.float32, layers=2):
    """A tiny LLaMA (64-token vocabulary; blocks: embeddings, layers, norm + untied head), a fixed
    batch without token 0 (its padding row gets no autograd gradient), and its LM-loss closure."""
    config = tiny_config("llama", vocab_size=64)
    config.num_hidden_layers = layers
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(dtype).eval()
    ids = torch.randint(1, 64, (4, 12), generator=torch.Generator().manual_seed(0))
    return model, lambda: model(input_ids=ids, labels=ids).loss.float()


def flat(tensors):
    return torch.cat([t.detach().flatten().float() for t in tensors])


# ---- blocks -------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["opt", "llama", "mistral", "roberta"])
def test_blocks_are_embeddings_layers_head(family):
    """Embeddings, each layer, head: in order, every trainable tensor exactly once."""
    model = tiny_model(family, vocab_size=64)
    params = list(model.parameters())
    parts = variants.blocks(model, params)
    assert [key for key, _ in parts] == [-1, 0, 1, 2]
    assert sorted(id(p) for _, ps in parts for p in ps) == sorted(id(p) for p in params)
    names = {id(p): n for n, p in model.named_parameters()}
    assert all("embed" in names[id(p)] for p in parts[0][1])        # incl. RoBERTa's LayerNorm


def test_opt_1_3b_has_26_blocks():
    """OPT-1.3B's structure (24 layers, narrow): 26 blocks; the final norm (registered before the
    layers) goes to the head, project_in to the embeddings, project_out to the head."""
    from transformers import OPTConfig, OPTForCausalLM
    config = OPTConfig(vocab_size=64, hidden_size=16, num_hidden_layers=24, ffn_dim=32,
                       num_attention_heads=4, word_embed_proj_dim=8)
    model = OPTForCausalLM(config)
    names = {id(p): n for n, p in model.named_parameters()}
    parts = variants.blocks(model.eval(), list(model.parameters()))
    assert len(parts) == 26
    assert [names[id(p)].split(".")[2] for p in parts[0][1]] == [
        "embed_tokens", "embed_positions", "project_in"]
    assert [names[id(p)].split(".")[2] for p in parts[-1][1]] == [
        "project_out", "final_layer_norm", "final_layer_norm"]


@pytest.mark.slow
def test_block_estimate_beats_full_rge_at_equal_forwards():
    """Tab. 6's rationale: at 2p forwards, p block estimates point closer to ∇f than one q = p RGE.

    Not a theorem: E‖ĝ‖² is Σ_b (d_b + 2)‖g_b‖² for blocks and ≈ (d/p)‖g‖² for full RGE, so blocks
    win when the gradient sits in blocks smaller than average, as here (embeddings and head: 31 %
    of the entries, 95 % of ‖g‖²). A tiny OPT goes the other way: its embedding block (514
    positions) has 67 % of the entries and 41 % of ‖g‖². Mean cosine over 300 draws, fixed seeds:
    block 0.0260, full 0.0226, a gap of about 4 standard errors.
    """
    model, loss = tiny_lm()
    params = list(model.parameters())
    grad = flat(torch.autograd.grad(loss(), params))
    parts = [ps for _, ps in variants.blocks(model, params)]
    p = len(parts)

    def cosine(triples):
        g = {id(t): s * x for t, x, s in triples}
        return float(torch.nn.functional.cosine_similarity(flat(g[id(t)] for t in params), grad, 0))

    full, block = [], []
    for r in range(300):
        est = rge.estimate(loss, params, seeds=[r * p + b for b in range(p)], mu=1e-3)
        full.append(cosine(rge.gradients(est, params)))
        ests = [rge.estimate(loss, ps, seeds=[10**6 + r * p + b], mu=1e-3)
                for b, ps in enumerate(parts)]
        block.append(cosine([t for e, ps in zip(ests, parts) for t in rge.gradients(e, ps)]))
        assert sum(e.forward_passes for e in ests) == est.forward_passes == 2 * p
    assert sum(block) / 300 > sum(full) / 300 > 0, (sum(block) / 300, sum(full) / 300)


def test_block_step_is_gauss_seidel_with_own_seeds():
    """One step = per block: estimate at the weights earlier blocks already moved, then update;
    each block draws its own seeds, so two same-shaped layers never share a direction."""
    model, loss = tiny_lm()
    oracle, oracle_loss = tiny_lm()
    opt = variants.build("zo_sgd", model, model.parameters(), dict(lr=1e-2, q=2), block=True)
    before = [p.detach().clone() for p in model.parameters()]
    opt.step(loss)
    stream = torch.Generator().manual_seed(0)                  # the optimizer's seed stream
    with torch.no_grad():
        for _, ps in variants.blocks(oracle, list(oracle.parameters())):
            seeds = [int(torch.randint(2**40, (1,), generator=stream)) for _ in range(2)]
            for t, g, s in rge.gradients(rge.estimate(oracle_loss, ps, seeds=seeds, mu=1e-3), ps):
                t.add_(s * g, alpha=-1e-2)
    for p, o in zip(model.parameters(), oracle.parameters()):
        torch.testing.assert_close(p, o, rtol=0, atol=0)
    delta = {n: p.detach() - b for (n, p), b in zip(model.named_parameters(), before)}
    d0, d1 = (delta[f"model.layers.{j}.self_attn.q_proj.weight"].flatten() for j in (0, 1))
    assert abs(torch.nn.functional.cosine_similarity(d0, d1, 0)) < 0.3  # the released code: ±1


# ---- hybrid -------------------------------------------------------------------------------------

@pytest.mark.parametrize("k, kind", [(0, "FOSGD"), (1, "Hybrid"), (2, "ZOSGD")])
def test_hybrid_trains_for_every_split(k, kind):
    """K = 0 is FO-SGD, K = n is ZO-SGD, in between both; each lowers the loss in 100 steps."""
    model, loss = tiny_lm()
    start = loss().item()
    opt = variants.build("zo_sgd", model, model.parameters(), dict(lr=1e-2), dict(lr=1e-2),
                         zo_layers=k)
    assert type(opt).__name__ == kind
    for _ in range(100):
        opt.step(loss)
    assert loss().item() < start - 0.1, (start, loss().item())


def test_hybrid_backprop_stops_at_layer_k():
    """Autograd saves no activation for the embeddings and the first K layers, their tensors get
    no gradient, the others' are freed once spent, and the activations saved (Tab. 7's memory)
    fall strictly as K grows."""
    saved_bytes = []
    for k in range(5):
        model, loss = tiny_lm(layers=4)
        stack, where, saved = models.layers(model), [-1], []
        for j, layer in enumerate(stack):
            layer.register_forward_pre_hook(lambda m, a, j=j: where.__setitem__(0, j))
            layer.register_forward_hook(lambda m, a, o, j=j: where.__setitem__(0, j + 0.5))
        weights = {t.untyped_storage().data_ptr() for t in model.parameters()}

        def pack(t):
            if t.untyped_storage().data_ptr() not in weights:       # an activation, not a weight
                saved.append((where[0], t.numel() * t.element_size()))
            return t

        opt = variants.build("zo_sgd", model, model.parameters(), dict(lr=0.0), dict(lr=0.0),
                             zo_layers=k)
        got = set()                                         # tensors that back-prop reached
        for p in model.parameters():
            if p.requires_grad:
                p.register_post_accumulate_grad_hook(lambda p: got.add(id(p)))
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            opt.step(loss)
        zo = {id(p) for key, ps in variants.blocks(model, list(model.parameters()))
              if k and (key < k or k == 4) for p in ps}
        assert saved if k == 0 else all(pos >= k for pos, _ in saved)
        assert got == {id(p) for p in model.parameters()} - zo
        assert k == 0 or all(p.grad is None for p in model.parameters())   # freed before ZO
        saved_bytes.append(sum(b for _, b in saved))
    assert saved_bytes == sorted(saved_bytes, reverse=True) and saved_bytes[-1] == 0, saved_bytes
    assert len(set(saved_bytes)) == 5, saved_bytes


# ---- sparse -------------------------------------------------------------------------------------

def test_sparsity_ratios_follow_one_magnitude_threshold():
    """s_i = share of |θ_i| ≤ τ with τ the S-quantile of all |θ|: more small weights, more zeros."""
    g = torch.Generator().manual_seed(0)
    params = [torch.randn(30000, generator=g) * 0.5, torch.randn(200, 100, generator=g),
              torch.randn(10000, generator=g) * 2, torch.ones(500)]   # the last: a norm's gains
    ratios = rge.sparsity_ratios(params, 0.3)
    tau = torch.quantile(torch.cat([p.abs().flatten() for p in params]), 0.3)   # the oracle
    for p, s in zip(params, ratios):
        assert s == pytest.approx(float((p.abs() <= tau).float().mean()), abs=1e-4)
    overall = sum(s * p.numel() for p, s in zip(params, ratios)) / sum(p.numel() for p in params)
    assert overall == pytest.approx(0.3, abs=1e-4)
    assert ratios[0] > ratios[1] > ratios[2] > ratios[3] == 0


def test_masked_direction_zeroes_each_tensors_share():
    """The mask zeroes a share s_i of u_i (not Φ(s_i)) and leaves the other entries as they were."""
    p = torch.empty(400, 250)
    mask = rge.Mask(seed=5, ratios=[0.0, 0.2, 0.9])
    for i, s in enumerate(mask.ratios):
        u, dense = rge.direction(p, 7, i, mask), rge.direction(p, 7, i)
        assert float((u == 0).float().mean()) == pytest.approx(s, abs=0.005)   # ~4 std errors
        assert torch.equal(u[u != 0], dense[u != 0])


def test_sparse_steps_share_masks_redrawn_every_k():
    """Perturbation and update use one mask; it is redrawn every mask_every = 2 steps; the
    untouched share of a step is the overall S."""
    model, loss = tiny_lm()
    seeds, draw = [], rge.direction

    def direction(p, seed, i, mask=None):                   # records the mask seed of each draw
        seeds[-1].add(mask.seed)
        return draw(p, seed, i, mask)

    opt = variants.build("zo_sgd", model, model.parameters(), dict(lr=1e-2), sparsity=0.4,
                         mask_every=2)
    unchanged = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(rge, "direction", direction)
        for _ in range(3):
            seeds.append(set())
            before = flat(model.parameters())
            opt.step(loss)
            unchanged.append(flat(model.parameters()) == before)
    assert [len(s) for s in seeds] == [1, 1, 1]                      # ±μ and update: one mask
    assert seeds[0] == seeds[1] != seeds[2]
    assert torch.equal(unchanged[0], unchanged[1]) and not torch.equal(unchanged[1], unchanged[2])
    assert float(unchanged[0].float().mean()) == pytest.approx(0.4, abs=0.03)


# ---- invariants ---------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", VARIANTS)
def test_zero_lr_leaves_weights_bitwise_unchanged_and_counts_forwards(name, dtype):
    """lr = 0: no bit moves. Forwards per step, q = 2 on 4 blocks (embeddings, 2 layers, head):
    block 2q·4; hybrid K = 1 2q + 1; sparse 2q; all three 2q·2 ZO blocks + 1."""
    model, loss = tiny_lm(dtype)
    before = copy.deepcopy(list(model.parameters()))
    opt = variants.build("zo_sgd", model, model.parameters(), dict(lr=0.0, q=2), dict(lr=0.0),
                         **VARIANTS[name])
    for _ in range(3):
        opt.step(loss)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert opt.forward_passes == {"block": 16, "hybrid": 5, "sparse": 4, "all three": 9}[name]


@pytest.mark.parametrize("args, error", [
    (dict(name="fo_sgd", block=True), "options of the ZO optimizers"),
    (dict(name="zo_sgd", zo_layers=3), "must be in 0..2"),
    (dict(name="zo_sgd", sparsity=1.0), "must be in [0, 1)")])
def test_bad_variants_fail_in_one_line(args, error):
    model, _ = tiny_lm()
    with pytest.raises(ValueError, match=re.escape(error)):
        variants.check(args.pop("name"), model, **args)


# ---- the CLI ----------------------------------------------------------------------------------

@needs_shared
@pytest.mark.parametrize("peft_method", fast_first(["ft", "lora"]))
@pytest.mark.parametrize("opt", fast_first(["zo_sgd", "zo_adam"]))
@pytest.mark.parametrize("flags, passes", fast_first([
    (["--block"], 8), (["--zo_layers", "1"], 3), (["--sparsity", "0.2", "--mask_every", "2"], 2)],
    keep=3))
def test_cli_runs_each_variant(flags, passes, opt, peft_method, tmp_path):
    """train.py end to end on a tiny OPT: each step logs its forwards (q = 1)."""
    import train
    argv = ["--model", save_tiny("opt", str(tmp_path / "model")), "--task", "sst2", "--opt", opt,
            "--peft", peft_method, "--data_dir", os.path.join(DATA, "sst2"), "--steps", "2",
            "--num_train", "8", "--num_dev", "4", "--num_eval", "4", "--batch_size", "2",
            "--eval_every", "2", "--output_dir", str(tmp_path / "out"), *flags]
    train.cli(argv)
    with open(tmp_path / "out" / "log.jsonl") as f:
        log = [json.loads(line) for line in f]
    if peft_method == "lora" and "--block" in flags:
        passes = 2 * 2                      # LoRA on q, v: only the two layers hold tensors
    assert [r["forward_passes"] for r in log] == [passes, passes]


def test_adapters_get_one_uniform_ratio():
    """Fresh adapters (LoRA B = 0) have no magnitudes to rank: every tensor gets the ratio S."""
    import peft
    model, _ = tiny_lm()
    params = peft.apply(model, "lora")
    opt = variants.build("zo_sgd", model, params, dict(lr=0), sparsity=0.3, pretrained=False)
    assert opt.param_groups[0]["sparsity"] == [0.3] * len(params)
    ranked = variants.build("zo_sgd", model, params, dict(lr=0), sparsity=0.3)
    assert ranked.param_groups[0]["sparsity"] != [0.3] * len(params)   # B = 0: all of it ≤ τ
