"""Train a DDPM or the evaluation classifier (Flax-examples style).

  python train/main.py --config=train/configs/mnist_ddpm.py:cpu --workdir=workdir/mnist_ddpm
  python train/main.py --config=train/configs/mnist_forget.py:cpu --config.only_class=3 \
      --config.init_from=checkpoints/mnist/ddpm --workdir=workdir/mnist_forget_3
  python train/main.py --config=train/configs/mnist_classifier.py:cpu --workdir=workdir/mnist_classifier

Rerunning the same command resumes from the last checkpoint in --workdir.
--data_dir (or $DNGJAX_DATA_DIR) names an offline folder with mnist.npz / cifar10.npz;
without one, TensorFlow Datasets is used (pip install 'dngjax[data]').
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for checkpoints, samples and the final model.")
flags.DEFINE_string("data_dir", None, "Offline data folder (overrides $DNGJAX_DATA_DIR and config.data_dir).")
flags.DEFINE_bool("verbose", False, "Log at INFO level (orbax prints ~30 lines per checkpoint save).")
config_flags.DEFINE_config_file("config", None, "Training configuration file (path[:size]).", lock_config=True)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError("Too many command-line arguments.")
    if not FLAGS.verbose:
        logging.set_verbosity(logging.WARNING)
    from dngjax.data import DataUnavailableError
    from train import train

    config = FLAGS.config
    if FLAGS.data_dir:
        with config.unlocked():
            config.data_dir = FLAGS.data_dir
    logging.info("config:\n%s", config)
    try:
        card = train.train_and_evaluate(config, FLAGS.workdir)
    except DataUnavailableError as e:
        logging.error("%s", e)
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    summary = {k: card.get(k) for k in ("name", "steps", "wall_time_s", "final_loss", "test_accuracy") if k in card}
    print(summary)


if __name__ == "__main__":
    app.run(main)
