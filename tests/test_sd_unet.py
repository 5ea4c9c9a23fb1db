"""The Flax SD UNet against diffusers' PyTorch UNet2DConditionModel (tiny random configs, test-only torch)."""

import json
import os

import numpy as np
import pytest
import jax
import jax.numpy as jnp

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from dngjax.models.sd_unet import load_sd_unet, timestep_embedding  # noqa: E402

SD1 = dict(block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
           up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=2, cross_attention_dim=24,
           attention_head_dim=8, norm_num_groups=8)
SD2 = dict(block_out_channels=(16, 32, 32), down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
           up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1,
           cross_attention_dim=24, attention_head_dim=(2, 4, 8), use_linear_projection=True, upcast_attention=True,
           transformer_layers_per_block=(1, 2, 1), norm_num_groups=8)


def _tiny_unet(tmp_path, kwargs, name="unet"):
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(sample_size=16, in_channels=4, out_channels=4, **kwargs).eval()
    with torch.no_grad():                              # non-trivial norms and biases (defaults are 1 and 0)
        for n, p in unet.named_parameters():
            if "norm" in n or n.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    path = str(tmp_path / name)
    unet.save_pretrained(path, safe_serialization=True)
    return unet, path


@pytest.mark.parametrize("kwargs", [SD1, SD2], ids=["sd1-conv-proj", "sd2-linear-proj-per-level-heads"])
def test_sd_unet_matches_diffusers(tmp_path, kwargs):
    unet, path = _tiny_unet(tmp_path, kwargs)
    model, params, cfg = load_sd_unet(path)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 4, 8, 12)).astype(np.float32)               # NCHW latents, non-square
    t = np.array([7, 815])
    ctx = rng.standard_normal((2, 5, 24)).astype(np.float32)
    with torch.no_grad():
        ref = unet(torch.from_numpy(x), torch.from_numpy(t), encoder_hidden_states=torch.from_numpy(ctx)).sample
    ref = ref.numpy().transpose(0, 2, 3, 1)
    got = np.asarray(jax.jit(model.apply)(params, jnp.asarray(x.transpose(0, 2, 3, 1)), jnp.asarray(t), jnp.asarray(ctx)))
    assert got.shape == (2, 8, 12, 4)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_timestep_embedding_matches_diffusers():
    from diffusers.models.embeddings import get_timestep_embedding
    t = np.array([0, 3, 999])
    for dim, flip, shift in ((32, True, 0), (33, False, 1)):
        ref = get_timestep_embedding(torch.from_numpy(t), dim, flip_sin_to_cos=flip, downscale_freq_shift=shift).numpy()
        np.testing.assert_allclose(np.asarray(timestep_embedding(jnp.asarray(t), dim, flip, shift)), ref,
                                   rtol=1e-5, atol=2e-4)


def test_sd_unet_loader_errors(tmp_path):
    _, path = _tiny_unet(tmp_path, SD1)
    with pytest.raises(FileNotFoundError, match="config.json is missing"):
        load_sd_unet(str(tmp_path))
    cfg_path = os.path.join(path, "config.json")
    cfg = json.load(open(cfg_path))
    json.dump({**cfg, "cross_attention_dim": 32}, open(cfg_path, "w"))
    with pytest.raises(ValueError, match="attn2.to_k.kernel has shape"):
        load_sd_unet(path)
    json.dump({**cfg, "layers_per_block": 1}, open(cfg_path, "w"))
    with pytest.raises(ValueError, match="does not match its weights"):
        load_sd_unet(path)
    json.dump({**cfg, "class_embed_type": "timestep"}, open(cfg_path, "w"))
    with pytest.raises(ValueError, match="unsupported UNet2DConditionModel options.*class_embed_type"):
        load_sd_unet(path)
    json.dump(cfg, open(cfg_path, "w"))
    os.remove(os.path.join(path, "diffusion_pytorch_model.safetensors"))
    with pytest.raises(FileNotFoundError, match="safetensors is missing"):
        load_sd_unet(path)


def test_sd_unet_half_precision_follows_float32(tmp_path):
    """dtype=bfloat16: parameters stored and computed in bfloat16 (softmax in float32), output float32 and
    close to the float32 network's."""
    _, path = _tiny_unet(tmp_path, SD2)
    model32, params32, _ = load_sd_unet(path)
    model16, params16, _ = load_sd_unet(path, dtype=jnp.bfloat16)
    assert all(a.dtype == jnp.bfloat16 for a in jax.tree_util.tree_leaves(params16))
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 8, 8, 4)), jnp.float32)
    t, ctx = jnp.array([7, 815]), jnp.asarray(rng.standard_normal((2, 5, 24)), jnp.float32)
    ref = np.asarray(jax.jit(model32.apply)(params32, x, t, ctx))   # jitted: eager dispatch compiles per op
    got = jax.jit(model16.apply)(params16, x, t, ctx)
    assert got.dtype == jnp.float32
    assert np.abs(np.asarray(got) - ref).max() < 0.05 * np.abs(ref).max()


@pytest.mark.parametrize("kwargs, size", [
    (SD1, (5, 7)),                                                              # 2 levels: odd latents
    (dict(SD2, act_fn="gelu", mid_block_scale_factor=1.41, downsample_padding=0), (10, 14)),   # 3 levels, not 4k
], ids=["sd1-odd-size", "sd2-gelu-midscale-pad0-10x14"])
def test_sd_unet_any_size_and_options_match_diffusers(tmp_path, kwargs, size):
    """Latents of any size (diffusers forwards upsample_size when h, w are not multiples of 2 ** downsamplings)
    and the options act_fn, mid_block_scale_factor, downsample_padding, against diffusers."""
    unet, path = _tiny_unet(tmp_path, kwargs)
    model, params, _ = load_sd_unet(path)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 4) + size).astype(np.float32)
    t = np.array([3, 500])
    ctx = rng.standard_normal((2, 5, 24)).astype(np.float32)
    with torch.no_grad():
        ref = unet(torch.from_numpy(x), torch.from_numpy(t), encoder_hidden_states=torch.from_numpy(ctx)).sample
    ref = ref.numpy().transpose(0, 2, 3, 1)
    got = np.asarray(jax.jit(model.apply)(params, jnp.asarray(x.transpose(0, 2, 3, 1)), jnp.asarray(t), jnp.asarray(ctx)))
    assert got.shape == (2,) + size + (4,)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_every_unet_config_key_is_implemented_or_refused():
    """Each UNet2DConditionModel __init__ parameter is read, has no effect at inference, or is refused by name
    when not at its default: a key a newer diffusers adds fails here."""
    import inspect
    from dngjax.models import sd_unet
    params = {k: p.default for k, p in inspect.signature(diffusers.UNet2DConditionModel.__init__).parameters.items()
              if k != "self"}
    known = set(sd_unet.IMPLEMENTED_KEYS) | set(sd_unet.NO_EFFECT_KEYS) | set(sd_unet._UNSUPPORTED)
    assert set(params) == known, set(params) ^ known
    for key, default in sd_unet._UNSUPPORTED.items():
        assert params[key] == default, key                      # refused exactly off diffusers' default
        other = (not default) if isinstance(default, bool) else default + 1 if isinstance(default, (int, float)) \
            else "other"
        with pytest.raises(ValueError, match=key):
            sd_unet.unet_from_config({**SD1, key: other})
    for key, value in (("act_fn", "softplus"), ("downsample_padding", 2), ("brand_new_option", 1)):
        with pytest.raises(ValueError, match=key):
            sd_unet.unet_from_config({**SD1, key: value})
