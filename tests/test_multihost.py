"""Several processes on JAX's distributed runtime (dngjax.distributed), two local CPU processes here.

Each group of processes runs on this machine: a coordinator on a free loopback port, every process with
two forced host devices (``--xla_force_host_platform_device_count=2``), the settings passed by the
``DNGJAX_*`` variables or the tools' flags. Checked:

* a DNG sweep of two processes (4 devices) equals, bit for bit, the sweep of one process on 4 devices,
  and every process holds the whole result;
* ``train/main.py`` as two processes (the tiny classifier, global batch 16 over 4 devices, each process reading
  its own rows) ends with the parameters and per-step losses of one process with the same batch on one
  device, to float32 reduction-order tolerance; only process 0 writes metrics, runs.jsonl and the model;
* the two-process run killed (SIGKILL, both processes) after its first checkpoint and rerun ends with the
  uninterrupted two-process run's parameters (marked slow);
* ``sample/main.py``'s class-removal job as two processes writes one run folder (process 0) equal to
  one process's (marked slow);
* inconsistent settings are refused with one line before anything starts.

Every process has a timeout: a hung group fails its test (the processes are killed) instead of hanging.
The processes share a persistent XLA compilation cache, so that a rerun does not compile again.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from dngjax import distributed
from test_sample_cli import tiny_checkpoints  # noqa: F401  (module fixture: the tiny sampling models)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT = 240        # seconds for one group of processes (two busy cores)
CONFIG = "train/configs/mnist_classifier.py:tiny"     # 20 steps of batch 16, checkpoints at 10 and 20

SWEEP = textwrap.dedent("""
    import sys, numpy as np
    from dngjax import distributed
    distributed.initialize()
    import jax, jax.numpy as jnp
    import dngjax as dj
    def eps_u(x, t): return 0.3 * jnp.tanh(x) + 0.1
    def eps_c(x, t): return 0.3 * jnp.tanh(x - 0.5)
    sched = dj.respace(dj.linear_schedule(), 8)
    keys = dj.keys_from_seeds(np.arange(13))
    rule = dj.DynamicNegativeGuidance(1.0, prior=0.3, temperature=0.25)
    x, tr = dj.sweep(eps_u, sched, keys, (3,), rule=rule, grid={"scale": [0.0, 2.0, 5.0]}, denoiser_c=eps_c,
                     chunk_size=6, return_trace=True)
    np.savez(sys.argv[1] + f"_{jax.process_index()}.npz", x=x, lam=tr.lam, p=tr.p, devices=jax.device_count())
""")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def base_env(tmp_path_factory):
    cache = tmp_path_factory.mktemp("xla_cache")
    env = {k: v for k, v in os.environ.items() if not k.startswith("DNGJAX_") or k == "DNGJAX_DATA_DIR"}
    env.update(PYTHONPATH=REPO, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(cache),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
               DNGJAX_INIT_TIMEOUT="60")
    return env


def _env(base, devices):
    flags = " ".join(f for f in base.get("XLA_FLAGS", "").split() if "device_count" not in f)
    return dict(base, XLA_FLAGS=f"{flags} --xla_force_host_platform_device_count={devices}".strip())


def start_group(cmd, base, logs, n=2, devices=2, use_flags=False):
    """``n`` processes running ``cmd`` (a list), joined by a fresh loopback coordinator; output into
    ``logs``_<i>.log. The settings go in as DNGJAX_* variables, or as the tools' flags (``use_flags``)."""
    port = free_port()
    procs = []
    for i in range(n):
        env = _env(base, devices)
        extra = []
        if n > 1 and use_flags:
            extra = [f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={n}", f"--process_id={i}"]
        elif n > 1:
            env.update(DNGJAX_COORDINATOR=f"127.0.0.1:{port}", DNGJAX_NUM_PROCESSES=str(n), DNGJAX_PROCESS_ID=str(i))
        with open(f"{logs}_{i}.log", "w") as out:
            procs.append(subprocess.Popen(cmd + extra, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO,
                                          start_new_session=True))
    return procs


def kill_group(procs):
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    for p in procs:
        p.wait()


def wait_group(procs, logs, timeout=TIMEOUT):
    """Wait for every process; a non-zero exit or the timeout fails (every process killed)."""
    end = time.monotonic() + timeout
    try:
        for p in procs:
            p.wait(timeout=max(end - time.monotonic(), 1))
    except subprocess.TimeoutExpired:
        kill_group(procs)
        pytest.fail(f"the processes ran over {timeout} s:\n" + _tails(logs, len(procs)))
    bad = [i for i, p in enumerate(procs) if p.returncode != 0]
    assert not bad, f"processes {bad} failed:\n" + _tails(logs, len(procs))


def run_group(cmd, base, logs, **kw):
    procs = start_group(cmd, base, logs, **kw)
    wait_group(procs, logs)


def _tails(logs, n):
    return "\n".join(f"--- process {i}:\n" + open(f"{logs}_{i}.log").read()[-2500:] for i in range(n))


# --------------------------------------------------------------------------- settings

def test_settings_are_checked_before_anything_starts(monkeypatch):
    for k in list(os.environ):
        if k.startswith(("DNGJAX_COORD", "DNGJAX_NUM", "DNGJAX_PROCESS", "DNGJAX_LOCAL", "DNGJAX_DISTRIBUTED",
                         "SLURM_", "OMPI_", "TPU_WORKER")):
            monkeypatch.delenv(k)
    assert distributed.resolve() is None                               # nothing asked: one process
    assert distributed.resolve(num_processes=1) is None
    kw = distributed.resolve("10.0.0.1:1234", 4, 3, "0,1")
    assert kw == {"coordinator_address": "10.0.0.1:1234", "num_processes": 4, "process_id": 3,
                  "local_device_ids": [0, 1]}
    monkeypatch.setenv("DNGJAX_COORDINATOR", "h:99")
    monkeypatch.setenv("DNGJAX_NUM_PROCESSES", "2")
    monkeypatch.setenv("DNGJAX_PROCESS_ID", "1")
    assert distributed.resolve()["process_id"] == 1
    assert distributed.resolve(process_id=0)["process_id"] == 0      # a flag wins over its variable
    monkeypatch.delenv("DNGJAX_PROCESS_ID")
    for args, words in [(("h:1", 2, None), "missing: process_id"), ((None, 2, 0), "coordinator_address"),
                        (("h:1", 2, 2), "ids are 0..1"), (("h", 2, 0), "host:port"), (("h:1", 0, 0), ">= 1"),
                        (("h:1", "two", 0), "integer")]:
        monkeypatch.delenv("DNGJAX_COORDINATOR", raising=False)
        with pytest.raises(ValueError, match=words):
            distributed.resolve(*args)
    monkeypatch.setenv("SLURM_JOB_ID", "7")                            # a cluster fills in what is missing
    for k, v in (("SLURM_STEP_NODELIST", "n[1-2]"), ("SLURM_NTASKS", "2"), ("SLURM_PROCID", "0"),
                 ("SLURM_LOCALID", "0")):
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("DNGJAX_NUM_PROCESSES")
    assert distributed.cluster_detected() == "slurm"
    assert distributed.resolve() == {"coordinator_address": None, "num_processes": None, "process_id": None,
                                     "local_device_ids": None}


def test_cli_refuses_inconsistent_flags(base_env, tmp_path):
    res = subprocess.run([sys.executable, os.path.join(REPO, "train", "main.py"),
                          "--config=" + os.path.join(REPO, "train/configs/mnist_ddpm.py:tiny"),
                          f"--workdir={tmp_path / 'w'}", "--num_processes=2", "--process_id=0"],
                         env=base_env, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert res.returncode == 2, res.stderr[-2000:]
    assert res.stderr.strip().splitlines()[-1].startswith("error: several processes:"), res.stderr[-2000:]
    assert "coordinator_address" in res.stderr and not os.path.exists(tmp_path / "w")


# --------------------------------------------------------------------------- sampling

def test_sweep_of_two_processes_equals_one_process_bit_for_bit(base_env, tmp_path):
    cmd = [sys.executable, "-c", SWEEP]
    two = start_group(cmd + [str(tmp_path / "two")], base_env, str(tmp_path / "two"))
    one = start_group(cmd + [str(tmp_path / "one")], base_env, str(tmp_path / "one"), n=1, devices=4)
    wait_group(two, str(tmp_path / "two"))
    wait_group(one, str(tmp_path / "one"))
    ref = np.load(tmp_path / "one_0.npz")
    assert int(ref["devices"]) == 4 and ref["x"].shape == (3, 13, 3)
    for i in range(2):
        got = np.load(tmp_path / f"two_{i}.npz")
        assert int(got["devices"]) == 4
        for k in ("x", "lam", "p"):
            np.testing.assert_array_equal(got[k], ref[k], err_msg=f"process {i}: {k}")


# --------------------------------------------------------------------------- training

def train_cmd(workdir, data):
    return [sys.executable, os.path.join(REPO, "train", "main.py"),
            "--config=" + os.path.join(REPO, CONFIG),
            f"--workdir={workdir}", f"--data_dir={data}"]


def train_result(workdir):
    """(parameters as a flat dict of numpy arrays, [(step, loss)] of metrics.jsonl, the model card)."""
    from dngjax import checkpoint as ckpt
    from flax import traverse_util
    _, params, card = ckpt.load_model(os.path.join(workdir, "model"))
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    flat = {k: np.asarray(v) for k, v in traverse_util.flatten_dict(params).items()}
    return flat, [(r["step"], r["loss"]) for r in rows], card


@pytest.fixture(scope="module")
def two_process_training(base_env, train_data, tmp_path_factory):
    """The tiny DDPM trained by two processes (flags) and by one process on one device, side by side."""
    d = tmp_path_factory.mktemp("train")
    two = start_group(train_cmd(d / "two", train_data), base_env, str(d / "two"), use_flags=True)
    one = start_group(train_cmd(d / "one", train_data), base_env, str(d / "one"), n=1, devices=1)
    wait_group(two, str(d / "two"))
    wait_group(one, str(d / "one"))
    return str(d / "two"), str(d / "one")


def test_two_process_training_equals_one_process(two_process_training):
    two, one = two_process_training
    p2, m2, card = train_result(two)
    p1, m1, _ = train_result(one)
    assert card["hardware"]["num_processes"] == 2 and card["hardware"]["num_devices_total"] == 4
    assert [s for s, _ in m2] == [s for s, _ in m1] == [5, 10, 15, 20] == [5, 10, 15, card["steps"]]  # once each
    np.testing.assert_allclose([l for _, l in m2], [l for _, l in m1], rtol=1e-4)
    assert p2.keys() == p1.keys()
    for k in p1:
        np.testing.assert_allclose(p2[k], p1[k], rtol=2e-3, atol=2e-5, err_msg="/".join(k))
    with open(os.path.join(two, "runs.jsonl")) as f:
        assert len([line for line in f if line.strip()]) == 1


@pytest.mark.slow       # ~60 s more on two busy cores: a killed group and its rerun
def test_two_process_training_killed_and_resumed(base_env, train_data, two_process_training, tmp_path):
    work = tmp_path / "run"
    logs = str(tmp_path / "killed")
    procs = start_group(train_cmd(work, train_data), base_env, logs)
    manifest = work / "checkpoints" / "10" / "sha256_manifest.json"
    end = time.monotonic() + TIMEOUT
    try:
        while not manifest.exists():
            assert all(p.poll() is None for p in procs), "a process ended before its first checkpoint:\n" + \
                _tails(logs, 2)
            assert time.monotonic() < end, "no checkpoint in time:\n" + _tails(logs, 2)
            time.sleep(0.05)
    finally:
        kill_group(procs)
    assert not (work / "model").exists()
    run_group(train_cmd(work, train_data), base_env, str(tmp_path / "resumed"))
    assert "resumed from step" in open(str(tmp_path / "resumed") + "_0.log").read()
    p_resumed, m_resumed, _ = train_result(str(work))
    p_ref, m_ref, _ = train_result(two_process_training[0])
    assert [s for s, _ in m_resumed] == [s for s, _ in m_ref]
    np.testing.assert_allclose([l for _, l in m_resumed], [l for _, l in m_ref], rtol=1e-6)
    for k in p_ref:
        np.testing.assert_allclose(p_resumed[k], p_ref[k], rtol=1e-6, atol=1e-7, err_msg="/".join(k))


# --------------------------------------------------------------------------- the class-removal job

@pytest.mark.slow       # ~2 min on two busy cores: the tiny class-removal job as two processes and as one
def test_class_removal_of_two_processes_equals_one_process(base_env, tiny_checkpoints, tmp_path):
    """Two processes (4 devices) write one run folder (process 0) whose labels equal those of one process on
    4 devices, and its lambda_t curves and scores to float32 rounding (XLA:CPU's convolutions may block
    their sums by the threads of a process: two devices per process vs four); the folder is complete."""
    def cmd(out):
        return [sys.executable, os.path.join(REPO, "sample", "main.py"),
                f"--config={os.path.join(REPO, 'sample', 'configs', 'mnist.py')}:tiny",
                f"--config.checkpoints={tiny_checkpoints}", "--config.removed_class=1", f"--config.outdir={out}",
                "--config.progress=False"]
    two = start_group(cmd(tmp_path / "two"), base_env, str(tmp_path / "two"), use_flags=True)
    one = start_group(cmd(tmp_path / "one"), base_env, str(tmp_path / "one"), n=1, devices=4)
    wait_group(two, str(tmp_path / "two"))
    wait_group(one, str(tmp_path / "one"))
    assert not os.path.exists(str(tmp_path / "two") + ".partial")
    assert "results in" in open(str(tmp_path / "two") + "_0.log").read()
    assert "results in" not in open(str(tmp_path / "two") + "_1.log").read()      # process 0 reports
    for name in ("labels.npz", "lambda_t.npz"):
        a, b = np.load(tmp_path / "two" / name), np.load(tmp_path / "one" / name)
        assert sorted(a.files) == sorted(b.files)
        for k in a.files:
            if name == "labels.npz":
                np.testing.assert_array_equal(a[k], b[k], err_msg=f"{name}: {k}")
            else:
                np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-6, err_msg=f"{name}: {k}")
    rows = lambda p: json.loads((p / "results.json").read_text())
    for r2, r1 in zip(rows(tmp_path / "two"), rows(tmp_path / "one"), strict=True):
        assert (r2["method"], r2["scale"], r2["safety_pct"]) == (r1["method"], r1["scale"], r1["safety_pct"])
        assert r2["kl"] == pytest.approx(r1["kl"], rel=1e-6) and r2["fd"] == pytest.approx(r1["fd"], rel=1e-4)
