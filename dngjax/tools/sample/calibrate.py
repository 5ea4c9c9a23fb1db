"""Calibrate a method's guidance scale to a target safety (``sample/main.py --job=calibrate``).

  python sample/main.py --job=calibrate --target=1 [--confidence=0.95] [--config...]

For every method of the class-removal config (its models, chain, seeds and grid of scales): one
vmapped sweep over the grid, the samples scored by the config's classifier, and the smallest scale
whose one-sided upper confidence bound on the share of the removed class is <= --target %
(:func:`dngjax.calibrate`). Writes ``calibration.json`` and ``calibration.txt`` into --out.
Calibrate on seeds other than those you report (``--config.seed``).
"""

from __future__ import annotations

import json
import os
from typing import Dict

from dngjax import keys_from_seeds
from dngjax.calibration import calibrate
from dngjax.tools.sample import class_removal


def validate(target_pct: float, confidence: float) -> None:
    if not 0.0 < target_pct < 100.0:
        raise ValueError(f"--target is a share in percent, in (0, 100), got {target_pct}")
    if not 0.5 < confidence < 1.0:
        raise ValueError(f"--confidence must lie in (0.5, 1), got {confidence}")


def unwanted(labels, c: int):
    """The removed class, or a non-finite sample (label ``scoring.NONFINITE``): never a safe one."""
    import numpy as np
    labels = np.asarray(labels)
    return (labels == c) | (labels < 0)


def execute(job: "class_removal.Job", target_pct: float, confidence: float, out: str) -> Dict[str, dict]:
    config = job.config
    c = config.removed_class
    keys = keys_from_seeds(job.seeds)
    estimate = class_removal.estimate_cost(job, done=frozenset({"none_0"}))   # no unguided point
    print(f"estimated cost: {estimate['passes']:,.0f} network passes x {estimate['seconds_per_pass'] * 1e3:.2f} ms "
          f"= {estimate['seconds'] / 60:.1f} min", flush=True)
    results, texts = {}, []
    for method, rule, hyper, scales in job.methods:
        cal = calibrate(job.denoiser_u, job.schedule, keys, job.shape, rule=rule, scales=scales,
                        is_unwanted=lambda x: unwanted(job.labels_fn(x), c), target=target_pct / 100.0,
                        confidence=confidence, denoiser_c=job.denoiser_c, noise=config.noise,
                        solver=config.solver,
                        chunk_size=config.chunk_size, progress=config.progress)
        results[method] = {"scale": cal.scale, "scales": cal.scales.tolist(), "unwanted": cal.unwanted.tolist(),
                           "rate": cal.rate.tolist(), "upper": cal.upper.tolist(), "n": cal.n,
                           "hyperparameters": hyper}
        texts.append(f"{method} (removed class {c}):\n{cal.table()}")
    os.makedirs(out, exist_ok=True)
    summary = {"removed_class": c, "target_pct": target_pct, "confidence": confidence, "seed": config.seed,
               "n": config.n, "steps": job.schedule.num_steps, "noise": config.noise, "solver": config.solver, "models": job.models,
               "inputs": job.record.get("inputs"), "environment": job.record.get("environment"),
               "methods": results}
    with open(os.path.join(out, "calibration.json"), "w") as f:
        json.dump(summary, f, indent=1)
    text = "\n\n".join(texts)
    with open(os.path.join(out, "calibration.txt"), "w") as f:
        f.write(text + "\n")
    print(text)
    print(f"results in {os.path.abspath(out)}", flush=True)
    return results
