"""One loader: a model folder's card decides its schedule, prediction type and labels, for every tool."""

import json
import os
import shutil

import numpy as np
import pytest

import dngjax as dj
from dngjax import checkpoint
from dngjax.tools.sample import inputs
from dngjax.tools.sample.configs import mnist

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIPPED = os.path.join(REPO, "checkpoints", "mnist")


def _copy_with_diffusion(tmp_path, name, **diffusion):
    dst = tmp_path / name
    shutil.copytree(os.path.join(SHIPPED, name), dst)
    card = json.loads((dst / "card.json").read_text())
    card["diffusion"] = dict(card.get("diffusion") or {}, **diffusion)
    (dst / "card.json").write_text(json.dumps(card))
    return str(dst)


def test_shipped_model_loads_with_its_cards_chain_and_prediction():
    model = checkpoint.load_diffusion_model(os.path.join(SHIPPED, "ddpm"))
    assert model.prediction == "eps" and model.num_classes == 0
    np.testing.assert_array_equal(np.asarray(model.schedule.betas), np.asarray(dj.linear_schedule(1000).betas))
    with pytest.raises(checkpoint.CheckpointError, match="takes none"):
        model.denoiser(label=3)


def test_cards_prediction_type_reaches_the_denoiser(tmp_path):
    path = _copy_with_diffusion(tmp_path, "ddpm", prediction="v")
    assert checkpoint.load_diffusion_model(path).denoiser().prediction == "v"
    bad = _copy_with_diffusion(tmp_path, "forget_0", prediction="score")
    with pytest.raises(checkpoint.CheckpointError, match="diffusion.prediction='score'"):
        checkpoint.load_diffusion_model(bad)


def test_class_removal_takes_the_chain_from_the_cards(tmp_path):
    config = mnist.get_config()
    np.testing.assert_array_equal(np.asarray(inputs.training_chain(config).betas),
                                  np.asarray(dj.linear_schedule(1000).betas))
    with config.unlocked():
        config.T = 500
    with pytest.raises(ValueError, match="T = 1000"):
        inputs.training_chain(config)
    config = mnist.get_config()
    with config.unlocked():
        config.uncond = _copy_with_diffusion(tmp_path, "ddpm", schedule="cosine")
    with pytest.raises(ValueError, match="different noise schedules"):
        inputs.training_chain(config)
