"""A tiny random Stable Diffusion folder in the diffusers layout (test-only: needs torch, diffusers, transformers).

``make_folder(path, prediction="epsilon")`` builds a StableDiffusionPipeline from tiny components (UNet
with cross-attention at 2 levels, 2-level VAE, 2-layer CLIP text encoder, a 60-token BPE vocabulary,
DDPMScheduler with SD's scaled_linear betas and clip_sample=False, or the diffusers ``scheduler`` given), saves it with ``save_pretrained`` (safetensors) and returns
the torch pipeline, so tests and the benchmark compare against the same weights.
"""

import json
import os

LETTERS = "abcdefghijklmnopqrstuvwxyz"


def _tokenizer_files(folder):
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "!": 2, "!</w>": 3}
    for ch in LETTERS:
        vocab[ch] = len(vocab)
        vocab[ch + "</w>"] = len(vocab)
    vocab["ca"] = len(vocab)
    vocab["cat</w>"] = len(vocab)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.json"), "w") as f:
        json.dump(vocab, f)
    with open(os.path.join(folder, "merges.txt"), "w") as f:
        f.write("#version: 0.2\nc a\nca t</w>\n")
    return len(vocab)


def make_folder(path, prediction="epsilon", seed=0, scheduler=None):
    import torch
    import diffusers
    import transformers

    tok_dir = str(path).rstrip("/") + "_vocab"
    vocab_size = _tokenizer_files(tok_dir)
    tokenizer = transformers.CLIPTokenizer.from_pretrained(tok_dir, model_max_length=77)
    torch.manual_seed(seed)
    text_encoder = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, hidden_act="gelu", layer_norm_eps=1e-5)).eval()
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=(4, 8), use_linear_projection=True, norm_num_groups=8).eval()
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(8, 16), latent_channels=4,
                                  down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                                  layers_per_block=1, norm_num_groups=4, sample_size=16).eval()
    with torch.no_grad():                  # non-trivial norms and biases; a UNet output of order 1
        for model in (unet, vae, text_encoder):
            for n, p in model.named_parameters():
                if "norm" in n or n.endswith("bias"):
                    p.add_(0.1 * torch.randn_like(p))
    if scheduler is None:              # SD's betas; no x_0 clipping (a pixel-space option SD's folders turn off)
        scheduler = diffusers.DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                            num_train_timesteps=1000, prediction_type=prediction, clip_sample=False)
    pipe = diffusers.StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                             scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                             requires_safety_checker=False)
    pipe.save_pretrained(str(path), safe_serialization=True)
    return pipe
