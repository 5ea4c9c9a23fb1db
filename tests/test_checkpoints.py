"""dngjax.checkpoint: round trips, clear errors, and the shipped MNIST checkpoints (load + a few DNG steps)."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dngjax import checkpoint
from dngjax.models.classifier import Classifier
from dngjax.models.unet import UNet

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIPPED = os.path.join(REPO, "checkpoints", "mnist")
FORGET_CLASSES = (0, 1, 2, 3)


def _tiny_unet():
    return UNet(ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), dropout=0.0, groups=4)


def _random_params(module, *init_args, seed=0):
    """Random params of the init's shapes: eval_shape traces without compiling; a real init (eager or
    jitted) spends 30-60 s compiling on 2 cores, and a round trip needs no particular values."""
    shapes = jax.eval_shape(module.init, jax.random.PRNGKey(0), *init_args)
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(lambda a: jnp.asarray(0.1 * rng.standard_normal(a.shape), a.dtype), shapes)


def _saved_unet(tmp_path, name="m"):
    m = _tiny_unet()
    p = _random_params(m, jnp.zeros((1, 28, 28, 1)), jnp.zeros((1,), jnp.int32))
    path = str(tmp_path / name)
    checkpoint.save_model(path, m, p, {"dataset": "mnist", "kind": "ddpm", "steps": 3})
    return m, p, path


def test_unet_round_trip(tmp_path):
    m, p, path = _saved_unet(tmp_path)
    m2, p2, card = checkpoint.load_model(path)
    assert m2 == m and card["steps"] == 3 and card["num_params"] == checkpoint.num_params(p)
    for a, b in zip(jax.tree_util.tree_leaves(p), jax.tree_util.tree_leaves(p2)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    eps = checkpoint.load_denoiser(path)
    x = jnp.ones((2, 28, 28, 1))
    np.testing.assert_allclose(eps(x, jnp.array([5, 5])), m.apply(p, x, jnp.array([5, 5])), rtol=1e-6)
    # card.json path works too
    checkpoint.load_model(os.path.join(path, "card.json"))


def test_card_diffusion_gives_prediction_type_and_schedule(tmp_path):
    """A v-predicting model on Stable Diffusion's schedule (as the diffusers converter writes its card)."""
    import dngjax as dj
    m = _tiny_unet()
    p = _random_params(m, jnp.zeros((1, 28, 28, 1)), jnp.zeros((1,), jnp.int32))
    diffusion = {"num_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "schedule": "scaled_linear",
                 "prediction": "v"}
    path = str(tmp_path / "v")
    checkpoint.save_model(path, m, p, {"dataset": "mnist", "kind": "ddpm", "diffusion": diffusion})
    assert checkpoint.load_denoiser(path).prediction == "v"
    card = checkpoint.load_card(path)
    np.testing.assert_array_equal(checkpoint.schedule_of(card).betas, dj.scaled_linear_schedule().betas)
    np.testing.assert_array_equal(checkpoint.schedule_of({}).betas, dj.linear_schedule().betas)
    np.testing.assert_array_equal(checkpoint.schedule_of({"diffusion": {"schedule": "squaredcos_cap_v2"}}).betas,
                                  dj.cosine_schedule().betas)
    with pytest.raises(checkpoint.CheckpointError, match="supported are"):
        checkpoint.schedule_of({"diffusion": {"schedule": "sigmoid"}})
    bad = str(tmp_path / "bad")
    checkpoint.save_model(bad, m, p, {"dataset": "mnist", "kind": "ddpm", "diffusion": dict(diffusion, prediction="score")})
    with pytest.raises(checkpoint.CheckpointError, match="prediction"):
        checkpoint.load_denoiser(bad)


def test_classifier_round_trip(tmp_path):
    m = Classifier(widths=(4, 8), feature_dim=16)
    p = _random_params(m, jnp.zeros((1, 28, 28, 1)), seed=1)
    checkpoint.save_model(str(tmp_path / "c"), m, p, {"dataset": "mnist", "kind": "classifier"})
    m2, p2, _ = checkpoint.load_classifier(str(tmp_path / "c"))
    x = jnp.zeros((3, 28, 28, 1))
    np.testing.assert_allclose(m2.apply(p2, x), m.apply(p, x))
    assert m2.apply(p2, x, method="features").shape == (3, 16)
    with pytest.raises(checkpoint.CheckpointError, match="expected a unet"):
        checkpoint.load_denoiser(str(tmp_path / "c"))


def test_missing(tmp_path):
    with pytest.raises(checkpoint.CheckpointError, match="does not exist"):
        checkpoint.load_model(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(checkpoint.CheckpointError, match="no card.json"):
        checkpoint.load_model(str(tmp_path / "empty"))
    _, _, path = _saved_unet(tmp_path)
    os.remove(os.path.join(path, "params.msgpack"))
    with pytest.raises(checkpoint.CheckpointError, match="parameter file missing"):
        checkpoint.load_model(path)


def test_corrupt_params_and_card(tmp_path):
    _, _, path = _saved_unet(tmp_path)
    f = os.path.join(path, "params.msgpack")
    data = open(f, "rb").read()
    open(f, "wb").write(data[: len(data) // 2])  # truncated, e.g. a killed copy
    with pytest.raises(checkpoint.CheckpointError, match="corrupt checkpoint"):
        checkpoint.load_model(path)
    # without a checksum the decoder catches it
    card = json.load(open(os.path.join(path, "card.json")))
    card.pop("params_sha256")
    json.dump(card, open(os.path.join(path, "card.json"), "w"))
    with pytest.raises(checkpoint.CheckpointError, match="corrupt checkpoint"):
        checkpoint.load_model(path)
    open(os.path.join(path, "card.json"), "w").write("{not json")
    with pytest.raises(checkpoint.CheckpointError, match="corrupt model card"):
        checkpoint.load_model(path)


def test_architecture_mismatch(tmp_path):
    _, _, path = _saved_unet(tmp_path)
    cpath = os.path.join(path, "card.json")
    card = json.load(open(cpath))
    card["arch"]["kwargs"]["ch"] = 16
    json.dump(card, open(cpath, "w"))
    with pytest.raises(checkpoint.CheckpointError, match="architecture mismatch"):
        checkpoint.load_model(path)
    card["arch"]["kwargs"]["ch"] = 8
    card["arch"]["kwargs"]["ch_mult"] = [1, 2, 2]
    json.dump(card, open(cpath, "w"))
    with pytest.raises(checkpoint.CheckpointError, match="architecture mismatch"):
        checkpoint.load_model(path)
    card["arch"] = {"kind": "transformer", "kwargs": {}}
    json.dump(card, open(cpath, "w"))
    with pytest.raises(checkpoint.CheckpointError, match="unknown architecture"):
        checkpoint.load_model(path)


def test_reference_stats_errors(tmp_path):
    with pytest.raises(checkpoint.CheckpointError, match="not found"):
        checkpoint.load_reference_stats(str(tmp_path / "x.npz"))
    np.savez(tmp_path / "r.npz", mu=np.zeros(3), sigma=np.eye(3))
    mu, sigma = checkpoint.load_reference_stats(str(tmp_path / "r.npz"))
    assert mu.shape == (3,) and sigma.shape == (3, 3)


# --------------------------------------------------------------------------- shipped checkpoints

needs_shipped = pytest.mark.skipif(not os.path.isfile(os.path.join(SHIPPED, "ddpm", "card.json")),
                                   reason="shipped MNIST checkpoints not present")


@needs_shipped
def test_shipped_checkpoints_load_and_cards_report_quality():
    cmod, cparams, ccard = checkpoint.load_classifier(os.path.join(SHIPPED, "classifier"))
    assert ccard["test_accuracy"] >= 0.99
    x = jnp.zeros((2, 28, 28, 1))
    feats = cmod.apply(cparams, x, method="features")
    for name in ["ddpm"] + [f"forget_{c}" for c in FORGET_CLASSES]:
        m, p, card = checkpoint.load_model(os.path.join(SHIPPED, name), expect_kind="unet")
        assert card["dataset"] == "mnist" and "hardware" in card and "wall_time_s" in card
        assert "quality" in card, name
    for c in FORGET_CLASSES:
        assert checkpoint.load_card(os.path.join(SHIPPED, f"forget_{c}"))["only_class"] == c
        mu, sigma = checkpoint.load_reference_stats(os.path.join(SHIPPED, "reference_stats", f"train_without_{c}.npz"))
        assert mu.shape == (feats.shape[1],) and sigma.shape == (feats.shape[1],) * 2
        assert np.all(np.isfinite(sigma)) and np.allclose(sigma, sigma.T)
    total = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(SHIPPED) for f in fs)
    assert total < 60e6


@needs_shipped
def test_a_few_dng_steps_on_shipped_models():
    from dngjax.guidance import DynamicNegativeGuidance
    from dngjax.sampler import keys_from_seeds, sample
    from dngjax.schedules import linear_schedule, respace

    eps_u = checkpoint.load_denoiser(os.path.join(SHIPPED, "ddpm"))
    eps_c = checkpoint.load_denoiser(os.path.join(SHIPPED, "forget_0"))
    x = sample(eps_u, respace(linear_schedule(), 4), keys_from_seeds(np.arange(2)), (28, 28, 1),
               rule=DynamicNegativeGuidance(scale=1.0, prior=0.25), denoiser_c=eps_c)
    assert x.shape == (2, 28, 28, 1) and np.all(np.isfinite(np.asarray(x)))


@pytest.mark.skipif(not os.path.isfile(os.path.join(SHIPPED, "cond", "card.json")),
                    reason="shipped class-conditional MNIST model not present")
def test_shipped_class_conditional_model_null_label_each_label_and_guided_steps():
    """One network gives eps(x) (null label) and eps(x | c) for every digit, and DNG runs with
    eps_u = eps(x | null), eps_neg = eps(x | c-)."""
    from dngjax.guidance import DynamicNegativeGuidance
    from dngjax.sampler import keys_from_seeds, sample
    from dngjax.schedules import linear_schedule, respace

    path = os.path.join(SHIPPED, "cond")
    module, params, card = checkpoint.load_model(path, expect_kind="unet")
    assert module.num_classes == 10 and card["config"]["label_dropout"] > 0 and "quality" in card
    x = jax.random.normal(jax.random.key(0), (2, 28, 28, 1))
    t = jnp.array([300, 300])
    null = np.asarray(checkpoint.load_denoiser(path)(x, t))
    np.testing.assert_allclose(null, np.asarray(checkpoint.load_denoiser(path, label=10)(x, t)), rtol=1e-5,
                               atol=1e-6)
    outs = [np.asarray(checkpoint.load_denoiser(path, label=c)(x, t)) for c in range(10)]
    for c, out in enumerate(outs):
        assert out.shape == x.shape and np.all(np.isfinite(out))
        assert not np.allclose(out, null, atol=1e-4), f"label {c} gives the null label's prediction"
    x0 = sample(checkpoint.load_denoiser(path), respace(linear_schedule(), 4), keys_from_seeds(np.arange(2)),
                (28, 28, 1), rule=DynamicNegativeGuidance(scale=1.0, prior=0.25),
                denoiser_c=checkpoint.load_denoiser(path, label=2))
    assert x0.shape == (2, 28, 28, 1) and np.all(np.isfinite(np.asarray(x0)))
