"""diffusers UNet2DModel -> Flax UNet conversion: parity on random weights, file formats, errors."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dngjax import checkpoint
from dngjax import convert as cv
from dngjax.models import convert_diffusers as cd
from dngjax.models.configs import cifar10_unet

TIMESTEPS = (0, 10, 500, 999)
REL_TOL = 1e-4

# google/ddpm-cifar10-32's config.json (as on the hub).
CIFAR10_CONFIG = {
    "_class_name": "UNet2DModel",
    "_diffusers_version": "0.0.4",
    "act_fn": "silu",
    "attention_head_dim": None,
    "block_out_channels": [128, 256, 256, 256],
    "center_input_sample": False,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
    "downsample_padding": 0,
    "flip_sin_to_cos": False,
    "freq_shift": 1,
    "in_channels": 3,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-06,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 32,
    "time_embedding_type": "positional",
    "up_block_types": ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
}

# Small variant with the same structure (attention at 16x16 on both paths).
SMALL_CONFIG = dict(
    CIFAR10_CONFIG,
    block_out_channels=[32, 64],
    layers_per_block=1,
    norm_num_groups=8,
    down_block_types=["DownBlock2D", "AttnDownBlock2D"],
    up_block_types=["AttnUpBlock2D", "UpBlock2D"],
    dropout=0.1,
)


class NotATensor:
    """A pickled object that torch.load(weights_only=True) must refuse."""


def _init_kwargs(config):
    return {k: (tuple(v) if isinstance(v, list) else v)
            for k, v in config.items() if not k.startswith("_")}


def _random_diffusers_unet(config, seed=0):
    """A diffusers UNet2DModel with every tensor randomly perturbed (norm affines included)."""
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(seed)
    model = diffusers.UNet2DModel(**_init_kwargs(config)).eval()
    with torch.no_grad():
        for p in model.parameters():
            std = float(p.std()) if p.numel() > 1 else 0.0
            p.add_(0.5 * (std if std > 0 else 0.2) * torch.randn_like(p))
    return model


def _max_rel_errors(model, module, params, size, seed=0):
    """max|eps_flax - eps_torch| / max|eps_torch| per timestep, for 2 random inputs per timestep.

    All timesteps go through one batch, so the Flax UNet compiles once.
    """
    torch = pytest.importorskip("torch")
    n = 2 * len(TIMESTEPS)
    x = np.random.RandomState(seed).randn(n, 3, size, size).astype(np.float32)
    t = np.repeat(np.asarray(TIMESTEPS, np.int64), 2)
    with torch.no_grad():
        ref = model(torch.from_numpy(x), torch.from_numpy(t)).sample.numpy()
    out = np.asarray(jax.jit(module.apply)(params, jnp.asarray(x.transpose(0, 2, 3, 1)),
                                           jnp.asarray(t, jnp.int32))).transpose(0, 3, 1, 2)
    errs = {}
    for i, tt in enumerate(TIMESTEPS):
        r, o = ref[2 * i:2 * i + 2], out[2 * i:2 * i + 2]
        assert np.std(r) > 0.1, "reference output is near-trivial"
        errs[tt] = float(np.abs(o - r).max() / np.abs(r).max())
    return errs


def _flat(params):
    return {jax.tree_util.keystr(k): np.asarray(v)
            for k, v in jax.tree_util.tree_leaves_with_path(params)}


@pytest.fixture(scope="module")
def small_model():
    return _random_diffusers_unet(SMALL_CONFIG)


@pytest.fixture(scope="module")
def small_dir(small_model, tmp_path_factory):
    d = tmp_path_factory.mktemp("small_unet")
    small_model.save_pretrained(str(d), safe_serialization=True)
    assert os.path.isfile(d / cd.SAFETENSORS_NAME)
    return d


# ----------------------------------------------------------------------------- parity


def test_small_parity_safetensors(small_model, small_dir):
    module, params = cd.convert(str(small_dir))
    assert module.downsample_padding == 0 and module.attn_resolutions == (16,)
    assert checkpoint.num_params(params) == sum(p.numel() for p in small_model.parameters())
    errs = _max_rel_errors(small_model, module, params, 32)
    print("small config, max rel error per timestep:", errs)
    assert max(errs.values()) <= REL_TOL, errs


def test_small_parity_symmetric_downsample_padding(tmp_path):
    """downsample_padding=1 (PyTorch-style symmetric padding) converts exactly too."""
    model = _random_diffusers_unet(dict(SMALL_CONFIG, downsample_padding=1), seed=1)
    model.save_pretrained(str(tmp_path), safe_serialization=True)
    module, params = cd.convert(str(tmp_path))
    assert module.downsample_padding == 1
    errs = _max_rel_errors(model, module, params, 32, seed=1)
    assert max(errs.values()) <= REL_TOL, errs


@pytest.mark.slow
def test_cifar10_parity_full_size(tmp_path):
    model = _random_diffusers_unet(CIFAR10_CONFIG, seed=2)
    model.save_pretrained(str(tmp_path), safe_serialization=True)
    module, params = cd.convert(str(tmp_path))
    assert checkpoint.num_params(params) == 35_746_307
    errs = _max_rel_errors(model, module, params, 32, seed=2)
    print("cifar10 config, max rel error per timestep:", errs)
    assert max(errs.values()) <= REL_TOL, errs


def test_cifar10_config_maps_to_cifar10_unet():
    kw = cd.unet_kwargs_from_config(CIFAR10_CONFIG)
    ref = cifar10_unet()
    for k in ("ch", "ch_mult", "num_res_blocks", "attn_resolutions", "groups"):
        assert tuple(np.atleast_1d(kw[k])) == tuple(np.atleast_1d(getattr(ref, k))), k
    assert kw["downsample_padding"] == 0 and kw["out_ch"] == 3
    module = cd.UNet(**kw)
    shapes = jax.eval_shape(module.init, jax.random.PRNGKey(0),
                            jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32),
                            jax.ShapeDtypeStruct((1,), jnp.int32))
    assert sum(int(np.prod(s.shape)) for s in jax.tree_util.tree_leaves(shapes)) == 35_746_307


# ----------------------------------------------------------------------------- formats


def _write_bin(state, config, d, legacy=False):
    torch = pytest.importorskip("torch")
    d.mkdir(parents=True, exist_ok=True)
    sd = {}
    for k, v in state.items():
        if legacy:
            for new, old in (("to_q", "query"), ("to_k", "key"), ("to_v", "value"),
                             ("to_out.0", "proj_attn")):
                k = k.replace(f".{new}.", f".{old}.")
        sd[k] = v.detach().clone()
    torch.save(sd, str(d / cd.BIN_NAME))
    (d / cd.CONFIG_NAME).write_text(json.dumps(config))
    return sd


@pytest.mark.parametrize("legacy", [False, True])
def test_bin_checkpoint_matches_safetensors(small_model, small_dir, tmp_path, legacy):
    sd = _write_bin(small_model.state_dict(), SMALL_CONFIG, tmp_path / "bin", legacy)
    if legacy:
        assert any(".query." in k for k in sd) and not any(".to_q." in k for k in sd)
    _, p_st = cd.convert(str(small_dir))
    _, p_bin = cd.convert(str(tmp_path / "bin"))
    a, b = _flat(p_st), _flat(p_bin)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_bin_refuses_arbitrary_pickle(tmp_path):
    torch = pytest.importorskip("torch")
    torch.save({"conv_in.weight": NotATensor()}, str(tmp_path / cd.BIN_NAME))
    (tmp_path / cd.CONFIG_NAME).write_text(json.dumps(SMALL_CONFIG))
    with pytest.raises(ValueError, match="weights_only"):
        cd.convert(str(tmp_path))


def test_pipeline_directory_with_unet_subfolder(small_dir, tmp_path):
    import shutil
    shutil.copytree(small_dir, tmp_path / "unet")
    (tmp_path / "model_index.json").write_text("{}")
    _, p = cd.convert(str(tmp_path))
    _, q = cd.convert(str(small_dir))
    assert _flat(p).keys() == _flat(q).keys()


def test_cli_writes_a_model_folder_every_loader_takes(small_dir, tmp_path, capsys):
    """The converter writes the project's one model-folder format (card.json + sha256 + shapes):
    checkpoint.load_model reads it, and training can start from it (init_from)."""
    from dngjax import checkpoint
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:                      # absl's app.run exits
        cv.cli_main(["convert", str(small_dir), str(out)])
    assert e.value.code in (None, 0)
    printed = capsys.readouterr().out
    module, params = cd.convert(str(small_dir))
    assert f"{checkpoint.num_params(params):,}" in printed
    card = checkpoint.load_card(str(out))
    assert card["input_shape"] == [SMALL_CONFIG["sample_size"]] * 2 + [SMALL_CONFIG.get("in_channels", 3)]
    assert card["source"] == "diffusers UNet2DModel" and card["diffusion"]["prediction"] == "eps"
    assert card["params_sha256"] and card["num_params"] == checkpoint.num_params(params)
    module2, params2, _ = checkpoint.load_model(str(out), expect_kind="unet")
    assert module2 == module
    a, b = _flat(params), _flat(params2)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_cli_error_exit_code(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cv.cli_main(["convert", str(tmp_path / "nope"), str(tmp_path / "out")])
    assert e.value.code == 2
    assert "not found" in capsys.readouterr().err


def test_old_command_line_says_where_it_moved(tmp_path):
    """The command line is python -m dngjax.convert (above the models); the old module's says so, exit 2."""
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-m", "dngjax.models.convert_diffusers", "a", "b"], capture_output=True,
                       text=True, cwd=str(tmp_path), env=dict(os.environ, JAX_PLATFORMS="cpu"), timeout=300)
    assert r.returncode == 2 and "python -m dngjax.convert SRC_DIR OUT_DIR" in r.stderr


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize("field,value", [
    ("flip_sin_to_cos", True),
    ("freq_shift", 0),
    ("time_embedding_type", "fourier"),
    ("center_input_sample", True),
    ("act_fn", "gelu"),
    ("norm_eps", 1e-5),
    ("attention_head_dim", 8),
    ("num_class_embeds", 10),
    ("class_embed_type", "timestep"),
    ("resnet_time_scale_shift", "scale_shift"),
    ("mid_block_type", None),
    ("add_attention", False),
    ("mid_block_scale_factor", 2.0),
    ("downsample_padding", 2),
    ("downsample_type", "resnet"),
    ("upsample_type", "resnet"),
    ("time_embedding_dim", 256),
    ("attn_norm_num_groups", 16),
    ("block_out_channels", [128, 192, 256, 256]),
    ("sample_size", None),
    ("sample_size", 36),
    ("norm_num_groups", 48),
    ("_class_name", "UNet2DConditionModel"),
])
def test_rejects_unsupported_config(field, value):
    with pytest.raises(ValueError, match=field):
        cd.unet_kwargs_from_config(dict(CIFAR10_CONFIG, **{field: value}))


def test_rejects_missing_fields_with_diffusers_defaults():
    cfg = {k: v for k, v in CIFAR10_CONFIG.items() if k != "flip_sin_to_cos"}
    with pytest.raises(ValueError, match="flip_sin_to_cos"):  # diffusers' default is True
        cd.unet_kwargs_from_config(cfg)


def test_rejects_block_types():
    cfg = dict(CIFAR10_CONFIG, down_block_types=["DownBlock2D", "CrossAttnDownBlock2D",
                                                 "DownBlock2D", "DownBlock2D"])
    with pytest.raises(ValueError, match=r"down_block_types\[1\].*CrossAttnDownBlock2D"):
        cd.unet_kwargs_from_config(cfg)
    cfg = dict(CIFAR10_CONFIG, up_block_types=["UpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D"])
    with pytest.raises(ValueError, match="up_block_types.*mirror"):
        cd.unet_kwargs_from_config(cfg)
    cfg = dict(CIFAR10_CONFIG, up_block_types=["UpBlock2D", "UpBlock2D", "AttnUpBlock2D"])
    with pytest.raises(ValueError, match="up_block_types"):
        cd.unet_kwargs_from_config(cfg)


def test_missing_directory_and_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        cd.convert(str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="config.json"):
        cd.convert(str(tmp_path))
    (tmp_path / cd.CONFIG_NAME).write_text(json.dumps(SMALL_CONFIG))
    with pytest.raises(FileNotFoundError, match="safetensors"):
        cd.convert(str(tmp_path))
    (tmp_path / cd.CONFIG_NAME).write_text("{not json")
    (tmp_path / cd.SAFETENSORS_NAME).write_bytes(b"")
    with pytest.raises(ValueError, match="JSON"):
        cd.convert(str(tmp_path))
    from dngjax import checkpoint
    with pytest.raises(checkpoint.CheckpointError, match="a diffusers folder\\? convert it first"):
        checkpoint.load_model(str(tmp_path))


def _save_st(state, config, d):
    st = pytest.importorskip("safetensors.numpy")
    d.mkdir(parents=True, exist_ok=True)
    st.save_file({k: np.ascontiguousarray(v) for k, v in state.items()},
                 str(d / cd.SAFETENSORS_NAME))
    (d / cd.CONFIG_NAME).write_text(json.dumps(config))


@pytest.fixture(scope="module")
def small_state(small_dir):
    return cd.load_diffusers_checkpoint(str(small_dir))[1]


def test_shape_mismatch(small_state, tmp_path):
    state = dict(small_state)
    state["down_blocks.0.resnets.0.conv1.weight"] = np.zeros((32, 32, 3, 1), np.float32)
    _save_st(state, SMALL_CONFIG, tmp_path)
    with pytest.raises(ValueError, match=r"shape mismatch(.|\n)*down_blocks\.0\.resnets\.0\.conv1\.weight"):
        cd.convert(str(tmp_path))


def test_config_disagrees_with_weights(small_dir, tmp_path):
    # Weights of the small model, config of the full one: reported as shape mismatches.
    import shutil
    shutil.copy(small_dir / cd.SAFETENSORS_NAME, tmp_path / cd.SAFETENSORS_NAME)
    (tmp_path / cd.CONFIG_NAME).write_text(json.dumps(CIFAR10_CONFIG))
    with pytest.raises(ValueError, match="shape mismatches"):
        cd.convert(str(tmp_path))


def test_missing_and_unexpected_tensors(small_state, tmp_path):
    state = dict(small_state)
    del state["mid_block.attentions.0.to_q.weight"]
    state["extra.weight"] = np.zeros(3, np.float32)
    _save_st(state, SMALL_CONFIG, tmp_path)
    with pytest.raises(ValueError) as e:
        cd.convert(str(tmp_path))
    assert "mid_block.attentions.0.to_q.weight" in str(e.value)
    assert "extra.weight" in str(e.value)


# ----------------------------------------------------------------------------- the card's schedule


@pytest.mark.parametrize("scheduler,diffusion", [
    ({"_class_name": "DDPMScheduler", "prediction_type": "v_prediction"},
     {"num_timesteps": 1000, "beta_start": 1e-4, "beta_end": 0.02, "schedule": "linear", "prediction": "v"}),
    ({"_class_name": "DDIMScheduler", "prediction_type": "sample", "beta_schedule": "squaredcos_cap_v2",
      "num_train_timesteps": 500},
     {"num_timesteps": 500, "beta_start": 1e-4, "beta_end": 0.02, "schedule": "squaredcos_cap_v2", "prediction": "x0"}),
    ({"_class_name": "DDPMScheduler", "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
      "clip_sample": True, "trained_betas": None},
     {"num_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "schedule": "scaled_linear", "prediction": "eps"}),
])
def test_pipeline_scheduler_config_gives_the_card_diffusion(small_dir, tmp_path, scheduler, diffusion):
    """A pipeline folder's scheduler config decides the card's schedule and prediction type (every type the
    denoiser takes), through the one parser of scheduler configs (dngjax.sd_scheduler)."""
    import shutil
    shutil.copytree(small_dir, tmp_path / "src" / "unet")
    (tmp_path / "src" / "scheduler").mkdir()
    (tmp_path / "src" / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler))
    card = cv.convert_folder(str(tmp_path / "src"), str(tmp_path / "out"))
    assert card["diffusion"] == diffusion
    assert checkpoint.load_denoiser(str(tmp_path / "out")).prediction == diffusion["prediction"]
    assert checkpoint.schedule_of(card).num_steps == diffusion["num_timesteps"]


@pytest.mark.parametrize("scheduler,match", [
    ({"prediction_type": "flow"}, "prediction_type='flow' is not supported"),
    ({"beta_schedule": "sigmoid"}, "beta_schedule='sigmoid' is not supported"),
    ({"trained_betas": [1e-4] * 1000}, "trained_betas"),
    ({"prediction_type": "v_prediction", "rescale_betas_zero_snr": True}, "rescale_betas_zero_snr"),
])
def test_pipeline_scheduler_config_refused_by_name(small_dir, tmp_path, scheduler, match):
    import shutil
    shutil.copytree(small_dir, tmp_path / "src" / "unet")
    (tmp_path / "src" / "scheduler").mkdir()
    (tmp_path / "src" / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler))
    with pytest.raises(ValueError, match=match):
        cv.convert_folder(str(tmp_path / "src"), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()
