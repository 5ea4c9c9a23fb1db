"""stable_diffusion.generate as diffusers' users call it, on a tiny random SD folder: the negative prompt
of StableDiffusionPipeline (two passes per step) against diffusers with the same starting latents, image
sizes in pixels and starting latents with their errors (raised before anything is compiled), and one
compilation for calls that change only prompts and scales.
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")

import dngjax as dj  # noqa: E402
from dngjax import stable_diffusion as sd  # noqa: E402
from tests.compile_count import count_compiles  # noqa: E402
from tests.sd_tiny import make_folder  # noqa: E402

PROMPT, NEGATIVE = "a cat", "a dog"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("sdgen") / "tiny-sd"
    torch_pipe = make_folder(path)
    return torch_pipe, sd.load(str(path))


def _diffusers_euler(torch_pipe, timesteps, x_T, scale, negative, height, width):
    """diffusers' StableDiffusionPipeline on the Euler scheduler stepping ``timesteps`` from ``x_T``
    (N, h, w, C): (latents (N, h, w, C), uint8 images (N, H, W, 3)) as the pipeline makes them."""
    # "leading": with "linspace" or "trailing" spacing diffusers' Euler starts from sigma_max x_T instead of
    # sqrt(sigma_max^2 + 1) x_T (init_noise_sigma), i.e. from sqrt(1 - alpha_bar) x_T in DDIM's variable
    euler = diffusers.EulerDiscreteScheduler.from_config(torch_pipe.scheduler.config, timestep_spacing="leading")
    pipe = diffusers.StableDiffusionPipeline(**{**torch_pipe.components, "scheduler": euler})
    pipe.set_progress_bar_config(disable=True)
    n = len(x_T)
    with torch.no_grad():
        lat = pipe(prompt=[PROMPT] * n, negative_prompt=None if negative is None else [negative] * n,
                   guidance_scale=scale, timesteps=[int(t) for t in timesteps], height=height, width=width,
                   latents=torch.from_numpy(x_T.transpose(0, 3, 1, 2).copy()), output_type="latent").images
        img = pipe.vae.decode(lat / pipe.vae.config.scaling_factor).sample
    img = pipe.image_processor.postprocess(img, output_type="np")                 # [0, 1], as the pipeline's "np"
    return lat.numpy().transpose(0, 2, 3, 1), np.round(img * 255).astype(np.uint8)


def test_cfg_with_a_negative_prompt_is_diffusers_negative_prompt(tiny):
    """ClassifierFreeGuidance(s) with a negative prompt: eps_neg + s (eps_pos - eps_neg), diffusers'
    ``negative_prompt`` at ``guidance_scale=s``; the same latents from the same x_T (Euler = DDIM at eta 0
    on the same timesteps) within float32 rounding, uint8 images within 1/255; at a non-square size other
    than the training one (24 x 16 px, latents 12 x 8; training: 16 x 16 px)."""
    torch_pipe, pipe = tiny
    height, width = 24, 16
    h, w = height // pipe.downscale, width // pipe.downscale
    x_T = np.random.default_rng(1).standard_normal((2, h, w, 4)).astype(np.float32)
    images, latents, trace = sd.generate(pipe, PROMPT, NEGATIVE, seeds=[0, 1], rule=dj.ClassifierFreeGuidance(3.0),
                                         steps=4, solver="euler", height=height, width=width, x_T=x_T,
                                         return_latents=True, return_trace=True)
    assert images.shape == (1, 2, 2 * h, 2 * w, 3) and latents.shape == (1, 2, h, w, 4)
    ref_lat, ref_img = _diffusers_euler(torch_pipe, trace.t, x_T, 3.0, NEGATIVE, 2 * h, 2 * w)
    err = np.abs(latents[0] - ref_lat).max() / np.abs(ref_lat).max()
    assert err < 2e-5, err                                   # float32 rounding over 4 steps
    assert np.abs(images[0].astype(int) - ref_img.astype(int)).max() <= 1
    # not the empty-prompt CFG: the negative prompt changed the images
    _, ref_null = _diffusers_euler(torch_pipe, trace.t, x_T, 3.0, None, 2 * h, 2 * w)
    assert np.abs(ref_null.astype(int) - ref_img.astype(int)).max() > 2
    # a deterministic chain: x_T alone decides the latents, whatever the seeds
    other = sd.generate(pipe, PROMPT, NEGATIVE, seeds=[5, 6], rule=dj.ClassifierFreeGuidance(3.0), steps=4,
                        solver="euler", x_T=x_T, return_latents=True)[1]
    np.testing.assert_array_equal(other, latents)


def test_sizes_and_starting_latents_are_checked_before_anything_compiles(tiny):
    _, pipe = tiny
    cfg = dj.ClassifierFreeGuidance(2.0)
    nchw = np.zeros((2, 4, 8, 8), np.float32)
    bad = [
        (dict(height=15), "height=15 px: image sizes must be positive multiples of 2 px"),
        (dict(width=16.0), "width must be a whole number of pixels"),
        (dict(height=16, latent_shape=(8, 8, 4)), "not both"),
        (dict(latent_shape=(16, 16, 4)), r"looks like an image size in pixels.*height=16, width=16"),
        (dict(latent_shape=(8, 8)), r"latent_shape must be \(h, w, 4\).*height=, width="),
        (dict(x_T=nchw), r"channels first.*transpose\(0, 2, 3, 1\)"),
        (dict(x_T=np.zeros((3, 8, 8, 4), np.float32)), "3 starting latents for 2 seeds"),
        (dict(x_T=np.zeros((2, 8, 8, 4), np.float32), height=32), r"x_T has latents \(8, 8, 4\) but height=32"),
        (dict(x_T=np.zeros((2, 16, 16, 3), np.float32)), "images?"),
    ]
    with count_compiles("") as compiled:
        for kwargs, message in bad:
            with pytest.raises(ValueError, match=message):
                sd.generate(pipe, PROMPT, None, seeds=[0, 1], rule=cfg, steps=2, **kwargs)
        with pytest.raises(ValueError, match="ClassifierFreeGuidance.*diffusers' negative prompt"):
            sd.generate(pipe, PROMPT, NEGATIVE, seeds=[0], rule=dj.NoGuidance())
        with pytest.raises(ValueError, match="needs a negative prompt"):
            sd.generate(pipe, PROMPT, None, seeds=[0], rule=dj.PositiveNegativePrompting(1.0, cfg_scale=2.0))
    assert compiled == []
    # latents of 9 x 8 do not fit the two-level UNet's downsampling unless it pads and resizes as
    # diffusers' does: then they sample like any other size
    try:
        with count_compiles("") as compiled:
            out = sd.generate(pipe, PROMPT, None, seeds=[0], rule=cfg, steps=2, latent_shape=(9, 8, 4))
    except ValueError as e:
        assert "cannot denoise 9 x 8 latents (18 x 16 px)" in str(e) and compiled == []
    else:
        assert out.shape == (1, 1, 18, 16, 3)


def test_eta_zero_with_the_default_noise_is_ddim(tiny):
    _, pipe = tiny
    common = dict(seeds=[0, 1], rule=dj.ClassifierFreeGuidance(2.0), steps=3, return_latents=True)
    by_eta = sd.generate(pipe, PROMPT, NEGATIVE, eta=0.0, **common)[1]
    by_solver = sd.generate(pipe, PROMPT, NEGATIVE, solver="ddim", **common)[1]
    assert np.isfinite(by_eta).all()
    np.testing.assert_allclose(by_eta, by_solver, rtol=1e-6, atol=1e-6)


def test_a_study_compiles_once_per_method_family(tiny):
    """Prompts, negative prompts and scales are traced: after the first call of a rule class (and grid
    length), calls with other prompts and hyperparameters compile nothing, and CFG with a negative prompt
    (diffusers' baseline) reuses the compilation of CFG without one."""
    _, pipe = tiny
    common = dict(seeds=[0, 1], steps=3, solver="ddim", return_latents=True)        # as the eta test's
    with count_compiles("_grid_impl") as first:
        a = sd.generate(pipe, PROMPT, None, rule=dj.ClassifierFreeGuidance(2.0), **common)[0]
    with count_compiles("") as again:
        b = sd.generate(pipe, "a b", NEGATIVE, rule=dj.ClassifierFreeGuidance(5.0), **common)[0]
        c = sd.generate(pipe, "c", "a b c", rule=dj.ClassifierFreeGuidance(7), **common)[0]
    assert len(first) <= 1 and again == []
    assert np.abs(a.astype(int) - b).max() > 0 and np.abs(b.astype(int) - c).max() > 0
    dng = lambda **kw: dj.PositiveDynamicNegativeGuidance(**{"scale": 2.0, "cfg_scale": 2.0, "prior": 0.1,
                                                              "temperature": 0.2, "offset": 1e-3, **kw})
    common = dict(seeds=[0, 1], steps=3, return_trace=True)
    with count_compiles("_grid_impl") as first:
        sd.generate(pipe, PROMPT, NEGATIVE, rule=dng(), grid={"scale": [0.0, 3.0]}, **common)
    with count_compiles("") as again:
        _, trace = sd.generate(pipe, "a b", "c", rule=dng(cfg_scale=4.0, temperature=0.5, prior=0.02, offset=0.0),
                               grid={"scale": [1.0, 9.0]}, **common)
    assert first == ["jit(_grid_impl)"] and again == []
    np.testing.assert_allclose(trace.lam[:, 0], np.array([[1.0] * 2, [9.0] * 2]) * 0.02 / 0.98, rtol=1e-5)  # new values


def test_text_to_image_job_reports_compilation_and_reuses_the_persistent_cache(tiny, tmp_path):
    """The job with diffusers-NP alone (no CLIP): the unguided run and diffusers-NP share one compiled
    sampler, the compile time is reported, and a second run (in-memory caches cleared) loads its programs
    from the persistent cache instead of compiling them."""
    import jax
    import json
    import os
    from dngjax.tools.sample import text_to_image
    from dngjax.tools.sample.configs import sd as sd_configs
    torch_pipe, _ = tiny
    folder = str(tmp_path / "sd")
    torch_pipe.save_pretrained(folder, safe_serialization=True)
    c = sd_configs.get_config("tiny")
    c.folder, c.methods, c.compilation_cache = folder, ("diffusers-NP",), str(tmp_path / "cache")
    c.height = 15
    with pytest.raises(ValueError, match="config.height=15.*multiples of 2 px"):
        text_to_image.prepare(c)
    c.height, runs = 0, []
    try:
        for i in range(2):
            c.outdir = str(tmp_path / f"out{i}")
            jax.clear_caches()
            with count_compiles("_grid_impl") as sampler:
                out = text_to_image.execute(text_to_image.prepare(c))
            runs.append((json.load(open(os.path.join(out, "results.json"))), sampler))
    finally:
        text_to_image.enable_compilation_cache(None)
    (first, sampler0), (second, sampler1) = runs
    assert first["compilation"]["cache_dir"] == str(tmp_path / "cache")
    assert sampler0 == ["jit(_grid_impl)"] and sampler1 == ["jit(_grid_impl)"]   # one sampler for both methods
    assert first["compilation"]["programs"] >= 3 and first["compilation"]["compile_seconds"] > 0
    assert first["compilation"]["cache_hits"] == 0 and os.listdir(tmp_path / "cache")
    assert second["compilation"]["cache_hits"] >= 1                  # at least the sampler: over 1 s to compile
    assert second["compilation"]["compile_seconds"] < first["compilation"]["compile_seconds"]
    a, b = (np.load(os.path.join(tmp_path / f"out{i}", "images.npz")) for i in range(2))
    np.testing.assert_array_equal(a["row0_diffusers-NP_related"], b["row0_diffusers-NP_related"])
