"""Renamed public names: the old spellings still work (with a DeprecationWarning naming the new one), and a
run recorded with the old spellings is the same run as one recorded with the new ones."""

import json
import os

import numpy as np
import pytest

import dngjax as dj

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNS = os.path.join(ROOT, "docs", "runs")


def test_schedule_and_step_read_beta_tilde_under_the_old_names():
    s = dj.respace(dj.linear_schedule(), 10)
    with pytest.warns(DeprecationWarning, match="Schedule.beta_tildes"):
        old = s.posterior_variances
    np.testing.assert_array_equal(old, s.beta_tildes)
    with pytest.warns(DeprecationWarning, match="beta_tildes"):
        replaced = s.replace(posterior_variances=s.betas)
    np.testing.assert_array_equal(replaced.beta_tildes, s.betas)
    step = dj.chain_steps(s, "beta_tilde")
    with pytest.warns(DeprecationWarning, match="Step.beta_tilde"):
        np.testing.assert_array_equal(step.posterior_variance, step.beta_tilde)


def test_the_variance_value_posterior_is_beta_tilde():
    s = dj.respace(dj.linear_schedule(), 10)
    with pytest.warns(DeprecationWarning, match="'beta_tilde'"):
        old = dj.chain_steps(s, "posterior")
    new = dj.chain_steps(s, "beta_tilde")
    np.testing.assert_array_equal(old.noise_variance, new.noise_variance)
    with pytest.warns(DeprecationWarning, match="update_variance"):
        rule = dj.DynamicNegativeGuidance(variance="posterior")
    assert rule == dj.DynamicNegativeGuidance(update_variance="beta_tilde") == dj.DynamicNegativeGuidance()
    with pytest.warns(DeprecationWarning, match="DynamicNegativeGuidance.update_variance"):
        assert rule.variance == "beta_tilde"


def test_sample_with_the_old_noise_value_equals_the_new():
    s = dj.respace(dj.linear_schedule(), 5)
    eps = lambda x, t: 0.1 * x
    keys = dj.keys_from_seeds(np.arange(3))
    with pytest.warns(DeprecationWarning):
        old = dj.sample(eps, s, keys, (2,), noise="posterior")
    np.testing.assert_array_equal(old, dj.sample(eps, s, keys, (2,), noise="beta_tilde"))


def test_an_old_spelling_run_record_is_the_same_run_as_the_new_spelling():
    """An archived config.json (``noise: "posterior"``, ``dng.variance``) has the identity of today's spelling
    (``noise: "beta_tilde"``, ``dng.update_variance``): its points are reused, nothing is named a difference."""
    from dngjax.tools.sample import run_store
    old = json.load(open(os.path.join(RUNS, "protocol_cpu", "class_0", "config.json")))
    assert old["noise"] == "posterior" and old["dng"]["variance"] == "posterior"
    new = json.loads(json.dumps(old))
    new["noise"] = "beta_tilde"
    new["dng"]["update_variance"] = new["dng"].pop("variance").replace("posterior", "beta_tilde")
    assert run_store.identity(old) == run_store.identity(new)
    assert run_store.differences(old, new) == [] and run_store.differences(new, old) == []
    assert old["noise"] == "posterior" and "variance" in old["dng"]            # the record itself is untouched
    new["dng"]["update_variance"] = "beta"
    assert run_store.differences(old, new) == ['dng.update_variance: "beta_tilde" -> "beta"']


def test_old_spelling_method_variant_builds_the_beta_tilde_rule():
    from dngjax.tools.sample import methods
    from dngjax.tools.sample.configs import common
    c = common.base_config()
    old, h_old = methods.build_rule("DNG:posterior", c)
    new, h_new = methods.build_rule("DNG:beta_tilde", c)
    assert old == new and h_old == h_new and h_new["update_variance"] == "beta_tilde"


def test_training_num_steps_is_num_train_steps():
    """The training config's length is ``num_train_steps`` (``num_steps`` is a chain's length): an old config
    and ``--config.num_steps`` on the training command line still set it."""
    import ml_collections
    from dngjax.tools.train import main, trainer
    from dngjax.tools.train.configs import mnist_ddpm
    assert main.renamed_flags(["train", "--config.num_steps=5", "--config.seed=1"]) == [
        "train", "--config.num_train_steps=5", "--config.seed=1"]
    c = mnist_ddpm.get_config("tiny")
    old = ml_collections.ConfigDict({k: v for k, v in c.items() if k != "num_train_steps"})
    old.num_steps = 7
    with pytest.warns(DeprecationWarning, match="config.num_train_steps"):
        trainer.validate_config(old)
    assert old.num_train_steps == 7 and "num_steps" not in old


def test_a_card_says_model_type_and_older_cards_kind():
    """A card's ``model_type`` is what the model is for; ``arch["kind"]`` its network. Shipped cards (written before
    the name) say ``kind`` and read the same."""
    from dngjax import checkpoint
    root = os.path.join(ROOT, "checkpoints", "mnist")
    old = checkpoint.load_card(os.path.join(root, "ddpm"))
    assert "model_type" not in old and checkpoint.model_type(old) == "ddpm" and old["arch"]["kind"] == "unet"
    assert checkpoint.model_type(checkpoint.load_card(os.path.join(root, "classifier"))) == "classifier"
    assert checkpoint.model_type({"model_type": "ddpm", "arch": {"kind": "unet"}}) == "ddpm"


def test_the_gmm_lab_names_the_negative_concept():
    """The lab's negative concept: ``NegativeSplit`` with ``negative``, ``negative_weight``, ``denoiser_neg``...;
    the older ``ForgetSplit`` and ``forget*`` names still work."""
    from dngjax import gmm
    sched = dj.linear_schedule(50)
    new = gmm.NegativeSplit(*gmm.toy_1d(), sched)
    with pytest.warns(DeprecationWarning, match="NegativeSplit"):
        old = gmm.ForgetSplit(*gmm.toy_1d(), sched)
    assert isinstance(old, gmm.NegativeSplit) and old.posterior_fn == new.posterior_fn
    for name, now in (("forget", "negative"), ("forget_weight", "negative_weight"), ("forget_mixture", "negative_mixture"),
                      ("denoiser_forget", "denoiser_neg")):
        with pytest.warns(DeprecationWarning, match=f"NegativeSplit.{now}"):
            assert getattr(new, name) is getattr(new, now)
    x = np.array([[-3.0], [0.0], [3.0]])
    with pytest.warns(DeprecationWarning):
        np.testing.assert_array_equal(new.in_forget(x), new.in_negative(x))
    with pytest.warns(DeprecationWarning):
        assert gmm.ExactForgetPosterior(new.full, new.negative, sched) == new.posterior_fn
