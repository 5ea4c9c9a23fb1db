"""Every command on bad inputs: one ``error: ...`` line on stderr, exit code 2, no traceback, nothing written.

Each case runs the real command in a subprocess (``sys.executable``), in a folder of its own that holds
one regular file (``afile``, for output folders that are files or lie under one); the listing of that
folder and of the fixtures' folders is compared before and after. Ctrl-C: SIGINT to a running tiny job
once it reports progress gives exit code 130 and one ``interrupted: ...`` line that says how to resume.
"""

import os
import signal
import subprocess
import sys
import time

import pytest

from test_sample_cli import tiny_checkpoints  # noqa: F401  (fixture: tiny random models, shipped layout)
from test_train import fake_data  # noqa: F401  (fixture: a small MNIST-like npz folder)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = [os.path.join(REPO, "train", "main.py")]
SAMPLE = [os.path.join(REPO, "sample", "main.py")]
EXPORT = ["-m", "train.export"]
GMM = ["-m", "experiments.gmm"]
CONVERT = ["-m", "dngjax.convert"]
TINY_DDPM = f"--config={REPO}/train/configs/mnist_ddpm.py:tiny"
TINY_SAMPLE = f"--config={REPO}/sample/configs/mnist.py:tiny"


def _env(data_dir):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO, DNGJAX_DATA_DIR=str(data_dir))
    env.pop("PYTHONWARNINGS", None)
    return env


def _listing(*roots):
    out = set()
    for root in roots:
        for folder, dirs, files in os.walk(root):
            for name in dirs + files:
                p = os.path.join(folder, name)
                out.add((p, os.path.getsize(p) if os.path.isfile(p) else -1))
    return out


def _fill(args, **where):
    return [a.format(**where) for a in args]


# (id, command, arguments, what the one line must say). Arguments may name {ckpt} (the tiny checkpoints),
# {data} (the tiny data folder) and {prepared} (a workdir holding a tiny run of another network); relative
# paths lie in the case's own folder, whose "afile" is a regular file.
CASES = [
    # train/main.py: config file, config field, --workdir (a file, under a file, another network's run),
    # --data_dir, an unknown flag
    ("train-config-missing", TRAIN, ["--config=/nonexistent/config.py", "--workdir=w"],
     "--config=/nonexistent/config.py: no such file"),
    ("train-workdir-is-a-file", TRAIN, [TINY_DDPM, "--workdir=afile"], "--workdir=afile is a file, not a folder"),
    ("train-workdir-under-a-file", TRAIN, [TINY_DDPM, "--workdir=afile/w"], "--workdir=afile/w cannot be created"),
    ("train-workdir-of-another-network", TRAIN, [TINY_DDPM, "--workdir={prepared}", "--config.model.kwargs.ch=4"],
     "holds a run (checkpoint step 2) of another network"),
    ("train-data-missing", TRAIN, [TINY_DDPM, "--workdir=w", "--data_dir=nowhere"], "--data_dir"),
    ("train-unknown-flag", TRAIN, [TINY_DDPM, "--workdir=w", "--epochs=3"], "Unknown command line flag 'epochs'"),
    # sample/main.py: a config-field typo with the default config, a missing config file, config.outdir
    # (a file, under a file), and the job flags: --out, --target, --runs, --classes, text_to_image's model
    ("sample-typo-default-config", SAMPLE, ["--config.removed_clas=3"],
     'unknown config field \'removed_clas\'. Did you mean "removed_class"'),
    ("sample-config-missing", SAMPLE, ["--config=/nonexistent/config.py"], "--config=/nonexistent/config.py: no such file"),
    ("sample-outdir-is-a-file", SAMPLE, [TINY_SAMPLE, "--config.checkpoints={ckpt}", "--config.removed_class=1",
                                         "--config.outdir=afile"], "--config.outdir=afile is a file"),
    ("sample-outdir-under-a-file", SAMPLE, [TINY_SAMPLE, "--config.checkpoints={ckpt}", "--config.removed_class=1",
                                            "--config.outdir=afile/run"], "--config.outdir=afile/run cannot be created"),
    ("sample-chunk-far-too-large", SAMPLE, [TINY_SAMPLE, "--config.checkpoints={ckpt}", "--config.removed_class=1",
                                            "--config.outdir=run", "--config.n=4194304", "--config.chunk_size=4194304"],
     "--config.chunk_size=4194304: one sampling chunk"),
    ("sample-posterior-out-under-a-file", SAMPLE, ["--job=posterior_check", TINY_SAMPLE, "--config.checkpoints={ckpt}",
                                                   "--classes=1", "--out=afile/pc"], "--out=afile/pc cannot be created"),
    ("sample-posterior-classes", SAMPLE, ["--job=posterior_check", "--classes=one"], "--classes=one"),
    ("sample-calibrate-target", SAMPLE, ["--job=calibrate", "--target=0"], "--target"),
    ("sample-select-runs-missing", SAMPLE, ["--job=select", "--runs=nowhere"], "no results.json in ['nowhere']"),
    ("sample-archive-out-under-a-file", SAMPLE, ["--job=archive", "--runs={ckpt}", "--out=afile/copy"],
     "--out=afile/copy cannot be created"),
    ("sample-text-to-image-no-model", SAMPLE, ["--job=text_to_image", f"--config={REPO}/sample/configs/sd.py:quick",
                                               "--config.folder=nowhere"], "nowhere"),
    # python -m train.export: --workdir, --out, --only, a flag's bound, a classifier to score with
    ("export-workdir-missing", EXPORT, ["--workdir=nowhere"], "--workdir=nowhere does not exist"),
    ("export-out-under-a-file", EXPORT, ["--nocopy", "--out=afile/models"], "--out=afile/models cannot be created"),
    ("export-only-unknown", EXPORT, ["--nocopy", "--only=ddpm unet"], "--only names unknown models ['unet']"),
    ("export-chunk-bound", EXPORT, ["--chunk=0"], "--chunk=0"),
    ("export-no-classifier", EXPORT, ["--nocopy", "--out=models"], "train the classifier first"),
    # python -m experiments.gmm: --out, --replot's samples, a float flag's bound
    ("gmm-out-under-a-file", GMM, ["--figure=fig1", "--n=8", "--out=afile/gmm"], "--out=afile/gmm cannot be created"),
    ("gmm-replot-without-samples", GMM, ["--figure=fig1", "--replot", "--out=gmm"], "--replot reuses gmm/fig1_samples.npz"),
    ("gmm-p-max-bound", GMM, ["--p_max=2"], "--p_max=2"),
    # python -m dngjax.convert: the positional arguments, SRC_DIR, OUT_DIR
    ("convert-no-arguments", CONVERT, [], "expected SRC_DIR OUT_DIR"),
    ("convert-src-missing", CONVERT, ["nowhere", "out"], "not found"),
    ("convert-out-under-a-file", CONVERT, ["{ckpt}", "afile/out"], "OUT_DIR=afile/out cannot be created"),
]


@pytest.fixture(scope="module")
def prepared_workdir(tmp_path_factory):
    """A workdir holding a checkpoint (step 2) of the tiny ddpm config's train state (ch 8), saved by orbax
    as the trainer saves it (zeros: only the shapes matter)."""
    import jax
    import jax.numpy as jnp
    import orbax.checkpoint as ocp
    from dngjax.tools.train import trainer
    from dngjax.tools.train.configs import mnist_ddpm

    w = tmp_path_factory.mktemp("prepared") / "w"
    c = mnist_ddpm.get_config("tiny")
    module, opt = trainer.build_model(c), trainer.make_optimizer(c)
    shapes = trainer._abstract_state(module, opt, c, (28, 28, 1))
    state = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    mngr = ocp.CheckpointManager(str(w / "checkpoints"), options=ocp.CheckpointManagerOptions(
        create=True, enable_async_checkpointing=False))
    mngr.save(2, args=ocp.args.StandardSave(state))
    mngr.wait_until_finished()
    mngr.close()
    return w


def assert_one_line(res, prefix="error:", code=2):
    """Exit ``code``; stderr's last non-empty line starts with ``prefix`` and is the only such line; no traceback."""
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert res.returncode == code, (res.returncode, res.stderr[-3000:])
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    assert lines and lines[-1].startswith(prefix), res.stderr[-3000:]
    assert sum(line.startswith(("error:", "interrupted:")) for line in lines) == 1, res.stderr[-3000:]
    return lines[-1]


@pytest.mark.parametrize("command,args,message", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(command, args, message, tmp_path, tiny_checkpoints,
                                                            fake_data, prepared_workdir):
    (tmp_path / "afile").write_text("not a folder")
    roots = (tmp_path, tiny_checkpoints, fake_data, prepared_workdir)
    before = _listing(*roots)
    res = subprocess.run([sys.executable, *command, *_fill(args, ckpt=tiny_checkpoints, data=fake_data,
                                                           prepared=prepared_workdir)],
                         capture_output=True, text=True, cwd=str(tmp_path), env=_env(fake_data), timeout=300)
    line = assert_one_line(res)
    # only stderr's one line: logs and warnings of the start-up are not errors, but no other line precedes it
    assert [x for x in res.stderr.splitlines() if x.strip()] == [line], res.stderr[-3000:]
    assert message in line, line
    assert _listing(*roots) == before, sorted(_listing(*roots) ^ before)


def test_a_batch_far_too_large_is_refused_after_compiling_before_the_first_step(tmp_path, fake_data):
    """The compiled train step's memory (XLA's estimate) against the memory free: a batch of 2^20 tiny
    images needs terabytes; refused with the batch size to use, and the new workdir is removed."""
    (tmp_path / "afile").write_text("not a folder")
    before = _listing(tmp_path, fake_data)
    res = subprocess.run([sys.executable, *TRAIN, TINY_DDPM, "--workdir=w", "--config.batch_size=1048576"],
                         capture_output=True, text=True, cwd=str(tmp_path), env=_env(fake_data), timeout=300)
    line = assert_one_line(res)
    assert line.startswith("error: --config.batch_size=1048576: one training step needs ~") and \
        "memory is free: use --config.batch_size=" in line, line
    suggested = int(line.rsplit("--config.batch_size=", 1)[1].split()[0])
    assert 1 <= suggested < 1048576
    assert _listing(tmp_path, fake_data) == before


def _interrupt(cmd, cwd, env, ready, also=lambda: True, timeout=300):
    """Run ``cmd``, send SIGINT once a line of stdout or stderr contains ``ready`` and ``also()`` holds;
    (returncode, stdout, stderr)."""
    import threading
    p = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen = {"out": [], "err": []}
    hit = threading.Event()

    def pump(stream, key):
        for line in stream:
            seen[key].append(line)
            if ready in line:
                hit.set()

    threads = [threading.Thread(target=pump, args=(p.stdout, "out"), daemon=True),
               threading.Thread(target=pump, args=(p.stderr, "err"), daemon=True)]
    for t in threads:
        t.start()
    t0 = time.time()
    try:
        while not (hit.is_set() and also()) and p.poll() is None and time.time() - t0 < timeout:
            time.sleep(0.1)
        assert hit.is_set() and also(), ("never printed " + ready, "".join(seen["err"])[-3000:])
        p.send_signal(signal.SIGINT)
        # Python acts on the signal when the main thread returns from C: an XLA compilation in progress
        # (a minute or more on a loaded 2-core CI machine, beside torch-heavy tests) finishes first
        p.wait(timeout=400)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    for t in threads:
        t.join(timeout=10)
    return subprocess.CompletedProcess(cmd, p.returncode, "".join(seen["out"]), "".join(seen["err"]))


@pytest.mark.slow
def test_ctrl_c_during_training_says_how_to_resume_and_the_rerun_does(tmp_path, fake_data):
    cmd = [sys.executable, *TRAIN, TINY_DDPM, "--workdir=w", "--config.num_train_steps=100000",
           "--config.checkpoint_every=1"]
    saved = lambda: [d for d in os.listdir(tmp_path / "w" / "checkpoints") if d.isdigit()]
    res = _interrupt(cmd, str(tmp_path), _env(fake_data), ready="measured", also=lambda: bool(saved()))
    line = assert_one_line(res, "interrupted:", 130)
    assert "rerun the same command to resume from the last checkpoint in" in line, line
    saved = saved()
    res = subprocess.run(cmd[:-2] + [f"--config.num_train_steps={max(map(int, saved)) + 1}"], capture_output=True,
                         text=True, cwd=str(tmp_path), env=_env(fake_data), timeout=300)
    assert res.returncode == 0 and "resumed from step" in res.stderr, res.stderr[-3000:]


def test_ctrl_c_during_class_removal_keeps_the_finished_points_and_says_so(tmp_path, tiny_checkpoints, fake_data):
    out = tmp_path / "run"
    cmd = [sys.executable, *SAMPLE, TINY_SAMPLE, f"--config.checkpoints={tiny_checkpoints}",
           "--config.removed_class=1", f"--config.outdir={out}", "--config.n=100000", "--config.chunk_size=8"]
    res = _interrupt(cmd, str(tmp_path), _env(fake_data), ready="estimated cost")
    line = assert_one_line(res, "interrupted:", 130)
    assert f"the finished grid points are kept in {out}.partial: rerun the same command to resume" in line, line
    assert os.path.isdir(str(out) + ".partial") and not os.path.exists(out)


@pytest.mark.slow
def test_ctrl_c_of_a_job_that_does_not_resume_says_it_starts_again(tmp_path, fake_data):
    res = _interrupt([sys.executable, *GMM, "--figure=fig1", "--n=4000000", "--chunk=1000", "--steps=1000",
                      "--out=gmm"], str(tmp_path), _env(fake_data), ready="N=4000000")
    line = assert_one_line(res, "interrupted:", 130)
    assert "nothing resumes" in line, line
