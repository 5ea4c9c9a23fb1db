"""Shared defaults of the training configs (``get_config`` of each file starts from these)."""

import ml_collections


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.name = "model"
    c.dataset = "mnist"
    c.data_dir = ""  # offline folder; empty = $DNGJAX_DATA_DIR, then TensorFlow Datasets
    c.only_class = -1  # >= 0: train only on this class (forget-class model)
    c.drop_class = -1  # >= 0: train without this class
    c.limit_examples = 0  # > 0: use only the first N examples (tests)
    c.seed = 0
    c.batch_size = 64
    c.micro_batch = 0  # > 0: the gradient is accumulated over micro-batches of this size (same result, less time on CPU)
    c.num_train_steps = 1000
    c.log_every = 50
    c.checkpoint_every = 200
    c.keep_checkpoints = 2
    c.sample_every = 0  # DDPMs: sample-grid PNG every N steps (0: only at the end)
    c.sample_steps = 100  # respaced chain length for sample grids
    c.final_samples = 64
    c.max_steps_this_run = 0  # > 0: stop (saved, resumable) after this many steps of this run
    c.progress = True
    c.init_from = ""  # model folder to initialise the parameters from (fine-tuning)
    c.ema_decay = 0.999
    c.augment_shift = 0
    c.label_dropout = 0.0  # class-conditional DDPMs: probability of training on the null label instead

    c.model = ml_collections.ConfigDict()
    c.model.kind = "unet"
    c.model.kwargs = ml_collections.ConfigDict()

    c.optim = ml_collections.ConfigDict()
    c.optim.lr = 2e-4
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.weight_decay = 0.0
    c.optim.warmup_steps = 100
    c.optim.schedule = "constant"  # or "cosine" (warm-up, then cosine decay over the whole run)
    c.optim.decay_steps = 0  # "constant" only: > 0 ends the run with a cosine decay to lr / 100 over this many steps
    c.optim.grad_clip = 1.0

    c.diffusion = ml_collections.ConfigDict()
    c.diffusion.num_timesteps = 1000
    c.diffusion.beta_start = 1e-4
    c.diffusion.beta_end = 0.02
    return c


def unet_kwargs(**kw) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(kw)
