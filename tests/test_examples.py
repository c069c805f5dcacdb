"""The minimal example and the tutorial run end to end, from another directory, and show what
they claim: the loss falls, the estimate follows √(q/(d+q+1)), the memory follows Tab. 5.

    python -m pytest tests/test_examples.py -q          (the tutorial, in its fast mode, is slow)
"""
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIGURES = ("rge_cosine.png", "zo_vs_fo.png", "memory.png")
NUMBER = r"([-+\d.e]+)"


def run(script, cwd, *argv):
    """stdout of `python script argv` run in `cwd`; one thread (tiny models, a shared CPU)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MPLBACKEND="Agg")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, script), *argv], cwd=cwd, env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def rows(pattern, text):
    """Each match of `pattern` in `text`, its groups as floats (label groups kept as text)."""
    def value(group):
        try:
            return float(group)
        except ValueError:
            return group.strip()
    matches = re.findall(pattern, text)
    assert matches, f"no line matches {pattern!r} in:\n{text}"
    return [tuple(map(value, m)) if isinstance(m, tuple) else value(m) for m in matches]


def test_minimal_example_learns(tmp_path):
    """zo_minimal.py: the loss at least halves and the test accuracy ends far above chance (1/3)."""
    out = run("examples/zo_minimal.py", tmp_path)
    log = rows(rf"step +(\d+)  train loss {NUMBER}  test accuracy {NUMBER}", out)
    (_, first_loss, _), (_, last_loss, last_accuracy) = log[0], log[-1]
    assert last_loss < 0.5 * first_loss
    assert last_accuracy > 0.8


@pytest.mark.slow
def test_tutorial_fast_mode(tmp_path):
    out = run("docs/tutorial.py", tmp_path, "--fast", "--figures", str(tmp_path / "figures"))
    for name in FIGURES:
        with open(tmp_path / "figures" / name, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n", name

    # 2. RGE: the cosine grows with q as √(q/(d+q+1)) (within 2× once q ≥ 16, where the mean
    # over the seeds has settled); a tiny μ loses the slope to fp32 rounding, not in fp64.
    cos_q = rows(rf"q = +(\d+)   cos\(ĝ, ∇f\) = {NUMBER}   √\(q/\(d\+q\+1\)\) = {NUMBER}", out)
    assert cos_q[-1][1] > cos_q[0][1]
    assert all(theory / 2 < cos < 2 * theory for q, cos, theory in cos_q if q >= 16)
    cos_mu = {dtype: dict(rows(rf"μ={NUMBER}: {NUMBER}", line))
              for dtype, line in rows(r"(fp32|fp64) (μ=.*)", out)}
    tiny, plateau, large = min(cos_mu["fp32"]), 1e-3, max(cos_mu["fp32"])
    assert cos_mu["fp64"][tiny] > 0.95 * cos_mu["fp64"][plateau]
    assert cos_mu["fp32"][tiny] < 0.8 * cos_mu["fp64"][tiny]
    assert all(cos[large] < cos[plateau] / 2 for cos in cos_mu.values())

    # 3. Training: every optimizer lowers the loss; back-prop most, 16 queries more than one.
    final = {label: (first, last) for label, first, last in
             rows(rf"(.+?) +train loss {NUMBER} → {NUMBER} after \d+ steps", out)}
    assert all(last < first for first, last in final.values())
    assert final["FO-SGD"][1] < min(last for label, (_, last) in final.items() if "ZO" in label)
    assert final["ZO-SGD, q = 16"][1] < final["ZO-SGD, q = 1"][1]

    # 4. Memory: the measured peaks follow Tab. 5 (ZO-Adam above it, by its update's
    # temporaries), ZO-SGD's is about half FO-SGD's, and FO-SGD's grows faster with the length.
    peaks = {label: (m, t) for label, m, t in
             rows(rf"(\S+) +peak: measured +{NUMBER} MiB, Tab. 5 +{NUMBER} MiB", out)}
    assert abs(peaks["ZO-SGD"][0] / peaks["ZO-SGD"][1] - 1) < 0.05
    assert all(abs(m / t - 1) < 0.1 for m, t in (peaks["FO-SGD"], peaks["FO-Adam"]))
    assert peaks["ZO-Adam"][0] >= peaks["ZO-Adam"][1]
    assert peaks["ZO-SGD"][0] < 0.6 * peaks["FO-SGD"][0]
    sweep = rows(rf"\d+ tokens: ZO-SGD +{NUMBER} MiB   FO-SGD +{NUMBER} MiB", out)
    (zo_short, fo_short), (zo_long, fo_long) = sweep[0], sweep[-1]
    assert fo_long - fo_short > 2 * (zo_long - zo_short) > 0
