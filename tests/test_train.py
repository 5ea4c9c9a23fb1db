"""train/: tiny configs train, the loss falls, an interrupted run resumes to the same parameters."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from dngjax import checkpoint, data

from dngjax.tools.train import trainer
from dngjax.tools.train.configs import (cifar10_classifier, cifar10_ddpm, cifar10_forget, mnist_classifier,
                           mnist_cond, mnist_ddpm, mnist_forget)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def fake_data(tmp_path_factory):
    """A small MNIST-like npz with learnable structure (class = position of a bright square) + CIFAR."""
    d = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)

    def make(n, shape):
        y = (np.arange(n) % 10).astype(np.uint8)
        x = rng.integers(0, 40, (n, *shape), dtype=np.uint8)
        for i, c in enumerate(y):
            r, q = divmod(int(c), 5)
            x[i, 4 + 10 * r:12 + 10 * r, 2 + 5 * q:7 + 5 * q] = 250
        return x, y

    xtr, ytr = make(300, (28, 28))
    xte, yte = make(50, (28, 28))
    np.savez(d / "mnist.npz", x_train=xtr, y_train=ytr, x_test=xte, y_test=yte)
    xtr, ytr = make(40, (32, 32, 3))
    np.savez(d / "cifar10.npz", x_train=xtr, y_train=ytr, x_test=xtr[:10], y_test=ytr[:10])
    data._load_offline_file.cache_clear()
    return str(d)


def _cfg(mod, fake_data, **over):
    c = mod.get_config("tiny")
    c.data_dir = fake_data
    for k, v in over.items():
        c[k] = v
    return c


def _losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line)["loss"] for line in f]


def _params_equal(a, b):
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_ddpm_tiny_trains_loss_falls_resumes_identically_and_compiles_once_per_run(fake_data, tmp_path):
    """The loss falls; a run interrupted after a save and rerun ends with the uninterrupted run's
    parameters; and the train step is compiled once per run: the saves put host scalars into the state
    with the state's sharding (the step is compiled ahead of time, so a mismatch would raise), and a
    resumed run compiles once too. metrics.jsonl holds each step once after the resume."""
    import shutil

    from compile_count import count_compiles

    cfg = _cfg(mnist_ddpm, fake_data, num_train_steps=8, checkpoint_every=4)
    full = str(tmp_path / "full")
    with count_compiles("train_step") as compiles:
        card = trainer.train_and_evaluate(cfg, full)
        assert len(compiles) == 1, compiles               # the save at step 4 did not recompile
    assert card["steps"] == 8 and checkpoint.model_type(card) == "ddpm"
    for key in ("config", "wall_time_s", "hardware", "final_loss", "arch", "num_params"):
        assert key in card
    losses = _losses(full)
    assert len(losses) == 8
    assert np.mean(losses[-3:]) < losses[0]  # eps-prediction loss starts near 1 and falls

    # interrupted after 4 steps (as if killed right after the save), then the same command again
    part = str(tmp_path / "part")
    with count_compiles("train_step") as compiles:
        halted = trainer.train_and_evaluate(_cfg(mnist_ddpm, fake_data, num_train_steps=8, checkpoint_every=4,
                                               max_steps_this_run=5), part)
        assert halted["halted"] and halted["step"] == 5
        assert not os.path.exists(os.path.join(part, "model"))
        # step 5 was saved too (the last step of a run is always saved); drop it to resume from step 4:
        # the log holds step 5, the checkpoint does not
        shutil.rmtree(os.path.join(part, "checkpoints", "5"))
        jax.clear_caches()
        trainer.train_and_evaluate(cfg, part)
        assert len(compiles) == 2, compiles                # one per run, the resumed one included
    with open(os.path.join(part, "metrics.jsonl")) as f:
        assert [json.loads(line)["step"] for line in f] == list(range(1, 9))
    # runs.jsonl: the killed run's segment ends where the resumed one starts (the step it restored)
    assert [(r["start_step"], r["end_step"], r["stop_step"]) for r in card["training_runs"]] == [(0, 8, 8)]
    part_card = checkpoint.load_card(os.path.join(part, "model"))
    assert [(r["start_step"], r["end_step"], r["stop_step"]) for r in part_card["training_runs"]] == [(0, 4, 5), (4, 8, 8)]
    assert part_card["training_runs"][1]["optim"]["lr"] == cfg.optim.lr and part_card["init_from_model"] is None
    m1, p1, _ = checkpoint.load_model(full)
    m2, p2, _ = checkpoint.load_model(part)
    assert m1 == m2
    _params_equal(p1, p2)


def test_class_conditional_ddpm_trains_with_label_dropout(fake_data, tmp_path):
    cfg = _cfg(mnist_cond, fake_data, num_train_steps=4, checkpoint_every=4)
    assert cfg.model.kwargs.num_classes == 10 and 0.1 <= cfg.label_dropout <= 0.2
    card = trainer.train_and_evaluate(cfg, str(tmp_path / "cond"))
    assert card["arch"]["kwargs"]["num_classes"] == 10
    module, params, _ = checkpoint.load_model(str(tmp_path / "cond"))
    x = np.zeros((2, 28, 28, 1), np.float32)
    t = np.array([10, 500], np.int32)
    # the label embedding was trained: the gradient reached the rows of the labels it saw and the null row
    emb = np.asarray(params["params"]["label_emb"]["embedding"])
    init = np.asarray(jax.jit(module.init)(jax.random.PRNGKey(cfg.seed), x[:1], t[:1], np.zeros(1, np.int32))
                      ["params"]["label_emb"]["embedding"])   # jitted: eager init compiles op by op
    assert not np.allclose(emb, init)
    assert jax.eval_shape(module.apply, params, x, t, label=np.array([3, 10])).shape == x.shape
    bad = _cfg(mnist_cond, fake_data, num_train_steps=2, label_dropout=0.0)
    with pytest.raises(ValueError, match="label_dropout"):
        trainer.train_and_evaluate(bad, str(tmp_path / "bad"))


def test_classifier_tiny_trains_and_card_has_accuracy(fake_data, tmp_path):
    cfg = _cfg(mnist_classifier, fake_data, num_train_steps=30, checkpoint_every=15)
    card = trainer.train_and_evaluate(cfg, str(tmp_path / "clf"))
    assert checkpoint.model_type(card) == "classifier"
    assert 0.0 <= card["test_accuracy"] <= 1.0
    losses = _losses(str(tmp_path / "clf"))
    assert np.mean(losses[-2:]) < losses[0]
    module, params, _ = checkpoint.load_classifier(str(tmp_path / "clf"))
    x = np.zeros((2, 28, 28, 1), np.float32)
    assert module.apply(params, x).shape == (2, 10)
    assert module.apply(params, x, method="features").shape == (2, 16)


def test_forget_config_trains_only_on_its_class(fake_data, tmp_path):
    cfg = _cfg(mnist_forget, fake_data, num_train_steps=2, only_class=3)
    x, y = trainer.load_training_data(cfg)
    assert len(y) == 30 and np.all(y == 3)


@pytest.mark.slow
def test_init_from_a_trained_model(fake_data, tmp_path):
    src = str(tmp_path / "src")
    trainer.train_and_evaluate(_cfg(mnist_ddpm, fake_data, num_train_steps=2), src)
    cfg = _cfg(mnist_forget, fake_data, num_train_steps=2, only_class=1, init_from=os.path.join(src, "model"))
    card = trainer.train_and_evaluate(cfg, str(tmp_path / "ft"))
    assert card["init_from"].endswith("model")
    # the card keeps its predecessor's record: a fine-tune of the ddpm (another class), not a continuation
    assert card["init_from_model"]["steps"] == 2 and card["init_from_model"]["only_class"] is None
    from dngjax.tools.train import export
    assert not export.is_continuation(card) and export.totals(card)["steps"] == 2
    bad = _cfg(mnist_forget, fake_data, num_train_steps=2)
    bad.model.kwargs.ch = 16
    bad.init_from = os.path.join(src, "model")
    with pytest.raises(ValueError, match="architecture"):
        trainer.train_and_evaluate(bad, str(tmp_path / "bad"))


@pytest.mark.parametrize("mod", [pytest.param(cifar10_ddpm, marks=pytest.mark.slow),
                                 pytest.param(cifar10_forget, marks=pytest.mark.slow), cifar10_classifier])
def test_cifar10_configs_run_a_couple_of_steps(mod, fake_data, tmp_path):
    cfg = _cfg(mod, fake_data)
    card = trainer.train_and_evaluate(cfg, str(tmp_path / "run"))
    assert card["steps"] == 2 and card["dataset"] == "cifar10"
    assert card["input_shape"] == [32, 32, 3]


@pytest.mark.parametrize("mod", [mnist_ddpm, pytest.param(mnist_cond, marks=pytest.mark.slow), mnist_classifier])
def test_micro_batched_step_computes_the_whole_batch_step(mod):
    # the same random draws, loss and gradient (the mean of equal-sized micro-batch means); only the
    # summation order differs. Adam's first update is ~lr * sign(g), so compare the metrics and the
    # gradient through the optimizer's first moment, m = (1 - b1) g.
    import jax.numpy as jnp
    from dngjax.schedules import linear_schedule

    def config(micro):
        c = mod.get_config("tiny")
        c.model.kwargs.dropout = 0.0  # dropout masks are drawn per micro-batch: the one difference
        if c.model.kind == "unet":
            c.model.kwargs.ch_mult = (1,)  # one level: the step's micro-batching does not depend on depth
        c.micro_batch = micro
        return c

    cfg = config(0)
    shape = (1, 28, 28, 1)
    module = trainer.build_model(cfg)
    params = module.init({"params": jax.random.key(0), "dropout": jax.random.key(1)}, *(
        (jnp.zeros(shape), jnp.zeros((1,), jnp.int32)) if cfg.model.kind == "unet" else (jnp.zeros(shape),)))
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.uniform(-1, 1, (cfg.batch_size, 28, 28, 1)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 10, cfg.batch_size), jnp.int32)
    out = {}
    for micro in (0, 2):
        c = config(micro)
        opt = trainer.make_optimizer(c)
        step = jax.jit(trainer.make_train_step(module, opt, c, linear_schedule().alpha_bars))
        state = {"step": jnp.asarray(0, jnp.int32), "params": params, "ema_params": params,
                 "opt_state": opt.init(params)}
        out[micro] = step(state, x, y, jax.random.key(3))
    (s0, m0), (s2, m2) = out[0], out[2]
    for k in m0:
        np.testing.assert_allclose(np.asarray(m2[k]), np.asarray(m0[k]), rtol=2e-5, err_msg=k)
    mu = lambda s: [a for a in jax.tree.leaves(s["opt_state"]) if a.ndim > 0]
    la, lb = mu(s0), mu(s2)
    assert len(la) == len(lb) and len(la) >= 2 * len(jax.tree.leaves(params))
    scale = max(float(jnp.abs(a).max()) for a in la)
    for a, b in zip(la, lb):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=0, atol=2e-5 * scale)


def test_gpu_and_cpu_sizes_build():
    for mod in (mnist_ddpm, mnist_forget, mnist_classifier, mnist_cond):
        for size in ("gpu", "cpu", "tiny"):
            c = mod.get_config(size)
            assert c.num_train_steps > 0
            trainer.build_model(c)
    for mod in (cifar10_ddpm, cifar10_forget, cifar10_classifier):
        trainer.build_model(mod.get_config("gpu"))
    with pytest.raises(ValueError):
        mnist_ddpm.get_config("huge")


def test_sample_grid_png(tmp_path):
    x = np.random.default_rng(0).uniform(-1, 1, (10, 28, 28, 1)).astype(np.float32)
    trainer.write_png_grid(x, str(tmp_path / "g.png"))
    from PIL import Image
    assert Image.open(tmp_path / "g.png").size[0] > 28 * 3


def test_main_reports_missing_data_clearly(tmp_path):
    env = dict(os.environ, PYTHONPATH=REPO)
    env.pop(data.ENV_VAR, None)
    r = subprocess.run([sys.executable, os.path.join(REPO, "train", "main.py"),
                        "--config=" + os.path.join(REPO, "train/configs/mnist_classifier.py:tiny"),
                        f"--workdir={tmp_path / 'w'}", f"--data_dir={tmp_path / 'nowhere'}"],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert "--data_dir" in r.stderr and data.ENV_VAR in r.stderr


@pytest.mark.parametrize("config,args,message", [
    ("mnist_ddpm", ["--config.num_train_steps=0"], "config.num_train_steps must be >= 1"),
    ("mnist_ddpm", ["--config.only_class=12"], "config.only_class=12: mnist has classes 0..9"),
    ("mnist_cond", ["--config.label_dropout=0.0"], "needs 0 < label_dropout < 1"),
    ("mnist_ddpm", ["--config.batch_siz=3"], "unknown config field 'batch_siz'"),
    ("mnist_ddpm", ["--config.micro_batch=3"], "config.micro_batch must be 0 (the whole batch at once) or divide"),
    ("mnist_ddpm", ["--workdir="], "--workdir must name a folder"),
])
def test_main_user_errors_exit_2_before_training(fake_data, tmp_path, config, args, message):
    config = os.path.join(REPO, f"train/configs/{config}.py:tiny")
    r = subprocess.run([sys.executable, os.path.join(REPO, "train", "main.py"), f"--config={config}",
                        f"--workdir={tmp_path / 'w'}", f"--data_dir={fake_data}", *args],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    assert message in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert not os.path.exists(tmp_path / "w" / "checkpoints")


def test_main_help_exits_0(tmp_path):
    r = subprocess.run([sys.executable, os.path.join(REPO, "train", "main.py"), "--help"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "--workdir" in r.stdout, r.stderr[-2000:]


@pytest.mark.slow
def test_main_cli_trains_and_resumes(fake_data, tmp_path):
    env = dict(os.environ, PYTHONPATH=REPO)
    cmd = [sys.executable, os.path.join(REPO, "train", "main.py"),
           "--config=" + os.path.join(REPO, "train/configs/mnist_ddpm.py:tiny"),
           f"--workdir={tmp_path / 'w'}", f"--data_dir={fake_data}", "--config.num_train_steps=4"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    r = subprocess.run(cmd[:-1] + ["--config.num_train_steps=6"], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resumed from step 4" in r.stderr
    assert checkpoint.load_card(str(tmp_path / "w"))["steps"] == 6


@pytest.mark.slow
def test_data_parallel_over_two_host_devices(fake_data, tmp_path):
    """With 2 (simulated) devices the batch is sharded and the result matches 1 device closely."""
    code = f"""
import sys, numpy as np, jax
assert jax.local_device_count() == 2
from dngjax.tools.train import trainer
from dngjax.tools.train.configs import mnist_ddpm
c = mnist_ddpm.get_config('tiny'); c.data_dir = {fake_data!r}; c.num_train_steps = 3
card = trainer.train_and_evaluate(c, sys.argv[1])
print('OK', card['hardware']['num_devices'])
"""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", PYTHONPATH=REPO)
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "dp")], capture_output=True, text=True,
                       env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "OK 2" in r.stdout
    one = trainer.train_and_evaluate(_cfg(mnist_ddpm, fake_data, num_train_steps=3), str(tmp_path / "one"))
    _, p2, _ = checkpoint.load_model(str(tmp_path / "dp"))
    _, p1, _ = checkpoint.load_model(str(tmp_path / "one"))
    for a, b in zip(jax.tree_util.tree_leaves(p1), jax.tree_util.tree_leaves(p2)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4)


def _run(a, end, num_steps, lr=1e-3, decay=0, warmup=10, dropout=0.0, init_from=None):
    return {"start_step": a, "end_step": end, "stop_step": num_steps, "num_steps": num_steps, "batch_size": 64,
            "label_dropout": dropout, "init_from": init_from,
            "optim": {"lr": lr, "b1": 0.9, "b2": 0.999, "weight_decay": 0.0, "warmup_steps": warmup,
                      "schedule": "constant", "decay_steps": decay, "grad_clip": 1.0}}


def test_export_describes_a_resumed_and_a_continued_training_history():
    """dngjax.tools.train.export writes a card's history in words: a run resumed with a longer schedule whose learning
    rate was the same over the earlier segment is one segment; a warm restart after a decay is named; a
    model continued from its own weights counts the steps and CPU hours of both (a fine-tune does not)."""
    from dngjax.tools.train import export
    runs = [_run(0, 100, 100, decay=40, dropout=0.1),
            _run(100, 120, 200, decay=50, dropout=0.2),     # killed at 120: lr constant there either way
            _run(120, 300, 300, decay=50, dropout=0.2)]
    note = export.schedule_note({"name": "m", "only_class": None, "steps": 300, "training_runs": runs})
    assert note == ("steps 0-100: Adam lr 0.001 after 10 warm-up steps, constant to step 60, then a cosine decay "
                    "to 1e-05 by step 100, label dropout 0.1; steps 100-300: Adam lr 0.001 (a warm restart: the "
                    "same Adam state), constant to step 250, then a cosine decay to 1e-05 by step 300, label dropout 0.2")
    # a lower learning rate from step 120 on is a segment of its own
    runs[2]["optim"]["lr"] = 5e-4
    assert "steps 100-120" in export.schedule_note({"name": "m", "steps": 300, "training_runs": runs})
    # so is a segment with another EMA decay (recorded since 2026-12-04), and the note names it
    runs[2]["optim"]["lr"] = 1e-3
    runs[1]["ema_decay"], runs[2]["ema_decay"] = 0.999, 0.9995
    note = export.schedule_note({"name": "m", "steps": 300, "training_runs": runs})
    assert "steps 100-120: Adam lr 0.001" in note and note.endswith("label dropout 0.2, EMA decay 0.9995")
    assert "label dropout 0.2, EMA decay 0.999;" in note
    # a segment written before the EMA decay was recorded does not split one that records it
    del runs[1]["ema_decay"]
    runs[2]["ema_decay"] = 0.999
    assert "steps 100-300: Adam lr 0.001" in export.schedule_note({"name": "m", "steps": 300, "training_runs": runs})

    prev = {"name": "f", "only_class": 2, "steps": 50, "wall_time_s": 100.0, "cpu_core_hours": 0.03,
            "training_runs": [_run(0, 50, 50)]}
    cont = {"name": "f", "only_class": 2, "steps": 20, "wall_time_s": 40.0, "cpu_core_hours": 0.01,
            "init_from_model": prev, "training_runs": [_run(0, 20, 20, lr=5e-4, decay=10, init_from="prev")]}
    assert export.is_continuation(cont)
    t = export.totals(cont)
    assert t["steps"] == 70 and t["wall_time_s"] == 140.0 and abs(t["cpu_core_hours"] - 0.04) < 1e-12
    assert export.schedule_note(cont) == (
        "steps 0-50: Adam lr 0.001 after 10 warm-up steps, constant; then continued from its EMA weights with a "
        "fresh Adam state for 20 steps; continuation steps 0-20: Adam lr 0.0005 after 10 warm-up steps, constant "
        "to step 10, then a cosine decay to 5e-06 by step 20")
    finetune = dict(cont, init_from_model=dict(prev, name="ddpm", only_class=None))
    assert not export.is_continuation(finetune) and export.totals(finetune)["steps"] == 20


def test_export_only_restricts_the_copy(tmp_path, capsys):
    """``python -m train.export --only=NAMES`` copies (and measures) only the named models: a staging
    folder for one model must not receive the other finished runs of the workdir."""
    from dngjax.tools.train import export
    for run, sha in (("mnist_ddpm", "a"), ("mnist_cond", "b"), ("mnist_forget_2", "c")):
        d = tmp_path / "work" / run / "model"
        d.mkdir(parents=True)
        (d / "params.msgpack").write_bytes(sha.encode())
        (d / "card.json").write_text(json.dumps({"name": run, "config": {}, "params_sha256": sha}))
    out = tmp_path / "out"
    export.copy_models(str(tmp_path / "work"), str(out), [2], only=("cond",))
    assert sorted(p.name for p in out.iterdir()) == ["cond"]
    assert (out / "cond" / "params.msgpack").read_bytes() == b"b"
    export.copy_models(str(tmp_path / "work"), str(out), [2])
    assert sorted(p.name for p in out.iterdir()) == ["cond", "ddpm", "forget_2"]
    assert "unchanged" in capsys.readouterr().out   # cond's parameters were already there


def test_export_names_the_architecture_including_its_depth():
    """The checkpoints README and the model notes name the network from its card, so a deeper UNet
    (``num_res_blocks=2``) is not described as the default one."""
    from dngjax.tools.train import export
    unet = {"kind": "unet", "kwargs": {"ch": 16, "ch_mult": [1, 2, 4], "num_res_blocks": 1}}
    assert export.arch_summary({"arch": unet}) == "UNet ch 16 x (1, 2, 4)"
    deep = {"kind": "unet", "kwargs": dict(unet["kwargs"], num_res_blocks=2)}
    assert export.arch_summary({"arch": deep}) == "UNet ch 16 x (1, 2, 4), 2 res blocks per level"
    assert export.arch_summary({"arch": {"kind": "cnn", "kwargs": {"widths": [16, 32]}}}) == "CNN widths (16, 32)"
    note = export.NOTES["forget"].format(c=2, steps=9000, schedule="s", arch=export.arch_summary({"arch": deep}))
    assert "2 res blocks per level, 9,000 steps x 64" in note
