"""Convert a diffusers ``UNet2DModel`` folder (e.g. ``google/ddpm-cifar10-32``) into a dngjax model folder.

Command line::

    python -m dngjax.convert SRC_DIR OUT_DIR

writes a dngjax model folder (``params.msgpack`` + ``card.json`` with the architecture,
``input_shape`` and the diffusion schedule, the format of :mod:`dngjax.checkpoint`), which every
loader of the project takes: ``checkpoint.load_model(OUT_DIR)``, ``--config.init_from=OUT_DIR`` for
fine-tuning, ``--config.uncond=OUT_DIR`` for sampling. SRC_DIR is a UNet folder (``config.json`` and
``diffusion_pytorch_model.safetensors`` or ``.bin``) or a pipeline folder with ``unet/`` (and
``scheduler/``, whose ``scheduler_config.json`` then gives the card's schedule and prediction type).

The conversion itself (config checks, weights) is :mod:`dngjax.models.convert_diffusers`; this module
adds what needs the rest of the library: the scheduler config (:func:`dngjax.sd_scheduler.card_diffusion`),
the model folder (:mod:`dngjax.checkpoint`) and the command line (:mod:`dngjax.cli`).
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, Mapping, Optional

from . import checkpoint
from .models.convert_diffusers import DIFFUSERS_DEFAULTS, convert_loaded, find_unet_dir, load_diffusers_checkpoint
from .models.unet import UNet
from .sd_scheduler import card_diffusion

#: the card's schedule when the source says none (a bare UNet folder): the DDPM default of Ho et al.'s
#: models (linear betas 1e-4 .. 0.02, T = 1000, eps prediction)
DEFAULT_DIFFUSION = {"num_timesteps": 1000, "beta_start": 1e-4, "beta_end": 0.02, "schedule": "linear",
                     "prediction": "eps"}


def convert_folder(src: str, out_dir: str) -> Dict[str, Any]:
    """Convert the diffusers folder ``src`` into the dngjax model folder ``out_dir``; returns its card."""
    config, state = load_diffusers_checkpoint(src)
    diffusion = _diffusion_of(src)                      # a refused scheduler config fails before the weights
    module, params = convert_loaded(config, state)
    return save_converted(out_dir, module, params, src=src, config=config, diffusion=diffusion)


def _diffusion_of(src: str) -> Dict[str, Any]:
    """The card's ``diffusion`` entry: from ``scheduler/scheduler_config.json`` next to the UNet of a
    pipeline folder, else :data:`DEFAULT_DIFFUSION` (a bare UNet folder says no schedule)."""
    sched_path = (os.path.join(src, "scheduler", "scheduler_config.json")
                  if src and find_unet_dir(src) != src else "")
    if not (sched_path and os.path.isfile(sched_path)):
        return dict(DEFAULT_DIFFUSION)
    with open(sched_path) as f:
        try:
            sc = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{sched_path!r} is not valid JSON: {e}") from e
    try:
        return card_diffusion(sc)
    except ValueError as e:
        raise ValueError(f"{sched_path}: {e}") from None


def save_converted(out_dir: str, module: UNet, params: Any, src: str = "", config: Optional[Mapping[str, Any]] = None,
                   diffusion: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """Write the converted model as a dngjax model folder (:func:`dngjax.checkpoint.save_model`).

    ``config``: the diffusers config (for ``input_shape``); ``diffusion``: the card's diffusion entry
    (default: the one of ``src``'s scheduler config, see :func:`convert_folder`). Returns the card.
    """
    config = dict(config or {})
    size = config.get("sample_size", 32)
    hgt, wid = (size, size) if isinstance(size, int) else tuple(size)
    in_ch = config.get("in_channels", DIFFUSERS_DEFAULTS["in_channels"])
    diffusion = dict(diffusion) if diffusion is not None else (_diffusion_of(src) if src else dict(DEFAULT_DIFFUSION))
    card = {"name": os.path.basename(os.path.abspath(src)) if src else "converted", "model_type": "ddpm",
            "input_shape": [int(hgt), int(wid), int(in_ch)], "source": "diffusers UNet2DModel",
            "converted_from": os.path.abspath(src) if src else None, "diffusion": diffusion,
            "params": "as released (converted to Flax layout)"}
    checkpoint.save_model(out_dir, module, params, card)
    return checkpoint.load_card(out_dir)


def main(argv) -> None:
    """``python -m dngjax.convert SRC_DIR OUT_DIR`` (run through :func:`dngjax.cli.run`)."""
    from . import cli
    src, out = argv[1:]
    with cli.user_errors():
        cli.check_writable_folder(out, "OUT_DIR")
        card = convert_folder(src, out)
    print(f"converted {card['num_params']:,} parameters -> {out}")


def cli_main(argv=None) -> None:
    from . import cli
    cli.run(main, lambda: None, argv=argv, positional=("SRC_DIR", "OUT_DIR"),
            doc=__doc__.split("The conversion itself")[0])


if __name__ == "__main__":
    cli_main()
