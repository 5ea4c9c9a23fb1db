"""dngjax.sd_scheduler: a diffusers scheduler config -> the sampler's chain, step by step against diffusers.

No network: a fake model (random outputs, fixed per step) drives diffusers' ``scheduler.step`` and the
sampler's step coefficients (``chain_steps``) side by side, with the same step noise (the noise diffusers
draws from ``torch.Generator().manual_seed(i)``), for every supported class, spacing, prediction type and
the options SD folders use (steps_offset, set_alpha_to_one, zero terminal SNR, DDPM's variances, DDIM's eta).
"""

import dataclasses
import inspect
import math

import numpy as np
import pytest
import jax.numpy as jnp

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from dngjax.denoiser import to_eps  # noqa: E402
from dngjax.sampler import chain_steps  # noqa: E402
from dngjax.sd_scheduler import SCHEDULER_DEFAULTS, scheduler_chain  # noqa: E402

SD_BETAS = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
CLASSES = ("DDIMScheduler", "DDPMScheduler", "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler",
           "DPMSolverMultistepScheduler")


def test_every_scheduler_key_of_diffusers_is_known():
    """SCHEDULER_DEFAULTS holds exactly diffusers' __init__ parameters and defaults: a new key fails here."""
    for name, table in SCHEDULER_DEFAULTS.items():
        sig = inspect.signature(getattr(diffusers, name).__init__)
        params = {k: p.default for k, p in sig.parameters.items() if k != "self"}
        assert set(params) == set(table), (name, set(params) ^ set(table))
        for k, default in params.items():
            assert table[k] == default or (isinstance(default, float) and math.isnan(default)), (name, k)


def _run(name, steps, eta=None, **options):
    """Max relative difference of x after each step (and of the model input) between diffusers' step and
    the chain's coefficients, over one fake trajectory of (1, 4, 3, 3) samples."""
    sched = getattr(diffusers, name)(**SD_BETAS, **options)
    cfg = dict(sched.config, _class_name=name)
    chain = scheduler_chain(cfg, steps, eta=eta)
    sched.set_timesteps(steps)
    np.testing.assert_array_equal(np.asarray(chain.schedule.timesteps)[::-1], sched.timesteps.numpy())
    sampler_eta = {"euler": 0.0, "euler_ancestral": 1.0, "ddim": chain.eta}.get(chain.solver)
    st = chain_steps(chain.schedule, chain.noise, sampler_eta, "dpmpp_2m" if chain.solver == "dpmpp_2m" else None)
    st = {f.name: np.asarray(getattr(st, f.name))[::-1] for f in dataclasses.fields(st)}     # noisiest first
    pred = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}[cfg["prediction_type"]]
    rng = np.random.default_rng(0)
    shape = (1, 4, 3, 3)
    x = rng.standard_normal(shape).astype(np.float32)
    ref = torch.from_numpy(x * float(sched.init_noise_sigma))
    ours, x0_prev, err = x * chain.x_T_scale, np.zeros(shape, np.float32), 0.0
    for i, t in enumerate(sched.timesteps):
        err = max(err, np.abs(sched.scale_model_input(ref, t).numpy() - ours).max())   # the UNet's input
        m = rng.standard_normal(shape).astype(np.float32)
        z = torch.randn(shape, generator=torch.Generator().manual_seed(i)).numpy()
        kw = {} if eta is None else {"eta": eta}
        ref = sched.step(torch.from_numpy(m), t, ref, generator=torch.Generator().manual_seed(i), **kw).prev_sample
        eps = np.asarray(to_eps(jnp.asarray(m), jnp.asarray(ours), pred, st["alpha_bar"][i],
                                st["one_minus_alpha_bar"][i]))
        new = (st["mean_x"][i] * ours + st["mean_eps"][i] * eps + st["mean_x0_prev"][i] * x0_prev
               + np.sqrt(st["noise_variance"][i]) * z)
        x0_prev = (ours - np.sqrt(st["one_minus_alpha_bar"][i]) * eps) / np.sqrt(st["alpha_bar"][i])
        ours = new
        r = ref.numpy()
        if name.startswith("Euler"):                               # sigma-space -> x-space
            r = r / np.sqrt(1.0 + sched.sigmas[i + 1].item() ** 2)
        err = max(err, np.abs(r - ours).max() / np.abs(r).max())
    return err


@pytest.mark.parametrize("name", CLASSES)
def test_chain_steps_as_diffusers_for_every_spacing_and_prediction(name):
    pixel = dict(clip_sample=False) if name in ("DDIMScheduler", "DDPMScheduler") else {}
    for spacing in ("leading", "trailing", "linspace"):
        for prediction in ("epsilon", "v_prediction", "sample") if name == "DDIMScheduler" else ("epsilon", "v_prediction"):
            extra = dict(pixel, steps_offset=1 if spacing == "leading" else 0)
            if name == "DDIMScheduler":
                extra["set_alpha_to_one"] = spacing != "trailing"
            # 5 steps: "linspace" is fractional for Euler (999 / 4) and off diffusers' DDIM step t - T // 5
            err = _run(name, 5, timestep_spacing=spacing, prediction_type=prediction, **extra)
            assert err < 5e-5, (name, spacing, prediction, err)


def test_options_sd_folders_use():
    # DDIM with eta (leading: the last step ends at alpha_bar = 1, no noise there in either), DDPM's fixed_large
    assert _run("DDIMScheduler", 6, eta=0.7, clip_sample=False, steps_offset=1) < 5e-5
    assert _run("DDPMScheduler", 6, clip_sample=False, variance_type="fixed_large") < 5e-5
    # DPM-Solver++ with lower_order_final off and euler_at_final on: still first order at the end (sigma = 0)
    assert _run("DPMSolverMultistepScheduler", 20, lower_order_final=False) < 5e-5
    assert _run("DPMSolverMultistepScheduler", 6, euler_at_final=True, timestep_spacing="leading") < 5e-5


def test_zero_terminal_snr():
    """rescale_betas_zero_snr: alpha_bar(T - 1) is 2**-24 in the chain (Euler / DPM-Solver++ as diffusers; DDIM
    and DDPM step from exactly 0 there: the first step differs by ~sqrt(alpha_bar / alpha_bar_prev))."""
    v = dict(prediction_type="v_prediction", rescale_betas_zero_snr=True, timestep_spacing="trailing")
    chain = scheduler_chain(dict(_class_name="DDIMScheduler", **SD_BETAS, clip_sample=False, **v), 5)
    assert int(chain.schedule.timesteps[-1]) == 999 and float(chain.schedule.alpha_bars[-1]) == 2.0 ** -24
    assert _run("EulerDiscreteScheduler", 5, **v) < 1e-3             # float32 rounding at sigma = 4096
    assert _run("DPMSolverMultistepScheduler", 5, **v) < 1e-3
    assert _run("DDIMScheduler", 5, clip_sample=False, **v) < 1e-3
    assert _run("DDPMScheduler", 5, clip_sample=False, **v) < 1e-2
    with pytest.raises(ValueError, match="rescale_betas_zero_snr=True with prediction_type='epsilon'"):
        scheduler_chain(dict(_class_name="DDIMScheduler", **SD_BETAS, clip_sample=False,
                             rescale_betas_zero_snr=True), 5)


def test_solver_override_is_from_config():
    """solver= builds that class from the folder's config: the keys it takes, its defaults for the others."""
    pndm = dict(_class_name="PNDMScheduler", **SD_BETAS, set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1,
                clip_sample=False, timestep_spacing="leading")             # SD 1.5's config
    with pytest.raises(ValueError, match="PNDMScheduler \\(PLMS\\), which is not implemented: pass solver="):
        scheduler_chain(pndm, 10)
    ddim = scheduler_chain(pndm, 10, solver="ddim")
    ref = diffusers.DDIMScheduler.from_config(pndm)
    ref.set_timesteps(10)
    np.testing.assert_array_equal(np.asarray(ddim.schedule.timesteps)[::-1], ref.timesteps.numpy())
    assert ddim.scheduler == "DDIMScheduler" and ddim.eta == 0.0 and not ddim.config["set_alpha_to_one"]
    np.testing.assert_allclose(float(ddim.schedule.alpha_bars_prev[0]), ref.final_alpha_cumprod.item(), rtol=1e-6)
    euler = scheduler_chain(pndm, 10, solver="euler")
    assert euler.config["timestep_spacing"] == "leading" and euler.x_T_scale == 1.0 and euler.eta is None
    ref = diffusers.EulerDiscreteScheduler.from_config(pndm)
    ref.set_timesteps(10)
    np.testing.assert_array_equal(np.asarray(euler.schedule.timesteps)[::-1], ref.timesteps.numpy())
    dpm = scheduler_chain(pndm, 10, solver="dpmpp_2m")
    assert dpm.solver == "dpmpp_2m" and dpm.noise == "beta"
    ddpm = scheduler_chain(dict(pndm, variance_type="fixed_large"), 10, solver="ddpm")
    assert ddpm.solver == "ddpm" and ddpm.noise == "beta" and ddpm.eta is None


@pytest.mark.parametrize("cfg, match", [
    (dict(_class_name="DDIMScheduler"), "clip_sample=True"),
    (dict(_class_name="DDIMScheduler", clip_sample=False, thresholding=True), "thresholding=True"),
    (dict(_class_name="EulerDiscreteScheduler", use_karras_sigmas=True), "use_karras_sigmas=True"),
    (dict(_class_name="EulerDiscreteScheduler", final_sigmas_type="sigma_min"), "final_sigmas_type='sigma_min'"),
    (dict(_class_name="EulerDiscreteScheduler", interpolation_type="log_linear"), "interpolation_type='log_linear'"),
    (dict(_class_name="DPMSolverMultistepScheduler", solver_order=3), "solver_order=3"),
    (dict(_class_name="DPMSolverMultistepScheduler", algorithm_type="sde-dpmsolver++"), "algorithm_type='sde-dpmsolver"),
    (dict(_class_name="DPMSolverMultistepScheduler", solver_type="heun"), "solver_type='heun'"),
    (dict(_class_name="DPMSolverMultistepScheduler", use_lu_lambdas=True), "use_lu_lambdas=True"),
    (dict(_class_name="DDPMScheduler", clip_sample=False, variance_type="learned_range"), "variance_type='learned_range'"),
    (dict(_class_name="DDPMScheduler", clip_sample=False, beta_schedule="squaredcos_cap_v2"), "beta_schedule='squaredcos"),
    (dict(_class_name="LMSDiscreteScheduler"), "'LMSDiscreteScheduler' is not supported"),
])
def test_refusals_name_the_option(cfg, match):
    with pytest.raises(ValueError, match=match):
        scheduler_chain(dict(SD_BETAS, **cfg), 10)


def test_eta_only_for_ddim():
    cfg = dict(_class_name="EulerDiscreteScheduler", **SD_BETAS, clip_sample=False)   # (a DDIM key)
    with pytest.raises(ValueError, match="EulerDiscreteScheduler has no eta"):
        scheduler_chain(cfg, 10, eta=0.5)
    assert scheduler_chain(cfg, 10, solver="ddim", eta=0.5).eta == 0.5
    with pytest.raises(ValueError, match="eta must lie in"):
        scheduler_chain(cfg, 10, solver="ddim", eta=2.0)
    with pytest.raises(ValueError, match="solver must be one of"):
        scheduler_chain(cfg, 10, solver="plms")


# ----------------------------------------------------------------------------- the one reader of a config's training


def test_every_prediction_type_of_the_denoiser_is_read():
    """diffusers' prediction types map onto every prediction the Denoiser takes; others are refused by name."""
    from dngjax.denoiser import PREDICTIONS as DENOISER_PREDICTIONS
    from dngjax.sd_scheduler import PREDICTIONS, card_diffusion, parse_training, training_schedule
    assert sorted(PREDICTIONS.values()) == sorted(DENOISER_PREDICTIONS)
    for diffusers_name, ours in PREDICTIONS.items():
        cfg = dict(SD_BETAS, prediction_type=diffusers_name)
        assert parse_training(cfg).prediction == ours
        assert training_schedule(cfg)[1] == ours
        assert card_diffusion(cfg)["prediction"] == ours
    for reader in (parse_training, training_schedule, card_diffusion):
        with pytest.raises(ValueError, match="prediction_type='flow_prediction' is not supported"):
            reader({"prediction_type": "flow_prediction"})


def test_training_schedule_and_card_agree_with_the_model_card_reader():
    """sd.load's training chain (alpha_bars as diffusers computes them), the converter's card entry and
    checkpoint.schedule_of (the card's chain) give the same schedule for a config both can say."""
    from dngjax import checkpoint
    from dngjax.schedules import scaled_linear_schedule, linear_schedule
    from dngjax.sd_scheduler import beta_schedule, card_diffusion, parse_training, training_schedule
    assert parse_training({}) == parse_training({"beta_schedule": "linear", "num_train_timesteps": 1000})
    for cfg, ref in ((SD_BETAS, scaled_linear_schedule()), ({}, linear_schedule())):
        schedule, _ = training_schedule(cfg)
        card_schedule = checkpoint.schedule_of({"diffusion": card_diffusion(cfg)})
        for field in ("betas", "alpha_bars", "one_minus_alpha_bars", "beta_tildes"):
            np.testing.assert_array_equal(getattr(schedule, field), getattr(ref, field), err_msg=field)
            np.testing.assert_array_equal(getattr(card_schedule, field), getattr(ref, field), err_msg=field)
    np.testing.assert_array_equal(beta_schedule("squaredcos_cap_v2", 50).betas, beta_schedule("cosine", 50).betas)
    with pytest.raises(KeyError):
        beta_schedule("sigmoid")


@pytest.mark.parametrize("cfg,match", [
    ({"beta_schedule": "sigmoid"}, "beta_schedule='sigmoid' is not supported"),
    ({"trained_betas": [0.01] * 1000}, "trained_betas"),
    ({"prediction_type": "v_prediction", "rescale_betas_zero_snr": True}, "rescale_betas_zero_snr"),
    ({"rescale_betas_zero_snr": True}, "zero terminal SNR needs 'v_prediction'"),
])
def test_card_refuses_what_a_card_cannot_say(cfg, match):
    from dngjax.sd_scheduler import card_diffusion
    with pytest.raises(ValueError, match=match):
        card_diffusion(cfg)
