"""Runs killed at random points (SIGKILL) and rerun to completion equal an uninterrupted run, bit for bit.

``train/main.py`` (a tiny DDPM) and ``sample/main.py`` (the tiny class-removal job) run as
subprocesses; each is killed a few times, after a delay drawn from a fixed-seed RNG, counted from
the moment its work starts (training: the train step is compiled; sampling: the cost estimate is
printed), then rerun until it finishes. Training must end with the uninterrupted run's parameter
bytes and per-step losses; sampling with its results.json metrics and its sample, label, feature
and lambda_t arrays. A corrupted training checkpoint (one flipped byte) falls back to the one before
and ends the same way; with every checkpoint corrupt, train/main.py refuses with one line.

The processes share a persistent XLA compilation cache (a cached executable is the one compiled),
so that only the uninterrupted runs compile. tests/test_train.py and tests/test_sample_cli.py
cover one deterministic interruption each.
"""

import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from test_sample_cli import tiny_checkpoints  # noqa: F401  (module fixture: the tiny sampling models)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_STEPS = 8           # the tiny config saves every 2 steps and keeps 2
TRAIN_MARKER = "train step compiled"
SAMPLE_MARKER = "estimated cost:"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    cache = tmp_path_factory.mktemp("xla_cache")
    return dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(cache),
                JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")


def launch(cmd, env, log, marker, delay=None, timeout=600):
    """Run ``cmd`` (output into ``log``); ``delay`` seconds after ``marker`` appears in its output, SIGKILL it.

    Returns ``(killed, seconds from the marker to the kill or to the exit, output)``."""
    with open(log, "w") as out:
        p = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    t_marker, t_end = None, time.monotonic() + timeout
    try:
        while p.poll() is None:
            now = time.monotonic()
            if t_marker is None:
                with open(log) as f:
                    if marker in f.read():
                        t_marker = now
            if t_marker is not None and delay is not None and now >= t_marker + delay:
                p.send_signal(signal.SIGKILL)
                p.wait()
                return True, now - t_marker, open(log).read()
            assert now < t_end, f"{cmd} ran for over {timeout} s"
            time.sleep(0.01)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    text = open(log).read()
    assert p.returncode == 0, text[-3000:]
    assert t_marker is not None, f"{marker!r} never printed:\n{text[-3000:]}"
    return False, time.monotonic() - t_marker, text


def kill_and_rerun(cmd, env, logs, marker, loop_s, fractions, remaining, state):
    """Kill ``cmd`` once per fraction u (``u * loop_s * remaining()`` s after its marker), then run it to
    the end. Returns a line per kill (where it landed, and ``state()`` then) and how many runs were killed."""
    notes, killed = [], 0
    for i, u in enumerate(fractions):
        left = remaining()
        was_killed, at, _ = launch(cmd, env, os.path.join(logs, f"kill_{i}.log"), marker, u * loop_s * left)
        killed += was_killed
        notes.append(f"run {i}: {'killed' if was_killed else 'finished'} {at:.2f} s after its marker "
                     f"(u={u:.3f}, {left:.2f} of the work left); then {state()}")
    launch(cmd, env, os.path.join(logs, "final.log"), marker)
    print("\n".join(notes))                  # where the kills landed (pytest -s shows it)
    return notes, killed


# --------------------------------------------------------------------------- training

def train_cmd(workdir, data, *extra):
    return [sys.executable, os.path.join(REPO, "train", "main.py"),
            "--config=" + os.path.join(REPO, "train/configs/mnist_ddpm.py:tiny"),
            f"--workdir={workdir}", f"--data_dir={data}", f"--config.num_train_steps={TRAIN_STEPS}", *extra]


def train_result(workdir):
    """(parameter bytes, [(step, loss, grad_norm)] of metrics.jsonl) of a finished run."""
    with open(os.path.join(workdir, "model", "params.msgpack"), "rb") as f:
        params = f.read()
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return params, [(r["step"], r["loss"], r["grad_norm"]) for r in rows]


@pytest.fixture(scope="module")
def train_reference(env, train_data, tmp_path_factory):
    """The uninterrupted run: its result and the seconds from its marker to its exit."""
    w = tmp_path_factory.mktemp("train_ref")
    _, loop_s, _ = launch(train_cmd(w / "run", train_data), env, str(w / "ref.log"), TRAIN_MARKER)
    params, metrics = train_result(str(w / "run"))
    assert [m[0] for m in metrics] == list(range(1, TRAIN_STEPS + 1))
    return params, metrics, loop_s, str(w / "run")


def _train_steps_left(workdir):
    steps = [int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")) if s.isdigit()] \
        if os.path.isdir(os.path.join(workdir, "checkpoints")) else []
    return (TRAIN_STEPS - max(steps, default=0)) / TRAIN_STEPS


def _train_state(workdir):
    ckpts = os.path.join(workdir, "checkpoints")
    return (f"checkpoints {sorted(os.listdir(ckpts)) if os.path.isdir(ckpts) else []}, "
            f"model {'written' if os.path.isdir(os.path.join(workdir, 'model')) else 'not written'}")


def _check_training_killed(env, train_data, train_reference, tmp_path, seed, kills):
    ref_params, ref_metrics, loop_s, _ = train_reference
    rng = np.random.default_rng(seed)
    fractions = rng.uniform(0.05, 0.8, kills)
    w = str(tmp_path / "run")
    notes, killed = kill_and_rerun(train_cmd(w, train_data), env, str(tmp_path), TRAIN_MARKER, loop_s, fractions,
                                   lambda: max(_train_steps_left(w), 0.2), lambda: _train_state(w))
    assert killed >= 1, notes
    params, metrics = train_result(w)
    assert [m[0] for m in metrics] == [m[0] for m in ref_metrics], notes
    assert metrics == ref_metrics, notes
    assert params == ref_params, notes
    assert not os.path.exists(os.path.join(w, "corrupt_checkpoints")), notes


def test_training_killed_at_random_points_ends_with_the_uninterrupted_parameters(env, train_data, train_reference,
                                                                                 tmp_path):
    # seed 88: the first kill comes early in the run (u = 0.20), the second late in the rerun (u = 0.58)
    _check_training_killed(env, train_data, train_reference, tmp_path, seed=88, kills=2)


@pytest.mark.slow
def test_training_killed_at_more_random_points(env, train_data, train_reference, tmp_path):
    _check_training_killed(env, train_data, train_reference, tmp_path, seed=7, kills=6)


def _data_file(step_dir):
    """The largest of orbax's array data files of a saved step."""
    files = glob.glob(os.path.join(step_dir, "default", "ocdbt.process_0", "d", "*"))
    assert files, os.listdir(step_dir)
    return max(files, key=os.path.getsize)


def _flip_byte(path, where):
    data = bytearray(open(path, "rb").read())
    data[int(where * (len(data) - 1))] ^= 0x10
    with open(path, "wb") as f:
        f.write(data)


def test_a_corrupt_checkpoint_falls_back_and_none_good_exits_2(env, train_data, train_reference, tmp_path):
    """The uninterrupted run's folder (its last two steps kept) without its exported model, one byte of the
    last step's largest data file flipped, then the same command: one warning naming that step and the
    file, "resumed from" the step before, and the uninterrupted run's parameters at the end. Then every
    kept step corrupted: exit 2, one error line, nothing moved."""
    ref_params, ref_metrics, _, ref_dir = train_reference
    w = str(tmp_path / "run")
    shutil.copytree(ref_dir, w)
    shutil.rmtree(os.path.join(w, "model"))
    ckpts = os.path.join(w, "checkpoints")
    last, before = str(TRAIN_STEPS), str(TRAIN_STEPS - 2)
    assert sorted(os.listdir(ckpts), key=int) == [before, last]
    bad = _data_file(os.path.join(ckpts, last))
    _flip_byte(bad, 0.5)
    _, _, log = launch(train_cmd(w, train_data), env, str(tmp_path / "resume.log"), TRAIN_MARKER)
    lines = log.splitlines()
    corrupt = [line for line in lines if "is corrupt" in line]
    assert len(corrupt) == 1, log[-3000:]
    assert f"checkpoint step {last} is corrupt: sha256 of {bad} does not match its manifest" in corrupt[0]
    assert corrupt[0].endswith(f"falling back to step {before}")
    assert any(f"resumed from step {before} in {ckpts} (sha256 verified)" in line for line in lines), log[-3000:]
    params, metrics = train_result(w)
    assert metrics == ref_metrics and params == ref_params
    assert len(glob.glob(os.path.join(w, "corrupt_checkpoints", f"{last}_*"))) == 1
    assert sorted(os.listdir(ckpts), key=int) == [before, last]          # the last step saved again

    for s in (before, last):
        _flip_byte(_data_file(os.path.join(ckpts, s)), 0.25)
    r = subprocess.run(train_cmd(w, train_data, f"--config.num_train_steps={TRAIN_STEPS + 2}"), capture_output=True,
                       text=True, env=env, timeout=300)
    assert r.returncode == 2, r.stderr[-3000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert errors[0].startswith(f"error: no usable checkpoint in {ckpts}: every saved step fails its sha256 check")
    assert all(f"step {s}: sha256 of {ckpts}/{s}/" in errors[0] for s in (before, last)), errors[0]
    assert sorted(os.listdir(ckpts), key=int) == [before, last]          # nothing moved, nothing trained
    assert len(os.listdir(os.path.join(w, "corrupt_checkpoints"))) == 1
    assert train_result(w)[0] == ref_params


# --------------------------------------------------------------------------- sampling

SAMPLE_POINTS = 4        # the tiny config's unguided point, NP at 0.5 and 2, DNG at 5 (SLD left out)
ARRAYS = ("samples.npz", "labels.npz", "features.npz", "reference.npz", "lambda_t.npz")


def sample_cmd(checkpoints, outdir):
    return [sys.executable, os.path.join(REPO, "sample", "main.py"),
            f"--config={os.path.join(REPO, 'sample', 'configs', 'mnist.py')}:tiny",
            f"--config.checkpoints={checkpoints}", "--config.removed_class=1", f"--config.outdir={outdir}",
            "--config.save_samples=True", "--config.methods=('NP', 'DNG')"]


def sample_result(outdir):
    """results.json without the timings, and every per-sample array file."""
    with open(os.path.join(outdir, "results.json")) as f:
        rows = [{k: v for k, v in r.items() if k != "sample_seconds"} for r in json.load(f)]
    arrays = {}
    for name in ARRAYS:
        with np.load(os.path.join(outdir, name)) as z:
            arrays.update({f"{name}/{k}": z[k] for k in z.files})
    return rows, arrays


def assert_same_samples(a, b, notes=()):
    rows_a, arrays_a = a
    rows_b, arrays_b = b
    assert len(rows_a) == len(rows_b) == SAMPLE_POINTS, notes
    for ra, rb in zip(rows_a, rows_b):
        same = json.dumps(ra, sort_keys=True) == json.dumps(rb, sort_keys=True)      # NaN == NaN here
        assert same, (ra["method"], ra["scale"], {k: (ra[k], rb.get(k)) for k in ra if ra[k] != rb.get(k)}, notes)
    assert sorted(arrays_a) == sorted(arrays_b), notes
    for k in arrays_a:
        assert arrays_a[k].dtype == arrays_b[k].dtype and arrays_a[k].shape == arrays_b[k].shape, k
        np.testing.assert_array_equal(arrays_a[k], arrays_b[k], err_msg=f"{k} {notes}")


@pytest.fixture(scope="module")
def sample_reference(env, tiny_checkpoints, tmp_path_factory):
    """Two uninterrupted runs: the first compiles (and fills the cache), the second measures the seconds
    from the marker to the exit of a run that does not compile; both have the same results."""
    w = tmp_path_factory.mktemp("sample_ref")
    launch(sample_cmd(tiny_checkpoints, w / "cold"), env, str(w / "cold.log"), SAMPLE_MARKER)
    _, loop_s, _ = launch(sample_cmd(tiny_checkpoints, w / "warm"), env, str(w / "warm.log"), SAMPLE_MARKER)
    result = sample_result(str(w / "cold"))
    assert_same_samples(result, sample_result(str(w / "warm")))
    return result, loop_s, str(w / "cold")


def _sample_points(outdir):
    return sorted(os.path.basename(p) for p in glob.glob(os.path.join(str(outdir) + ".partial", "points", "*.npz"))
                  if not p.endswith(".tmp.npz"))


PARTIAL_SWEEP = "one of NP's two points recorded"


def _sample_state(outdir):
    points = _sample_points(outdir)
    partial = sum(p.startswith("NP_") for p in points) == 1
    chunks = sorted(os.path.relpath(p, str(outdir) + ".partial")
                    for p in glob.glob(os.path.join(str(outdir) + ".partial", "chunks", "*", "*")))
    return f"points {points}, chunks {chunks}" + (f" ({PARTIAL_SWEEP})" if partial else "")


def _check_sampling_killed(env, tiny_checkpoints, sample_reference, tmp_path, seed, kills):
    ref, loop_s, _ = sample_reference
    rng = np.random.default_rng(seed)
    fractions = rng.uniform(0.05, 0.8, kills)
    out = tmp_path / "run"
    notes, killed = kill_and_rerun(sample_cmd(tiny_checkpoints, out), env, str(tmp_path), SAMPLE_MARKER, loop_s,
                                   fractions, lambda: max(1.0 - len(_sample_points(out)) / SAMPLE_POINTS, 0.2),
                                   lambda: _sample_state(out))
    assert killed >= 1, notes
    assert not os.path.exists(str(out) + ".partial"), notes
    assert_same_samples(sample_result(str(out)), ref, notes)


def test_sampling_killed_at_random_points_ends_with_the_uninterrupted_results(env, tiny_checkpoints,
                                                                              sample_reference, tmp_path):
    # seed 88: the first kill comes early in the run (u = 0.20), the second late in the rerun (u = 0.58)
    _check_sampling_killed(env, tiny_checkpoints, sample_reference, tmp_path, seed=88, kills=2)


@pytest.mark.slow
def test_sampling_killed_at_more_random_points(env, tiny_checkpoints, sample_reference, tmp_path):
    _check_sampling_killed(env, tiny_checkpoints, sample_reference, tmp_path, seed=7, kills=6)


def test_sampling_killed_between_the_points_of_one_sweep_ends_with_the_uninterrupted_results(
        env, tiny_checkpoints, sample_reference, tmp_path):
    """What a kill right after NP's first point was recorded leaves (its work folder with the unguided point
    and NP at 0.5; its chunks gone too), rerun to the end: the results must be the uninterrupted run's (NP's
    two scales are sampled in one vmapped call, whose floats differ in the last bits from a grid of one:
    the resume redoes the sweep NP at 0.5 recorded in ``swept_with``)."""
    ref, _, ref_dir = sample_reference
    out = tmp_path / "run"
    work = str(out) + ".partial"
    os.makedirs(os.path.join(work, "points"))
    shutil.copy(os.path.join(ref_dir, "config.json"), work)
    for p in ("none_s0.npz", "NP_s0.5.npz"):
        shutil.copy(os.path.join(ref_dir, "points", p), os.path.join(work, "points"))
    assert PARTIAL_SWEEP in _sample_state(out)
    launch(sample_cmd(tiny_checkpoints, out), env, str(tmp_path / "resume.log"), SAMPLE_MARKER)
    assert_same_samples(sample_result(str(out)), ref)
