"""dngjax/tools/sample/posterior_check.py: the AUROC against a brute-force oracle, and the job end to end."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from dngjax.tools.sample.posterior_check import auroc

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _auroc_oracle(scores, positive):
    pos = [s for s, y in zip(scores, positive) if y]
    neg = [s for s, y in zip(scores, positive) if not y]
    total = 0.0
    for a in pos:
        for b in neg:
            total += 1.0 if a > b else (0.5 if a == b else 0.0)
    return total / (len(pos) * len(neg))


def test_auroc_hand_made_and_random():
    y = np.array([True, True, False, False])
    assert auroc(np.array([0.9, 0.8, 0.1, 0.2]), y) == 1.0
    assert auroc(np.array([0.1, 0.2, 0.9, 0.8]), y) == 0.0
    assert auroc(np.array([0.5, 0.5, 0.5, 0.5]), y) == 0.5
    assert np.isnan(auroc(np.array([0.1, 0.2]), np.array([False, False])))
    rng = np.random.default_rng(0)
    s = rng.integers(0, 5, size=40).astype(float)          # many ties
    lab = rng.random(40) < 0.3
    assert auroc(s, lab) == pytest.approx(_auroc_oracle(s, lab), abs=1e-12)


@pytest.mark.skipif(not os.path.isfile(os.path.join(REPO, "checkpoints", "mnist", "forget_1", "card.json")),
                    reason="shipped MNIST checkpoints missing")
def test_cli_writes_json_and_png(tmp_path):
    out = tmp_path / "pc"
    r = subprocess.run([sys.executable, os.path.join(REPO, "sample", "main.py"), "--job=posterior_check",
                        "--classes=1", "--config.n=8", "--config.steps=3", "--config.chunk_size=8", f"--out={out}"],
                       cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "AUROC" in r.stdout
    res = json.load(open(out / "posterior_check.json"))["results"][0]
    assert res["removed_class"] == 1 and res["n"] == 8 and len(res["t"]) == 3 == len(res["auroc"])
    assert res["mean_p_other"][0] == pytest.approx(0.25, abs=1e-6)    # the prior at the first step
    assert (out / "posterior_check.png").stat().st_size > 1000
