"""Class removal with NP, SLD and DNG, and the DNG posterior check (flags only; logic in sample/).

  python sample/main.py                                    # the main job: MNIST, remove 0, shipped checkpoints
  python sample/main.py --config.removed_class=3           # another class (forget models for 0-3 ship)
  python sample/main.py --config.conditional='{root}/cond' # one class-conditional model instead of two
  python sample/main.py --config.conditional='{root}/cond' --config.also_remove='(2,)' \\
      --config.methods='("DNG",)' --config.compute_reference=True   # remove 0 and 2 at once (multi-concept DNG)
  python sample/main.py --config=sample/configs/mnist.py:full      # the paper's protocol (GPU)
  python sample/main.py --config=sample/configs/cifar10.py:full --config.fid_weights=pt_inception-....pth
  python sample/main.py --job=posterior_check --classes=0,1,2,3    # does DNG's p_t flag the class?
  python sample/main.py --job=report --runs=outputs/report_cpu     # one report over several runs
  python sample/main.py --job=summary --runs=OUT_A,OUT_B          # the verdicts of several reports side by side
  python sample/main.py --job=select --runs=outputs/select          # DNG hyperparameters from selection runs
  python sample/main.py --job=extend --runs=OUT/class_0 --n=1024     # the points that decide the verdict, on more seeds
  python sample/main.py --job=archive --runs=outputs/protocol_cpu --out=docs/runs/protocol_cpu   # keep the small record
  python sample/main.py --job=calibrate --target=1 --config.seed=5000  # smallest scale with <= 1 % (95 % bound)
  python sample/main.py --job=text_to_image --config=sample/configs/sd.py:paper \\
      --config.folder=PATH/stable-diffusion-2-base --config.clip=PATH/clip-vit-large-patch14   # SD + Q metric
  dngjax-sample ...                                        # the same, as an installed command

Jobs: ``class_removal`` (default; :mod:`dngjax.tools.sample.class_removal`), ``posterior_check``
(:mod:`dngjax.tools.sample.posterior_check`: the config's DNG hyperparameters, chain and models, unguided) and
``report`` (:mod:`dngjax.tools.sample.report`: report.md and one trade-off figure over class-removal runs) and
``summary`` (:mod:`dngjax.tools.sample.summary`: the verdict tables and claims.png over several reports' report.json) and
``select`` (:mod:`dngjax.tools.sample.selection`: DNG's hyperparameters from runs on selection seeds, by a fixed rule) and
``extend`` (:mod:`dngjax.tools.sample.extend`: a run's deciding points topped up to --n samples, merged by the report) and
``archive`` (:mod:`dngjax.tools.sample.archive`: the small files of finished runs and reports, into the repository) and
``calibrate`` (:mod:`dngjax.tools.sample.calibrate`: per method, the smallest scale of its grid that meets --target) and
``text_to_image`` (:mod:`dngjax.tools.sample.text_to_image`: Stable Diffusion with NP / DNG away from negative prompts,
the paper's Q metric; config sample/configs/sd.py).
Every input is validated before sampling starts, output folders before any model loads; a bad one
exits with code 2 and one message. Ctrl-C exits with code 130 and one line that says whether the job
resumes: a class-removal run (and extend) keeps its finished grid points in ``<outdir>.partial``, and the
same command (the same --config.outdir) samples only the rest.

The class-removal job also runs as several processes (docs/multihost.md): every process runs the same
command with --coordinator_address=HOST:PORT --num_processes=N --process_id=I (or the DNGJAX_* variables);
each sweep's seeds are sharded over every process's devices, and process 0 alone writes the run folder
(which every process reads, to resume: a shared file system).
"""

import os

from absl import flags, logging

from dngjax import cli

FLAGS = flags.FLAGS
DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "mnist.py")


def define_flags():
    from ml_collections import config_flags
    config_flags.DEFINE_config_file(
        "config", DEFAULT_CONFIG,
        "Config file, path[:name] (default: sample/configs/mnist.py, the 'quick' main job; "
        "text_to_image: sample/configs/sd.py).",
        lock_config=True)
    flags.DEFINE_enum("job", "class_removal", list(JOBS), "What to run.")
    flags.DEFINE_list("classes", None, "posterior_check: removed classes to check (default: the config's).")
    flags.DEFINE_list("runs", None, "report, select, extend: class-removal output folders, or folders of them; "
                                    "summary: folders holding a report.json; archive: one folder to archive.")
    flags.DEFINE_integer("n", 1024, "extend: samples per deciding point after the top-up.")
    flags.DEFINE_float("target", 1.0, "calibrate: the highest acceptable share of the removed class, in %.")
    flags.DEFINE_float("confidence", 0.95, "calibrate: one-sided confidence of the bound on that share.")
    flags.DEFINE_string("out", None, "posterior_check, calibrate: output folder (default outputs/posterior_check, "
                                     "outputs/calibration); "
                                     "report, select, summary: where report.md / selection.md / summary.md go "
                                     "(default: the runs' common parent); archive: the copy (required).")


def resume_note(job) -> str:
    """What Ctrl-C says during a class-removal run: its finished points are kept, the same outdir resumes."""
    out = job.outdir.rstrip("/")
    how = ("rerun the same command" if job.config.outdir else f"rerun with --config.outdir={out}")
    return f"the finished grid points are kept in {out}.partial: {how} to resume (it samples only the rest)"


def check_chunk_memory(job, trace: bool) -> None:
    """The largest sweep's sampling chunk fits in memory (:func:`dngjax.memory.check_sampling_chunk`)."""
    from dngjax import memory
    grid = max([len(scales) for _, _, _, scales in job.methods] + [1])
    memory.check_sampling_chunk(job.denoiser_u, job.shape, len(job.seeds), job.config.chunk_size, grid,
                                trace_steps=job.schedule.num_steps if trace else 0)


def _check_out(path, flag):
    """The output folder ``path`` (of ``flag``) can be created or written: checked before any model loads."""
    if path:
        cli.check_writable_folder(path, flag)


def run_text_to_image(config):
    from dngjax.tools.sample import text_to_image
    with cli.user_errors():
        _check_out(config.get("outdir") or os.path.join("outputs", "text_to_image"), "--config.outdir")
        job = text_to_image.prepare(config)
    cli.on_interrupt(f"{job.outdir} is incomplete and nothing resumes: rerunning the same command starts again")
    text_to_image.execute(job)


def run_class_removal(config):
    from dngjax.tools.sample import class_removal
    with cli.user_errors():
        class_removal.validate_config(config)
        _check_out(class_removal.choose_outdir(config), "--config.outdir")
        job = class_removal.prepare(config)
        check_chunk_memory(job, trace=True)
    cli.on_interrupt(resume_note(job))
    class_removal.execute(job)


def run_calibrate(config):
    from dngjax.tools.sample import calibrate, class_removal
    out = FLAGS.out or "outputs/calibration"
    with cli.user_errors():
        calibrate.validate(FLAGS.target, FLAGS.confidence)
        _check_out(out, "--out")
        job = class_removal.prepare(config)
        check_chunk_memory(job, trace=False)
    calibrate.execute(job, FLAGS.target, FLAGS.confidence, out)


def run_posterior_check(config):
    from dngjax.tools.sample import posterior_check
    out = FLAGS.out or "outputs/posterior_check"
    with cli.user_errors():
        try:
            classes = [int(c) for c in (FLAGS.classes or [config.removed_class])]
        except ValueError:
            raise ValueError(f"--classes={','.join(FLAGS.classes)}: class numbers, e.g. --classes=0,1,2") from None
        _check_out(out, "--out")
        job = posterior_check.prepare(config, classes, out)
    posterior_check.execute(job)


def run_extend(config):
    from dngjax.tools.sample import class_removal, extend, report
    with cli.user_errors():
        runs = [r for r in report.find_runs(_runs("extend")) if not extend.is_top_up(r)]
        jobs = {run: extend.extension_config(run, FLAGS.n, progress=config.progress) for run in runs}
        for cfg in jobs.values():
            if cfg is not None:
                _check_out(cfg.outdir, "the top-up folder of --runs")
        jobs = {run: class_removal.prepare(cfg) for run, cfg in jobs.items() if cfg is not None}
        for job in jobs.values():
            check_chunk_memory(job, trace=True)
    cli.on_interrupt("the finished points of the top-up being sampled are kept in its <folder>.partial: "
                     "rerun the same command to resume (finished top-ups are not sampled again)")
    for run in runs:
        job = jobs.get(run)
        while job is not None:          # again while the larger samples make another point deciding
            class_removal.execute(job)
            cfg = extend.extension_config(run, FLAGS.n, progress=config.progress)
            job = None if cfg is None else class_removal.prepare(cfg)
        print(f"{run}: its deciding points have n >= {FLAGS.n}", flush=True)


def run_archive(config):
    from dngjax.tools.sample import archive
    with cli.user_errors():
        if not FLAGS.runs or len(FLAGS.runs) != 1 or not FLAGS.out:
            raise ValueError("--job=archive needs one --runs=FOLDER and --out=COPY (e.g. docs/runs/NAME)")
        _check_out(FLAGS.out, "--out")
        paths = archive.plan(FLAGS.runs[0], FLAGS.out)
    copied = archive.archive(FLAGS.runs[0], FLAGS.out, paths)
    for path, size in copied:
        print(f"{size:>9,d} B  {os.path.join(FLAGS.out, path)}")
    print(f"archived {len(copied)} file(s), {sum(s for _, s in copied):,d} B, from {FLAGS.runs[0]} into {FLAGS.out}")


def run_summary(config):
    from dngjax.tools.sample import summary
    with cli.user_errors():
        runs = _runs("summary", "folders holding a report.json")
        _check_out(FLAGS.out, "--out")
        groups, high_safety = summary.load(runs)     # every report.json there and alike
    summary.write_summary(groups, high_safety, runs, FLAGS.out)


def run_select(config):
    from dngjax.tools.sample import report, selection
    with cli.user_errors():
        wanted = _runs("select")
        _check_out(FLAGS.out, "--out")
        runs = report.find_runs(wanted)
        selection.write_selection(runs, FLAGS.out, config.high_safety, config.select_ceiling)


def run_report(config):
    from dngjax.tools.sample import report
    with cli.user_errors():
        wanted = _runs("report")
        _check_out(FLAGS.out, "--out")
        runs = report.find_runs(wanted)
    report.write_report(runs, FLAGS.out, config.high_safety)


def _runs(job: str, what: str = "") -> list:
    """--runs, required by ``job``."""
    if not FLAGS.runs:
        raise ValueError(f"--job={job} needs --runs=FOLDER[,FOLDER...]" + (f" ({what})" if what else ""))
    return list(FLAGS.runs)


#: --job=NAME -> the function that runs it on the config
JOBS = {"class_removal": run_class_removal, "posterior_check": run_posterior_check, "report": run_report,
        "summary": run_summary, "select": run_select, "extend": run_extend, "archive": run_archive,
        "calibrate": run_calibrate, "text_to_image": run_text_to_image}


#: the jobs that run as several processes (docs/multihost.md); the others are file work for one process
MULTIPROCESS_JOBS = ("class_removal",)


def main(argv):
    from dngjax import distributed
    logging.set_verbosity(logging.WARNING)
    if distributed.joined() and FLAGS.job not in MULTIPROCESS_JOBS:
        cli.fail(f"--job={FLAGS.job} runs as one process; several processes run --job="
                 f"{' or --job='.join(MULTIPROCESS_JOBS)} (drop --num_processes and the DNGJAX_* variables)")
    JOBS[FLAGS.job](FLAGS.config)


def cli_main():
    cli.run(main, define_flags, doc=__doc__, distributed=True)


if __name__ == "__main__":
    cli_main()
