"""train/: sha256 manifests of the orbax training checkpoints, verified on resume.

A flipped byte in a saved step's data file restores without complaint from orbax (its arrays are
read as they are); the trainer writes a manifest of every file after each save and, on resume,
falls back past a step that fails it to the newest one that passes, or refuses to start (exit 2,
one line) when none passes (end to end through train/main.py: tests/test_kill_resume.py). Steps
saved before manifests existed (checkpoints/train_state/) are accepted with a warning.
"""

import glob
import hashlib
import json
import logging
import os
import shutil

import jax
import pytest

from dngjax import checkpoint
from dngjax.tools.train import integrity, trainer
from dngjax.tools.train.configs import mnist_cond, mnist_ddpm

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _warnings(caplog):
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def test_manifest_detects_a_changed_file_a_missing_file_and_an_unreadable_manifest(tmp_path):
    step = tmp_path / "7"
    (step / "default" / "d").mkdir(parents=True)
    (step / "default" / "d" / "a").write_bytes(b"\x00" * 100)
    (step / "_CHECKPOINT_METADATA").write_text("{}")
    assert integrity.verify(str(step)) == (integrity.UNVERIFIED, f"no {integrity.MANIFEST_FILE}")
    integrity.write_manifest(str(step), 7)
    manifest = json.loads((step / integrity.MANIFEST_FILE).read_text())
    assert manifest["step"] == 7 and sorted(manifest["files"]) == ["_CHECKPOINT_METADATA", "default/d/a"]
    assert manifest["files"]["default/d/a"]["sha256"] == hashlib.sha256(b"\x00" * 100).hexdigest()
    assert not (step / (integrity.MANIFEST_FILE + ".tmp")).exists()
    assert integrity.verify(str(step))[0] == integrity.OK
    (step / "default" / "d" / "a").write_bytes(b"\x00" * 50 + b"\x01" + b"\x00" * 49)   # same size
    status, detail = integrity.verify(str(step))
    assert status == integrity.CORRUPT and detail == f"sha256 of {step / 'default' / 'd' / 'a'} does not match its manifest"
    os.remove(step / "default" / "d" / "a")
    assert integrity.verify(str(step)) == (integrity.CORRUPT, f"{step / 'default' / 'd' / 'a'} is missing")
    (step / integrity.MANIFEST_FILE).write_text("{not json")
    assert integrity.verify(str(step))[0] == integrity.CORRUPT
    # the newest step that is not corrupt, from the newest down; none at all is an error
    older = tmp_path / "5"
    older.mkdir()
    (older / "x").write_text("x")
    integrity.write_manifest(str(older), 5)
    assert integrity.choose_step(str(tmp_path), [5, 7]) == (5, integrity.OK, [(7, integrity.verify(str(step))[1])])
    (older / "x").write_text("y")
    with pytest.raises(checkpoint.CheckpointError, match=r"no usable checkpoint .*step 7: .*step 5: sha256 of"):
        integrity.choose_step(str(tmp_path), [5, 7])
    assert integrity.choose_step(str(tmp_path), []) == (None, integrity.OK, [])


def test_keep_checkpoints_below_two_is_refused():
    cfg = mnist_ddpm.get_config("tiny")
    trainer.validate_config(cfg)
    cfg.keep_checkpoints = 1
    with pytest.raises(ValueError, match="keep_checkpoints must be >= 2"):
        trainer.validate_config(cfg)


@pytest.mark.parametrize("name,model,config", [pytest.param("mnist_ddpm", "ddpm", mnist_ddpm, id="ddpm"),
                                               pytest.param("mnist_cond", "cond", mnist_cond, id="cond")])
def test_shipped_train_state_without_manifest_still_restores(tmp_path, caplog, name, model, config):
    """checkpoints/train_state/ was saved before manifests: restored with a warning that it cannot be
    verified, into the CPU config's state, and its EMA parameters are the shipped model's (the sha256
    of their msgpack bytes is the one in checkpoints/mnist/<model>/card.json). The repository's files
    are copied, never written."""
    from flax import serialization

    src = os.path.join(REPO, "checkpoints", "train_state", name)
    shipped = sorted(os.listdir(os.path.join(src, "checkpoints")))
    assert not glob.glob(os.path.join(src, "checkpoints", "*", integrity.MANIFEST_FILE))
    work = tmp_path / name
    shutil.copytree(src, work)
    cfg = config.get_config("cpu")
    module = trainer.build_model(cfg)
    opt = trainer.make_optimizer(cfg)
    ckpt_dir = str(work / "checkpoints")
    mngr = trainer.checkpoint_manager(ckpt_dir, cfg.keep_checkpoints)
    with caplog.at_level(logging.WARNING):
        state, step = trainer.restore_verified(mngr, ckpt_dir, str(work),
                                               lambda: trainer._abstract_state(module, opt, cfg, (28, 28, 1)))
    mngr.close()
    assert step == int(shipped[-1]) and int(state["step"]) == step
    msgs = _warnings(caplog)
    assert any(f"checkpoint step {step} in {ckpt_dir} has no {integrity.MANIFEST_FILE}" in m
               and m.endswith("it cannot be verified") for m in msgs), msgs
    assert any(m.startswith(f"resumed from step {step} in {ckpt_dir} (unverified)") for m in msgs), msgs
    card = checkpoint.load_card(os.path.join(REPO, "checkpoints", "mnist", model))
    data = serialization.to_bytes(jax.device_get(state["ema_params"]))
    assert hashlib.sha256(data).hexdigest() == card["params_sha256"]
    assert sorted(os.listdir(os.path.join(src, "checkpoints"))) == shipped
    assert not glob.glob(os.path.join(src, "checkpoints", "*", integrity.MANIFEST_FILE))
