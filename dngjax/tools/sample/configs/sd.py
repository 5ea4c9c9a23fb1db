"""Text-to-image negative guidance with Stable Diffusion (``sample/main.py --job=text_to_image``).

  python sample/main.py --job=text_to_image --config=sample/configs/sd.py:paper \\
      --config.folder=PATH/stable-diffusion-2-base --config.clip=PATH/clip-vit-large-patch14

Named configs:

* ``paper`` (default): the paper's five prompts (its appendix H table) with their related and unrelated
  negative prompts, DNG's temperature and offset per prompt, prior 0.01, and the guidance scales of its
  figures (NP / DNG); 32 seeds, 50 steps, classifier-free guidance 7.5 toward the prompt; the methods
  diffusers-NP (diffusers' negative prompt, 2 passes per step), NP and DNG (positive mode, 3 passes).
  A GPU job: 5 prompts x 32 seeds x 50 steps x (2 + 2 negatives x (2 + 3 + 3)) network passes =
  144,000 UNet passes at 64 x 64 latents.
* ``quick``: the first prompt, 4 seeds, 25 steps (a look at the images, e.g. on a CPU: 1,800
  UNet passes).

``rows`` picks prompts of the table (e.g. ``--config.rows="(0, 3)"``). Each row: (prompt, related
negative, unrelated negative, DNG temperature, DNG offset, NP scale, DNG scale); diffusers-NP has no
scale of its own (it is CFG at ``cfg_scale`` with the negative prompt as the unconditional prediction).
``height`` / ``width``: the image size in pixels (multiples of 8; 0 = the model's training size).
``compilation_cache``: JAX's persistent compilation cache, "default" ($XDG_CACHE_HOME/dngjax/jax, else
~/.cache/dngjax/jax), a folder, or "" (off).
"""

import ml_collections

PAPER_PROMPTS = (
    ("A Medieval Feast", "Chalices, candles", "Kids playing football", 0.2, 0.004, 3.4, 27.0),
    ("A dinner table", "Flowers, wine glasses", "Person wearing sunglasses", 0.3, 0.003, 1.7, 12.0),
    ("An art workshop", "Paint, canvases", "A bicycle in the rain", 0.2, 0.002, 1.7, 27.0),
    ("An antique store", "Lamps, old books", "An electric toothbrush", 0.2, 0.004, 2.55, 21.0),
    ("An English breakfast", "Eggs, sausages", "View of skyline", 0.3, 0.003, 3.4, 18.0),
)


def get_config(name: str = "paper"):
    c = ml_collections.ConfigDict()
    c.name = name
    c.folder = ""            # a diffusers Stable Diffusion folder (model_index.json, unet/, vae/, ...): required
    c.clip = ""              # a CLIP model folder (CLIPModel or CLIPVisionModelWithProjection) for Q; "" = no Q
    c.prompts = PAPER_PROMPTS
    c.rows = tuple(range(len(PAPER_PROMPTS)))
    c.methods = ("diffusers-NP", "NP", "DNG")   # also "SLD"
    c.n = 32
    c.seed = 0
    c.steps = 50
    # the paper's chain: ancestral DDPM steps with beta_tilde (tracked DNG with the paper's update needs a
    # stochastic step), DDPMScheduler built from the folder's scheduler config (its spacing and offset);
    # "" = the folder's own scheduler class (PNDM folders are refused: name a solver)
    c.solver = "ddpm"
    c.noise = "beta_tilde"
    c.cfg_scale = 7.5
    c.dng = ml_collections.ConfigDict(dict(prior=0.01, p_min=1e-6, p_max=0.99, update_variance="beta_tilde"))
    c.sld = ml_collections.ConfigDict(dict(scale=1.0, threshold=0.04, s_s=100.0, beta_m=0.2, s_m=0.1, warmup=0))
    c.dtype = "float32"      # the UNet's dtype: float16 / bfloat16 on a GPU
    c.height = 0             # image size in pixels (multiples of 8); 0: the UNet's training size (512 for SD 2 base)
    c.width = 0
    c.compilation_cache = "default"   # "default": $XDG_CACHE_HOME/dngjax/jax (~/.cache/dngjax/jax); a folder; "": off
    c.chunk_size = 8
    c.grid_images = 8        # seeds shown in the figures
    c.outdir = ""            # default: outputs/text_to_image/<name>-<UTC time>
    c.progress = True
    if name == "paper":
        pass
    elif name == "quick":
        c.rows = (0,)
        c.n = 4
        c.steps = 25
        c.chunk_size = 4
        c.grid_images = 4
    elif name == "tiny":     # tests: a tiny random folder
        c.rows = (0,)
        c.prompts = (("a cat", "cat", "dog", 0.2, 0.004, 2.0, 10.0),)
        c.n = 3
        c.steps = 3
        c.chunk_size = 2
        c.grid_images = 3
        c.progress = False
        c.compilation_cache = ""   # tests: no process-wide cache
    else:
        raise ValueError(f"unknown config {name!r}: paper, quick or tiny")
    return c
