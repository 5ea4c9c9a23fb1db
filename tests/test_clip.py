"""The Flax CLIP text encoder against transformers' PyTorch CLIPTextModel (tiny random configs, test-only torch)."""

import json
import os

import numpy as np
import pytest
import jax.numpy as jnp

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from dngjax.models.clip import load_clip_text  # noqa: E402


def _tiny(tmp_path, act, name):
    cfg = transformers.CLIPTextConfig(vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                      num_attention_heads=4, max_position_embeddings=16, hidden_act=act,
                                      layer_norm_eps=1e-5)
    torch.manual_seed(0)
    model = transformers.CLIPTextModel(cfg).eval()
    with torch.no_grad():                                    # non-trivial LayerNorm parameters too
        for n, p in model.named_parameters():
            if "layer_norm" in n:
                p.add_(0.1 * torch.randn_like(p))
    path = str(tmp_path / name)
    model.save_pretrained(path, safe_serialization=True)
    return model, path


@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])       # SD 1.x's CLIP ViT-L and SD 2.x's OpenCLIP ViT-H
def test_clip_text_encoder_matches_transformers(tmp_path, act):
    model, path = _tiny(tmp_path, act, act)
    encoder, params = load_clip_text(path)
    ids = np.random.default_rng(0).integers(0, 99, size=(3, 16))
    with torch.no_grad():
        ref = model(input_ids=torch.from_numpy(ids)).last_hidden_state.numpy()
    got = np.asarray(encoder.apply(params, jnp.asarray(ids, jnp.int32)))
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max())
    # causal: a token never sees later ones (changing the last token changes only the last position)
    ids2 = ids.copy()
    ids2[:, -1] = (ids2[:, -1] + 1) % 99
    got2 = np.asarray(encoder.apply(params, jnp.asarray(ids2, jnp.int32)))
    np.testing.assert_allclose(got2[:, :-1], got[:, :-1], rtol=1e-6, atol=1e-6)
    assert np.abs(got2[:, -1] - got[:, -1]).max() > 1e-3


def test_clip_text_loader_errors(tmp_path):
    _, path = _tiny(tmp_path, "quick_gelu", "m")
    with pytest.raises(FileNotFoundError, match="config.json is missing"):
        load_clip_text(str(tmp_path))
    cfg = json.load(open(os.path.join(path, "config.json")))
    cfg["hidden_size"] = 48
    json.dump(cfg, open(os.path.join(path, "config.json"), "w"))
    with pytest.raises(ValueError, match="has shape"):
        load_clip_text(path)
    cfg["hidden_size"], cfg["hidden_act"] = 32, "silu"
    json.dump(cfg, open(os.path.join(path, "config.json"), "w"))
    with pytest.raises(ValueError, match="hidden_act='silu' is not supported"):
        load_clip_text(path)


def test_clip_weights_map_by_name_and_mismatches_are_listed(tmp_path):
    """The CLIP weights go through the project's one PyTorch -> Flax mapper (models/torch_weights.py): buffers
    are skipped, and one error lists every missing and unexpected parameter by name."""
    from dngjax.models import clip
    from dngjax.models.torch_weights import read_folder
    _, path = _tiny(tmp_path, "quick_gelu", "m")
    cfg, state = read_folder(path, "model.safetensors", "a CLIP folder")
    encoder = clip.encoder_from_config(cfg)
    state = {k: v for k, v in state.items() if not k.endswith("position_ids")}
    ref = clip.params_from_torch(state, encoder)
    with_buffer = dict(state, **{"text_model.embeddings.position_ids": np.arange(16)[None], "logit_scale": np.ones(()),
                                 "vision_model.post_layernorm.weight": np.ones(3)})     # a full CLIPModel's
    got = clip.params_from_torch(with_buffer, encoder)
    assert jnp.array_equal(got["params"]["layers_1"]["fc2"]["kernel"], ref["params"]["layers_1"]["fc2"]["kernel"])
    fc2 = next(k for k in state if k.endswith("encoder.layers.1.mlp.fc2.weight"))   # text_model. or not
    bad = {k: v for k, v in state.items() if k != fc2}
    bad[fc2.replace("layers.1.mlp.fc2", "layers.0.mlp.fc3")] = np.zeros((4, 4), np.float32)
    with pytest.raises(ValueError) as e:
        clip.params_from_torch(bad, encoder)
    assert "layers_1.fc2.kernel" in str(e.value) and fc2.replace("layers.1.mlp.fc2", "layers.0.mlp.fc3") in str(e.value)


def test_tokenizer_pads_truncates_and_brackets_prompts(tmp_path):
    """A tiny BPE vocabulary in the diffusers tokenizer/ layout: bos ... eos, padded to max_length."""
    from dngjax.models.clip import load_tokenizer
    chars = list("abcdefghijklmnopqrstuvwxyz")
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in chars:
        vocab[ch] = len(vocab)
        vocab[ch + "</w>"] = len(vocab)
    vocab["ca"] = len(vocab)
    vocab["cat</w>"] = len(vocab)
    folder = tmp_path / "tokenizer"
    folder.mkdir()
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\nc a\nca t</w>\n")
    encode = load_tokenizer(str(folder), max_length=8)
    with pytest.warns(UserWarning, match="12 tokens; the text encoder takes 8: this part was cut: 'ghij"):
        ids = encode(["a cat", "abcdefghij"])                                      # as diffusers says it
    assert ids.shape == (2, 8) and ids.dtype == np.int32
    assert ids[0].tolist()[:4] == [0, vocab["a</w>"], vocab["cat</w>"], 1]          # merges applied
    assert ids[1, 0] == 0 and ids[1, -1] == 1                                      # truncated, still closed
    assert encode("a cat").shape == (1, 8)
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 16}))
    with pytest.raises(ValueError, match="model_max_length=16 differs from the text encoder's max_position_embeddings=8"):
        load_tokenizer(str(folder), max_length=8)                # diffusers would pad to 16
    assert load_tokenizer(str(folder), max_length=16)("a cat").shape == (1, 16)
    with pytest.raises(FileNotFoundError, match="merges.txt is missing"):
        (folder / "merges.txt").unlink()
        load_tokenizer(str(folder))


def test_every_clip_text_config_key_is_implemented_or_without_effect():
    """The CLIPTextConfig keys beyond transformers' generic PretrainedConfig ones are all read or have no effect
    on the last hidden states: a key a newer transformers adds fails here."""
    from dngjax.models import clip
    own = set(transformers.CLIPTextConfig().to_dict()) - set(transformers.PretrainedConfig().to_dict())
    own -= {"model_type", "transformers_version"}
    known = set(clip.TEXT_IMPLEMENTED_KEYS) | set(clip.TEXT_NO_EFFECT_KEYS)
    assert own <= known, own - known
    with pytest.raises(ValueError, match="hidden_act='relu2'"):
        clip.encoder_from_config(dict(vocab_size=10, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                                      num_attention_heads=2, hidden_act="relu2"))


def test_clip_image_encoder_matches_transformers(tmp_path):
    """The image tower with its projection (the Q metric's image embeddings), from a CLIPVisionModelWithProjection
    folder and from a full CLIPModel folder (its text tower ignored)."""
    from dngjax.models.clip import load_clip_image
    vcfg = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, image_size=30,
                patch_size=6, projection_dim=16, hidden_act="quick_gelu")
    torch.manual_seed(0)
    vis = transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(**vcfg)).eval()
    with torch.no_grad():
        for n, p in vis.named_parameters():
            if "layer" in n and "norm" in n:
                p.add_(0.1 * torch.randn_like(p))
    vis.save_pretrained(str(tmp_path / "vis"), safe_serialization=True)
    px = np.random.default_rng(1).standard_normal((2, 3, 30, 30)).astype(np.float32)
    with torch.no_grad():
        ref = vis(pixel_values=torch.from_numpy(px)).image_embeds.numpy()
    encoder, params = load_clip_image(str(tmp_path / "vis"))
    got = np.asarray(encoder.apply(params, jnp.asarray(px.transpose(0, 2, 3, 1))))
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max())

    full_cfg = transformers.CLIPConfig(text_config=dict(vocab_size=99, hidden_size=32, intermediate_size=37,
                                                        num_hidden_layers=1, num_attention_heads=4,
                                                        max_position_embeddings=16),
                                       vision_config=vcfg, projection_dim=16)
    full = transformers.CLIPModel(full_cfg).eval()
    full.save_pretrained(str(tmp_path / "full"), safe_serialization=True)
    with torch.no_grad():
        ref2 = full.get_image_features(pixel_values=torch.from_numpy(px))
    ref2 = (ref2.pooler_output if hasattr(ref2, "pooler_output") else ref2).numpy()
    encoder2, params2 = load_clip_image(str(tmp_path / "full"))
    np.testing.assert_allclose(np.asarray(encoder2.apply(params2, jnp.asarray(px.transpose(0, 2, 3, 1)))), ref2,
                               rtol=1e-4, atol=1e-5 * np.abs(ref2).max())
    with pytest.raises(ValueError, match="images of 28x28"):
        encoder.apply(params, jnp.zeros((1, 28, 28, 3)))
