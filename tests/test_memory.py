"""memory.py and bench_memory.py: Tab. 5's rows by hand, the layer terms by hand, the CPU
readings on a small model, the paper's configurations, bad input. Sizes only: nothing here
asserts a time.

    python -m pytest tests/test_memory.py -q
"""
import importlib.util
import os
import subprocess
import sys

import pytest
import torch
from torch.nn.modules.module import register_module_forward_hook

import bench_memory
import memory
import models
from tiny import FAMILIES, tiny_config, fast_first

GIB, MIB = memory.GIB, 2**20
# two transformer layers between embeddings and head: |x_l|, |a_l| in bytes, |W| = 100
TERMS = dict(names=["embeddings", "layer 0", "layer 1", "head"], W=100, x=80,
             x_l=[30, 20, 20, 10], a_l=[5, 25, 15, 40], a=85)


def meta(*argv):
    """bench_memory.py's rows for `argv` on the meta device: Tab. 5 alone, no memory used."""
    return bench_memory.main(["--device", "meta", *argv])


# ---- the memory model ---------------------------------------------------------------------------

@pytest.mark.parametrize("opt, state, dynamic", [
    ("fo_sgd", 0, 30 + 25 + 20 + 40),            # Σ_l max{|a_l|, |x_l|}
    ("fo_adam", 2 * 80, 115),                    # + 2|x| (w/o foreach)
    ("forward_grad", 0, 80 + 40),                # |x| + max_l |a_l|
    ("zo_sgd", 0, 30), ("zo_sgd_sign", 0, 30), ("zo_sgd_cons", 0, 30),   # max_l |x_l|
    ("zo_sgd_mmt", 80, 30), ("zo_adam", 2 * 80, 30)])
def test_tab5_rows_by_hand(opt, state, dynamic):
    p = memory.predict(opt, TERMS)
    assert (p["weights"], p["state"], p["dynamic"]) == (100, state, dynamic)
    assert p["peak"] == 100 + state + dynamic


def test_fp16_foreach_kept_gradients_and_hybrid_by_hand():
    # FP16 (App. C.2): max{½|a| + ½|x|, Σ_l max{½|a_l|, |x_l|}} = max{82.5, 30 + 20 + 20 + 20}
    assert memory.predict("fo_sgd", TERMS, amp=True)["dynamic"] == 90
    wide = dict(TERMS, a_l=[100, 100, 100, 100], a=400)          # activations dominate
    assert memory.predict("fo_adam", wide, amp=True)["dynamic"] == 200 + 40
    # FO-Adam with foreach holds a third |x| (Tab. 5: 3|x|), as a temporary of the update
    p = memory.predict("fo_adam", TERMS, foreach=True)
    assert (p["state"], p["dynamic"], p["peak"]) == (160, 115 + 80, 100 + 3 * 80 + 115)
    # gradients kept on .grad between steps move from dynamic to state; the peak stays
    p = memory.predict("fo_sgd", TERMS, kept=80)
    assert (p["state"], p["dynamic"], p["peak"]) == (80, 35, 215)
    # hybrid (Tab. 7): K = 0 is FO-SGD, K = n is ZO-SGD, K = 1 has embeddings and layer 0 by ZO
    dynamic = [memory.predict("zo_sgd", TERMS, zo_layers=k)["dynamic"] for k in (0, 1, 2)]
    assert dynamic == [115, max(20 + 40, 30), 30]


@pytest.mark.slow
def test_opt125m_closed_form_and_f16():
    """OPT-125M's |x_l| from its shapes, Tab. 5's ZO rows and F16 halving (App. C.2)."""
    h, n, vocab, positions = 768, 12, 50272, 2048 + 2
    embeddings = (vocab + positions) * h                       # the head is tied to the tokens
    layer = 4 * (h * h + h) + 2 * 4 * h * h + 4 * h + h + 2 * 2 * h   # q k v o, fc1, fc2, norms
    x = embeddings + n * layer + 2 * h                           # + final norm
    assert x == 125_239_296                                      # the published count
    zo, zo_adam, fo, fo16, zo16 = meta("--opt", "zo_sgd,zo_adam,fo_sgd", "--seq_len", "8") + \
        meta("--opt", "fo_sgd,zo_sgd", "--seq_len", "8", "--dtype", "fp16")
    t = zo["_terms"]
    assert t["x_l"] == [4 * embeddings, *[4 * layer] * n, 4 * 2 * h] and t["W"] == 4 * x
    assert zo["predicted_peak"] * GIB == 4 * (x + embeddings)    # |x| + max_l |x_l|
    assert zo_adam["predicted_peak"] * GIB == 4 * (3 * x + embeddings)
    assert zo16["predicted_peak"] * GIB == 2 * (x + embeddings)  # F16: every term halved
    assert fo["predicted_peak"] * GIB == 4 * x + sum(map(max, t["a_l"], t["x_l"]))
    assert fo16["predicted_weights"] * GIB == 4 * x              # FP16 keeps fp32 weights
    assert fo16["predicted_peak"] < fo["predicted_peak"]


@pytest.mark.parametrize("name, params", [
    ("opt-350m", 331_196_416), ("opt-1.3b", 1_315_758_080), ("opt-13b", 12_853_473_280),
    ("llama-2-7b", 6_738_415_616), ("mistral-7b", 7_241_732_096)])
def test_paper_configurations_have_the_published_sizes(name, params):
    model = models.from_config(models.config(name), device="meta")
    assert sum(p.numel() for p in model.parameters()) == params


# ---- the layer terms ----------------------------------------------------------------------------

class MLP(torch.nn.Module):
    """A transformer's layout (embeddings, a ModuleList of layers, head) with a countable graph."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Linear(8, 16)
        self.layers = torch.nn.ModuleList(
            torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.ReLU()) for _ in range(2))
        self.head = torch.nn.Linear(16, 4)

    def forward(self, x):
        x = self.embed(x)
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_saved_activations_of_an_mlp_by_hand(device):
    """Linear saves its input (its weight is |W|, not |a|), ReLU its output, pow its input; the
    ReLU output that the next Linear saves again is one storage, counted once."""
    torch.manual_seed(0)
    model, x = MLP().to(device), torch.randn(3, 8, device=device)
    t = memory.layer_terms(model, lambda: model(x).pow(2).mean(), list(model.parameters()))
    b = 3 * 4                                                    # batch 3, fp32
    assert t["a_l"] == [8 * b, (16 + 16) * b, 16 * b, 4 * b]
    assert t["x_l"] == [4 * (8 * 16 + 16), 4 * (16 * 16 + 16), 4 * (16 * 16 + 16), 4 * (16 * 4 + 4)]
    assert t["W"] == t["x"] == sum(t["x_l"]) and t["a"] == sum(t["a_l"])
    frozen = memory.layer_terms(model, lambda: model(x).pow(2).mean(), [model.head.weight])
    assert frozen["x_l"] == [0, 0, 0, 4 * 16 * 4] and frozen["W"] == t["W"]


def _caches(fn):
    """fn()'s result and the modules whose output carried a KV cache while it ran."""
    caches = []

    def spot(module, args, out):
        if getattr(out, "past_key_values", None) is not None:
            caches.append(type(module).__name__)
    handle = register_module_forward_hook(spot)
    try:
        return fn(), caches
    finally:
        handle.remove()


@pytest.mark.parametrize("family", FAMILIES)
def test_synthetic_losses_against_the_models_own_logits(family):
    """"task" = NLL of the first token as the answer at the last position; "lm" = the model's own
    `labels=` loss (next token, or same token for a masked LM). Neither keeps a KV cache (two
    tensors of the hidden size per layer and token), which no training step holds."""
    torch.manual_seed(0)
    model = models.from_config(tiny_config(family, vocab_size=64))
    ids = torch.randint(4, 64, (3, 7))
    with torch.no_grad():
        logits = model(input_ids=ids).logits
        reference, default_caches = _caches(lambda: model(input_ids=ids, labels=ids).loss)
        (task, lm), caches = _caches(lambda: [bench_memory.synthetic_loss(model, ids, loss)()
                                              for loss in bench_memory.LOSSES])
    oracle = -logits[:, -1].log_softmax(-1).gather(1, ids[:, :1]).mean()
    torch.testing.assert_close(task, oracle, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lm, reference, rtol=1e-5, atol=1e-6)
    assert caches == [] and bool(default_caches) == (family != "roberta")   # the spotter works


def test_the_paired_task_loss_is_the_task_loss_twice():
    """pair=True: closure(pair=True) runs the doubled batch and returns the task loss for each
    half (rge.estimate's contract), closure() the task loss itself."""
    torch.manual_seed(0)
    model = models.from_config(tiny_config("opt", vocab_size=64))
    ids = torch.randint(4, 64, (3, 7))
    with torch.no_grad():
        task = bench_memory.synthetic_loss(model, ids)()
        paired = bench_memory.synthetic_loss(model, ids, pair=True)
        both = paired(pair=True)
    assert both.shape == (2,) and torch.equal(paired(), task)
    torch.testing.assert_close(both, torch.stack([task, task]), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", fast_first(FAMILIES))
def test_both_losses_run_on_the_meta_device(family, tmp_path):
    """Every family's terms on meta (transformers' mask code must not read token values): what
    the every-token loss saves beyond the task loss in the head (the logits) grows with T."""
    tiny_config(family, vocab_size=64).save_pretrained(tmp_path)
    head = {(loss, T): meta("--model", str(tmp_path), "--opt", "fo_sgd", "--loss", loss,
                            "--batch_size", "2", "--seq_len", str(T))[0]["_terms"]["a_l"][-1]
            for loss in bench_memory.LOSSES for T in (8, 16)}
    extra = {T: head["lm", T] - head["task", T] for T in (8, 16)}
    assert 0 < extra[8] < extra[16]


# ---- the readings on CPU ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_opt(tmp_path_factory):
    """A 2-layer OPT config whose 51 MB embedding is large against the allocator's noise."""
    from transformers import OPTConfig
    path = tmp_path_factory.mktemp("small-opt")
    OPTConfig(vocab_size=50272, hidden_size=256, num_hidden_layers=2, ffn_dim=512,
              num_attention_heads=4, word_embed_proj_dim=256,
              max_position_embeddings=64).save_pretrained(path)
    return str(path)


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists(memory.CLEAR_REFS), reason="needs Linux /proc")
def test_cpu_readings_weights_state_and_dynamic(small_opt):
    zo, fo = bench_memory.main(["--model", small_opt, "--opt", "zo_sgd,fo_sgd", "--device", "cpu",
                          "--batch_size", "2", "--seq_len", "16", "--steps", "1"])
    for row in zo, fo:
        assert row["measured_weights"] * GIB == pytest.approx(row["_terms"]["W"], rel=0.03)
        assert row["measured_dynamic"] > 0 and row["forward_passes"] >= 1
    assert abs(zo["measured_state"]) * GIB < 2 * MIB             # ZO-SGD keeps nothing
    x = fo["_terms"]["x"] / GIB
    assert fo["predicted_state"] == x                            # .grad of every weight, counted
    assert fo["measured_state"] == pytest.approx(x, rel=0.1)
    # dynamic: ZO-SGD's is Tab. 5's max_l |x_l| (the embedding's perturbed copy; train.py's loss
    # has no B×T×V logits); FO-SGD's is Tab. 5's plus one more |x_emb|, torch's dense embedding
    # gradient added to the tied head's (out of place it would be two more)
    emb = zo["_terms"]["x_l"][0] / GIB
    assert zo["predicted_dynamic"] == emb
    assert abs(zo["measured_dynamic"] - emb) * GIB < 4 * MIB
    assert fo["measured_dynamic"] - fo["predicted_dynamic"] == pytest.approx(emb, rel=0.1)


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists(memory.CLEAR_REFS), reason="needs Linux /proc")
def test_the_paired_forward_holds_the_tied_embedding_twice(small_opt):
    """--pair (train.py's default path): the tied embedding's two perturbed copies live through
    the forward, so ZO-SGD's dynamic memory is at least 2·|x_emb|, one |x_emb| above Tab. 5's
    max_l |x_l| (what the sequential path holds, test above), plus the doubled activations."""
    zo, = bench_memory.main(["--model", small_opt, "--opt", "zo_sgd", "--device", "cpu", "--pair",
                             "--batch_size", "2", "--seq_len", "16", "--steps", "1"])
    emb = zo["_terms"]["x_l"][0] / GIB
    assert zo["pair"] and zo["predicted_dynamic"] == emb
    assert 2 * emb - 4 * MIB / GIB < zo["measured_dynamic"] < 2 * emb + 16 * MIB / GIB


@pytest.mark.skipif(memory.LIBC is None or not os.path.exists(memory.STATUS),
                    reason="needs glibc and Linux /proc")
def test_cache_freed_memory_reuses_a_freed_block_without_fresh_pages():
    """A tensor allocated again after it was freed, as a ZO step draws u again: glibc's default
    maps a 64 MiB one afresh (16384 pages of 4 KiB faulted in again; fewer with huge pages);
    with freed blocks cached, a block is reused and (almost) no page is faulted in. Then
    track_tensors gives freed blocks back again: a 256 MiB tensor (larger than any block cached
    before) faults its pages in every time it is made."""
    script = "\n".join([
        "import resource, torch, memory",
        "def faults(n):",                         # page faults of an n-float tensor made again
        "    for _ in range(3): torch.ones(n)",             # allocated, filled, freed
        "    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt",
        "    torch.ones(n)",
        "    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before",
        "default = faults(1 << 24)",
        "memory.cache_freed_memory()",
        "cached, cached_large = faults(1 << 24), faults(1 << 26)",
        "memory.track_tensors()",
        "print(default, cached, cached_large, faults(1 << 26))"])
    out = subprocess.run([sys.executable, "-c", script], check=True, capture_output=True,
                         text=True, cwd=os.path.join(os.path.dirname(__file__), "..")).stdout
    default, cached, cached_large, tracked_large = map(int, out.split())
    assert cached < 64 and cached_large < 256
    assert default > 10 * cached + 16 and tracked_large > 10 * cached_large + 64


@pytest.mark.slow
def test_hybrid_sweep_falls_with_zo_layers_and_is_written(small_opt, tmp_path, capsys):
    rows = meta("--model", small_opt, "--sweep", "zo_layers", "0,1,2", "--out", str(tmp_path))
    peaks = [r["predicted_peak"] for r in rows]
    assert peaks[0] > peaks[2] and sorted(peaks, reverse=True) == peaks
    stem = str(tmp_path / os.path.basename(small_opt)) + "_zo_layers_meta"
    with open(stem + ".csv") as f:
        assert len(f.readlines()) == 1 + 3
    assert os.path.exists(stem + ".json")
    assert os.path.exists(stem + ".png") or importlib.util.find_spec("matplotlib") is None
    cpu = ["--model", small_opt, "--device", "cpu", "--seq_len", "8", "--steps", "1",
           "--sweep", "zo_layers", "0,2", "--out", str(tmp_path)]
    fo, zo = bench_memory.main(cpu)
    assert fo["measured_peak"] > zo["measured_peak"]


# ---- bad input ----------------------------------------------------------------------------------

@pytest.mark.parametrize("argv, message", [
    (["--opt", "zo_sgd,nope"], "unknown --opt 'nope'"),
    (["--model", "gpt-5"], "unknown --model 'gpt-5'"),
    (["--sweep", "lr", "1,2"], "unknown --sweep 'lr'"),
    (["--sweep", "seq_len", "64,long"], "comma-separated integers"),
    (["--steps", "0"], "--steps must be at least 1"),
    (["--pair", "--loss", "lm"], "--pair measures train.py's paired forward")])
def test_bad_input_is_one_line_and_exit_2(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        meta(*argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and err.count("\n") == 1


def test_peft_is_imported_only_for_an_adapter(small_opt, capsys):
    row, = meta("--model", small_opt, "--peft", "lora")
    assert 0 < row["_terms"]["x"] < row["_terms"]["W"] / 100


@pytest.mark.slow
def test_hub_ids_and_recorded_results_are_kept(tmp_path, monkeypatch, capsys):
    """facebook/opt-125m is opt-125m's shape; a sweep without --out never replaces a recorded
    file in results/, and replaces it when --out names the folder."""
    sweep = ["--sweep", "seq_len", "8,16", "--opt", "zo_sgd"]
    hub, short = (meta("--model", name, "--seq_len", "8") for name in ("facebook/opt-125m",
                                                                        "opt-125m"))
    assert hub == [row | {"model": "facebook/opt-125m"} for row in short]
    monkeypatch.chdir(tmp_path)
    recorded = tmp_path / "results" / "opt-125m_seq_len_meta.csv"
    recorded.parent.mkdir()
    recorded.write_text("recorded")
    with pytest.raises(SystemExit) as exit_info:
        meta("--model", "facebook/opt-125m", *sweep)
    assert exit_info.value.code == 2 and "--out" in capsys.readouterr().err
    assert recorded.read_text() == "recorded"
    meta("--model", "facebook/opt-125m", *sweep, "--out", "results")
    assert recorded.read_text().startswith("model,")
