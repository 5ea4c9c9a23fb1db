"""Export trained MNIST models into ``checkpoints/mnist`` and measure their quality.

  python -m train.export --workdir=workdir/cpu --out=checkpoints/mnist --classes="0 1 2 3"

Steps (each can be skipped with --noX flags):

1. copy: ``WORKDIR/mnist_classifier/model`` -> ``OUT/classifier``,
   ``WORKDIR/mnist_ddpm/model`` -> ``OUT/ddpm``, ``WORKDIR/mnist_forget_C/model`` -> ``OUT/forget_C``;
2. stats: for every class C, the mean and covariance of the classifier's
   penultimate features over the MNIST train set without C ->
   ``OUT/reference_stats/train_without_C.npz`` (``mu``, ``sigma``, ``n``);
3. eval: sample each DDPM on a respaced 100-step ancestral chain, classify the
   samples with the shipped classifier and write the result into the model
   card (``quality``): forget-class models, the share classified as their class
   (target >= 95%); the unconditional model, KL(train histogram || sample
   histogram) (target < 0.05); plus a 64-sample grid ``samples.png``.
   Also writes ``OUT/README.md``, a summary table.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", "workdir/cpu", "Folder with the training runs (mnist_classifier, mnist_ddpm, mnist_forget_C).")
flags.DEFINE_string("out", "checkpoints/mnist", "Destination folder.")
flags.DEFINE_string("classes", "0 1 2 3", "Forget classes (space separated).")
flags.DEFINE_string("data_dir", None, "Offline data folder (else $DNGJAX_DATA_DIR, then TFDS).")
flags.DEFINE_bool("copy", True, "Copy the models from --workdir.")
flags.DEFINE_bool("stats", True, "Compute the reference feature statistics.")
flags.DEFINE_bool("eval", True, "Measure sample quality and write it into the cards.")
flags.DEFINE_integer("n_uncond", 1000, "Samples of the unconditional model for the class histogram.")
flags.DEFINE_integer("n_forget", 200, "Samples of each forget-class model.")
flags.DEFINE_integer("steps", 100, "Respaced chain length for the quality samples.")
flags.DEFINE_integer("chunk", 250, "Samples per compiled sampler call.")
flags.DEFINE_integer("seed", 12345, "Seed of the quality samples.")
flags.DEFINE_string("only", "", "Restrict eval to these model names (space separated), e.g. 'ddpm forget_0'.")


def _names(classes):
    return {"mnist_classifier": "classifier", "mnist_ddpm": "ddpm",
            **{f"mnist_forget_{c}": f"forget_{c}" for c in classes}}


def copy_models(workdir, out, classes):
    for src, dst in _names(classes).items():
        s = os.path.join(workdir, src, "model")
        d = os.path.join(out, dst)
        if not os.path.isfile(os.path.join(s, "card.json")):
            print(f"skip {src}: no finished model in {s}")
            continue
        os.makedirs(d, exist_ok=True)
        old = _read(d) if os.path.isfile(os.path.join(d, "card.json")) else {}
        for f in ("params.msgpack", "card.json"):
            shutil.copy2(os.path.join(s, f), os.path.join(d, f))
        card = _read(d)
        if card.get("init_from"):
            # name the shipped model it was fine-tuned from rather than a training path
            card["init_from_workdir"] = card["init_from"]
            card["init_from"] = "ddpm (the shipped unconditional model, before its quality evaluation)"
        card["config"].pop("data_dir", None)
        if old.get("params_sha256") == card.get("params_sha256"):  # same model: keep its measured quality
            for k in ("quality", "samples_png"):
                if k in old:
                    card[k] = old[k]
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


def classifier_fns(out):
    import jax
    import jax.numpy as jnp
    from dngjax import checkpoint

    cmod, cparams, _ = checkpoint.load_classifier(os.path.join(out, "classifier"))
    logits = jax.jit(lambda x: cmod.apply(cparams, jnp.clip(x, -1.0, 1.0)))
    feats = jax.jit(lambda x: cmod.apply(cparams, jnp.clip(x, -1.0, 1.0), method="features"))

    def batched(fn, x, bs=1000):
        return np.concatenate([np.asarray(fn(jnp.asarray(x[i:i + bs]))) for i in range(0, len(x), bs)])

    return (lambda x: batched(lambda b: jnp.argmax(logits(b), -1), x)), (lambda x: batched(feats, x))


def reference_stats(out, classes, data_dir):
    from dngjax import data, metrics

    _, feats_fn = classifier_fns(out)
    x, y = data.load_dataset("mnist", "train", data_dir=data_dir)
    t0 = time.time()
    feats = feats_fn(x)
    os.makedirs(os.path.join(out, "reference_stats"), exist_ok=True)
    for c in classes:
        keep = y != c
        mu, sigma = metrics.gaussian_stats(feats[keep])
        path = os.path.join(out, "reference_stats", f"train_without_{c}.npz")
        np.savez(path, mu=mu.astype(np.float64), sigma=sigma.astype(np.float64), n=int(keep.sum()))
        print(f"wrote {path} (n={int(keep.sum())}, dim={mu.shape[0]}, {time.time() - t0:.0f}s)")


def _sample(module, params, n, seed, steps, chunk):
    from dngjax.denoiser import denoiser
    from dngjax.sampler import keys_from_seeds, sample
    from dngjax.schedules import linear_schedule, respace

    sched = respace(linear_schedule(), steps)
    eps = denoiser(module, params)
    seeds = np.arange(n) + seed
    xs = []
    for i in range(0, n, chunk):
        idx = seeds[i:i + chunk]
        if len(idx) < chunk:  # same compiled shape for the last chunk
            idx = np.concatenate([idx, np.arange(chunk - len(idx)) + seeds[-1] + 1])
        xs.append(np.asarray(sample(eps, sched, keys_from_seeds(idx), (28, 28, 1)))[:n - i])
    return np.concatenate(xs)[:n]


def evaluate(out, classes, data_dir, n_uncond, n_forget, steps, chunk, seed, only=()):
    from dngjax import checkpoint, data, metrics
    from train.train import save_grid

    labels_fn, _ = classifier_fns(out)
    _, y_train = data.load_dataset("mnist", "train", data_dir=data_dir, as_float=False)
    train_hist = metrics.class_histogram(y_train, 10)
    ccard = _read(os.path.join(out, "classifier"))
    todo = [("ddpm", None, n_uncond)] + [(f"forget_{c}", c, n_forget) for c in classes]
    for name, c, n in todo:
        if only and name not in only:
            continue
        d = os.path.join(out, name)
        if not os.path.isdir(d):
            print(f"skip {name}: not exported")
            continue
        module, params, card = checkpoint.load_model(d, expect_kind="unet")
        t0 = time.time()
        x = _sample(module, params, n, seed, steps, min(chunk, n))
        dt = time.time() - t0
        save_grid(os.path.join(d, "samples.png"), x[:64], nrow=8)
        labels = labels_fn(x)
        hist = metrics.class_histogram(labels, 10)
        q = {"sampler": f"ancestral DDPM, linear betas respaced to {steps} steps",
             "num_samples": int(n), "seed_first": int(seed),
             "scored_by": f"classifier (checkpoints/mnist/classifier, test accuracy {ccard.get('test_accuracy')})",
             "class_histogram": hist.tolist(), "sampling_wall_time_s": round(dt, 1)}
        if c is None:
            p_train = train_hist / train_hist.sum()
            q_gen = metrics.smoothed_distribution(hist)
            kl = metrics.kl_divergence(p_train, q_gen)
            q["train_class_histogram"] = train_hist.tolist()
            q["kl_train_to_samples"] = round(kl, 5)
            q["kl_samples_to_train"] = round(metrics.kl_divergence(q_gen, p_train), 5)
            q["kl_note"] = ("KL(p_train || p_samples) in nats; p_samples smoothed with 0.5 pseudo-counts "
                            "per class (dngjax.metrics.smoothed_distribution)")
            q["target"] = "kl_train_to_samples < 0.05"
            q["passed"] = bool(kl < 0.05)
            print(f"{name}: KL(train || samples) = {kl:.4f}  hist={hist.tolist()}  ({dt:.0f}s)")
        else:
            frac = float(np.mean(labels == c))
            q["fraction_classified_as_class"] = round(frac, 4)
            q["target"] = ">= 0.95 classified as the forget class"
            q["passed"] = bool(frac >= 0.95)
            print(f"{name}: {100 * frac:.1f}% classified as {c}  hist={hist.tolist()}  ({dt:.0f}s)")
        card = _read(d)
        card["quality"] = q
        card["samples_png"] = "samples.png"
        _write(d, card)


def write_readme(out, classes):
    rows = []
    for name in ["classifier", "ddpm"] + [f"forget_{c}" for c in classes]:
        d = os.path.join(out, name)
        if not os.path.isfile(os.path.join(d, "card.json")):
            continue
        card = _read(d)
        hw = card.get("hardware", {})
        q = card.get("quality", {})
        if name == "classifier":
            qual = f"test accuracy {100 * card.get('test_accuracy', 0):.2f}%"
        elif "kl_train_to_samples" in q:
            qual = f"KL(train‖samples) {q['kl_train_to_samples']:.4f} (n={q['num_samples']})"
        elif "fraction_classified_as_class" in q:
            qual = f"{100 * q['fraction_classified_as_class']:.1f}% classified as {card.get('only_class')} (n={q['num_samples']})"
        else:
            qual = "not measured"
        arch = card["arch"]["kwargs"]
        arch_s = (f"UNet ch={arch.get('ch')} mult={arch.get('ch_mult')}" if card["arch"]["kind"] == "unet"
                  else f"CNN widths={arch.get('widths')}")
        rows.append(f"| `{name}` | {arch_s}, {card.get('num_params')} params | {card.get('steps')} x {card.get('batch_size')}"
                    f"{' (fine-tuned from ddpm)' if card.get('init_from') else ''} | {card.get('wall_time_s')} s on "
                    f"{hw.get('platform')} ({hw.get('cpu_count')} cores) | {card.get('final_loss')} | {qual} |")
    notes = "".join(f"- `{n}`: {_read(os.path.join(out, n)).get('notes')}\n"
                    for n in ["classifier", "ddpm", f"forget_{classes[0]}"]
                    if classes and os.path.isfile(os.path.join(out, n, "card.json")) and
                    _read(os.path.join(out, n)).get("notes"))
    hw = _read(os.path.join(out, "ddpm")).get("hardware_note", "") if os.path.isfile(
        os.path.join(out, "ddpm", "card.json")) else ""
    text = ("# Shipped MNIST models\n\nGenerated by `python -m train.export`; every number comes from the model "
            "cards (`*/card.json`). Quality: samples of a 100-step respaced ancestral chain, classified by "
            "`classifier`.\n\n| model | architecture | steps x batch | training time | final loss | quality |\n"
            "| --- | --- | --- | --- | --- | --- |\n" + "\n".join(rows) + "\n\n" + notes +
            (f"\nHardware: {hw}\n" if hw else "") +
            "\n\n`reference_stats/train_without_C.npz`: mean `mu` and covariance `sigma` of the classifier's "
            "penultimate features (128-d) over the MNIST train set without class C, for the Fréchet distance (FD).\n")
    with open(os.path.join(out, "README.md"), "w") as f:
        f.write(text)


NOTES = {
    "classifier": "CPU size of train/configs/mnist_classifier.py (CNN widths (16, 32), 128-d features), "
                  "1500 steps x 128 with +-2 pixel shift augmentation.",
    "ddpm": "Reduced from the project's mnist_unet() (ch 32, ~1.1 M parameters) to ch 16 (~280 k parameters), "
            "dropout 0, to fit about 30 minutes of CPU: 2200 steps x 64 (~2.3 epochs). The wall time includes "
            "XLA compilation and one kill -9 + automatic resume (at step 100).",
    "forget": "Initialised from the unconditional model (ddpm) and fine-tuned on class {c} only for {steps} steps x 64 "
              "(not trained from scratch, for lack of CPU time).",
}
HARDWARE_NOTE = ("2-core x86_64 CPU VM shared with other jobs that ran at the same time (load average ~7), "
                 "so wall times are several times what an idle 2-core machine needs.")


def add_notes(out, classes):
    for name in ["classifier", "ddpm"] + [f"forget_{c}" for c in classes]:
        d = os.path.join(out, name)
        if not os.path.isfile(os.path.join(d, "card.json")):
            continue
        card = _read(d)
        if card.get("hardware", {}).get("platform") != "cpu":
            continue  # notes describe the CPU-trained shipped models only
        key = "forget" if name.startswith("forget_") else name
        card["notes"] = NOTES[key].format(c=card.get("only_class"), steps=card.get("steps"))
        card["hardware_note"] = HARDWARE_NOTE
        _write(d, card)


def main(argv):
    del argv
    classes = [int(c) for c in FLAGS.classes.split()]
    os.makedirs(FLAGS.out, exist_ok=True)
    if FLAGS.copy:
        copy_models(FLAGS.workdir, FLAGS.out, classes)
    if FLAGS.stats:
        reference_stats(FLAGS.out, classes, FLAGS.data_dir)
    if FLAGS.eval:
        evaluate(FLAGS.out, classes, FLAGS.data_dir, FLAGS.n_uncond, FLAGS.n_forget, FLAGS.steps,
                 FLAGS.chunk, FLAGS.seed, tuple(FLAGS.only.split()))
    add_notes(FLAGS.out, classes)
    write_readme(FLAGS.out, classes)


if __name__ == "__main__":
    app.run(main)
