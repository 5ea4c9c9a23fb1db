"""Runs a user can trust: a run is its config and the files it reads; finished work is never deleted;
non-finite samples are never scored as safe.

* a replaced model file at the same path is another run (config.json records every model and reference
  file's sha256, the package versions and the git commit): refused, or moved aside with
  config.overwrite, never reused;
* a finished or interrupted run of another config is refused before any model loads, one line naming
  the difference and the ways on; config.overwrite moves it aside, never deletes it;
* samples with a NaN or inf element count as unsafe, are counted per point and flagged everywhere.
"""

import glob
import hashlib
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from test_sample_cli import random_params, tiny_checkpoints  # noqa: F401  (the tiny models fixture)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = f"{os.path.join(REPO, 'sample', 'configs', 'mnist.py')}:tiny"


def _config(root, out, **extra):
    from dngjax.tools.sample.configs import mnist
    c = mnist.get_config("tiny")
    c.checkpoints = str(root)
    c.removed_class = 1
    c.bootstrap = 0
    c.methods = ("NP",)
    c.grid.NP = (2.0, 1e30)               # 1e30: every sample overflows
    c.outdir = str(out)
    for k, v in extra.items():
        setattr(c, k, v)
    return c


def _config_np(root, out, **extra):
    c = _config(root, out, **extra)
    c.grid.NP = (2.0,)
    return c


def _tree(folder):
    """Every file under folder with its bytes' sha256."""
    out = {}
    for d, _, files in os.walk(folder):
        for f in files:
            p = os.path.join(d, f)
            out[os.path.relpath(p, folder)] = hashlib.sha256(open(p, "rb").read()).hexdigest()
    return out


@pytest.fixture(scope="module")
def finished(tiny_checkpoints, tmp_path_factory):
    """A finished tiny run (unguided, NP at 2 and at 1e30), its printed output and its files."""
    from dngjax.tools.sample import class_removal
    out = tmp_path_factory.mktemp("finished") / "run"
    import contextlib
    import io
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        class_removal.run(_config(tiny_checkpoints, out))
    return out, buf.getvalue()


def test_config_json_records_every_file_read_with_its_sha256_and_the_software(finished, tiny_checkpoints):
    out, _ = finished
    import dngjax
    import flax
    rec = json.loads((out / "config.json").read_text())
    root = str(tiny_checkpoints)
    files = {"uncond/card.json": "ddpm/card.json", "uncond/params.msgpack": "ddpm/params.msgpack",
             "forget/card.json": "forget_1/card.json", "forget/params.msgpack": "forget_1/params.msgpack",
             "classifier/card.json": "classifier/card.json", "classifier/params.msgpack": "classifier/params.msgpack",
             "reference_stats": "reference_stats/train_without_1.npz"}
    assert sorted(rec["inputs"]) == sorted(files)
    for name, rel in files.items():
        path = os.path.join(root, rel)
        assert rec["inputs"][name] == {"path": path, "sha256": hashlib.sha256(open(path, "rb").read()).hexdigest()}
    env = rec["environment"]
    assert (env["jax"], env["flax"], env["numpy"], env["dngjax"]) == (
        jax.__version__, flax.__version__, np.__version__, dngjax.__version__)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True)
    assert env["git_commit"] == (head.stdout.strip() if head.returncode == 0 else None)
    summary = (out / "summary.txt").read_text()
    assert f"uncond/params.msgpack {rec['inputs']['uncond/params.msgpack']['sha256'][:12]}" in summary
    assert f"jax {jax.__version__}" in summary
    # versions and the commit are recorded, not compared: another commit is the same run
    from dngjax.tools.sample import run_store
    other = dict(rec, environment=dict(env, git_commit="0" * 40, jax="0.0.0"), overwrite=True, progress=True)
    assert run_store.differences(rec, other) == []


def test_a_replaced_model_file_is_another_run_refused_then_moved_aside(tiny_checkpoints, tmp_path, capsys):
    """The reviewer's case: the same command after replacing the model at a checkpoint path reused the
    old model's points. Now it is refused naming the file and its two hashes; config.overwrite moves
    the old run aside, whole, and samples everything with the new model."""
    from dngjax import checkpoint
    from dngjax.models.configs import mnist_unet
    from dngjax.tools.sample import class_removal

    root = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoints, root)
    out = tmp_path / "run"
    class_removal.run(_config_np(root, out))
    before = _tree(out)
    ddpm = root / "ddpm" / "params.msgpack"
    old = hashlib.sha256(ddpm.read_bytes()).hexdigest()

    unet = mnist_unet(ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), dropout=0.0, groups=4)
    params = random_params(unet, jnp.zeros((1, 28, 28, 1)), jnp.zeros((1,), jnp.int32), seed=7)
    checkpoint.save_model(str(root / "ddpm"), unet, params, {"dataset": "mnist"})
    new = hashlib.sha256(ddpm.read_bytes()).hexdigest()
    assert new != old
    capsys.readouterr()
    with pytest.raises(ValueError) as e:
        class_removal.prepare(_config_np(root, out))
    msg = str(e.value)
    assert "\n" not in msg and f"{ddpm} sha256 {old[:12]}.. -> {new[:12]}.." in msg, msg
    assert "--config.outdir" in msg and "--config.overwrite=True" in msg and "n:" not in msg, msg
    assert _tree(out) == before and not os.path.exists(str(out) + ".partial")
    # nor may --job=extend top the old model's points up with the new model's samples
    from dngjax.tools.sample import extend
    with pytest.raises(ValueError, match="a top-up would mix two models") as e:
        extend.extension_config(str(out), 16)
    assert f"{ddpm} sha256 {old[:12]}.. -> {new[:12]}.." in str(e.value)

    class_removal.execute(class_removal.prepare(_config_np(root, out, overwrite=True)))
    printed = capsys.readouterr().out
    assert "reusing" not in printed                   # nothing of the old model's run
    (aside,) = glob.glob(str(out) + ".old-*")
    assert f"moved {out} aside to {aside}" in printed
    assert _tree(aside) == before                     # the old run, whole
    rec = json.loads((out / "config.json").read_text())
    assert rec["inputs"]["uncond/params.msgpack"]["sha256"] == new and rec["overwrite"] is True
    # the same command again (overwrite or not): the same run, every point reused
    class_removal.execute(class_removal.prepare(_config_np(root, out)))
    assert "reusing 2 finished grid point(s) of 2" in capsys.readouterr().out
    assert glob.glob(str(out) + ".old-*") == [aside]


def test_rerun_with_another_config_is_refused_before_any_model_loads(finished, tiny_checkpoints, tmp_path):
    """n = 4 into a finished n = 8 run replaced it silently. Now: exit 2, one line naming the difference
    and both ways on, before the models load (a missing classifier is not even looked at), nothing touched."""
    out, _ = finished
    before = _tree(out)
    res = subprocess.run([sys.executable, os.path.join(REPO, "sample", "main.py"), f"--config={TINY}",
                          f"--config.checkpoints={tiny_checkpoints}", "--config.removed_class=1",
                          "--config.bootstrap=0", "--config.methods=('NP',)", "--config.grid.NP=(2.0,1e30)",
                          "--config.n=4", "--config.classifier=nowhere/classifier", f"--config.outdir={out}"],
                         capture_output=True, text=True, cwd=str(tmp_path), timeout=300)
    err = res.stderr.strip()
    assert res.returncode == 2 and err.startswith("error:") and "\n" not in err, res.stderr[-3000:]
    assert "n: 8 -> 4" in err and 'classifier: "{root}/classifier" -> "nowhere/classifier"' in err, err
    assert f"--config.outdir, or pass --config.overwrite=True to move it aside to {out}.old-" in err, err
    assert "checkpoint not found" not in err
    assert _tree(out) == before and not os.path.exists(str(out) + ".partial")


def test_an_interrupted_run_of_another_config_is_refused_and_moved_aside_never_deleted(
        tiny_checkpoints, tmp_path, monkeypatch, capsys):
    import dngjax as dj
    from dngjax.tools.sample import class_removal

    real = dj.sample_chunks

    def interrupted(*a, **k):                       # NP stops after its first chunk of seeds (4 of 8)
        for i, chunk in enumerate(real(*a, **k)):
            if i == 1:
                raise KeyboardInterrupt
            yield chunk

    out = tmp_path / "run"
    monkeypatch.setattr(dj, "sample_chunks", interrupted)
    with pytest.raises(KeyboardInterrupt):
        class_removal.execute(class_removal.prepare(_config_np(tiny_checkpoints, out)))
    monkeypatch.setattr(dj, "sample_chunks", real)
    work = str(out) + ".partial"
    before = _tree(work)
    assert "points/none_s0.npz" in before and "chunks/NP_2/0000000.npz" in before

    with pytest.raises(ValueError) as e:
        class_removal.prepare(_config_np(tiny_checkpoints, out, n=4))
    msg = str(e.value)
    assert msg.startswith(f"{work} holds an interrupted run of another config") and "n: 8 -> 4" in msg, msg
    assert "\n" not in msg and "--config.overwrite=True" in msg
    assert _tree(work) == before and not out.exists()

    capsys.readouterr()
    class_removal.execute(class_removal.prepare(_config_np(tiny_checkpoints, out, n=4, overwrite=True)))
    (aside,) = glob.glob(work + ".old-*")
    assert f"moved {work} aside to {aside}" in capsys.readouterr().out
    assert _tree(aside) == before
    assert json.loads((out / "results.json").read_text())[0]["n"] == 4


def test_finished_run_is_moved_aside_not_deleted_when_replaced_by_another_identity(tiny_checkpoints, tmp_path):
    """The last step (the complete work folder renamed to outdir) never deletes another run there,
    even one that appeared after the checks."""
    from dngjax.tools.sample import run_store
    out = tmp_path / "run"
    out.mkdir()
    (out / "results.json").write_text("[]")
    (out / "config.json").write_text(json.dumps({"n": 99}))
    work = tmp_path / "run.partial"
    (work / "points").mkdir(parents=True)
    (work / "config.json").write_text(json.dumps({"n": 8}))
    run_store.publish(str(work), str(out), {"n": 8})
    (aside,) = glob.glob(str(out) + ".old-*")
    assert json.loads(open(os.path.join(aside, "config.json")).read()) == {"n": 99}
    assert json.loads((out / "config.json").read_text()) == {"n": 8} and not work.exists()


def test_scorer_flags_non_finite_samples_instead_of_clipping_them(tiny_checkpoints):
    from dngjax import checkpoint, evaluation
    cmod, cparams, _ = checkpoint.load_classifier(str(tiny_checkpoints / "classifier"))
    score = evaluation.make_scorer(cmod, cparams, batch_size=4)
    x = np.random.default_rng(0).uniform(-1, 1, (3, 28, 28, 1)).astype(np.float32)
    x[0, 3, 4, 0] = np.nan
    x[1, 0, 0, 0] = np.inf
    s = score(x)
    assert s.finite.tolist() == [False, False, True]
    assert s.labels[:2].tolist() == [evaluation.NONFINITE_LABEL] * 2
    assert np.isnan(s.confidence[:2]).all() and np.isnan(s.features[:2]).all()
    alone = score(x[2:])
    assert s.labels[2] == alone.labels[0] and np.allclose(s.features[2], alone.features[0], atol=1e-5)
    q = evaluation.sample_quality(s, np.zeros(8), np.eye(8))
    assert q["nonfinite"] == 2 and sum(q["class_histogram"]) == 1 and q["confident_share"] <= 1 / 3
    assert np.isnan(q["fd"])                           # one finite sample: no covariance


def test_non_finite_samples_count_as_unsafe_and_leave_kl_and_fd_to_the_finite_ones():
    from ml_collections import ConfigDict
    from dngjax import metrics
    from dngjax.tools.sample import scoring
    config = ConfigDict(dict(dataset="mnist", removed_class=1, also_remove=(), kl_pseudo_count=0.5,
                             bootstrap=5, seed=0))
    labels = np.array([1, 1, 0, 2, -1, -1, 3, 4])
    feats = np.random.default_rng(1).normal(size=(8, 3)).astype(np.float32)
    feats[labels < 0] = np.nan
    ref = (np.zeros(3), np.eye(3))
    r = scoring.score_labels(labels, feats, ref, config)
    assert r["safety_pct"] == 50.0                     # 2 class-1 + 2 non-finite of 8
    assert r["nonfinite"] == 2 and r["valid"] is False and sum(r["histogram"]) == 6
    assert r["kl"] == metrics.kl_to_ideal(metrics.class_histogram(labels[labels >= 0], 10), 1, 0.5)
    assert r["fd"] == pytest.approx(metrics.frechet_distance_features(feats[labels >= 0], *ref))
    assert np.isfinite([r["safety_std"], r["kl_std"]]).all()


def test_np_at_scale_1e30_is_reported_invalid_not_perfectly_safe(finished, tmp_path):
    """The reviewer's case: NP at 1e30 gave only non-finite samples and was reported 0.00 % unsafe with
    finite KL and FD. Now: a warning naming the point, nonfinite per row, the samples counted as unsafe,
    and the count in summary.txt, report.md, report.json and the summary job's table."""
    from dngjax.tools.sample import report, summary
    out, printed = finished
    rows = json.loads((out / "results.json").read_text())
    bad = rows[-1]
    assert (bad["method"], bad["scale"]) == ("NP", 1e30)
    assert bad["nonfinite"] == 8 and bad["valid"] is False, bad
    assert bad["safety_pct"] == 100.0 and np.isnan(bad["kl"]) and np.isnan(bad["fd"])
    assert all(r["nonfinite"] == 0 and r["valid"] for r in rows[:-1])
    assert ("warning: NP at scale 1e+30: 8 of 8 samples are non-finite (NaN or inf): counted as the removed "
            "class in safety %") in printed
    assert (np.load(out / "labels.npz")["NP_1"] == -1).all()
    table = (out / "summary.txt").read_text()
    assert "non-finite" in table and any(line.startswith("NP") and line.rstrip().endswith("8  INVALID")
                                         for line in table.splitlines()), table

    rep = report.write_report([str(out)], str(tmp_path / "report"))
    md = open(os.path.join(rep, "report.md")).read()
    assert "| NP | 1e+30 | 8 | 100.00 |" in md and "| 8 **invalid** |" in md and "**Invalid points**" in md
    group = json.load(open(os.path.join(rep, "report.json")))["groups"][0]
    assert group["nonfinite"] == [{"method": "NP", "scale": 1e30, "nonfinite": 8, "n": 8}]
    assert group["grid"]["NP"]["kl"] is None or group["grid"]["NP"]["kl"]["scale"] != 1e30
    groups, high = summary.load([rep])
    assert "| 8 (NP 1e+30: 8 of 8) |" in summary.markdown(groups, high)
    # the merged per-sample statistics agree: non-finite samples are unsafe
    per = report.PerSample(str(out))
    assert per.statistic(per.rows[-1], "safety", np.arange(8)) == 100.0


def test_the_data_set_file_is_recorded_when_read_but_the_reference_it_makes_decides(tiny_checkpoints, tmp_path):
    """Computing missing reference statistics reads the data set: its file is recorded (inputs), but the
    identity holds the reference file it makes, so the same run resumed later (reference on disk, data
    set not read) is the same run."""
    from dngjax.tools.sample import run_store
    data = tmp_path / "data"
    data.mkdir()
    (data / "mnist.npz").write_bytes(b"stand-in")
    c = _config(tiny_checkpoints, tmp_path / "run", reference_stats=str(tmp_path / "missing.npz"),
                compute_reference=True, data_dir=str(data))
    files = run_store.input_files(c)
    assert files["dataset"] == str(data / "mnist.npz") and "reference_stats" not in files
    first = run_store.run_record(c, files)
    (tmp_path / "missing.npz").write_bytes(b"the statistics")
    later = run_store.run_record(c, run_store.input_files(c))
    assert "dataset" not in later["inputs"] and "reference_stats" in later["inputs"]
    first["inputs"]["reference_stats"] = later["inputs"]["reference_stats"]
    assert run_store.differences(first, later) == []
    c.compute_reference = False
    assert "dataset" not in run_store.input_files(c)


def test_a_field_added_to_the_config_at_its_default_is_no_difference_from_older_records(tmp_path):
    """A rule hyperparameter added later (absent from an older config.json) at its default value keeps the
    older run's points usable; at another value it is a difference, named."""
    from dngjax.tools.sample import run_store
    c = _config(tmp_path, tmp_path / "out")
    new = run_store.config_json(c)
    new["inputs"] = None
    old = json.loads(json.dumps(new))
    del old["dng"]["hold_below"]
    assert run_store.differences(old, new) == []
    assert run_store.differences(new, old) == []
    new["dng"]["hold_below"] = 0.2
    assert run_store.differences(old, new) == ["dng.hold_below: (absent) -> 0.2"]
