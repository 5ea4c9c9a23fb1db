"""Train a DDPM or the evaluation classifier (Flax-examples style: flags here, logic in train.trainer).

  python train/main.py --config=train/configs/mnist_ddpm.py:cpu --workdir=workdir/mnist_ddpm
  python train/main.py --config=train/configs/mnist_forget.py:cpu --config.only_class=3 \\
      --workdir=workdir/mnist_forget_3
  python train/main.py --config=train/configs/mnist_classifier.py:cpu --workdir=workdir/mnist_classifier
  dngjax-train ...                      # the same, as an installed command

Rerunning the same command resumes from the last checkpoint in --workdir
(``--config.max_steps_this_run=N`` stops after N steps, to split a long run).
--data_dir (or $DNGJAX_DATA_DIR) names an offline folder with mnist.npz / cifar10.npz;
without one, TensorFlow Datasets is used (pip install 'dngjax[data]').
"""

from absl import flags, logging

from dngjax import cli

FLAGS = flags.FLAGS


def define_flags():
    from ml_collections import config_flags
    flags.DEFINE_string("workdir", None, "Directory for checkpoints, samples and the final model.", required=True)
    flags.DEFINE_string("data_dir", None, "Offline data folder (overrides $DNGJAX_DATA_DIR and config.data_dir).")
    flags.DEFINE_bool("verbose", False, "Log at INFO level (orbax prints ~30 lines per checkpoint save).")
    config_flags.DEFINE_config_file("config", None, "Training configuration file (path[:size]).",
                                    lock_config=True)
    flags.mark_flag_as_required("config")


def main(argv):
    from train import trainer

    if not FLAGS.verbose:
        logging.set_verbosity(logging.WARNING)
    config = FLAGS.config
    if FLAGS.data_dir:
        with config.unlocked():
            config.data_dir = FLAGS.data_dir
    logging.info("config:\n%s", config)
    with cli.user_errors():
        if not FLAGS.workdir:
            raise ValueError("--workdir must name a folder")
        run = trainer.prepare(config, FLAGS.workdir)   # data, model, optimiser, resume: before any step
    card = run()
    summary = {k: card.get(k) for k in ("name", "steps", "wall_time_s", "final_loss", "test_accuracy") if k in card}
    print(summary)


def cli_main():
    cli.run(main, define_flags, doc=__doc__)


if __name__ == "__main__":
    cli_main()
