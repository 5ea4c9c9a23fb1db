"""Train a DDPM or the evaluation classifier (Flax-examples style: flags here, logic in dngjax.tools.train.trainer).

  python train/main.py --config=train/configs/mnist_ddpm.py:cpu --workdir=workdir/mnist_ddpm
  python train/main.py --config=train/configs/mnist_forget.py:cpu --config.only_class=3 \\
      --workdir=workdir/mnist_forget_3
  python train/main.py --config=train/configs/mnist_classifier.py:cpu --workdir=workdir/mnist_classifier
  dngjax-train ...                      # the same, as an installed command

Rerunning the same command resumes from the last checkpoint in --workdir
(``--config.max_steps_this_run=N`` stops after N steps, to split a long run; Ctrl-C stops it too).
Before anything is loaded, --workdir is checked: writable, and a run it holds trained the same network;
after the train step is compiled, its memory against the memory available (a batch too large is
refused, with the size to use).
--data_dir (or $DNGJAX_DATA_DIR) names an offline folder with mnist.npz / cifar10.npz;
without one, TensorFlow Datasets is used (pip install 'dngjax[data]').

Several processes (hosts; docs/multihost.md): every process runs the same command with
--coordinator_address=HOST:PORT --num_processes=N --process_id=I (or $DNGJAX_COORDINATOR,
$DNGJAX_NUM_PROCESSES, $DNGJAX_PROCESS_ID; SLURM, Open MPI and TPU slices supply them); the training is
data-parallel over every process's devices, config.batch_size the global batch, and --workdir must be
one folder that every process sees (a shared file system).
"""

import os
import shutil
import sys

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


def resume_note(workdir: str, every: int) -> str:
    """What Ctrl-C during training says: the run resumes from its last checkpoint."""
    return (f"rerun the same command to resume from the last checkpoint in {workdir} (one is saved every "
            f"config.checkpoint_every={every} steps; before the first, the run starts again)")


def main(argv):
    from dngjax import memory
    from dngjax.tools.train import preflight, trainer

    if not FLAGS.verbose:
        logging.set_verbosity(logging.WARNING)
    config = FLAGS.config
    if FLAGS.data_dir:
        with config.unlocked():
            config.data_dir = FLAGS.data_dir
    logging.info("config:\n%s", config)
    with cli.user_errors():
        trainer.validate_config(config)
        workdir = preflight.check_workdir(config, FLAGS.workdir)   # writable; a run there of this network
    created = not os.path.exists(workdir)
    cli.on_interrupt(resume_note(workdir, config.checkpoint_every) if not created else
                     "nothing was trained yet (the new --workdir is removed): rerunning the same command starts again")
    try:
        with cli.user_errors():
            run = trainer.prepare(config, workdir)   # data, model, optimiser, resume: before any step
    except BaseException:
        _remove_if_new(workdir, created)        # a refused or interrupted start leaves no folder behind
        raise
    cli.on_interrupt(resume_note(workdir, config.checkpoint_every))
    try:
        card = run()
    except memory.TooLarge as e:                # refused after compiling the step, before the first one
        _remove_if_new(workdir, created)
        cli.fail(str(e))
    summary = {k: card.get(k) for k in ("name", "steps", "wall_time_s", "final_loss", "test_accuracy") if k in card}
    print(summary)


def _remove_if_new(workdir: str, created: bool) -> None:
    if created and os.path.isdir(workdir):
        shutil.rmtree(workdir, ignore_errors=True)


#: training config flags renamed: ``--config.OLD=...`` still works, with a message naming the new one
#: (``num_steps`` is the sampler's chain length elsewhere; the training's is ``num_train_steps``)
RENAMED_CONFIG_FLAGS = {"num_steps": "num_train_steps"}


def renamed_flags(argv):
    """``argv`` with the old ``--config.OLD`` flags spelled the new way (a line on stderr for each)."""
    out = []
    for a in argv:
        for old, new in RENAMED_CONFIG_FLAGS.items():
            if a == f"--config.{old}" or a.startswith(f"--config.{old}="):
                print(f"--config.{old} is deprecated: use --config.{new}", file=sys.stderr)
                a = f"--config.{new}" + a[len(f"--config.{old}"):]
        out.append(a)
    return out


def cli_main():
    sys.argv[:] = renamed_flags(sys.argv)
    cli.run(main, define_flags, doc=__doc__, distributed=True)


if __name__ == "__main__":
    cli_main()
