"""Checks of a training run's ``--workdir`` before anything is loaded or written.

* the folder can be written, or created (:func:`dngjax.cli.check_writable_folder`);
* a run it already holds (``WORKDIR/checkpoints``) trained the network and optimizer of this config:
  its newest checkpoint's array shapes (orbax's metadata, read without restoring anything) are
  compared with the config's train state, so that a resume with another architecture fails with
  one line that names the difference instead of orbax's restore error.
"""

from __future__ import annotations

import json
import os
from typing import Dict, Optional, Tuple

from dngjax import cli


def check_workdir(config, workdir: str) -> str:
    """``workdir`` as an absolute path; :class:`dngjax.cli.UserError` if it cannot be written or holds a
    run of another network or optimizer. Creates nothing."""
    full = cli.check_writable_folder(workdir, "--workdir")
    check_resumable(config, full, shown=workdir)
    return full


def _key(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


def saved_shapes(ckpt_dir: str) -> Optional[Tuple[int, Dict[str, tuple]]]:
    """``(step, {array path: shape})`` of the newest checkpoint in ``ckpt_dir`` whose metadata can be read;
    None when there is none (an unreadable step is left to the restore, which reports it)."""
    import jax
    import orbax.checkpoint as ocp
    try:
        steps = sorted((int(d) for d in os.listdir(ckpt_dir) if d.isdigit()), reverse=True)
    except OSError:
        return None
    if not steps:
        return None
    mngr = ocp.CheckpointManager(ckpt_dir, item_handlers=ocp.StandardCheckpointHandler(),
                                 options=ocp.CheckpointManagerOptions(create=False))
    try:
        for step in steps:
            try:
                meta = mngr.item_metadata(step)
            except Exception:          # noqa: BLE001 -- a corrupt or foreign step: the restore's business
                continue
            leaves = jax.tree_util.tree_leaves_with_path(meta)
            if leaves:
                return step, {_key(p): tuple(getattr(leaf, "shape", ()) or ()) for p, leaf in leaves}
    finally:
        mngr.close()
    return None


def _first_difference(saved: Dict[str, tuple], mine: Dict[str, tuple]) -> Tuple[str, int]:
    """The first differing array in words, and how many differ."""
    shape = sorted(k for k in saved.keys() & mine.keys() if saved[k] != mine[k])
    only_mine, only_saved = sorted(mine.keys() - saved.keys()), sorted(saved.keys() - mine.keys())
    n = len(shape) + len(only_mine) + len(only_saved)
    if shape:
        k = shape[0]
        return f"{k} has shape {saved[k]} there and {mine[k]} in this config", n
    if only_mine:
        return f"{only_mine[0]} exists in this config only", n
    if only_saved:
        return f"{only_saved[0]} exists in the checkpoint only", n
    return "", 0


def _config_differences(workdir: str, config, field: str) -> str:
    """Named differences of ``config.<field>`` from the saved run's (its model card, else its runs.jsonl)."""
    saved = None
    card = os.path.join(workdir, "model", "card.json")
    runs = os.path.join(workdir, "runs.jsonl")
    try:
        if os.path.isfile(card):
            with open(card) as f:
                saved = json.load(f).get("config", {})
        elif os.path.isfile(runs) and field == "optim":
            with open(runs) as f:
                lines = [json.loads(line) for line in f if line.strip()]
            saved = {"optim": lines[-1].get("optim")} if lines else None
    except (OSError, ValueError):
        return ""
    if not saved or field not in saved:
        return ""
    from dngjax.tools.train.trainer import config_to_dict
    mine = config_to_dict(config)[field]

    def flat(d, prefix):
        out = {}
        for k, v in (d or {}).items():
            if isinstance(v, dict):
                out.update(flat(v, f"{prefix}.{k}"))
            else:
                out[f"{prefix}.{k}"] = v
        return out

    a, b = flat(saved[field], f"config.{field}"), flat(mine, f"config.{field}")
    diffs = [f"{k}={a.get(k)!r} there, {b.get(k)!r} here" for k in sorted(a.keys() | b.keys())
             if a.get(k) != b.get(k) and not (isinstance(a.get(k), list) and tuple(a[k]) == b.get(k))]
    return "; ".join(diffs[:3])


def check_resumable(config, workdir: str, shown: Optional[str] = None) -> None:
    """:class:`dngjax.cli.UserError` if ``workdir`` holds checkpoints of another network or optimizer state
    than ``config`` trains (nothing is restored; ~1 s for the shapes)."""
    ckpt_dir = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(ckpt_dir):
        return
    found = saved_shapes(ckpt_dir)
    if found is None:
        return
    step, saved = found
    import jax
    from dngjax.data import SHAPES
    from dngjax.tools.train import trainer
    module, opt = trainer.build_model(config), trainer.make_optimizer(config)
    abstract = trainer._abstract_state(module, opt, config, SHAPES[config.dataset])
    mine = {_key(p): tuple(leaf.shape) for p, leaf in jax.tree_util.tree_leaves_with_path(abstract)}
    shown = shown or workdir
    part = lambda d, net: {k: v for k, v in d.items() if k.startswith("params/") == net}
    what, n = _first_difference(part(saved, True), part(mine, True))
    if n:
        named = _config_differences(workdir, config, "model")
        raise cli.UserError(
            f"--workdir={shown} holds a run (checkpoint step {step}) of another network: {what}"
            f"{f' ({n} parameter arrays differ)' if n > 1 else ''}{f'; {named}' if named else ''}: "
            "give this config a new --workdir, or resume with the config that run started with")
    what, n = _first_difference(part(saved, False), part(mine, False))
    if n:
        named = _config_differences(workdir, config, "optim")
        raise cli.UserError(
            f"--workdir={shown} holds a run (checkpoint step {step}) with another optimizer state: {what}"
            f"{f'; {named}' if named else ' (config.optim.grad_clip and weight_decay decide its form)'}: "
            "resume with that run's config.optim, or give this config a new --workdir")
