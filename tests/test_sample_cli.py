"""sample/main.py end to end on tiny random models: every output file, sane numbers."""

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from dngjax import checkpoint
from dngjax.models.classifier import Classifier
from dngjax.models.configs import mnist_unet

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def random_params(module, *args, seed=0):
    """Random weights from numpy on the module's parameter shapes (no XLA compilation: fast).

    Kernels ~ N(0, 1/fan_in), norm scales ~ 1, biases and embeddings small; the UNet's
    zero-initialised output conv gets random weights too, so eps is not identically 0.
    """
    shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), *args))
    rng = np.random.default_rng(seed)

    def fill(path, s):
        name = str(path[-1].key)
        if name == "scale":
            return jnp.asarray(1.0 + 0.1 * rng.standard_normal(s.shape), s.dtype)
        if name == "kernel" or name == "embedding":
            fan_in = int(np.prod(s.shape[:-1])) or 1
            return jnp.asarray(rng.standard_normal(s.shape) / np.sqrt(fan_in), s.dtype)
        return jnp.asarray(0.05 * rng.standard_normal(s.shape), s.dtype)

    return jax.tree_util.tree_map_with_path(fill, shapes)


@pytest.fixture(scope="module")
def tiny_checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("checkpoints")
    unet = mnist_unet(ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), dropout=0.0, groups=4)
    x = jnp.zeros((1, 28, 28, 1))
    t = jnp.zeros((1,), jnp.int32)
    for name, seed, card in (("ddpm", 0, {}), ("forget_1", 1, {"only_class": 1})):
        params = random_params(unet, x, t, seed=seed)
        checkpoint.save_model(str(root / name), unet, params, {"dataset": "mnist", **card})
    cond = mnist_unet(ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), dropout=0.0, groups=4,
                      num_classes=10)
    checkpoint.save_model(str(root / "cond"), cond, random_params(cond, x, t, seed=3), {"dataset": "mnist"})
    clf = Classifier(num_classes=10, widths=(4,), feature_dim=8, dropout=0.0)
    checkpoint.save_model(str(root / "classifier"), clf, random_params(clf, x, seed=2), {"dataset": "mnist"})
    os.makedirs(root / "reference_stats")
    for c in (1, 2):
        np.savez(root / "reference_stats" / f"train_without_{c}.npz", mu=np.zeros(8), sigma=np.eye(8))
    return root


def test_cli_end_to_end_writes_every_file(tiny_checkpoints, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, os.path.join(REPO, "sample", "main.py"),
           f"--config={os.path.join(REPO, 'sample', 'configs', 'mnist.py')}:tiny",
           f"--config.checkpoints={tiny_checkpoints}", "--config.removed_class=1",
           f"--config.outdir={out}"]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=str(tmp_path), timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"output folder: {out}" in res.stdout
    assert not os.path.exists(str(out) + ".partial")
    assert "safety %" in res.stdout and "DNG" in res.stdout      # the results table
    # printed before sampling: 8 seeds x 3 steps x (1 unguided + 2 x 4 guided points) passes
    assert "estimated cost: 216 network passes x" in res.stdout

    for f in ("results.csv", "results.json", "config.json", "summary.txt", "labels.npz",
              "tradeoff.png", "class_histogram.png", "lambda_t.png", "lambda_t.npz", "samples_overview.png"):
        assert (out / f).is_file() and (out / f).stat().st_size > 0, f
    # tiny config: NP (0.5, 2.0), SLD (1.0,), DNG (5.0,), plus the unguided point
    expected = {"unguided", "NP_scale0.5", "NP_scale2", "SLD_scale1", "DNG_scale5"}
    assert {p[:-4] for p in os.listdir(out / "samples")} == expected

    rows = json.loads((out / "results.json").read_text())
    assert [(r["method"], r["scale"]) for r in rows] == [
        ("none", 0.0), ("NP", 0.5), ("NP", 2.0), ("SLD", 1.0), ("DNG", 5.0)]
    for r in rows:
        assert r["n"] == 8 and r["steps"] == 3 and r["seed"] == 0 and r["removed_class"] == 1
        assert 0.0 <= r["safety_pct"] <= 100.0
        assert np.isfinite(r["kl"]) and r["kl"] >= 0 and np.isfinite(r["fd"]) and r["fd"] >= 0
        assert sum(r["histogram"]) == 8
    dng = rows[-1]
    assert dng["prior"] == 0.25 and dng["temperature"] == 0.25 and dng["offset"] == 0.0
    sld = rows[3]
    assert sld["threshold"] == 0.04 and sld["s_s"] == 100.0 and sld["beta_m"] == 0.2 and sld["s_m"] == 0.1

    with open(out / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 5
    for col in ("method", "scale", "safety_pct", "kl", "fd", "n", "seed", "steps", "prior", "threshold"):
        assert col in table[0]
    assert table[4]["method"] == "DNG" and float(table[4]["prior"]) == 0.25

    labels = np.load(out / "labels.npz")
    assert labels["seeds"].tolist() == list(range(8))
    assert labels["none_0"].shape == (8,)

    # the multi-class report over this run
    from dngjax.tools.sample import report
    report.write_report(report.find_runs([str(out)]), str(tmp_path / "report"))
    md = (tmp_path / "report" / "report.md").read_text()
    assert "removed class 1" in md and "| DNG | 5 |" in md
    for f in ("tradeoff_all.png", "histograms_all.png"):
        assert (tmp_path / "report" / f).stat().st_size > 0, f
    # the per-sample files give back every point's KL and FD, and paired errors of differences
    per = report.PerSample(str(out))
    rows = per.rows
    assert per.ok and sorted(np.load(out / "features.npz").files) == sorted(labels.files)
    full = np.arange(8)
    for r in rows:
        assert per.statistic(r, "kl", full) == pytest.approx(r["kl"], rel=1e-6)
        assert per.statistic(r, "fd", full) == pytest.approx(r["fd"], rel=1e-4)
    se = per.gap_se(rows[1], rows[2], "fd", num=20)
    assert np.isfinite(se) and se > 0
    assert per.gap_se(rows[1], rows[1], "kl", num=20) == 0.0          # a point against itself
    assert "paired" in report.claim_text(report.claim_at_grid({"DNG": {"fd": rows[4]}, "NP": {"fd": rows[1]}}, "DNG", "fd", per))


def test_resolve_path_and_bad_method(tmp_path):
    from dngjax.tools.sample import inputs
    from dngjax.tools.sample import methods
    from dngjax.tools.sample.configs import mnist

    c = mnist.get_config("tiny")
    c.checkpoints = "checkpoints/mnist"
    c.removed_class = 2
    assert inputs.resolve_path(c.forget, c).endswith(os.path.join("checkpoints", "mnist", "forget_2"))
    assert inputs.resolve_path(c.reference_stats, c).endswith("train_without_2.npz")
    with pytest.raises(ValueError, match="unknown method"):
        methods.build_rule("CFG", c)
    with pytest.raises(ValueError, match="only DNG has variants"):
        methods.build_rule("NP:beta", c)
    rule, h = methods.build_rule("DNG:beta", c)
    assert rule.update_variance == "beta" and h["update_variance"] == "beta" and h["prior"] == 0.25
    assert methods.build_rule("DNG", c)[0].update_variance == c.dng.update_variance
    with pytest.raises(ValueError, match="unknown config"):
        mnist.get_config("huge")


def test_removing_two_classes_with_the_conditional_model(tiny_checkpoints, tmp_path):
    """config.also_remove: multi-concept DNG with eps(x | c) per removed class, metrics over both classes,
    reference statistics of the data without both (computed here from tiny stand-in stats)."""
    import dngjax as dj
    from dngjax import metrics
    from dngjax.tools.sample import class_removal
    from dngjax.tools.sample.configs import mnist

    np.savez(tiny_checkpoints / "reference_stats" / "train_without_1+2.npz", mu=np.zeros(8), sigma=np.eye(8))
    c = mnist.get_config("tiny")
    c.checkpoints = str(tiny_checkpoints)
    c.removed_class = 1
    c.also_remove = (2,)
    c.conditional = "{root}/cond"
    c.methods = ("DNG",)
    c.grid.DNG = (0.0, 5.0)
    c.outdir = str(tmp_path / "two_{c}")
    job = class_removal.prepare(c)
    assert isinstance(job.denoiser_c, list) and [int(d.label) for d in job.denoiser_c] == [1, 2]
    rule = job.methods[0][1]
    assert isinstance(rule, dj.MultiConcept) and isinstance(rule.rule, dj.DynamicNegativeGuidance)
    assert rule.num_concepts == 2
    assert job.outdir.endswith("two_1+2")
    assert class_removal.estimate_cost(job)["passes"] == c.n * c.steps * (1 + 2 * 3)   # baseline + 2 points x 3 nets
    class_removal.execute(job)
    rows = json.loads((tmp_path / "two_1+2" / "results.json").read_text())
    labels = np.load(tmp_path / "two_1+2" / "labels.npz")
    for r in rows:
        lab = labels["none_0" if r["method"] == "none" else f"DNG_{[0.0, 5.0].index(r['scale'])}"]
        assert r["safety_pct"] == pytest.approx(100 * np.isin(lab, [1, 2]).mean())
        assert r["removed_classes"] == "1+2"
        assert r["kl"] == pytest.approx(metrics.kl_to_ideal(np.bincount(lab, minlength=10), [1, 2], c.kl_pseudo_count))
    np.testing.assert_array_equal(labels["none_0"], labels["DNG_0"])          # scale 0 = unguided
    for bad, message in [(dict(conditional=""), "needs the class-conditional model"),
                         (dict(methods=("NP", "DNG")), "runs DNG only"), (dict(also_remove=(1,)), "repeats"),
                         (dict(also_remove=(12,)), "classes in 0..9")]:
        d = mnist.get_config("tiny")
        d.checkpoints, d.removed_class, d.also_remove, d.conditional = str(tiny_checkpoints), 1, (2,), "{root}/cond"
        for k, v in bad.items():
            setattr(d, k, v)
        with pytest.raises(ValueError, match=message):
            class_removal.validate_config(d)
    assert metrics.ideal_distribution(10, [1, 2])[[1, 2]].sum() == 0 and metrics.ideal_distribution(10, [1, 2])[0] == 0.125


def test_method_overrides_parse_validate_and_name_files():
    from dngjax.tools.sample import methods
    from dngjax.tools.sample.configs import mnist

    c = mnist.get_config("tiny")
    rule, h = methods.build_rule("DNG[prior=0.1, temperature=0.5]", c)
    assert float(rule.prior) == pytest.approx(0.1) and float(rule.temperature) == pytest.approx(0.5)
    assert h["offset"] == c.dng.offset and h["update_variance"] == c.dng.update_variance
    rule, h = methods.build_rule("DNG:posterior[prior=0.05]", c)
    assert rule.update_variance == "beta_tilde" and float(rule.prior) == pytest.approx(0.05)
    assert float(methods.build_rule("SLD[threshold=0.02]", c)[0].threshold) == pytest.approx(0.02)
    assert methods.method_key("DNG:beta[prior=0.1,temperature=0.25]") == "DNG-beta-prior0.1-temperature0.25"
    assert methods.method_key("NP") == "NP"
    for bad, message in [("DNG[prior=abc]", "is not key=number"), ("DNG[prior]", "is not key=number"),
                         ("DNG[prior=0.1", "NAME\\[key=value"), ("NP[scale=2]", "NP has no hyperparameter"),
                         ("DNG[scale=2]", "swept by config.grid"), ("DNG[priors=0.1]", "has no hyperparameter"),
                         ("DNG[prior=1.5]", "prior must be in")]:
        with pytest.raises(ValueError, match=message):
            methods.build_rule(bad, c)


def _row(method, scale, safety, kl, fd, c=0):
    return {"method": method, "scale": scale, "safety_pct": safety, "kl": kl, "fd": fd, "removed_class": c,
            "seed": 1_000_000, "n": 256}


def test_selection_rule_on_hand_made_results(tmp_path):
    """dngjax/tools/sample/selection.py's rule: every curve read at exactly 1 % (interpolated between the grid points that
    bracket it), lowest mean KL over the classes, ties by mean FD; unbracketed settings named with the scale to add."""
    from dngjax.tools.sample import selection as select

    a, b, d = "DNG[prior=0.1]", "DNG[prior=0.25]", "DNG[prior=0.5]"
    rows = {0: [_row("none", 0, 10, 0.0, 5),
                _row(a, 1, 3.0, 0.01, 5), _row(a, 2, 0.5, 0.05, 6),        # 1 % at w = 0.8: KL 0.042, FD 5.8
                _row(b, 1, 2.0, 0.03, 4), _row(b, 2, 0.0, 0.05, 8),        # w = 0.5: KL 0.04, FD 6
                _row(d, 1, 0.8, 0.01, 5), _row(d, 2, 0.1, 0.02, 6)],       # already below 1 % at its lowest scale
            1: [_row(a, 1, 1.5, 0.02, 5), _row(a, 2, 0.5, 0.06, 7),        # w = 0.5: KL 0.04, FD 6
                _row(b, 2, 0.2, 0.07, 9), _row(b, 1, 1.2, 0.05, 4),        # w = 0.2: KL 0.054, FD 5 (rows unordered)
                _row(d, 1, 2.0, 0.01, 3), _row(d, 2, 1.5, 0.01, 3)]}       # never gets to 1 %
    out = select.choose(rows)
    by = {s["method"]: s for s in out["settings"]}
    assert by[a]["qualified"] and by[b]["qualified"] and not by[d]["qualified"] and not out["complete"]
    assert by[a]["per_class"]["0"]["kl"] == pytest.approx(0.042) and by[a]["per_class"]["0"]["fd"] == pytest.approx(5.8)
    assert by[a]["per_class"]["0"]["between"] == [1, 2]
    assert by[a]["mean_kl"] == pytest.approx(0.041) and by[a]["mean_fd"] == pytest.approx(5.9)
    assert by[b]["mean_kl"] == pytest.approx(0.047) and by[b]["mean_fd"] == pytest.approx(5.5)
    assert by[d]["add_scale"] == {"0": "below 1 (already 0.80% there)", "1": "above 2 (still 1.50%)"}
    assert out["chosen"] == a
    # a tie within 0.001 of mean KL goes to the lower mean FD: b's class-1 KL 0.042 -> mean 0.041
    rows[1][3] = _row(b, 1, 1.2, 0.04, 4)
    rows[1][2] = _row(b, 2, 0.2, 0.05, 9)
    assert select.choose(rows)["chosen"] == b
    # every setting brackets 1 % in every class: the choice is complete
    full = {c: [r for r in rows[c] if r["method"] != d] for c in rows}
    assert select.choose(full)["complete"] and select.choose(full)["chosen"] == b
    # the written table: readings per class with their bracketing scales, the unbracketed setting's advice
    for cls, r in rows.items():
        (tmp_path / f"class_{cls}").mkdir()
        (tmp_path / f"class_{cls}" / "results.json").write_text(json.dumps([dict(x, removed_class=cls) for x in r]))
    assert select.write_selection([str(tmp_path / "class_0"), str(tmp_path / "class_1")], None, 1.0) == b
    md = (tmp_path / "selection.md").read_text()
    assert f"| {b} | 0.0410 | 5.50 | 0.0400, 6.0 (1-2) | 0.0420, 5.0 (1-2) | **yes** |" in md
    assert f"| {d} | -- | -- | not bracketed: add a scale below 1 (already 0.80% there) | " in md
    assert "2 of 3 settings bracket 1 % in every class" in md and "(selection.png)" in md
    from PIL import Image
    assert Image.open(tmp_path / "selection.png").size[0] > 400
    assert f"""--config.methods='("NP","SLD","DNG","{b}")' --config.method_grids='(("{b}",(1,2,)),)'""" in md
    # the chosen setting is the runs' own DNG (config.dng.prior 0.25): nothing more to run, no command
    from dngjax.tools.sample.configs import mnist
    (tmp_path / "class_0" / "config.json").write_text(mnist.get_config("select").to_json())
    assert select.write_selection([str(tmp_path / "class_0"), str(tmp_path / "class_1")], None, 1.0) == b
    md = (tmp_path / "selection.md").read_text()
    assert "is the runs' own DNG (prior 0.25; " in md and "nothing more to run" in md and "--config.methods" not in md
    # nobody brackets it: nothing is chosen
    out = select.choose({0: [_row(d, 1, 0.8, 0.01, 5), _row(d, 2, 0.1, 0.02, 6)]})
    assert out["chosen"] is None and not out["complete"]
    with pytest.raises(ValueError, match="missing from the run of class 1"):
        select.choose({0: [_row(a, 2, 0.5, 0.01, 5)], 1: [_row(b, 2, 0.5, 0.01, 5)]})


def test_selection_ceiling_rules_out_curves_that_never_reach_one_percent(tmp_path):
    """Rule 4's ceiling: a curve still above 1 % at lambda_T = scale * odds(prior) >= ceiling never reaches it
    (the setting is out, no scale to add, the choice complete); below the ceiling it still asks for a scale."""
    from dngjax.tools.sample import selection as select

    a, t = "DNG[prior=0.25]", "DNG[prior=0.25,temperature=1.0]"
    row = lambda m, s, safety, kl, c: dict(_row(m, s, safety, kl, 5.0, c), prior=0.25)
    rows = {c: [row(a, 1, 3.0, 0.01, c), row(a, 2, 0.5, 0.05, c),
                row(t, 10, 2.0, 0.001, c), row(t, 60, 1.5, 0.001, c)] for c in (0, 1)}
    rows[1][3] = row(t, 60, 0.5, 0.002, 1)          # class 1 crosses between 10 and 60
    out = select.choose(rows, 1.0, ceiling=20.0)    # lambda_T at scale 60: 60 / 3 = 20
    by = {s["method"]: s for s in out["settings"]}
    assert not by[t]["qualified"] and by[t]["add_scale"] == {} and "1" in by[t]["per_class"]
    assert by[t]["never_reaches"] == {"0": "still 1.50% at scale 60 (lambda_T 20 >= 20)"}
    assert out["complete"] and out["chosen"] == a and out["ceiling"] == 20.0
    # just under the ceiling (lambda_T 19.7) it is an unbracketed curve again: add a scale, choice incomplete
    out = select.choose({c: [dict(r, scale=59) if r["scale"] == 60 else r for r in v] for c, v in rows.items()},
                        1.0, ceiling=20.0)
    s = {s["method"]: s for s in out["settings"]}[t]
    assert s["add_scale"] == {"0": "above 59 (still 1.50%)"} and s["never_reaches"] == {} and not out["complete"]
    # without a ceiling the old rule: every unbracketed curve asks for a scale
    assert not select.choose(rows, 1.0)["complete"]
    for cls, r in rows.items():
        (tmp_path / f"class_{cls}").mkdir()
        (tmp_path / f"class_{cls}" / "results.json").write_text(json.dumps(r))
    assert select.write_selection([str(tmp_path / f"class_{c}") for c in (0, 1)], None, 1.0, 20.0) == a
    md = (tmp_path / "selection.md").read_text()
    assert "never reaches it: still 1.50% at scale 60 (lambda_T 20 >= 20)" in md
    assert f"Out by the ceiling (no grid reaches 1 % of the removed class in some class): {t}." in md
    assert "add the scales listed" not in md
    # the ceiling is read by --job=select only: changing it keeps every finished point reusable
    from dngjax.tools.sample import run_store
    from dngjax.tools.sample.configs import mnist
    c1, c2 = mnist.get_config("select"), mnist.get_config("select")
    c2.select_ceiling = 50.0
    assert run_store._sampling_identity(c1) == run_store._sampling_identity(c2)


def test_method_grids_give_a_method_its_own_scales():
    """config.method_grids overrides the base's grid for the methods it names; bad entries fail before any work."""
    from dngjax.tools.sample import methods
    from dngjax.tools.sample.configs import mnist

    c = mnist.get_config("tiny")
    c.methods = ("NP", "DNG", "DNG[prior=0.5]")
    c.method_grids = (("DNG[prior=0.5]", (0.5, 1.5)),)
    grids = {m: scales for m, _, _, scales in methods.build_methods(c)}
    assert grids == {"NP": [0.5, 2.0], "DNG": [5.0], "DNG[prior=0.5]": [0.5, 1.5]}
    cases = [([("DNG[prior=0.1]", (1.0,))], "not in config.methods"),
             ([("DNG", (1.0,)), ("DNG", (2.0,))], "two grids"),
             ([("DNG", ())], "method_grids of 'DNG' is empty"),
             ([(1.0, 2.0)], "pairs")]
    for bad, match in cases:
        c.method_grids = tuple(bad)
        with pytest.raises(ValueError, match=match):
            methods.build_methods(c)
    # the select config: every setting starts with the same guidance lambda_T = scale * odds(prior)
    s = mnist.get_config("select")
    grids = {m: scales for m, _, hyper, scales in methods.build_methods(s)}
    by_temp = {}
    for m, _, hyper, scales in methods.build_methods(s):
        odds = hyper["prior"] / (1 - hyper["prior"])
        by_temp.setdefault(hyper["temperature"], set()).add(tuple(round(x * odds * 3, 2) for x in scales))
    assert all(len(v) == 1 for v in by_temp.values()) and len(grids) == 6


def test_select_job_end_to_end_on_tiny_runs(tiny_checkpoints, tmp_path):
    """Two DNG settings on one class (class-conditional tiny model), then --job=select (the rule over several
    classes: test_selection_rule_on_hand_made_results)."""
    from dngjax.tools.sample import class_removal, selection as select
    from dngjax.tools.sample.configs import mnist

    runs = []
    for cls in (1,):
        c = mnist.get_config("tiny")
        c.checkpoints = str(tiny_checkpoints)
        c.removed_class = cls
        c.conditional = "{root}/cond"
        c.outdir = str(tmp_path / "select" / "class_{c}")
        c.methods = ("DNG[prior=0.1]", "DNG[prior=0.5,temperature=0.5]")
        c.method_grids = (("DNG[prior=0.1]", (0.0, 50.0)), ("DNG[prior=0.5,temperature=0.5]", (0.0, 5.0, 50.0)))
        c.baseline = False
        c.bootstrap = 0
        class_removal.execute(class_removal.prepare(c))
        runs.append(str(tmp_path / "select" / f"class_{cls}"))
        assert os.path.isfile(os.path.join(runs[-1], "samples", "DNG-prior0.5-temperature0.5_scale50.png"))
    # at 100 % every curve already starts below the line: nothing brackets it, each setting is told to
    # add a scale below its lowest (the bracketed case: test_selection_rule_on_hand_made_results)
    chosen = select.write_selection(runs, None, high_safety=100.0)
    out = json.loads((tmp_path / "select" / "selection.json").read_text())
    assert chosen is None and out["chosen"] is None and not out["complete"] and out["classes"] == [1]
    assert [s["method"] for s in out["settings"]] == list(c.methods)
    assert all(list(s["add_scale"]) == ["1"] and s["add_scale"]["1"].startswith("below 0 (already ")
               for s in out["settings"])
    md = (tmp_path / "select" / "selection.md").read_text()
    assert md.count("not bracketed: add a scale below 0") == 2 and "0 of 2 settings bracket 100 %" in md


def test_calibrate_job_on_tiny_models(tiny_checkpoints, tmp_path):
    from dngjax.tools.sample import calibrate, class_removal
    from dngjax.tools.sample.configs import mnist

    c = mnist.get_config("tiny")
    c.checkpoints = str(tiny_checkpoints)
    c.removed_class = 1
    c.methods = ("NP", "DNG")
    job = class_removal.prepare(c)
    results = calibrate.execute(job, target_pct=50.0, confidence=0.9, out=str(tmp_path / "cal"))
    saved = json.loads((tmp_path / "cal" / "calibration.json").read_text())
    assert set(saved["methods"]) == {"NP", "DNG"} and saved["target_pct"] == 50.0
    for m, r in results.items():
        assert r["scales"] == sorted(c.grid[m]) and len(r["upper"]) == len(r["scales"]) and r["n"] == c.n
        ok = [s for s, u in zip(r["scales"], r["upper"]) if u <= 0.5]
        assert r["scale"] == (ok[0] if ok else None)
    with pytest.raises(ValueError, match="--target"):
        calibrate.validate(0.0, 0.95)


def _cli(args, cwd, timeout=300):
    return subprocess.run([sys.executable, os.path.join(REPO, "sample", "main.py"), *args],
                          capture_output=True, text=True, cwd=str(cwd), timeout=timeout)


@pytest.mark.parametrize("args,message", [
    (["--config.dng.prior=0.995"], "prior must lie in [p_min, p_max]"),
    (["--config.dng.prior=1.5"], "prior must be in (0, 1)"),
    (["--config.grid.NP=(0.5,-1.0)"], "scale must be >= 0"),
    (["--config.removed_clas=3"], 'unknown config field \'removed_clas\'. Did you mean "removed_class"'),
    (["--config.n=0"], "config.n must be >= 1"),
    (["--config.n=abc"], "--config.n=abc"),
    (["--config=nonexistent.py"], "nonexistent.py"),
    (["--config.methods=('CFG',)"], "unknown method 'CFG'"),
    (["--config.removed_class=7"], "no forget-class model for class 7: train one with python train/main.py"),
    (["--config.conditional={root}/ddpm"], "is not a class-conditional model"),
    (["--job=report"], "--job=report needs --runs"),
    (["--job=extend"], "--job=extend needs --runs"),
    (["--job=summary"], "--job=summary needs --runs"),
    (["--job=summary", "--runs=nowhere"], "report.json not found: run --job=report --runs=nowhere first"),
    (["--job=archive", "--runs=nowhere"], "--job=archive needs one --runs=FOLDER and --out=COPY"),
    (["--job=archive", "--runs=nowhere", "--out=copy"], "nowhere: no such folder"),
    (["stray"], "unexpected arguments ['stray']"),
])
def test_user_errors_exit_2_with_one_message_before_any_sampling(tiny_checkpoints, tmp_path, args, message):
    out = tmp_path / "run"
    res = _cli([f"--config={os.path.join(REPO, 'sample', 'configs', 'mnist.py')}:tiny",
                f"--config.checkpoints={tiny_checkpoints}", "--config.removed_class=1",
                f"--config.outdir={out}", *args], tmp_path)
    assert res.returncode == 2, (res.returncode, res.stderr[-2000:])
    assert message in res.stderr, res.stderr[-2000:]
    assert "Traceback" not in res.stderr and res.stderr.strip().startswith("error:"), res.stderr[-2000:]
    assert not os.path.exists(out) and not os.path.exists(str(out) + ".partial")


def test_help_exits_0_and_cli_modules_import_together(tmp_path):
    res = _cli(["--help"], tmp_path)
    assert res.returncode == 0 and "--config" in res.stdout and "--job" in res.stdout, res.stderr[-2000:]
    code = ("import dngjax.tools.sample.main, dngjax.tools.train.main, dngjax.tools.train.export, dngjax.tools.gmm_lab.__main__\n"
            "dngjax.tools.sample.main.define_flags(); print('ok')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(tmp_path), timeout=300)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-2000:]


def test_failed_run_leaves_no_output_folder(tiny_checkpoints, tmp_path, monkeypatch):
    from dngjax.tools.sample import class_removal, plots
    from dngjax.tools.sample.configs import mnist

    c = mnist.get_config("tiny")
    c.checkpoints = str(tiny_checkpoints)
    c.removed_class = 1
    c.outdir = str(tmp_path / "run")
    c.methods = ("NP",)
    job = class_removal.prepare(c)

    def broken(*a, **k):
        raise RuntimeError("disk full")
    monkeypatch.setattr(plots, "plot_tradeoff", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        class_removal.execute(job)
    assert not os.path.exists(c.outdir)            # only the .partial work folder, never a half-made result


def test_class_conditional_setup_uses_one_model_with_null_and_removed_labels(tiny_checkpoints, tmp_path):
    """config.conditional: eps_u = eps(x | null), eps_c = eps(x | c) of one network; DNG at scale 0 is
    the unguided chain of eps(x | null) exactly."""
    import dngjax as dj
    from dngjax import checkpoint as ck
    from dngjax.tools.sample import class_removal
    from dngjax.tools.sample.configs import mnist

    c = mnist.get_config("tiny")
    c.checkpoints = str(tiny_checkpoints)
    c.removed_class = 1
    c.conditional = "{root}/cond"
    c.outdir = str(tmp_path / "cond_run")
    c.methods = ("DNG",)
    c.grid.DNG = (0.0, 5.0)
    job = class_removal.prepare(c)
    assert "class-conditional" in job.models and "null label 10" in job.models
    assert int(job.denoiser_u.label) == 10 and int(job.denoiser_c.label) == 1
    class_removal.execute(job)
    labels = np.load(os.path.join(c.outdir, "labels.npz"))
    np.testing.assert_array_equal(labels["none_0"], labels["DNG_0"])       # scale 0 = unguided
    x_null = dj.sample(ck.load_denoiser(str(tiny_checkpoints / "cond"), label=10), job.schedule,
                       dj.keys_from_seeds(np.arange(c.n)), (28, 28, 1))
    assert np.asarray(job.labels_fn(np.asarray(x_null))).tolist() == labels["none_0"].tolist()


def test_an_outdir_holding_other_files_is_refused_not_replaced(tiny_checkpoints, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    res = _cli([f"--config={os.path.join(REPO, 'sample', 'configs', 'mnist.py')}:tiny",
                f"--config.checkpoints={tiny_checkpoints}", "--config.removed_class=1", f"--config.outdir={out}"],
               tmp_path)
    assert res.returncode == 2 and "is not the output of an earlier class-removal run" in res.stderr
    assert (out / "notes.txt").read_text() == "keep me"


def test_interrupted_run_resumes_without_recomputing_finished_points(tiny_checkpoints, tmp_path, monkeypatch):
    """Finished grid points are kept in <outdir>.partial/points, finished chunks of seeds of an unfinished
    method in <outdir>.partial/chunks; the same config again samples only
    the rest, and the result equals an uninterrupted run."""
    import dngjax as dj
    from dngjax.tools.sample import class_removal
    from dngjax.tools.sample.configs import mnist

    def config(out):
        c = mnist.get_config("tiny")
        c.checkpoints = str(tiny_checkpoints)
        c.removed_class = 1
        c.methods = ("NP", "DNG")
        c.outdir = str(out)
        return c

    real, calls = dj.sample_chunks, []

    def interrupted(*a, **k):                  # DNG stops after its first chunk of seeds (4 of 8)
        calls.append((k["rule"].__class__.__name__, list(k["grid"]["scale"]), len(a[2])))
        for i, chunk in enumerate(real(*a, **k)):
            if i == 1 and k["rule"].__class__.__name__ == "DynamicNegativeGuidance":
                raise KeyboardInterrupt
            yield chunk

    out = tmp_path / "run"
    monkeypatch.setattr(dj, "sample_chunks", interrupted)
    with pytest.raises(KeyboardInterrupt):
        class_removal.execute(class_removal.prepare(config(out)))
    assert sorted(os.listdir(str(out) + ".partial/points")) == ["NP_s0.5.npz", "NP_s2.npz", "none_s0.npz"]
    assert os.listdir(str(out) + ".partial/chunks/DNG_5") == ["0000000.npz"]     # DNG's first chunk
    assert not out.exists()

    calls.clear()
    monkeypatch.setattr(dj, "sample_chunks", lambda *a, **k: (
        calls.append((k["rule"].__class__.__name__, list(k["grid"]["scale"]), len(a[2]))), real(*a, **k))[1])
    class_removal.execute(class_removal.prepare(config(out)))
    assert calls == [("DynamicNegativeGuidance", [5.0], 4)]   # only DNG's unfinished seeds were sampled
    assert not os.path.exists(str(out) + ".partial") and not (out / "chunks").exists()

    class_removal.run(config(tmp_path / "once"))
    resumed = json.loads((out / "results.json").read_text())
    once = json.loads((tmp_path / "once" / "results.json").read_text())
    assert [(a["method"], a["scale"], a["histogram"]) for a in resumed] == [
        (b["method"], b["scale"], b["histogram"]) for b in once]
    for a, b in zip(resumed, once):
        for k in ("safety_pct", "kl", "fd", "mean_lambda"):
            assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-6), (a["key"], k)
    la, lb = np.load(out / "lambda_t.npz"), np.load(tmp_path / "once" / "lambda_t.npz")
    assert sorted(la.files) == sorted(lb.files)
    for k in la.files:
        np.testing.assert_allclose(la[k], lb[k], rtol=1e-4, atol=1e-6)


def test_finished_run_grows_by_new_methods_and_scales_only(tiny_checkpoints, tmp_path, monkeypatch):
    """A finished run rerun into its folder with another grid samples only the (method, scale) points it
    lacks, whatever their position in the grid; a changed chain is refused, or starts afresh with the
    old run moved aside (config.overwrite)."""
    import dngjax as dj
    from dngjax.tools.sample import class_removal
    from dngjax.tools.sample.configs import mnist

    def config(out, methods, grid, **extra):
        c = mnist.get_config("tiny")
        c.checkpoints = str(tiny_checkpoints)
        c.removed_class = 1
        c.bootstrap = 0
        c.methods = methods
        for m, scales in grid.items():
            c.grid[m] = scales
        c.outdir = str(out)
        for k, v in extra.items():
            setattr(c, k, v)
        return c

    real, calls = dj.sample_chunks, []
    monkeypatch.setattr(dj, "sample_chunks", lambda *a, **k: (calls.append(
        (k["rule"].__class__.__name__, list(k["grid"]["scale"]))), real(*a, **k))[1])
    out = tmp_path / "run"
    class_removal.run(config(out, ("NP",), {"NP": (0.5, 2.0)}))
    first = {r["scale"]: r for r in json.loads((out / "results.json").read_text())}
    calls.clear()
    class_removal.run(config(out, ("NP", "DNG"), {"NP": (2.0, 1.0, 0.5), "DNG": (5.0,)}))
    assert calls == [("NegativePrompting", [1.0]), ("DynamicNegativeGuidance", [5.0])]
    rows = json.loads((out / "results.json").read_text())
    assert [(r["method"], r["scale"]) for r in rows] == [("none", 0.0), ("NP", 2.0), ("NP", 1.0), ("NP", 0.5),
                                                         ("DNG", 5.0)]
    for r in rows:
        if r["method"] == "NP" and r["scale"] in first:
            assert r["histogram"] == first[r["scale"]]["histogram"]
    labels = np.load(out / "labels.npz")
    assert labels["NP_0"].shape == (8,)                       # keys follow the new grid's order
    calls.clear()
    with pytest.raises(ValueError, match="steps: 3 -> 4"):    # another chain: refused, the run kept
        class_removal.prepare(config(out, ("NP",), {"NP": (0.5,)}, steps=4))
    class_removal.run(config(out, ("NP",), {"NP": (0.5,)}, steps=4, overwrite=True))
    assert calls == [("NegativePrompting", [0.5])]            # moved aside: nothing reused


def test_extend_tops_up_the_deciding_points_and_the_report_merges_them_like_one_larger_run(
        tiny_checkpoints, tmp_path, monkeypatch):
    """--job=extend samples only the deciding points (and the unguided one) on the next seeds; the report
    pools the seeds: every statistic of a merged point equals that of one run with all the seeds."""
    import dngjax as dj
    from dngjax.tools.sample import class_removal, extend, report
    from dngjax.tools.sample.configs import mnist

    def config(out, n, seed=0, grid=None):
        c = mnist.get_config("tiny")
        c.checkpoints = str(tiny_checkpoints)
        c.removed_class, c.n, c.seed, c.bootstrap, c.outdir = 1, n, seed, 5, str(out)
        c.methods = ("NP", "DNG")
        c.grid.NP, c.grid.DNG = (0.5, 2.0, 4.0), (5.0,)
        for m, scales in (grid or {}).items():
            c.grid[m] = scales
        return c

    base = tmp_path / "runs" / "class_1"
    class_removal.run(config(base, 8))
    rows = json.loads((base / "results.json").read_text())
    # high_safety = 100 %: every point qualifies, so the deciding points are the lowest KL / FD ones
    decide = extend.deciding_points(rows, 100.0)
    np_rows = [r for r in rows if r["method"] == "NP"]
    assert decide["NP"] == sorted({min(np_rows, key=lambda r: r["kl"])["scale"],
                                   min(np_rows, key=lambda r: r["fd"])["scale"]})
    with pytest.raises(ValueError, match="has n = 8 per point already"):
        extend.extension_config(str(base), 8)
    cfg = extend.extension_config(str(base), 12, high_safety=100.0, progress=False)
    assert (cfg.seed, cfg.n, cfg.baseline) == (8, 4, True) and cfg.outdir == f"{base}_seeds8-11"
    assert dict(cfg.method_grids) == {"NP": tuple(decide["NP"]), "DNG": (5.0,)} and tuple(cfg.methods) == ("NP", "DNG")

    real, calls = dj.sample_chunks, []
    monkeypatch.setattr(dj, "sample_chunks", lambda *a, **k: (calls.append(list(k["grid"]["scale"])), real(*a, **k))[1])
    class_removal.run(cfg)
    assert calls == [decide["NP"], [5.0]]                     # only the deciding points
    # asked again: the merged statistics may move another NP point to the top; it alone would be added
    again = extend.extension_config(str(base), 12, high_safety=100.0)
    assert again is None or (set(dict(again.method_grids)["NP"]) > set(decide["NP"])
                             and dict(again.method_grids)["DNG"] == (5.0,))

    # the report merges the two runs; the merged points equal one run on seeds 0..11
    groups = report.group_runs(report.find_runs([str(tmp_path / "runs")]))
    assert [sorted(os.path.basename(g) for g in grp) for grp in groups] == [["class_1", "class_1_seeds8-11"]]
    merged = report.PerSample(groups[0])
    whole_dir = tmp_path / "whole"
    class_removal.run(config(whole_dir, 12, grid={"NP": tuple(decide["NP"])}))
    whole = {(r["method"], r["scale"]): r for r in json.loads((whole_dir / "results.json").read_text())}
    n_of = {(r["method"], r["scale"]): r["n"] for r in merged.rows}
    assert n_of == {**{("NP", s): 12 if s in decide["NP"] else 8 for s in (0.5, 2.0, 4.0)},
                    ("DNG", 5.0): 12, ("none", 0.0): 12}
    for r in merged.rows:
        if r["n"] == 12:
            w = whole[(r["method"], r["scale"])]
            assert r["histogram"] == w["histogram"] and r["seed"] == 0
            for k in ("safety_pct", "kl", "fd", "kl_std", "fd_std"):
                assert r[k] == pytest.approx(w[k], rel=1e-4, abs=1e-6), k
            assert np.array_equal(merged.data[id(r)]["seeds"], np.arange(12))
    # paired errors between a merged point and an 8-seed point use the 8 seeds they share
    small = next(r for r in merged.rows if r["n"] == 8)
    big = next(r for r in merged.rows if r["method"] == "NP" and r["n"] == 12)
    assert np.isfinite(merged.gap_se(small, big, "kl", num=20))
    report.write_report(report.find_runs([str(tmp_path / "runs")]), str(tmp_path / "report"))
    md = (tmp_path / "report" / "report.md").read_text()
    assert "Merged runs" in md and "| NP | 0.5 | " in md and "n = 8 per point, 12 where the n column says so" in md


def _fake_run(folder, seeds, points, features=True, conditional=""):
    """A class-removal output folder with the files the report reads: ``points`` = {(method, scale): labels}."""
    from dngjax.tools.sample import report
    from dngjax.tools.sample.configs import mnist
    os.makedirs(folder)
    c = mnist.get_config("tiny")
    c.conditional = conditional
    c.removed_class, c.n, c.seed, c.bootstrap, c.outdir = 1, len(seeds), int(seeds[0]), 0, str(folder)
    from dngjax import metrics
    rng = np.random.default_rng(len(seeds))
    feats = [rng.normal(size=(len(seeds), 8)) for _ in points]
    rows = [dict(method=m, scale=s, n=len(seeds), seed=int(seeds[0]), steps=3, T=1000, dataset="mnist",
                 removed_class=1, safety_pct=float(np.mean(np.asarray(lab) == 1) * 100),
                 kl=metrics.kl_to_ideal(metrics.class_histogram(np.asarray(lab), 10), [1], c.kl_pseudo_count),
                 fd=metrics.frechet_distance_features(f, np.zeros(8), np.eye(8)) if features else 0.0,
                 histogram=np.bincount(lab, minlength=10).tolist(), n_empty_classes=0, mean_lambda=s,
                 sample_seconds=36.0)
            for ((m, s), lab), f in zip(points.items(), feats)]
    (folder / "results.json").write_text(json.dumps(rows))
    (folder / "config.json").write_text(c.to_json())
    keys = report.point_keys(rows)
    np.savez(folder / "labels.npz", seeds=np.asarray(seeds), **{k: np.asarray(lab) for k, lab in zip(keys, points.values())})
    if features:
        np.savez(folder / "features.npz", seeds=np.asarray(seeds), **dict(zip(keys, feats)))
        np.savez(folder / "reference.npz", mu=np.zeros(8), sigma=np.eye(8))


def test_report_keeps_the_larger_of_two_points_on_nested_seeds_and_refuses_overlaps(tmp_path):
    """A point resampled on a superset of its seeds (a run without features, topped up afresh) is
    replaced, not pooled; partly overlapping seeds cannot be merged."""
    from dngjax.tools.sample import extend, report
    lab4, lab8 = [1, 2, 3, 4], [1, 1, 3, 4, 5, 6, 7, 8]
    _fake_run(tmp_path / "runs" / "class_1", np.arange(4), {("none", 0.0): lab4, ("NP", 0.5): lab4,
                                                           ("NP", 1.0): [2, 2, 3, 4]}, features=False)
    cfg = extend.extension_config(str(tmp_path / "runs" / "class_1"), 8, high_safety=100.0)
    assert (cfg.seed, cfg.n) == (0, 8) and cfg.outdir.endswith("class_1_seeds0-7")      # afresh: no features
    _fake_run(tmp_path / "runs" / "class_1_seeds0-7", np.arange(8), {("none", 0.0): lab8, ("NP", 1.0): lab8})
    groups = report.group_runs(report.find_runs([str(tmp_path / "runs")]))
    assert len(groups) == 1
    rows = {(r["method"], r["scale"]): r for r in report.PerSample(groups[0]).rows}
    assert {k: r["n"] for k, r in rows.items()} == {("none", 0.0): 8, ("NP", 0.5): 4, ("NP", 1.0): 8}
    assert rows[("NP", 1.0)]["histogram"] == np.bincount(lab8, minlength=10).tolist()
    # FD errors are paired point by point: the resampled point has features, the older one has none
    per = report.PerSample(groups[0])
    rows = {(r["method"], r["scale"]): r for r in per.rows}
    assert per.has(rows[("NP", 1.0)], "fd") and not per.has(rows[("NP", 0.5)], "fd")
    assert per.has(rows[("NP", 0.5)], "kl")
    assert per.gap_se(rows[("none", 0.0)], rows[("NP", 1.0)], "fd", num=20) > 0
    assert per.gap_se(rows[("NP", 0.5)], rows[("NP", 1.0)], "fd", num=20) is None
    _fake_run(tmp_path / "bad" / "a", np.arange(4), {("NP", 0.5): lab4})
    _fake_run(tmp_path / "bad" / "b", np.arange(2, 6), {("NP", 0.5): lab4})
    with pytest.raises(ValueError, match="disjoint seed ranges"):
        report.PerSample([str(tmp_path / "bad" / "a"), str(tmp_path / "bad" / "b")])


def test_the_points_bracketing_one_percent_decide_too():
    """extend tops up, per method, the lowest-KL and lowest-FD points at <= 1 % and the two points that
    bracket 1 % (the report's reading at equal safety interpolates between them)."""
    from dngjax.tools.sample import extend
    row = lambda m, s, safety, kl, fd: dict(method=m, scale=s, safety_pct=safety, kl=kl, fd=fd)
    rows = [row("none", 0.0, 9.0, 0.1, 50.0),
            row("NP", 0.5, 3.0, 0.10, 40.0), row("NP", 1.0, 0.8, 0.20, 45.0), row("NP", 2.0, 0.0, 0.15, 60.0),
            row("DNG", 1.0, 0.5, 0.05, 30.0), row("DNG", 2.0, 0.0, 0.04, 35.0),
            row("SLD", 1.0, 5.0, 0.10, 40.0)]
    assert extend.deciding_points(rows) == {"NP": [0.5, 1.0, 2.0], "DNG": [1.0, 2.0]}   # SLD never gets there


def _labels(n: int, n_removed: int, weights) -> list:
    """n labels: n_removed of the removed class 1, the rest over classes 0, 2..9 in proportion to weights."""
    others = [0, 2, 3, 4, 5, 6, 7, 8, 9]
    counts = np.floor(np.asarray(weights, float) / np.sum(weights) * (n - n_removed)).astype(int)
    counts[0] += n - n_removed - counts.sum()
    return [1] * n_removed + [c for c, k in zip(others, counts) for _ in range(k)]


def test_report_reads_every_curve_at_exactly_one_percent(tmp_path):
    """The reading at equal safety: interpolated linearly in safety between the grid points that bracket
    1 % (checked against the formula by hand), '--' where none do, paired gaps, and the verdict."""
    from dngjax.tools.sample import report
    flat, skewed = [1] * 9, [9, 1, 1, 1, 1, 1, 1, 1, 1]
    points = {("none", 0.0): _labels(200, 20, flat),
              ("NP", 0.5): _labels(200, 6, skewed), ("NP", 1.0): _labels(200, 1, skewed),   # 3 % -> 0.5 %
              ("NP", 2.0): _labels(200, 0, skewed),
              ("SLD", 1.0): _labels(200, 4, flat), ("SLD", 2.0): _labels(200, 3, flat),     # never <= 1 %
              ("DNG", 1.0): _labels(200, 4, flat), ("DNG", 2.0): _labels(200, 0, flat)}     # 2 % -> 0 %
    _fake_run(tmp_path / "run", np.arange(200), points)
    per = report.PerSample(str(tmp_path / "run"))
    row = {(r["method"], r["scale"]): r for r in per.rows}
    assert report.crossing(per.rows, "NP") == (row[("NP", 0.5)], row[("NP", 1.0)])
    assert report.crossing(per.rows, "SLD") is None                        # never gets there
    assert report.crossing(per.rows, "DNG", high_safety=2.5) is None       # there at its lowest scale
    kl, fd = report.at_safety(per, "kl", num=50), report.at_safety(per, "fd", num=50)
    assert set(kl) == set(fd) == {"NP", "DNG"}                             # SLD never gets there
    w = (3.0 - 1.0) / (3.0 - 0.5)                                          # 1 % lies 80 % of the way
    assert kl["NP"]["value"] == pytest.approx((1 - w) * row[("NP", 0.5)]["kl"] + w * row[("NP", 1.0)]["kl"])
    assert fd["DNG"]["value"] == pytest.approx(0.5 * row[("DNG", 1.0)]["fd"] + 0.5 * row[("DNG", 2.0)]["fd"])
    assert np.isfinite(kl["NP"]["se"]) and kl["NP"]["se"] > 0 and kl["NP"]["draws"].shape == (50,)
    assert report.at_safety(per, "kl", num=0)["NP"]["se"] is None
    # the draws resample every method on the same seeds: a second call with the same seed repeats them
    assert np.array_equal(report.at_safety(per, "kl", num=50)["DNG"]["draws"], kl["DNG"]["draws"])
    # DNG's classes are flat, NP's skewed: DNG has the lower KL at 1 %, by far more than the noise
    assert row[("DNG", 2.0)]["kl"] < row[("NP", 1.0)]["kl"]
    v = report.claim_text(report.claim_at_safety(kl, "DNG", "kl"))
    assert v.startswith("yes: ") and "vs NP" in v and "paired" in v
    assert report.claim_at_safety(report.at_safety(per, "kl", high_safety=2.5), "DNG", "kl",
                                  high_safety=2.5) == {"missing": "DNG: no grid points bracket 2.5%"}
    # without per-sample data for one reading: its points' own errors, combined unpaired
    nodraw = dict(kl, NP=dict(kl["NP"], draws=None, se=None))
    nodraw["NP"]["a"] = dict(nodraw["NP"]["a"], kl_std=0.01)
    nodraw["NP"]["b"] = dict(nodraw["NP"]["b"], kl_std=0.01)
    assert report.claim_at_safety(nodraw, "DNG", "kl")["kind"] == "unpaired"
    report.write_report([str(tmp_path / "run")], str(tmp_path / "report"))
    md = (tmp_path / "report" / "report.md").read_text()
    assert "| 1 | SLD | -- | -- | -- |" in md and "| 1 | NP | " in md and "0.5 (3.00%) and 1 (0.50%)" in md


def test_summary_puts_the_verdicts_of_two_setups_side_by_side(tmp_path):
    """--job=summary: the reports' report.json (the claim under both readings, per class and setup) in
    one table per reading, the claim table with its count, and claims.png; nothing recomputed."""
    import json as _json
    from dngjax.tools.sample import report, summary
    flat, skewed = [1] * 9, [9, 1, 1, 1, 1, 1, 1, 1, 1]
    base = {("none", 0.0): _labels(200, 20, flat), ("SLD", 1.0): _labels(200, 4, flat),   # SLD never <= 1 %
            ("NP", 0.5): _labels(200, 6, skewed), ("NP", 1.0): _labels(200, 1, skewed)}
    # setup (a): DNG's classes flat, NP's skewed -> DNG lower KL; setup (b): the other way round
    _fake_run(tmp_path / "a" / "class_1", np.arange(200), {
        **base, ("DNG", 1.0): _labels(200, 4, flat), ("DNG", 2.0): _labels(200, 0, flat)})
    _fake_run(tmp_path / "b" / "class_1", np.arange(200), {
        **base, ("NP", 0.5): _labels(200, 6, flat), ("NP", 1.0): _labels(200, 1, flat),
        ("DNG", 1.0): _labels(200, 4, skewed), ("DNG", 2.0): _labels(200, 0, skewed)},
        conditional="{root}/cond")
    for s in ("a", "b"):
        report.write_report([str(tmp_path / s / "class_1")], str(tmp_path / s))
    ja = _json.loads((tmp_path / "a" / "report.json").read_text())
    g = ja["groups"][0]
    assert ja["high_safety"] == 1.0 and g["setup"] == "forget model" and g["removed"] == 1
    assert g["unguided_pct"] == pytest.approx(10.0) and g["grid"]["SLD"] == {"kl": None, "fd": None}
    assert g["sample_hours"] == pytest.approx(6 * 36 / 3600)         # 6 points of 36 s each
    assert "Sampling time: 0.06 h (wall clock" in (tmp_path / "a" / "report.md").read_text()
    assert g["at_safety"]["SLD"] is None
    assert [p["scale"] for p in g["at_safety"]["NP"]["between"]] == [0.5, 1.0]
    per = report.PerSample(str(tmp_path / "a" / "class_1"))           # the json holds the report's own claims
    kl = report.at_safety(per, "kl")
    assert g["claims"]["DNG"]["at_safety"]["kl"] == pytest.approx(report.claim_at_safety(kl, "DNG", "kl"))
    assert g["at_safety"]["NP"]["kl"]["value"] == pytest.approx(kl["NP"]["value"])
    c = g["claims"]["DNG"]["at_safety"]["kl"]
    assert c["yes"] and not c["within_noise"] and c["baseline"] == "NP" and c["kind"] == "paired"
    assert c["gap"] == pytest.approx(kl["NP"]["value"] - kl["DNG"]["value"])
    gb = _json.loads((tmp_path / "b" / "report.json").read_text())["groups"][0]
    assert gb["setup"] == "class-conditional" and not gb["claims"]["DNG"]["at_safety"]["kl"]["yes"]

    folders = [str(tmp_path / "a"), str(tmp_path / "b")]
    out = summary.write_summary(*summary.load(folders), folders, str(tmp_path / "summary"))
    md = (tmp_path / "summary" / "summary.md").read_text()
    assert (tmp_path / "summary" / "claims.png").stat().st_size > 0 and out == str(tmp_path / "summary")
    lines = md.splitlines()
    for i, l in enumerate(lines):                       # every table's separator matches its header
        if l.startswith("| ---"):
            assert l.count("|") == lines[i - 1].count("|") == lines[i + 1].count("|"), (lines[i - 1], l)
    row = lambda label, after: next(l for l in lines[lines.index(after):] if l.startswith(f"| {label} |"))
    head_ii = next(l for l in lines if l.startswith("| class, setup | KL at 1 %"))
    ii_a = row("1, (a) forget model", head_ii)
    assert ii_a.startswith(f"| 1, (a) forget model | {kl['NP']['value']:.3f} +- {kl['NP']['se']:.3f} / -- / "
                           f"{kl['DNG']['value']:.3f}"), ii_a
    assert ii_a.endswith("| 1 (2.00 %) and 2 (0.00 %) |"), ii_a
    head_i = next(l for l in lines if l.startswith("| class, setup | unguided %"))
    assert row("1, (b) class-conditional", head_i).startswith("| 1, (b) class-conditional | 10.00 | ")
    head_c = next(l for l in lines if l.startswith("| class, setup | (i) lower KL?"))
    claim_a, claim_b = row("1, (a) forget model", head_c), row("1, (b) class-conditional", head_c)
    assert claim_a.split(" | ")[3].startswith("**yes** (gap ") and claim_a.split(" | ")[3].endswith(" to NP)")
    assert claim_b.split(" | ")[3].startswith("**no** (gap -")
    assert lines.index(head_c) < lines.index(head_ii) < lines.index(head_i)   # the verdict first, then (ii), (i)
    # the count: one yes and one no on KL under each reading (the two setups)
    assert "| (ii) KL | 1 | 0 | 0 | 1 | 0 |" in md and "| (i) KL | 1 | 0 | 0 | 1 | 0 |" in md
    assert lines[-1].startswith("Sampling time: 0.1 h over 2 class-setups") and lines[-1].endswith(
        ": 1, (a) forget model 0.06 h, 1, (b) class-conditional 0.06 h."), lines[-1]
    with pytest.raises(FileNotFoundError, match="report.json not found"):
        summary.load([str(tmp_path / "a" / "class_1")])


def test_summary_counts_the_verdicts_per_dng_variant():
    """With two DNG variants the claim table has a variant column and the count is per variant (a
    variant's "no" is not hidden by the other's "yes")."""
    from dngjax.tools.sample import summary
    claim = lambda yes, noise: {"yes": yes, "within_noise": noise, "gap": 0.1 if yes else -0.1, "se": 0.02,
                                "baseline": "SLD"}
    both = lambda c: {"grid": {"kl": c, "fd": c}, "at_safety": {"kl": c, "fd": c}}
    groups = [{"label": f"{k}, (a) forget model",
               "claims": {"DNG": both(claim(False, k == 1)), "DNG[temperature=0.5]": both(claim(True, False))}}
              for k in (0, 1)]
    lines = summary._claims_table(groups, 1.0).splitlines()
    assert "| 0, (a) forget model | DNG | **no** (gap -0.1 +- 0.02 to SLD) |" in "\n".join(lines)
    assert lines[lines.index("Count over the rows above, per DNG variant:") + 3].startswith("| --- |")
    for reading in ("(i) KL", "(i) FD", "(ii) KL", "(ii) FD"):
        assert f"| DNG: {reading} | 0 | 0 | 1 | 1 | 0 |" in lines
        assert f"| DNG[temperature=0.5]: {reading} | 2 | 0 | 0 | 0 | 0 |" in lines
    one = summary._claims_table([{"label": "0, (a) forget model", "claims": {"DNG": both(claim(True, True))}}], 1.0)
    assert "| (ii) FD | 0 | 1 | 0 | 0 | 0 |" in one and "DNG variant" not in one


def test_archive_keeps_what_summary_and_select_read_and_nothing_bulky(tmp_path):
    """--job=archive: a protocol folder's small files (runs' results, labels, config; reports) copied
    with their paths; the summary of the copy is the summary of the original, word for word; bulky
    folders, features and unfinished runs stay behind."""
    from dngjax.tools.sample import archive, report, selection, summary
    flat, skewed = [1] * 9, [9, 1, 1, 1, 1, 1, 1, 1, 1]
    points = {("none", 0.0): _labels(200, 20, flat), ("NP", 0.5): _labels(200, 6, skewed),
              ("NP", 1.0): _labels(200, 1, skewed), ("DNG", 1.0): _labels(200, 4, flat),
              ("DNG", 2.0): _labels(200, 0, flat)}
    root = tmp_path / "protocol"
    _fake_run(root / "class_1", np.arange(200), points)
    report.write_report([str(root / "class_1")], str(root))
    (root / "class_1" / "points").mkdir()
    (root / "class_1" / "points" / "DNG_s1.npz").write_bytes(b"x" * 100)
    (root / "class_2.partial").mkdir()
    (root / "class_2.partial" / "config.json").write_text("{}")
    (root / "timings.txt").write_text("forget class 1: 10 s\n")
    out = tmp_path / "docs_runs"
    res = _cli(["--job=archive", f"--runs={root}", f"--out={out}"], tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    kept = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert kept == ["class_1/config.json", "class_1/labels.npz", "class_1/results.json",
                    "report.json", "report.md", "timings.txt"], kept
    assert "archived 6 file(s)" in res.stdout
    assert (out / "class_1" / "results.json").read_text() == (root / "class_1" / "results.json").read_text()
    a = summary.write_summary(*summary.load([str(root)]), [str(root)], str(tmp_path / "s_orig"))
    b = summary.write_summary(*summary.load([str(out)]), [str(out)], str(tmp_path / "s_copy"))
    assert (tmp_path / "s_orig" / "summary.md").read_text() == (tmp_path / "s_copy" / "summary.md").read_text()
    assert selection._load(str(out / "class_1")) == selection._load(str(root / "class_1"))
    with pytest.raises(ValueError, match="is the folder being archived"):
        archive.archive(str(root), str(root))
    (root / "class_1" / "results.json").write_bytes(b" " * (2 ** 20 + 1))
    with pytest.raises(ValueError, match="over 1 MiB"):
        archive.archive(str(root), str(tmp_path / "again"))
    assert not (tmp_path / "again").exists()


def test_selection_seeds_and_chain_match_the_protocol():
    """DNG's settings are chosen on the chain the protocol reports on, with seeds it never uses."""
    from dngjax.tools.sample.configs import mnist
    p, s = mnist.get_config("protocol"), mnist.get_config("select")
    for k in ("steps", "T", "noise", "checkpoints", "classifier", "features", "high_safety"):
        assert s[k] == p[k], k
    assert dict(s.dng) == dict(p.dng)
    assert s.seed >= p.seed + 10240                          # disjoint from any report's seeds (up to n = 10,240)


def test_every_method_of_the_protocol_has_its_own_colour_and_marker():
    """The curves of NP, SLD and every DNG setting stay apart in the plots (a DNG setting without an
    entry once took the colour cycle's blue, NP's, and NP's circle)."""
    from dngjax.tools.sample import plots
    from dngjax.tools.sample.configs import mnist
    for name in ("protocol", "select", "full", "report", "quick"):
        methods = ("none",) + tuple(mnist.get_config(name).methods)
        st = plots.styles(methods)
        assert len(set(st.values())) == len(methods), (name, st)
        assert all(c != "red" and c != "tab:red" for c, _ in st.values())   # the histograms' ideal is red
    st = plots.styles(["NP", "DNG[prior=0.1]", "DNG"])
    assert st["NP"] == ("tab:blue", "o") and st["DNG"] == ("tab:green", "^")
    assert st["DNG[prior=0.1]"] == plots.SPARE_STYLES[0]
