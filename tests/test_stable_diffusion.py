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
from tests.sd_tiny import make_folder  # noqa: E402

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
    rule = dj.PositiveMode(dj.DynamicNegativeGuidance(scale=scale, prior=prior, temperature=tau, offset=delta),
                           cfg_scale=cfg)
    seeds = [3, 4]
    x_T = np.random.default_rng(0).standard_normal((2,) + pipe.latent_shape).astype(np.float32)
    chain = dj.respace(pipe.schedule, 2)
    d_null, (d_pos, d_neg) = sd.denoisers(pipe, PROMPT, NEGATIVE)
    keys = dj.keys_from_seeds(seeds)
    x0, trace = dj.sample(d_null, chain, keys, pipe.latent_shape, rule=rule, denoiser_c=(d_pos, d_neg),
                          noise="beta_tilde", x_T=x_T, return_trace=True)

    # the schedule from diffusers, the step noise z of these keys from a run with eps = 0
    ab_all = torch_pipe.scheduler.alphas_cumprod.double().numpy()
    t1, t0 = int(chain.timesteps[1]), int(chain.timesteps[0])
    ab1, ab0 = ab_all[t1], ab_all[t0]
    a1, a0 = ab1 / ab0, ab0                                     # alpha of each step (ab_prev = 1 at the end)
    var1 = (1 - a1) * (1 - ab0) / (1 - ab1)
    zero = lambda x, t: jnp.zeros_like(x)
    x0_zero = np.asarray(dj.sample(zero, chain, keys, pipe.latent_shape, noise="beta_tilde", x_T=x_T), np.float64)
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
    rule = dj.PositiveMode(dj.NegativePrompting(scale=1.0), cfg_scale=2.0)
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
    np.testing.assert_array_equal(sd.decode(pipe, latents, batch_size=4), images)     # padded last batch
    with pytest.raises(ValueError, match="needs a negative prompt"):
        sd.generate(pipe, PROMPT, None, seeds=[0], rule=rule)
    with pytest.raises(ValueError, match="does not use a negative prompt"):
        sd.generate(pipe, PROMPT, NEGATIVE, seeds=[0], rule=dj.NoGuidance())


def test_generate_runs_dng_with_the_continuous_posterior_on_dpm_solver(tiny):
    """Positive-mode DNG on 4 DPM-Solver++(2M) steps: scale 0 is CFG on the same solver, the posterior is
    tracked (finite, moving), and eta = 0 runs without naming the noise."""
    _, _, pipe = tiny
    rule = dj.PositiveMode(dj.DynamicNegativeGuidance(scale=1.0, prior=0.1, temperature=1.0, estimator="stratonovich"),
                           cfg_scale=2.0)
    _, latents, trace = sd.generate(pipe, PROMPT, NEGATIVE, seeds=[0, 1], rule=rule, grid={"scale": [0.0, 3.0]},
                                    steps=4, solver="dpmpp_2m", return_latents=True, return_trace=True)
    _, cfg = sd.generate(pipe, PROMPT, None, seeds=[0, 1], steps=4, solver="dpmpp_2m", return_latents=True,
                         rule=dj.ClassifierFreeGuidance(scale=2.0))
    np.testing.assert_allclose(latents[0], cfg[0], rtol=1e-4, atol=1e-4)
    p = np.asarray(trace.p)
    assert p.shape == (2, 4, 2) and np.isfinite(p).all() and (p > 0).all() and (p < 1).all()
    assert np.abs(p[0, -1] - 0.1).max() > 1e-4                          # moved away from the prior
    sd.generate(pipe, PROMPT, None, seeds=[0], steps=3, eta=0.0, rule=dj.ClassifierFreeGuidance(scale=2.0))


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


def _tiny_clip(path):
    import transformers
    torch.manual_seed(1)
    vis = transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(
        hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, image_size=30,
        patch_size=6, projection_dim=16, hidden_act="quick_gelu")).eval()
    vis.save_pretrained(str(path), safe_serialization=True)
    return vis


def test_q_score_on_hand_made_embeddings():
    from dngjax.q_metric import q_score
    u = np.array([[1.0, 0.0], [0.0, 1.0]])
    rel = np.array([[0.0, 1.0], [1.0, 0.0]])                  # orthogonal: distance 1
    unrel = u * 3.0                                            # parallel: distance 0
    out = q_score(u, rel, unrel)
    assert out["q"] == pytest.approx(1.0) and out["distance_related"] == pytest.approx(1.0)
    assert out["distance_unrelated"] == pytest.approx(0.0) and out["n"] == 2
    assert q_score(u, unrel, rel)["q"] == pytest.approx(-1.0)
    with pytest.raises(ValueError, match="same seeds"):
        q_score(u, rel[:1], unrel)


def test_clip_preprocessing_and_embeddings_match_transformers(tmp_path):
    """Images resized, cropped and normalised as CLIPImageProcessor does, then the projected embedding."""
    import transformers
    from dngjax.models.clip import load_clip_image
    from dngjax.q_metric import image_embeddings, preprocess
    vis = _tiny_clip(tmp_path / "clip")
    images = np.random.default_rng(0).integers(0, 256, (3, 40, 40, 3)).astype(np.uint8)
    images[:, 10:30, 5:25] = 200                               # some structure, not only noise
    proc = transformers.CLIPImageProcessor(size={"shortest_edge": 30}, crop_size={"height": 30, "width": 30})
    px = proc(images=list(images), return_tensors="np")["pixel_values"]          # (N, 3, 30, 30)
    got = np.asarray(preprocess(images, 30)).transpose(0, 3, 1, 2)
    assert np.abs(got - px).mean() < 0.02 and np.abs(got - px).max() < 0.3  # PIL rounds to uint8 after resizing
    encoder, params = load_clip_image(str(tmp_path / "clip"))
    with torch.no_grad():
        ref = vis(pixel_values=torch.from_numpy(px)).image_embeds.numpy()
    ref /= np.linalg.norm(ref, axis=-1, keepdims=True)
    emb = image_embeddings(encoder, params, images, batch_size=2)
    assert emb.shape == (3, 16)
    assert np.all(np.sum(emb * ref, -1) > 0.999)


def test_text_to_image_job_writes_figures_and_q(tiny, tmp_path):
    from dngjax.tools.sample import text_to_image
    from dngjax.tools.sample.configs import sd as sd_configs
    path, _, _ = tiny
    _tiny_clip(tmp_path / "clip")
    c = sd_configs.get_config("tiny")
    c.folder, c.clip, c.outdir = path, str(tmp_path / "clip"), str(tmp_path / "out")
    out = text_to_image.execute(text_to_image.prepare(c))
    files = sorted(os.listdir(out))
    assert {"samples_0.png", "lambda_0.png", "q_table.md", "results.json", "images.npz", "config.json"} <= set(files)
    res = json.load(open(os.path.join(out, "results.json")))["results"][0]
    for m in ("diffusers-NP", "NP", "DNG"):
        info = res["methods"][m]
        assert np.isfinite(info["q"]) and info["n"] == 3
        assert info["q"] == pytest.approx(info["distance_related"] - info["distance_unrelated"])
        assert info["q"] == pytest.approx(info["clip_score_unrelated"] - info["clip_score_related"])  # eq. 22
    assert "| diffusers-NP Q" in open(os.path.join(out, "q_table.md")).read()
    images = np.load(os.path.join(out, "images.npz"))
    assert images["row0_unguided"].shape == (3, 16, 16, 3)
    for m in ("diffusers-NP", "NP"):
        assert np.abs(images[f"row0_{m}_related"].astype(int) - images["row0_unguided"]).max() > 0
    c.folder = ""
    with pytest.raises(ValueError, match="config.folder is required"):
        text_to_image.prepare(c)
    c.folder, c.methods = path, ("CFG",)
    with pytest.raises(ValueError, match="choose among"):
        text_to_image.prepare(c)
