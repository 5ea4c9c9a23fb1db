"""Whole generations against diffusers' StableDiffusionPipeline on the tiny random SD folders.

The same starting latents, the folder's scheduler config switched as a user does
(``XScheduler.from_config(pipe.scheduler.config, timestep_spacing=...)``), classifier-free guidance 3
toward the prompt: diffusers' latents after 5 steps against ``sd.generate`` (``sd.chain``'s chain), for
each timestep spacing, eps and v prediction, DDIM (eta 0), DPM-Solver++(2M) and Euler; the decoded
uint8 images within 1 / 255.
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")

import dngjax as dj  # noqa: E402
from dngjax import stable_diffusion as sd  # noqa: E402
from tests.sd_tiny import make_folder  # noqa: E402

PROMPT, STEPS, CFG = "a cat", 5, 3.0
SCHEDULERS = {"DDIMScheduler": dict(set_alpha_to_one=False), "DPMSolverMultistepScheduler": {},
              "EulerDiscreteScheduler": {}}


ALL = [(name, spacing) for name in SCHEDULERS for spacing in ("leading", "trailing", "linspace")]
# every scheduler and every spacing once (a Latin square of ALL); the slow test runs all nine
EACH_ONCE = [("DDIMScheduler", "leading"), ("DPMSolverMultistepScheduler", "trailing"),
             ("EulerDiscreteScheduler", "linspace")]


def _compare(folder, prediction, cases, zero_snr=False):
    """{(class, spacing): max |ours - diffusers| / max |diffusers|} of the latents; checks the images of the
    first case within 1 / 255."""
    torch_pipe = make_folder(folder, prediction=prediction)
    base = dict(torch_pipe.scheduler.config)
    torch_pipe.set_progress_bar_config(disable=True)
    latents = np.random.default_rng(0).standard_normal((2, 4, 8, 8)).astype(np.float32)     # NCHW, as diffusers
    worst = {}
    for k, (name, spacing) in enumerate(cases):
        sched = getattr(diffusers, name).from_config(base, timestep_spacing=spacing, rescale_betas_zero_snr=zero_snr,
                                                     steps_offset=1 if spacing == "leading" else 0, **SCHEDULERS[name])
        torch_pipe.scheduler = sched
        with torch.no_grad():
            ref = torch_pipe([PROMPT] * 2, latents=torch.from_numpy(latents), num_inference_steps=STEPS,
                             guidance_scale=CFG, output_type="latent").images.numpy().transpose(0, 2, 3, 1)
        # the folder as saved with this scheduler, loaded back: the config decides the chain
        sched.save_pretrained(str(folder / "scheduler"))
        pipe = sd.load(str(folder))
        chain = sd.chain(pipe, STEPS)
        assert chain.scheduler == name
        # sd.generate, as a user calls it: the folder's scheduler, diffusers' latents (NHWC)
        _, out = sd.generate(pipe, PROMPT, None, [0, 1], rule=dj.ClassifierFreeGuidance(scale=CFG), steps=STEPS,
                             x_T=latents.transpose(0, 2, 3, 1), return_latents=True)
        out = np.asarray(out)[0]
        worst[name, spacing] = float(np.abs(out - ref).max() / np.abs(ref).max())
        if k == 0:                                                  # the uint8 images, once
            with torch.no_grad():
                img = torch_pipe.vae.decode(torch.from_numpy(ref.transpose(0, 3, 1, 2)) / pipe.scaling_factor).sample
            img = np.clip(np.round((img.numpy().transpose(0, 2, 3, 1) + 1) * 127.5), 0, 255).astype(int)
            assert np.abs(sd.decode(pipe, out).astype(int) - img).max() <= 1
    print(prediction, {f"{k[0][:5]}/{k[1]}": f"{v:.1e}" for k, v in worst.items()})
    return worst


def test_eps_generation_matches_diffusers_pipeline(tmp_path):
    """DDIM (eta 0, set_alpha_to_one=False), DPM-Solver++(2M), Euler, each with one of leading / trailing /
    linspace (each step of every combination: tests/test_sd_scheduler.py)."""
    worst = _compare(tmp_path / "sd", "epsilon", EACH_ONCE)
    assert max(worst.values()) < 2e-5, worst


@pytest.mark.slow
def test_eps_generation_matches_diffusers_pipeline_for_every_scheduler_and_spacing(tmp_path):
    worst = _compare(tmp_path / "sd", "epsilon", ALL)
    assert max(worst.values()) < 2e-5, worst


def test_v_generation_with_zero_terminal_snr_matches_diffusers_pipeline(tmp_path):
    """SD 2.1's kind of config with a zero-terminal-SNR fine-tune: v prediction, DDIM, trailing spacing (from
    t = 999, where alpha_bar is 0 in diffusers and 2**-24 here: see dngjax.sd_scheduler)."""
    worst = _compare(tmp_path / "sd", "v_prediction", [("DDIMScheduler", "trailing")], zero_snr=True)
    assert max(worst.values()) < 2e-3, worst


@pytest.mark.slow
def test_v_generation_matches_diffusers_pipeline(tmp_path):
    worst = _compare(tmp_path / "sd", "v_prediction", ALL)
    assert max(worst.values()) < 2e-5, worst


def test_no_guidance_generation_matches_diffusers_pipeline(tmp_path):
    """guidance_scale = 1 in diffusers (no classifier-free guidance: the prompt's prediction alone) is
    dj.NoGuidance() in sd.generate; DDIM with the folder's leading spacing, 5 steps, same latents."""
    torch_pipe = make_folder(tmp_path / "sd")
    torch_pipe.scheduler = diffusers.DDIMScheduler.from_config(dict(torch_pipe.scheduler.config), steps_offset=1,
                                                               set_alpha_to_one=False)
    torch_pipe.scheduler.save_pretrained(str(tmp_path / "sd" / "scheduler"))
    torch_pipe.set_progress_bar_config(disable=True)
    latents = np.random.default_rng(1).standard_normal((2, 4, 8, 8)).astype(np.float32)
    with torch.no_grad():
        ref = torch_pipe([PROMPT] * 2, latents=torch.from_numpy(latents), num_inference_steps=STEPS,
                         guidance_scale=1.0, output_type="latent").images.numpy().transpose(0, 2, 3, 1)
    pipe = sd.load(str(tmp_path / "sd"))
    _, out = sd.generate(pipe, PROMPT, None, [0, 1], rule=dj.NoGuidance(), steps=STEPS,
                         x_T=latents.transpose(0, 2, 3, 1), return_latents=True)
    err = float(np.abs(np.asarray(out)[0] - ref).max() / np.abs(ref).max())
    assert err < 2e-5, err
    _, cfg = sd.generate(pipe, PROMPT, None, [0, 1], rule=dj.ClassifierFreeGuidance(scale=3.0), steps=STEPS,
                         x_T=latents.transpose(0, 2, 3, 1), return_latents=True)
    assert float(np.abs(np.asarray(cfg)[0] - ref).max() / np.abs(ref).max()) > 1e-3      # guidance does differ
