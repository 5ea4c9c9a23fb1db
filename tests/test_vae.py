"""The Flax VAE decoder against diffusers' PyTorch AutoencoderKL (tiny random config, test-only torch)."""

import json
import os

import numpy as np
import pytest
import jax.numpy as jnp

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from dngjax.models.vae import load_vae_decoder, load_vae_encoder  # noqa: E402


def _tiny_vae(tmp_path):
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(8, 16),
                                  down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                                  layers_per_block=1, latent_channels=4, norm_num_groups=4, sample_size=16).eval()
    with torch.no_grad():                              # non-trivial norms and biases (defaults are 1 and 0)
        for n, p in vae.named_parameters():
            if "norm" in n or n.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    path = str(tmp_path / "vae")
    vae.save_pretrained(path, safe_serialization=True)
    return vae, path


def test_vae_decoder_matches_diffusers(tmp_path):
    vae, path = _tiny_vae(tmp_path)
    decoder, params, cfg = load_vae_decoder(path)
    assert cfg["scaling_factor"] == pytest.approx(vae.config.scaling_factor)
    z = np.random.default_rng(0).standard_normal((2, 4, 6, 5)).astype(np.float32)      # NCHW latents
    with torch.no_grad():
        ref = vae.decode(torch.from_numpy(z)).sample.numpy().transpose(0, 2, 3, 1)     # -> NHWC
    got = np.asarray(decoder.apply(params, jnp.asarray(z.transpose(0, 2, 3, 1))))
    assert got.shape == (2, 12, 10, 3)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_vae_encoder_matches_diffusers(tmp_path):
    vae, path = _tiny_vae(tmp_path)
    encoder, params, _ = load_vae_encoder(path)
    x = np.random.default_rng(1).uniform(-1, 1, (2, 3, 12, 20)).astype(np.float32)    # NCHW images
    with torch.no_grad():
        dist = vae.encode(torch.from_numpy(x)).latent_dist
    mean, logvar = encoder.apply(params, jnp.asarray(x.transpose(0, 2, 3, 1)))
    for got, ref in ((mean, dist.mean), (logvar, dist.logvar)):
        ref = ref.numpy().transpose(0, 2, 3, 1)
        assert got.shape == (2, 6, 10, 4)
        np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_vae_reads_old_attention_names(tmp_path):
    """Checkpoints saved by older diffusers name the attention query/key/value/proj_attn."""
    from safetensors.numpy import load_file, save_file
    vae, path = _tiny_vae(tmp_path)
    f = os.path.join(path, "diffusion_pytorch_model.safetensors")
    old = {k.replace("to_q.", "query.").replace("to_k.", "key.").replace("to_v.", "value.")
           .replace("to_out.0.", "proj_attn."): v for k, v in load_file(f).items()}
    assert any("proj_attn" in k for k in old)
    save_file(old, f)
    decoder, params, cfg = load_vae_decoder(path)
    z = np.random.default_rng(0).standard_normal((1, 4, 4, 4)).astype(np.float32)
    with torch.no_grad():
        ref = vae.decode(torch.from_numpy(z)).sample.numpy().transpose(0, 2, 3, 1)
    got = np.asarray(decoder.apply(params, jnp.asarray(z.transpose(0, 2, 3, 1))))
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_vae_loader_errors(tmp_path):
    _, path = _tiny_vae(tmp_path)
    with pytest.raises(FileNotFoundError, match="config.json is missing"):
        load_vae_decoder(str(tmp_path))
    cfg = json.load(open(os.path.join(path, "config.json")))
    cfg["block_out_channels"] = [8, 32]
    json.dump(cfg, open(os.path.join(path, "config.json"), "w"))
    with pytest.raises(ValueError, match="has shape"):
        load_vae_decoder(path)


def test_every_vae_config_key_is_implemented_or_refused():
    """Each AutoencoderKL __init__ parameter is read, has no effect here, or is refused by name off its default."""
    import inspect
    from dngjax.models import vae as vae_mod
    params = {k: p.default for k, p in inspect.signature(diffusers.AutoencoderKL.__init__).parameters.items()
              if k != "self"}
    known = set(vae_mod.IMPLEMENTED_KEYS) | set(vae_mod.NO_EFFECT_KEYS) | set(vae_mod.REQUIRED)
    assert set(params) == known, set(params) ^ known
    base = dict(block_out_channels=(8, 16), norm_num_groups=4, layers_per_block=1)
    for key, value in vae_mod.REQUIRED.items():
        assert params[key] == value, key
        other = (not value) if isinstance(value, bool) else [0.0] * 4 if value is None else "gelu"
        with pytest.raises(ValueError, match=key):
            vae_mod.decoder_from_config({**base, key: other})
    with pytest.raises(ValueError, match="brand_new_option"):
        vae_mod.decoder_from_config({**base, "brand_new_option": 1})
    with pytest.raises(ValueError, match="in_channels=4"):
        vae_mod.encoder_from_config({**base, "in_channels": 4})
