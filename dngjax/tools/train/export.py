"""Export trained MNIST models into ``checkpoints/mnist`` and measure their quality.

  python -m train.export --workdir=workdir/cpu --out=checkpoints/mnist --classes="0 1 2 3"

Steps (each can be skipped with --noX flags):

1. copy: ``WORKDIR/mnist_classifier/model`` -> ``OUT/classifier``, ``WORKDIR/mnist_ddpm/model``
   -> ``OUT/ddpm``, ``WORKDIR/mnist_cond/model`` -> ``OUT/cond``, ``WORKDIR/mnist_forget_C/model``
   -> ``OUT/forget_C`` (those that finished);
2. stats: the mean and covariance of the classifier's penultimate features over the MNIST train
   set (``reference_stats/train_all.npz``) and over the train set without each class C
   (``train_without_C.npz``);
3. eval: sample each DDPM on a respaced ancestral chain (``--steps``, ``--noise``), score the
   samples with the shipped classifier (:mod:`dngjax.evaluation`) and write the result into the
   model card (``quality``), with the quality targets:

   * ``ddpm`` and ``cond`` with the null label: FD to ``train_all`` <= 2x the FD of as many real
     MNIST test images; >= 93 % of samples classified with p > 0.9; KL(train histogram ||
     sample histogram) <= 0.01;
   * ``cond`` with label c, for every c: >= 98 % classified as c;
   * ``forget_C``: >= 99 % classified as C;

   plus a sample grid ``samples.png`` (``cond``: one row per label). Models whose cards already carry
   their quality are skipped (a newly copied model has none; ``--reeval`` or ``--only`` measures
   again), and a model in ``--workdir`` with the parameters of the shipped one is not copied.
   ``--only`` restricts both the copy and the measurement to the models it names.
   Writes ``OUT/README.md``.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import time

import numpy as np
from absl import flags

from dngjax import cli
from dngjax.renames import VARIANCE_VALUES

FLAGS = flags.FLAGS


def define_flags():
    flags.DEFINE_string("workdir", "workdir/cpu", "Folder with the training runs (mnist_ddpm, mnist_cond, mnist_forget_C).")
    flags.DEFINE_string("out", "checkpoints/mnist", "Destination folder.")
    flags.DEFINE_string("classes", "0 1 2 3", "Forget classes (space separated).")
    flags.DEFINE_string("data_dir", None, "Offline data folder (else $DNGJAX_DATA_DIR, then TFDS).")
    flags.DEFINE_bool("copy", True, "Copy the models from --workdir.")
    flags.DEFINE_bool("stats", True, "Compute the reference feature statistics.")
    flags.DEFINE_bool("eval", True, "Measure sample quality and write it into the cards.")
    flags.DEFINE_integer("n_uncond", 1000, "Samples of the unconditional model (and of cond with the null label).",
                         lower_bound=1)
    flags.DEFINE_integer("n_per_class", 200, "Samples of cond per label.", lower_bound=1)
    flags.DEFINE_integer("n_forget", 1000, "Samples of each forget-class model.", lower_bound=1)
    flags.DEFINE_integer("steps", 100, "Respaced chain length for the quality samples.", lower_bound=1)
    flags.DEFINE_enum("noise", "beta_tilde", ["beta", "beta_tilde", "posterior"],
                      "Noise of the reverse step (dngjax.sample's noise=): sigma_t^2 = beta_t or beta_tilde_t "
                      "('posterior': the older spelling of 'beta_tilde').")
    flags.DEFINE_integer("chunk", 250, "Samples per compiled sampler call.", lower_bound=1)
    flags.DEFINE_integer("seed", 12345, "Seed of the quality samples.", lower_bound=0)
    flags.DEFINE_string("only", "", "Restrict the copy and the eval to these model names (space separated), "
                        "e.g. 'ddpm forget_0'.")
    flags.DEFINE_bool("reeval", False, "Measure the quality of models whose cards already have it.")


def _names(classes):
    return {"mnist_classifier": "classifier", "mnist_ddpm": "ddpm", "mnist_cond": "cond",
            **{f"mnist_forget_{c}": f"forget_{c}" for c in classes}}


def copy_models(workdir, out, classes, only=()):
    """Copy each finished model of ``workdir`` (``NAME/model``) into ``out`` (all, or the names in ``only``)."""
    for src, dst in _names(classes).items():
        if only and dst not in only:
            continue
        s = os.path.join(workdir, src, "model")
        d = os.path.join(out, dst)
        if not os.path.isfile(os.path.join(s, "card.json")):
            print(f"skip {src}: no finished model in {s}")
            continue
        os.makedirs(d, exist_ok=True)
        old = _read(d) if os.path.isfile(os.path.join(d, "card.json")) else {}
        if old.get("params_sha256") and old["params_sha256"] == _read(s).get("params_sha256"):
            print(f"unchanged {d} (same parameters as {s}): its card is kept")
            continue
        for f in ("params.msgpack", "card.json"):
            shutil.copy2(os.path.join(s, f), os.path.join(d, f))
        card = _read(d)
        if card.get("init_from"):
            # name the shipped model it started from rather than a training path
            card["init_from_workdir"] = card["init_from"]
            prev = card.get("init_from_model") or {}
            if is_continuation(card):
                card["init_from"] = (f"{dst} as shipped before (params sha256 {str(prev.get('params_sha256'))[:12]}...), "
                                     "continued with a fresh Adam state")
            else:
                card["init_from"] = "ddpm (the shipped unconditional model, before its quality evaluation)"
        card["config"].pop("data_dir", None)
        _write(d, card)
        print(f"copied {s} -> {d}")


def _read(d):
    with open(os.path.join(d, "card.json")) as f:
        return json.load(f)


def _write(d, card):
    tmp = os.path.join(d, "card.json.tmp")
    with open(tmp, "w") as f:
        json.dump(card, f, indent=2)
    os.replace(tmp, os.path.join(d, "card.json"))


def _scorer(out):
    from dngjax import checkpoint, evaluation
    cmod, cparams, _ = checkpoint.load_classifier(os.path.join(out, "classifier"))
    return evaluation.make_scorer(cmod, cparams)


def reference_stats(out, classes, data_dir):
    from dngjax import data, evaluation

    score = _scorer(out)
    x, y = data.load_dataset("mnist", "train", data_dir=data_dir)
    t0 = time.time()
    feats = score(x).features
    os.makedirs(os.path.join(out, "reference_stats"), exist_ok=True)
    for name, keep in [("train_all", np.ones(len(y), bool))] + [(f"train_without_{c}", y != c) for c in classes]:
        path = os.path.join(out, "reference_stats", f"{name}.npz")
        np.savez(path, **evaluation.reference_stats(feats[keep]))
        print(f"wrote {path} (n={int(keep.sum())}, {time.time() - t0:.0f}s)")


def _sample(model, n, seed, steps, chunk, noise, label=None):
    """n samples of a loaded model (:class:`dngjax.checkpoint.DiffusionModel`) on its card's chain, respaced."""
    import dngjax as dj
    return dj.sample(model.denoiser(label), dj.respace(model.schedule, steps), dj.keys_from_seeds(np.arange(n) + seed),
                     tuple(model.card["input_shape"]), noise=noise, chunk_size=chunk)


def _unconditional_quality(x, score, train_stats, train_hist, real_fd):
    from dngjax import evaluation
    q = evaluation.sample_quality(score(x), *train_stats, ref_histogram=train_hist)
    q["fd_real_test_images_same_n"] = real_fd
    q["kl_train_to_samples"] = q.pop("kl_ref_to_samples")
    q["targets"] = {"fd": f"<= 2 x {real_fd:.2f}", "confident_share": ">= 0.93", "kl_train_to_samples": "<= 0.01"}
    q["passed"] = bool(q["fd"] <= 2 * real_fd and q["confident_share"] >= 0.93 and q["kl_train_to_samples"] <= 0.01)
    return q


def _fmt_uncond(q):
    return (f"FD {q['fd']:.2f} (real {q['fd_real_test_images_same_n']:.2f}), {100 * q['confident_share']:.1f}% "
            f"with p > 0.9, KL {q['kl_train_to_samples']:.4f}")


def _draw(model, n, *, seed, steps, chunk, noise, label=None):
    """n samples (n, *input_shape) of a loaded model, in sampler calls of at most ``chunk`` seeds."""
    return _sample(model, n, seed, steps, min(chunk, n), noise, label=label)


def _real_image_fd(score, train_stats, data_dir):
    """fd_real(n): the FD of n real MNIST test images to train_all, the floor of the FD at this sample size
    (each n measured once)."""
    real_fd = {}

    def fd_real(n):
        if n not in real_fd:
            from dngjax import data, metrics
            x_test, _ = data.load_dataset("mnist", "test", data_dir=data_dir)
            real_fd[n] = round(metrics.frechet_distance_features(score(x_test[:n]).features, *train_stats), 3)
        return real_fd[n]
    return fd_real


def _common_quality_fields(steps, noise, seed, classifier_card):
    """The quality fields every model's card shares: the sampler, the first seed, the scoring classifier."""
    return {"sampler": f"ancestral DDPM, linear betas respaced to {steps} steps, reverse-step noise "
                       f"sigma_t^2 = {'beta_t' if noise == 'beta' else 'beta_tilde_t'} ({noise!r})",
            "seed_first": int(seed),
            "scored_by": f"classifier (checkpoints/mnist/classifier, test accuracy "
                         f"{classifier_card.get('test_accuracy')})"}


def _to_measure(name, d, only, reeval) -> bool:
    """Whether model ``name`` (exported into ``d``) is measured: named in ``only`` (when given), exported, and
    without its quality in the card unless ``reeval`` or ``only``; says why it is skipped."""
    if only and name not in only:
        return False
    if not os.path.isfile(os.path.join(d, "card.json")):
        print(f"skip {name}: not exported")
        return False
    if "quality" in _read(d) and not reeval and not only:
        print(f"skip {name}: its card has its quality (a new model is copied without; --reeval or --only "
              "measures again)")
        return False
    return True


def _null_label_quality(model, name, common, draw, n_uncond, score, train_stats, train_hist, fd_real):
    """(quality, its first 64 samples) of ddpm or of cond with the null label: n_uncond samples against
    train_all (FD, confident share, KL of the class histograms)."""
    q = dict(common)
    x = draw(model, n_uncond)
    q.update(_unconditional_quality(x, score, train_stats, train_hist, fd_real(n_uncond)))
    print(f"{name}{' (null label)' if name == 'cond' else ''}: {_fmt_uncond(q)}  hist={q['class_histogram']}")
    return q, x[:64]


def _per_label_quality(model, common, null_label, draw, n_per_class, score):
    """(quality, 10 samples per label (100, ...)) of cond: the null label's quality and, per label c, the share
    of its n_per_class samples classified as c."""
    q = {**common, "null_label": null_label, "per_label": {}}
    rows = []
    for c in range(10):
        xc = draw(model, n_per_class, label=c)
        share = float(np.mean(score(xc).labels == c))
        q["per_label"][str(c)] = {"num_samples": n_per_class, "fraction_classified_as_label": round(share, 4)}
        rows.append(xc[:10])
        print(f"cond label {c}: {100 * share:.1f}% classified as {c}")
    worst = min(v["fraction_classified_as_label"] for v in q["per_label"].values())
    q["targets"] = {"null_label": q["null_label"]["targets"], "per_label": ">= 0.98 classified as the label"}
    q["passed"] = bool(q["null_label"]["passed"] and worst >= 0.98)
    return q, np.concatenate(rows)


def _forget_quality(model, name, common, draw, n_forget, score):
    """(quality, its first 64 samples) of a forget-class model: the share of n_forget samples classified as
    its class."""
    q = dict(common)
    c = model.card["only_class"]
    x = draw(model, n_forget)
    labels = score(x).labels
    frac = float(np.mean(labels == c))
    q.update({"num_samples": int(n_forget), "class_histogram": np.bincount(labels, minlength=10).tolist(),
              "fraction_classified_as_class": round(frac, 4),
              "targets": {"fraction_classified_as_class": ">= 0.99"}, "passed": bool(frac >= 0.99)})
    print(f"{name}: {100 * frac:.1f}% classified as {c}  hist={q['class_histogram']}")
    return q, x[:64]


def _write_quality(d, q, grid, nrow):
    """Write the sample grid ``samples.png`` (``nrow`` per row) into ``d`` and the quality ``q`` into its card."""
    from dngjax.tools.train.trainer import write_png_grid
    write_png_grid(grid, os.path.join(d, "samples.png"), nrow=nrow)
    card = _read(d)
    card["quality"] = q
    card["samples_png"] = "samples.png"
    _write(d, card)


def evaluate(out, classes, data_dir, n_uncond, n_per_class, n_forget, steps, chunk, seed, noise, only=(),
             reeval=False):
    """Measure each exported DDPM's sample quality (ddpm, cond, forget_C) and write it into its card, with a
    sample grid (the module docstring's step 3 and targets)."""
    from dngjax import checkpoint, data

    score = _scorer(out)
    _, y_train = data.load_dataset("mnist", "train", data_dir=data_dir, as_float=False)
    train_hist = np.bincount(y_train, minlength=10)
    train_stats = checkpoint.load_reference_stats(os.path.join(out, "reference_stats", "train_all.npz"))
    fd_real = _real_image_fd(score, train_stats, data_dir)
    common = _common_quality_fields(steps, noise, seed, _read(os.path.join(out, "classifier")))
    draw = functools.partial(_draw, seed=seed, steps=steps, chunk=chunk, noise=noise)
    for name in ["ddpm", "cond"] + [f"forget_{c}" for c in classes]:
        d = os.path.join(out, name)
        if not _to_measure(name, d, only, reeval):
            continue
        model = checkpoint.load_diffusion_model(d)
        t0 = time.time()
        if name == "ddpm" or name == "cond":
            q, grid = _null_label_quality(model, name, common, draw, n_uncond, score, train_stats, train_hist,
                                          fd_real)
        if name == "cond":
            q, grid = _per_label_quality(model, common, q, draw, n_per_class, score)
        elif name.startswith("forget_"):
            q, grid = _forget_quality(model, name, common, draw, n_forget, score)
        q["sampling_wall_time_s"] = round(time.time() - t0, 1)
        _write_quality(d, q, grid, nrow=10 if name == "cond" else 8)


def write_readme(out, classes):
    rows = []
    for name in ["classifier", "ddpm", "cond"] + [f"forget_{c}" for c in classes]:
        d = os.path.join(out, name)
        if not os.path.isfile(os.path.join(d, "card.json")):
            continue
        card = _read(d)
        hw = card.get("hardware", {})
        q = card.get("quality", {})
        if name == "classifier":
            qual = f"test accuracy {100 * card.get('test_accuracy', 0):.2f}%"
        elif "fd_real_test_images_same_n" in q:
            qual = f"{_fmt_uncond(q)} (n={q['num_samples']})"
        elif "null_label" in q:
            per = [v["fraction_classified_as_label"] for v in q["per_label"].values()]
            qual = (f"null label: {_fmt_uncond(q['null_label'])} (n={q['null_label']['num_samples']}); "
                    f"label c: {100 * min(per):.1f}-{100 * max(per):.1f}% classified as c "
                    f"(n={q['per_label']['0']['num_samples']} per label)")
        elif "kl_train_to_samples" in q:
            qual = f"KL(train‖samples) {q['kl_train_to_samples']:.4f} (n={q['num_samples']})"
        elif "fraction_classified_as_class" in q:
            qual = f"{100 * q['fraction_classified_as_class']:.1f}% classified as {card.get('only_class')} (n={q['num_samples']})"
        else:
            qual = "not measured"
        arch_s = arch_summary(card)
        tot = totals(card)
        if is_continuation(card):
            steps_s = (f"{tot['steps'] - card['steps']} + {card['steps']} x {card.get('batch_size')} (continued from "
                       "its own weights)")
        else:
            steps_s = f"{card.get('steps')} x {card.get('batch_size')}{' (fine-tuned from ddpm)' if card.get('init_from') else ''}"
        rows.append(f"| `{name}` | {arch_s}, {card.get('num_params')} params | {steps_s} | {round(tot['wall_time_s'], 1)} s on "
                    f"{hw.get('platform')} ({hw.get('cpu_cores_used', hw.get('cpu_count'))} of {hw.get('cpu_count')} "
                    f"cores) | {card.get('final_loss')} | {qual} |")
    notes = "".join(f"- `{n}`: {_read(os.path.join(out, n)).get('notes')}\n"
                    for n in ["classifier", "ddpm", "cond"] + [f"forget_{c}" for c in classes]
                    if os.path.isfile(os.path.join(out, n, "card.json")) and
                    _read(os.path.join(out, n)).get("notes"))
    hw = "".join(f"\n- `{n}`: {_read(os.path.join(out, n))['hardware_note']}"
                 for n in ["classifier", "ddpm", "cond"] + [f"forget_{c}" for c in classes]
                 if os.path.isfile(os.path.join(out, n, "card.json")) and _read(os.path.join(out, n)).get("hardware_note"))
    text = ("# Shipped MNIST models\n\nGenerated by `python -m train.export`; every number comes from the model "
            "cards (`*/card.json`). Quality: samples of a 100-step respaced ancestral chain, classified by "
            "`classifier`.\n\n| model | architecture | steps x batch | training time | final loss | quality |\n"
            "| --- | --- | --- | --- | --- | --- |\n" + "\n".join(rows) + "\n\n" + notes +
            (f"\nHardware:{hw}\n" if hw else "") +
            "\n\n`reference_stats/train_all.npz` and `train_without_C.npz`: mean `mu` and covariance `sigma` of the "
            "classifier's penultimate features (128-d) over the MNIST train set (without class C), for the "
            "Fréchet distance (FD).\n")
    with open(os.path.join(out, "README.md"), "w") as f:
        f.write(text)


NOTES = {
    "classifier": "CPU size of train/configs/mnist_classifier.py (CNN widths (16, 32), 128-d features), "
                  "1500 steps x 128 with +-2 pixel shift augmentation.",
    "ddpm": "train/configs/mnist_ddpm.py:cpu, trained from scratch: {arch}, {steps:,} steps x 64 "
            "(~{epochs:.1f} epochs), EMA decay 0.999 (unless a segment names another); {schedule}. Resumable: the same "
            "command with a larger --config.num_train_steps continues it.",
    "cond": "train/configs/mnist_cond.py:cpu, trained from scratch: the ddpm's architecture and schedule with a "
            "label embedding (labels 0-9 and the null label 10), trained with label dropout (each label replaced by "
            "the null label with the probability given per segment below); {steps:,} steps x 64 (~{epochs:.1f} epochs); {schedule}. Resumable like ddpm.",
    "forget": "train/configs/mnist_forget.py:cpu, trained from scratch on the ~6,000 train images of class {c} "
              "only: {arch}, {steps:,} steps x 64; {schedule}.",
}


def arch_summary(card) -> str:
    """The card's network in words, e.g. ``UNet ch 16 x (1, 2, 4), 2 res blocks per level``."""
    kw, kind = card["arch"]["kwargs"], card["arch"]["kind"]
    if kind != "unet":
        return f"CNN widths {tuple(kw.get('widths') or ())}"
    s = f"UNet ch {kw.get('ch')} x {tuple(kw.get('ch_mult') or ())}"
    nrb = kw.get("num_res_blocks", 1)
    return s + (f", {nrb} res blocks per level" if nrb != 1 else "")


def is_continuation(card) -> bool:
    """Whether the card's model was initialised from an earlier version of itself (same name and class),
    rather than fine-tuned from another model."""
    prev = card.get("init_from_model") or {}
    return bool(prev) and prev.get("name") == card.get("name") and prev.get("only_class") == card.get("only_class")


def _runs_of(card) -> list:
    """The card's training segments (``training_runs``, else one segment from its config)."""
    if card.get("training_runs"):
        return [_new_names(r) for r in card["training_runs"]]
    c = card.get("config") or {}
    return [{"start_step": 0, "end_step": int(card.get("steps", 0)),
             "num_train_steps": int(c.get("num_train_steps", c.get("num_steps", card.get("steps", 0)))),
             "batch_size": int(card.get("batch_size", c.get("batch_size", 0))), "optim": c.get("optim") or {},
             "label_dropout": float(c.get("label_dropout", 0.0) or 0.0), "init_from": c.get("init_from") or None}]


def _new_names(r) -> dict:
    """A training segment with today's field names (cards written before the rename say ``num_steps``)."""
    r = dict(r)
    if "num_steps" in r:
        r.setdefault("num_train_steps", r.pop("num_steps"))
    return r


def _same_ema(p, r) -> bool:
    """Whether two segments' EMA decays agree; a segment that did not record one (written before 2026-12-04)
    agrees with any, so it does not split a run that followed one schedule."""
    a, b = p.get("ema_decay"), r.get("ema_decay")
    return a is None or b is None or a == b


def _merge_runs(runs) -> list:
    """Consecutive segments that followed the same learning rate (e.g. a run stopped and resumed with a longer
    schedule whose constant part covers the earlier segment), label dropout and batch, as one."""
    from dngjax.tools.train.trainer import lr_schedule
    out = []
    for r in runs:
        if out and not r.get("init_from"):
            p = out[-1]
            steps = np.arange(p["start_step"], p["end_step"])
            same_lr = np.allclose(np.asarray(lr_schedule(p["optim"], p["num_train_steps"])(steps)),
                                  np.asarray(lr_schedule(r["optim"], r["num_train_steps"])(steps)), rtol=1e-6, atol=0)
            rest = ("b1", "b2", "weight_decay", "grad_clip")
            if (same_lr and p["label_dropout"] == r["label_dropout"] and p["batch_size"] == r["batch_size"]
                    and _same_ema(p, r) and all(p["optim"].get(k) == r["optim"].get(k) for k in rest)):
                out[-1] = dict(r, start_step=p["start_step"])
                continue
        out.append(dict(r))
    return out


def _reaches_decay(r) -> bool:
    """Whether the segment ``r`` ran into the decay of its learning rate (a cosine over the whole run, or a
    cosine over the run's last ``decay_steps`` steps that starts before the segment's end)."""
    decay = int(r["optim"].get("decay_steps", 0) or 0)
    return r["optim"].get("schedule") == "cosine" or (decay > 0 and r["num_train_steps"] - decay < r["end_step"])


def _run_note(r, restart: bool) -> str:
    o, a, b, n = r["optim"], r["start_step"], r["end_step"], r["num_train_steps"]
    lr = o.get("lr", 1e-3)
    s = f"steps {a:,}-{b:,}: Adam lr {lr:g}"
    if restart:
        s += " (a warm restart: the same Adam state)"
    if a < int(o.get("warmup_steps", 0)):
        s += f" after {o['warmup_steps']} warm-up steps"
    decay = int(o.get("decay_steps", 0) or 0)
    if o.get("schedule") == "cosine":
        s += f", a cosine decay to {lr / 100:g} over steps 0-{n:,}"
    elif _reaches_decay(r):
        s += ((f", constant to step {n - decay:,}, then" if n - decay > a else ",") + f" a cosine decay to {lr / 100:g}"
              + (f" by step {n:,}" if b >= n else f" (stopped at step {b:,} of {n:,})"))
    else:
        s += ", constant"
    if r.get("label_dropout"):
        s += f", label dropout {r['label_dropout']:g}"
    if r.get("ema_decay") is not None:   # recorded since 2026-12-04 (0.999 in the cpu configs before)
        s += f", EMA decay {r['ema_decay']:g}"
    return s


def schedule_note(card) -> str:
    """The training's schedule in words, segment by segment (from ``training_runs``), with the model it was
    continued from first."""
    parts, prefix = [], ""
    if is_continuation(card):
        prev = card["init_from_model"]
        parts.append(schedule_note(prev) + f"; then continued from its EMA weights with a fresh Adam state for "
                     f"{card.get('steps', 0):,} steps")
        prefix = "continuation "
    runs = _merge_runs(_runs_of(card))
    decayed = False
    notes = []
    for r in runs:
        notes.append(prefix + _run_note(r, restart=decayed and r["start_step"] > 0 and not r.get("init_from")))
        decayed = _reaches_decay(r)
    return "; ".join(parts + notes)


def totals(card) -> dict:
    """Steps, wall time and CPU core-hours of the model and of the versions of itself it was continued from."""
    t = {"steps": int(card.get("steps", 0)), "wall_time_s": float(card.get("wall_time_s") or 0.0),
         "cpu_core_hours": float(card.get("cpu_core_hours") or 0.0)}
    if is_continuation(card):
        p = totals(card["init_from_model"])
        t = {k: t[k] + p[k] for k in t}
    return t


HARDWARE_NOTE = ("{cpu}, {cores} of the VM's {count} cores (the process pinned with taskset; the other core "
                 "trained another model at the same time). CPU core-hours = wall time x cores used: {hours}.")


def add_notes(out, classes):
    """Notes for freshly copied CPU-trained models (cards that already have notes keep them)."""
    for name in ["classifier", "ddpm", "cond"] + [f"forget_{c}" for c in classes]:
        d = os.path.join(out, name)
        if not os.path.isfile(os.path.join(d, "card.json")):
            continue
        card = _read(d)
        hw = card.get("hardware", {})
        if hw.get("platform") != "cpu" or card.get("notes"):
            continue
        key = "forget" if name.startswith("forget_") else name
        tot = totals(card)
        epochs = tot["steps"] * card.get("batch_size", 0) / max(card.get("train_examples", 1), 1)
        card["notes"] = NOTES[key].format(c=card.get("only_class"), steps=tot["steps"], epochs=epochs,
                                          schedule=schedule_note(card), arch=arch_summary(card))
        card["hardware_note"] = HARDWARE_NOTE.format(cpu=hw.get("processor"), cores=hw.get("cpu_cores_used", "?"),
                                                     count=hw.get("cpu_count"), hours=round(tot["cpu_core_hours"], 2))
        _write(d, card)


def main(argv):
    with cli.user_errors():
        try:
            classes = [int(c) for c in FLAGS.classes.split()]
        except ValueError:
            raise ValueError(f"--classes={FLAGS.classes!r}: class numbers separated by spaces, "
                             "e.g. --classes='0 1 2 3'") from None
        if FLAGS.copy and not os.path.isdir(FLAGS.workdir):
            raise FileNotFoundError(f"--workdir={FLAGS.workdir} does not exist (or pass --nocopy)")
        unknown = set(FLAGS.only.split()) - set(_names(classes).values())
        if unknown:
            raise ValueError(f"--only names unknown models {sorted(unknown)}")
        cli.check_writable_folder(FLAGS.out, "--out")
        if FLAGS.stats or FLAGS.eval:   # both score with the classifier, on MNIST: both there before any copy
            from dngjax import data
            have = os.path.isfile(os.path.join(FLAGS.out, "classifier", "card.json"))
            source = os.path.join(FLAGS.workdir, "mnist_classifier", "model")
            copied = (FLAGS.copy and (not FLAGS.only.split() or "classifier" in FLAGS.only.split())
                      and os.path.isfile(os.path.join(source, "card.json")))
            if not (have or copied):
                raise FileNotFoundError(
                    f"--stats and --eval score with {os.path.join(FLAGS.out, 'classifier')}, which does not exist"
                    + (f" and is not copied from {source}" if FLAGS.copy else "")
                    + ": train the classifier first, or pass --nostats --noeval")
            stats = os.path.join(FLAGS.out, "reference_stats", "train_all.npz")
            if FLAGS.eval and not FLAGS.stats and not os.path.isfile(stats):
                raise FileNotFoundError(f"--eval compares with {stats}, which does not exist: drop --nostats")
            data.load_dataset("mnist", "train", data_dir=FLAGS.data_dir, as_float=False)
    if FLAGS.eval and not FLAGS.reeval and not FLAGS.only.split():
        cli.on_interrupt("rerun the same command to go on: models whose cards already have their quality are not "
                         "measured again (the copy and the reference statistics are redone)")
    else:
        cli.on_interrupt("nothing resumes with --reeval, --only or --noeval: rerunning the same command does every "
                         "step again")
    os.makedirs(FLAGS.out, exist_ok=True)
    if FLAGS.copy:
        copy_models(FLAGS.workdir, FLAGS.out, classes, tuple(FLAGS.only.split()))
    if FLAGS.stats:
        reference_stats(FLAGS.out, classes, FLAGS.data_dir)
    if FLAGS.eval:
        evaluate(FLAGS.out, classes, FLAGS.data_dir, FLAGS.n_uncond, FLAGS.n_per_class, FLAGS.n_forget,
                 FLAGS.steps, FLAGS.chunk, FLAGS.seed, VARIANCE_VALUES.get(FLAGS.noise, FLAGS.noise),
                 tuple(FLAGS.only.split()), FLAGS.reeval)
    add_notes(FLAGS.out, classes)
    write_readme(FLAGS.out, classes)


def cli_main():
    cli.run(main, define_flags, doc=__doc__)


if __name__ == "__main__":
    cli_main()
