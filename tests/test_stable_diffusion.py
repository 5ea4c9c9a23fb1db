"""The text-to-image pipeline (dngjax.stable_diffusion) on a tiny random SD folder, against PyTorch.

The reference runs diffusers' / transformers' modules of the same folder and the paper's equations in
numpy: two steps of the positive-mode DNG chain (three predictions per step, the posterior update after
the first step), with the schedule from diffusers' DDPMScheduler.
"""

import json
import os
import shutil

import numpy as np
import pytest
import jax.numpy as jnp

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("transformers")

import dngjax as dj  # noqa: E402
from dngjax import stable_diffusion as sd  # noqa: E402
from sd_tiny import make_folder  # noqa: E402

PROMPT, NEGATIVE = "a cat", "a dog"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("sd") / "tiny-sd"
    torch_pipe = make_folder(path)
    return str(path), torch_pipe, sd.load(str(path))


def _torch_eps(torch_pipe, x, t, prompts):
    """(3, B, h, w, C) numpy eps of the null prompt, the prompt and the negative prompt (NHWC)."""
    ids = torch_pipe.tokenizer(prompts, padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        ctx = torch_pipe.text_encoder(ids)[0]
        xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
        out = [torch_pipe.unet(xt, int(t), encoder_hidden_states=c[None].expand(x.shape[0], -1, -1)).sample
               for c in ctx]
    return np.stack([o.numpy().transpose(0, 2, 3, 1) for o in out]).astype(np.float64)


def test_two_positive_dng_steps_match_a_pytorch_reference(tiny):
    _, torch_pipe, pipe = tiny
    # a small temperature: the random tiny networks disagree a lot, and the update must not hit the clamp
    scale, cfg, prior, tau, delta = 4.0, 3.0, 0.3, 5e-5, 1e-3
    rule = dj.PositiveDynamicNegativeGuidance(scale=scale, cfg_scale=cfg, prior=prior, temperature=tau, offset=delta)
    seeds = [3, 4]
    x_T = np.random.default_rng(0).standard_normal((2,) + pipe.latent_shape).astype(np.float32)
    chain = dj.respace(pipe.schedule, 2)
    d_null, (d_pos, d_neg) = sd.denoisers(pipe, PROMPT, NEGATIVE)
    keys = dj.keys_from_seeds(seeds)
    x0, trace = dj.sample(d_null, chain, keys, pipe.latent_shape, rule=rule, denoiser_c=(d_pos, d_neg),
                          noise="posterior", x_T=x_T, return_trace=True)

    # the schedule from diffusers, the step noise z of these keys from a run with eps = 0
    ab_all = torch_pipe.scheduler.alphas_cumprod.double().numpy()
    t1, t0 = int(chain.timesteps[1]), int(chain.timesteps[0])
    ab1, ab0 = ab_all[t1], ab_all[t0]
    a1, a0 = ab1 / ab0, ab0                                     # alpha of each step (ab_prev = 1 at the end)
    var1 = (1 - a1) * (1 - ab0) / (1 - ab1)
    zero = lambda x, t: jnp.zeros_like(x)
    x0_zero = np.asarray(dj.sample(zero, chain, keys, pipe.latent_shape, noise="posterior", x_T=x_T), np.float64)
    z = (x0_zero * np.sqrt(a0) - x_T / np.sqrt(a1)) / np.sqrt(var1)

    def mean(x, eps, ab, a):
        return (x - (1 - a) / np.sqrt(1 - ab) * eps) / np.sqrt(a)

    prompts = ["", PROMPT, NEGATIVE]
    # step 1 (t1): lambda from the prior, the step, then Alg. 2's update with the prompt as "unconditional"
    e_null, e_pos, e_neg = _torch_eps(torch_pipe, x_T, t1, prompts)
    lam1 = scale * prior / (1 - prior)
    eps = e_null + cfg * (e_pos - e_null) - lam1 * (e_neg - e_pos)
    x1 = mean(x_T, eps, ab1, a1) + np.sqrt(var1) * z
    d = (np.sum((x1 - mean(x_T, e_neg, ab1, a1)) ** 2, axis=(1, 2, 3))
         - np.sum((x1 - mean(x_T, e_pos, ab1, a1)) ** 2, axis=(1, 2, 3)))
    log_p = np.clip(np.log(prior) + (-tau * d + delta) / (2 * var1), np.log(1e-6), np.log(0.99))
    # step 2 (t0, final: no noise)
    e_null, e_pos, e_neg = _torch_eps(torch_pipe, x1.astype(np.float32), t0, prompts)
    lam0 = scale * np.exp(log_p) / (1 - np.exp(log_p))
    eps = e_null + cfg * (e_pos - e_null) - lam0[:, None, None, None] * (e_neg - e_pos)
    want = mean(x1, eps, ab0, a0)

    np.testing.assert_allclose(np.asarray(trace.lam)[0], lam1, rtol=1e-5)       # (steps, seeds), sampling order
    np.testing.assert_allclose(np.asarray(trace.lam)[1], lam0, rtol=2e-3)
    assert np.all(np.abs(np.log(lam0 / lam1)) > 0.1)           # the update moved the posterior ...
    assert np.all((log_p > np.log(1e-6) + 1) & (log_p < np.log(0.99) - 0.1))    # ... inside the clamp
    np.testing.assert_allclose(np.asarray(x0), want, rtol=1e-3, atol=1e-3 * np.abs(want).max())


def test_generate_scale_zero_is_cfg_and_decodes_like_diffusers(tiny):
    _, torch_pipe, pipe = tiny
    rule = dj.PositiveNegativePrompting(scale=1.0, cfg_scale=2.0)
    images, latents = sd.generate(pipe, PROMPT, NEGATIVE, seeds=[0, 1, 2], rule=rule, grid={"scale": [0.0, 2.0]},
                                  steps=4, chunk_size=2, return_latents=True)
    assert images.shape == (2, 3, 16, 16, 3) and images.dtype == np.uint8
    cfg_images, cfg_latents = sd.generate(pipe, PROMPT, None, seeds=[0, 1, 2], steps=4, return_latents=True,
                                          rule=dj.ClassifierFreeGuidance(scale=2.0))
    np.testing.assert_allclose(latents[0], cfg_latents[0], rtol=1e-4, atol=1e-4)   # scale 0 = CFG toward the prompt
    assert np.abs(latents[1] - latents[0]).max() > 1e-3
    with torch.no_grad():
        ref = torch_pipe.vae.decode(torch.from_numpy(latents[1].transpose(0, 3, 1, 2) / pipe.scaling_factor)).sample
    ref = np.clip(np.round((ref.numpy().transpose(0, 2, 3, 1) + 1) * 127.5), 0, 255)
    assert np.abs(images[1].astype(int) - ref.astype(int)).max() <= 1
    with pytest.raises(ValueError, match="needs a negative prompt"):
        sd.generate(pipe, PROMPT, None, seeds=[0], rule=rule)
    with pytest.raises(ValueError, match="does not use a negative prompt"):
        sd.generate(pipe, PROMPT, NEGATIVE, seeds=[0], rule=dj.ClassifierFreeGuidance(scale=2.0))


def test_load_errors_name_the_missing_or_mismatched_part(tiny, tmp_path):
    path, _, _ = tiny
    with pytest.raises(FileNotFoundError, match="model_index.json is missing"):
        sd.load(str(tmp_path))
    broken = tmp_path / "broken"
    shutil.copytree(path, broken)
    shutil.rmtree(broken / "vae")
    with pytest.raises(FileNotFoundError, match=r"lacks the component\(s\) \['vae'\]"):
        sd.load(str(broken))
    shutil.copytree(os.path.join(path, "vae"), broken / "vae")
    cfg_path = broken / "scheduler" / "scheduler_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**cfg, "beta_schedule": "squaredcos_cap_v2"}))
    with pytest.raises(ValueError, match="beta_schedule='squaredcos_cap_v2' is not supported"):
        sd.load(str(broken))
    cfg_path.write_text(json.dumps({**cfg, "prediction_type": "v_prediction"}))
    assert sd.load(str(broken)).prediction == "v"
