"""The fast paths of a ZO step: the paired forward, the tied tensor drawn once, the draw count.

The oracle of the paired estimate is the sequential one (two forwards, u drawn twice), on tiny
models of every family and PEFT scheme. Both perturb with weights rounded identically, so the two
estimates differ only by the arithmetic of a forward on 2n rows against n rows; on CPU that is
bitwise the same here, and the assertions allow float32 rounding of f (rtol 1e-6), i.e.
|Δd| ≤ 1e-6·|f|/μ, and nothing more.

    python -m pytest tests/test_speed_paths.py -q
"""
import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import OPTConfig

import optimizers
import peft
import rge
import variants
from tiny import DATA, FAMILIES, needs_shared, real_tokenizer, tiny_model

ROOT = os.path.join(os.path.dirname(__file__), "..")

SCHEMES = ("ft", "lora", "prefix", "prompt")


def head_loss(model, ids):
    """tasks.py's shape of loss: the transformer on the batch, the LM head (a module call of its
    own, which reads the tied embedding a second time) on the last 3 positions, fp32 NLL.
    pair=True doubles the batch and returns [f(first half), f(second half)]."""
    def loss(pair=False):
        x = torch.cat([ids, ids]) if pair else ids
        h = model.base_model(input_ids=x, use_cache=False).last_hidden_state[:, -3:]
        logp = model.lm_head(h).float().log_softmax(-1)
        nll = -logp.gather(-1, x[:, -3:, None]).squeeze(-1).mean(1)          # per sequence
        return torch.stack([nll[:len(ids)].mean(), nll[len(ids):].mean()]) if pair else nll.mean()
    return loss


def tiny(family="opt", scheme="ft", dtype=torch.float32):
    model = tiny_model(family, dtype=dtype, vocab_size=64)
    params = peft.apply(model, scheme)
    ids = torch.randint(2, 64, (3, 7), generator=torch.Generator().manual_seed(0))
    return model, params, head_loss(model, ids)


def assert_same_estimate(a, b, mu):
    assert a.seeds == b.seeds and a.forward_passes == b.forward_passes
    assert a.loss == pytest.approx(b.loss, rel=1e-6)
    for x, y in zip(a.projected_grads, b.projected_grads):
        assert x == pytest.approx(y, abs=1e-6 * abs(a.loss) / mu)


# ---- the paired forward -------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("family", FAMILIES)
def test_paired_estimate_equals_sequential(family, scheme):
    """Every family × PEFT scheme, q = 2: the same d_j from one doubled forward per query."""
    model, params, loss = tiny(family, scheme)
    seq = rge.estimate(loss, params, seeds=[5, 6], mu=1e-2)
    pair = rge.estimate(loss, params, seeds=[5, 6], mu=1e-2, pair=True)
    assert_same_estimate(seq, pair, 1e-2)
    assert any(d != 0 for d in pair.projected_grads)


def test_paired_estimate_with_a_mask_and_tied_tensor():
    """Sparse directions and the tied OPT embedding (kept for the head): still the same d."""
    model, params, loss = tiny("opt")
    mask = rge.Mask(seed=3, ratios=[0.5] * len(params))
    seq = rge.estimate(loss, params, seeds=[9], mu=1e-2, mask=mask)
    pair = rge.estimate(loss, params, seeds=[9], mu=1e-2, mask=mask, pair=True, tied={0})
    assert_same_estimate(seq, pair, 1e-2)
    assert seq.tied == pair.tied == {0}                       # the embedding is the head


def test_paired_halves_see_plus_and_minus():
    """f of each half equals f at explicitly moved weights θ + μu and θ − μu (an oracle that does
    not use the hooks)."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.LayerNorm(6), torch.nn.Linear(6, 1))
    x = torch.randn(5, 4)
    params = list(net.parameters())

    def f(pair=False):
        y = net(torch.cat([x, x]) if pair else x).squeeze(-1)
        return torch.stack([y[:5].sum(), y[5:].sum()]) if pair else y.sum()

    with torch.no_grad(), rge.perturbed_pair(params, seed=4, mu=0.1):
        plus, minus = f(pair=True).tolist()
    for sign, value in ((1, plus), (-1, minus)):
        with torch.no_grad():
            moved = [p + sign * 0.1 * rge.direction(p, 4, i) for i, p in enumerate(params)]
            h = torch.nn.functional.linear(x, moved[0], moved[1])
            h = torch.nn.functional.layer_norm(h, (6,), moved[2], moved[3])
            expected = torch.nn.functional.linear(h, moved[4], moved[5]).sum()
        assert value == pytest.approx(float(expected), rel=1e-6)
    assert all(p is q for p, q in zip(net.parameters(), params))   # θ itself back in place


@pytest.mark.parametrize("shape", ["2d", "2d_strided", "3d"])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_pair_is_two_linear_calls_bitwise(shape, bias):
    """The halves a plain nn.Linear owner writes into one output are bitwise F.linear's: the same
    kernel (addmm, or mm without a bias) on the same rows, for the inputs F.linear flattens."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 5, 9, generator=g)
    x = {"2d": x[:, 0].contiguous(), "2d_strided": x[:, -1], "3d": x}[shape]
    weights = [(torch.randn(7, 9, generator=g), torch.randn(7, generator=g) if bias else None)
               for _ in range(2)]
    expected = torch.cat([torch.nn.functional.linear(x[:3], *weights[0]),
                          torch.nn.functional.linear(x[3:], *weights[1])])
    assert torch.equal(rge._linear_pair(x, 7, weights), expected)


def test_a_linear_owner_joins_its_halves_in_place(monkeypatch):
    """A plain nn.Linear owner needs no concatenation of its halves (the LayerNorm still does);
    a subclass of it takes the general path, and both give bitwise the same f(θ ± μu)."""
    class Subclass(torch.nn.Linear):
        pass

    joins = []
    join = rge._join
    monkeypatch.setattr(rge, "_join", lambda *a: joins.append(1) or join(*a))
    torch.manual_seed(0)
    x = torch.randn(5, 3, 4)
    values = {}
    for linear in (torch.nn.Linear, Subclass):
        torch.manual_seed(1)
        net = torch.nn.Sequential(linear(4, 6), torch.nn.LayerNorm(6), linear(6, 2))
        joins.clear()
        with torch.no_grad(), rge.perturbed_pair(list(net.parameters()), seed=4, mu=0.1):
            y = net(torch.cat([x, x]))
        values[linear] = torch.stack([y[:5].sum(), y[5:].sum()])
        assert len(joins) == (1 if linear is torch.nn.Linear else 3)
    assert torch.equal(values[torch.nn.Linear], values[Subclass])


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["block", "hybrid", "sparse"])
def test_paired_step_equals_sequential_step_for_variants(kind, monkeypatch):
    """Blocks, the hybrid and a sparse mask: one step with pair=True gives every block the same
    d_j as pair=False (to float32 rounding of f: the doubled batch is a matmul of 6 rows, not
    3), and lands on the same weights: a difference δ in d_j moves an entry by lr·δ·|u|/q."""
    hp, mu = dict(lr=1e-2, q=2), 1e-3
    runs, estimates = [], []
    original = rge.estimate
    monkeypatch.setattr(rge, "estimate", lambda *a, **k: estimates.append(original(*a, **k))
                        or estimates[-1])
    for pair in (True, False):
        model, params, loss = tiny("llama")
        opt = variants.build("zo_sgd", model, params, hp | dict(pair=pair, mu=mu), dict(lr=1e-2),
                             **{"block": dict(block=True), "hybrid": dict(zo_layers=1),
                                "sparse": dict(sparsity=0.3)}[kind])
        opt.step(loss)
        runs.append([p.detach().clone() for p in model.parameters()])
    paired, sequential = estimates[:len(estimates) // 2], estimates[len(estimates) // 2:]
    for a, b in zip(paired, sequential):
        assert_same_estimate(a, b, mu)
    loss_scale = max(abs(e.loss) for e in estimates)
    for a, b in zip(*runs):     # δ ≤ 1e-6·|f|/μ per d_j (assert_same_estimate), |u| < 6
        torch.testing.assert_close(a, b, rtol=0, atol=hp["lr"] * 1e-6 * loss_scale / mu * 6)


def test_pair_off_or_a_plain_closure_runs_sequentially(monkeypatch):
    """pair=False, or a closure without the `pair` keyword: two forwards per query."""
    model, params, loss = tiny("llama")
    seen = []
    original = rge.estimate

    def spy(*args, **kwargs):
        seen.append(kwargs["pair"])
        return original(*args, **kwargs)

    monkeypatch.setattr(rge, "estimate", spy)
    optimizers.ZOSGD(params, lr=0.0).step(loss)
    optimizers.ZOSGD(params, lr=0.0, pair=False).step(loss)
    optimizers.ZOSGD(params, lr=0.0).step(lambda: loss())
    assert seen == [True, False, False]


def test_pair_refuses_an_odd_batch_in_one_line():
    model, params, _ = tiny("llama")
    ids = torch.randint(2, 64, (3, 7))
    with pytest.raises(rge.PairError, match="even batch"), torch.no_grad():
        with rge.perturbed_pair(params, seed=1, mu=1e-2):
            model(input_ids=ids)


# ---- draws: tied once, two per tensor per step --------------------------------------------------

def count_draws(monkeypatch):
    calls = []
    draw = rge.direction
    monkeypatch.setattr(rge, "direction",
                        lambda p, s, i, *m: calls.append((s, i)) or draw(p, s, i, *m))
    return calls


@pytest.mark.parametrize("pair", [True, False])
def test_tied_tensor_is_drawn_once_per_forward_when_paired(pair, monkeypatch):
    """OPT's embedding is also its head. Paired: the first forward learns it (drawn per reader);
    from then on it is drawn once per forward, like every other tensor. Sequential (the lean
    path): drawn per reader, so no copy outlives its module."""
    model, params, loss = tiny("opt")
    calls = count_draws(monkeypatch)
    opt = optimizers.ZOSGD(params, lr=1e-3, pair=pair)
    opt.step(loss)
    calls.clear()
    opt.step(loss)
    forwards = 1 if pair else 2                  # draws per tensor per query, before the update
    for i in range(len(params)):
        reads = 2 if i == 0 and not pair else 1  # tensor 0: the tied embedding
        assert sum(j == i for _, j in calls) == forwards * reads + 1, i   # + 1: the update


@pytest.mark.parametrize("q", [1, 2])
@pytest.mark.parametrize("family", ["llama", "roberta"])
def test_two_draws_per_tensor_per_query_with_the_pair(family, q, monkeypatch):
    """ZO-SGD with the paired forward: 2 Gaussian draws per tensor and query (one for f(θ ± μu),
    one for the update), 2q forwards' worth of work, the sequential path 3 (5 for a tensor read
    by two modules: RoBERTa's tied embedding, and its head's bias, which the decoder shares)."""
    model, params, loss = tiny(family)
    names = {id(p): n for n, p in model.named_parameters()}
    tied = {i for i, p in enumerate(params) if family == "roberta" and names[id(p)] in
            ("roberta.embeddings.word_embeddings.weight", "lm_head.bias")}
    for pair, draws in ((True, 2), (False, 3)):
        opt = optimizers.ZOSGD(params, lr=1e-3, q=q, pair=pair)
        opt.step(loss)                                   # learns the tied tensors
        calls = count_draws(monkeypatch)
        opt.step(loss)
        monkeypatch.undo()
        expected = [i for i in range(len(params))
                    for _ in range((draws + 2 * (i in tied and not pair)) * q)]
        assert sorted(i for _, i in calls) == expected
        assert opt.forward_passes == 2 * q


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", ["zo_sgd", "zo_sgd_mmt", "zo_adam", "zo_sgd_cons"])
def test_zero_lr_leaves_weights_bitwise_unchanged_with_the_pair(name, dtype):
    """lr = 0, paired forward, tied embedding, stochastic rounding: no bit of any weight moves."""
    model, params, loss = tiny("opt", dtype=dtype)
    before = [p.detach().clone() for p in model.parameters()]
    opt = optimizers.OPTIMIZERS[name](params, lr=0.0)
    for _ in range(3):
        opt.step(loss)
    assert opt.projected_grad != 0.0
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


# ---- the task loss: tasks.pair_loss --------------------------------------------------------------

@needs_shared
@pytest.mark.slow
@pytest.mark.parametrize("family, task", [("opt", "sst2"), ("opt", "copa"), ("roberta", "sst2"),
                                          ("llama", "rte")])
def test_task_pair_loss_gives_the_sequential_estimate(family, task):
    """train.py's closure: tasks.pair_loss doubles a real batch (candidates, padding, masks);
    unperturbed it is [f, f]; in a ZO step it gives the sequential path's d."""
    import tasks
    model = tiny_model(family)
    tok = real_tokenizer(family)
    mlm = family == "roberta"
    train, _, _ = tasks.load(task, os.path.join(DATA, task), num_train=8, num_dev=0,
                             num_eval=None, mlm=mlm)
    batch = tasks.batches(tok, task, train, batch_size=4, mlm=mlm).at(0)
    with torch.no_grad():
        f = tasks.loss(model, batch)
        torch.testing.assert_close(tasks.pair_loss(model, batch), torch.stack([f, f]))

    def closure(pair=False):
        return tasks.pair_loss(model, batch) if pair else tasks.loss(model, batch)
    params = list(model.parameters())
    seq = rge.estimate(closure, params, seeds=[3], mu=1e-2)
    pair = rge.estimate(closure, params, seeds=[3], mu=1e-2, pair=True)
    assert_same_estimate(seq, pair, 1e-2)


@pytest.mark.slow
def test_bench_speed_runs_every_variant_on_a_config_folder(tmp_path):
    """bench_speed.py end to end on a tiny OPT config folder: one JSON per variant, in --out,
    with every timed quantity measured (no time is asserted: a benchmark, not a timed test)."""
    config = tmp_path / "tiny-opt"
    OPTConfig(vocab_size=512, hidden_size=32, num_hidden_layers=2, ffn_dim=64,
              num_attention_heads=4, max_position_embeddings=128,
              word_embed_proj_dim=32).save_pretrained(config)
    out = tmp_path / "speed"
    done = subprocess.run([sys.executable, "bench_speed.py", "--model", str(config), "--variants",
                           "full,lora,block", "--batch_size", "2", "--seq_len", "8", "--reps", "1",
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert sorted(os.listdir(out)) == ["tiny-opt-block.json", "tiny-opt-full.json",
                                       "tiny-opt-lora.json"]
    for name in os.listdir(out):
        record = json.loads((out / name).read_text())
        timed = record["cpu"]["median"]
        assert {"T_f", "T_u", "T_upd", "zo_pair", "zo_seq", "mezo"} <= set(timed)
        assert all(timed[k] > 0 for k in ("T_f", "zo_pair", "zo_seq", "mezo"))
