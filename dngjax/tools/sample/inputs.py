"""Class removal's inputs: model and reference paths of a config, the denoisers (through
:func:`dngjax.checkpoint.load_diffusion_model`: the cards decide), the training chain, the scorer."""

from __future__ import annotations

import os
from typing import Any, Callable, Tuple

import numpy as np

from dngjax.tools import SOURCE_ROOT as REPO_ROOT
from dngjax.tools.sample.methods import class_tag, removed_classes


def resolve_path(template: str, config) -> str:
    """Fill ``{root}`` / ``{c}``; relative paths: the working directory first, then the repository root."""
    root = config.checkpoints
    path = template.format(root=root, c=class_tag(config))
    if os.path.isabs(path) or os.path.exists(path):
        return path
    alt = os.path.join(REPO_ROOT, path)
    return alt if os.path.exists(alt) else path


def load_or_compute_reference(config, features_fn) -> Tuple[np.ndarray, np.ndarray]:
    from dngjax import checkpoint, metrics
    path = resolve_path(config.reference_stats, config)
    if os.path.isfile(path):
        return checkpoint.load_reference_stats(path)
    if not config.compute_reference:
        raise FileNotFoundError(
            f"reference statistics {path} not found. They ship with the MNIST checkpoints; "
            "otherwise rerun with --config.compute_reference=True (needs the data set, see dngjax.data).")
    from dngjax import data
    print(f"computing reference statistics of {config.dataset} train without class "
          f"{class_tag(config)} -> {path}", flush=True)
    x, _ = data.load_dataset(config.dataset, "train", data_dir=config.data_dir or None,
                             drop_class=list(removed_classes(config)))
    mu, sigma = metrics.gaussian_stats(features_fn(x))
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    np.savez(path, mu=mu, sigma=sigma, n=x.shape[0])
    return mu, sigma


def load_denoisers(config) -> Tuple[Any, Any, str]:
    """(denoiser_u, denoiser_c, description) of the two predictions the guidance combines, loaded with
    :func:`dngjax.checkpoint.load_diffusion_model` (the cards decide prediction type and labels)."""
    from dngjax import checkpoint
    c = config.removed_class
    if config.conditional:
        path = resolve_path(config.conditional, config)
        model = checkpoint.load_diffusion_model(path)
        k = model.num_classes
        if not k:
            raise ValueError(f"config.conditional={path} is not a class-conditional model (no num_classes)")
        removed = removed_classes(config)
        bad = [r for r in removed if not 0 <= r < k]
        if bad:
            raise ValueError(f"removed class(es) {bad} not a label of {path} (labels 0..{k - 1})")
        if len(removed) > 1:                          # one concept per removed class
            return (model.denoiser(label=k), [model.denoiser(label=r) for r in removed],
                    f"class-conditional {path}: eps(x | null label {k}) and eps(x | c) for c in {list(removed)}")
        return (model.denoiser(label=k), model.denoiser(label=c),
                f"class-conditional {path}: eps(x | null label {k}) and eps(x | {c})")
    upath, fpath = resolve_path(config.uncond, config), resolve_path(config.forget, config)
    uncond = checkpoint.load_diffusion_model(upath)
    try:
        forget = checkpoint.load_diffusion_model(fpath)
    except checkpoint.CheckpointError as e:
        raise checkpoint.CheckpointError(
            f"{e}\nno forget-class model for class {c}: train one with python train/main.py "
            f"--config=train/configs/{config.dataset}_forget.py:cpu --config.only_class={c} "
            f"--workdir=workdir/{config.dataset}_forget_{c}, then pass --config.forget=workdir/"
            f"{config.dataset}_forget_{c} (or use a class-conditional model: --config.conditional=...)") from None
    only = forget.card.get("only_class", c)
    if only not in (None, -1, c):
        raise ValueError(f"the forget model {fpath} was trained on class {only}, not the removed class {c}")
    return (uncond.denoiser(), forget.denoiser(), f"unconditional {upath} and forget-class {fpath}")


def training_chain(config):
    """The full training chain the models' cards name (:func:`dngjax.checkpoint.schedule_of`): the same for
    every model the run combines, and T = ``config.T``; ValueError otherwise."""
    import numpy as np
    from dngjax import checkpoint
    fields = ("conditional",) if config.conditional else ("uncond", "forget")
    chains = {}
    for f in fields:
        path = resolve_path(config[f], config)
        chains[path] = checkpoint.schedule_of(checkpoint.load_card(path))
    (first, full), *rest = chains.items()
    for path, other in rest:
        if other.num_steps != full.num_steps or not np.array_equal(np.asarray(other.betas), np.asarray(full.betas)):
            raise ValueError(f"{first} and {path} were trained on different noise schedules (their cards' "
                             "diffusion entries): guidance combines predictions of one chain")
    if full.num_steps != config.T:
        raise ValueError(f"config.T={config.T}, but {first} was trained on a chain of T = {full.num_steps} "
                         f"(its card's diffusion entry): set --config.T={full.num_steps}")
    return full


def make_scorer(config) -> Tuple[Callable, Callable, str, Tuple[np.ndarray, np.ndarray]]:
    """(labels_fn, scores_fn, feature-space name, reference (mu, sigma)); fns take model-space x (N, ...).

    ``scores_fn(x) -> (labels, features)`` runs the classifier once for both (and Inception for FID).
    """
    import jax.numpy as jnp
    from dngjax import checkpoint, evaluation, metrics

    cmod, cparams, _ = checkpoint.load_classifier(resolve_path(config.classifier, config))
    scorer = evaluation.make_scorer(cmod, cparams, batch_size=config.eval_batch)
    labels_fn = lambda x: scorer(x).labels
    if config.features == "classifier":
        features_fn = lambda x: scorer(x).features

        def scores_fn(x):
            s = scorer(x)
            return s.labels, s.features
        space = "classifier penultimate layer (FD)"
    elif config.features == "inception":
        from dngjax import fid_inception
        imod, ivars = fid_inception.load_fid_inception(config.fid_weights or None)
        f01 = fid_inception.fid_features_fn(imod, ivars)
        features_fn = lambda x: metrics.batched_apply(
            lambda b: np.asarray(f01((jnp.clip(b, -1.0, 1.0) + 1.0) / 2.0)), x, config.eval_batch)
        scores_fn = lambda x: (labels_fn(x), features_fn(x))
        space = "pytorch-fid Inception-v3 pool3 (FID)"
    else:
        raise ValueError(f"config.features must be 'classifier' or 'inception', got {config.features!r}")
    ref = load_or_compute_reference(config, features_fn)
    return labels_fn, scores_fn, space, ref


def check_model_root(config) -> None:
    """``config.checkpoints`` exists where a model path names ``{root}`` (the shipped models are in the
    project's checkout, not in the installed package): FileNotFoundError naming the flag to set."""
    fields = ("conditional",) if config.conditional else ("uncond", "forget")
    if not any("{root}" in config[f] for f in (*fields, "classifier")):
        return
    root = resolve_path(config.checkpoints, config)
    if not os.path.isdir(root):
        raise FileNotFoundError(
            f"model folder {config.checkpoints} not found (relative paths are looked up in the current folder "
            f"and in {REPO_ROOT}): the shipped models are in the project's checkout (checkpoints/mnist); run "
            f"from the checkout or pass --config.checkpoints=PATH/checkpoints/{config.dataset}")
