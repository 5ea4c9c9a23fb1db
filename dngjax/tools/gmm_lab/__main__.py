"""The Gaussian-mixture lab in one command (flags only; the figures are in fig1, fig3, appendix).

    python -m experiments.gmm --figure=all --out=outputs/gmm     # figs. 1, 3 and 7-9, documented sizes
    python -m experiments.gmm --figure=fig1 [--n=... --steps=... --replot]
    python -m experiments.gmm --figure=fig3 [--n_track=... --update_variance=beta_tilde --p_max=...]
    python -m experiments.gmm --figure=appendix [--n=0: fields only]      # figs. 7-9
    python -m experiments.gmm --figure=chain     # DNG's posterior against chain length (1000 .. 25 steps)
    python -m experiments.gmm --figure=ddim      # DNG on DDIM steps: eta x chain length
    python -m experiments.gmm --figure=extensions   # several concepts, positive mode, calibration (2-D lab)
    python -m experiments.gmm --figure=samplers     # DNG's estimators x DDIM / DPM-Solver++ / ancestral x chain length
    dngjax-gmm ...                                                      # the same, installed
"""

import os
import sys
import types

from absl import flags

from dngjax import cli

FLAGS = flags.FLAGS
FIGURES = ("fig1", "fig3", "appendix", "chain", "ddim", "extensions", "samplers")
#: samples per method when --n is not given
N_DEFAULT = {"fig1": 100_000, "fig3": 100_000, "appendix": 20_000, "chain": 100_000, "ddim": 100_000,
             "extensions": 20_000, "samplers": 20_000}


def define_flags():
    flags.DEFINE_enum("figure", "all", (*FIGURES, "all"), "Which figure(s) to make.")
    flags.DEFINE_string("out", "outputs/gmm", "Folder for the PNGs and the tables.")
    flags.DEFINE_integer("n", None, "Samples per method (default: fig1 and fig3 100,000, appendix 20,000; "
                                    "appendix: 0 = fields only).", lower_bound=0)
    flags.DEFINE_integer("steps", 1000, "Chain length (not chain/ddim: they run several; extensions: 1000 "
                         "means its default, 250): 1000 = the full linear schedule, fewer = respaced.",
                         lower_bound=1, upper_bound=1000)
    flags.DEFINE_integer("chunk", 25_000, "Samples per compiled call.", lower_bound=1)
    flags.DEFINE_integer("seed", 0, "First sample seed.", lower_bound=0)
    flags.DEFINE_bool("progress", True, "Progress bars.")
    flags.DEFINE_bool("replot", False, "fig1: reuse the samples saved by the last run (OUT/fig1_samples.npz).")
    flags.DEFINE_integer("n_track", 50_000, "fig3: trajectories for panel (a).", lower_bound=1)
    flags.DEFINE_enum("update_variance", "beta", ["beta", "beta_tilde"], "fig3, chain: sigma_t^2 of DNG's posterior update.")
    flags.DEFINE_enum("variance", None, ["beta", "beta_tilde", "posterior"],
                      "Deprecated spelling of --update_variance ('posterior': 'beta_tilde').")
    flags.DEFINE_float("p_max", 0.99, "fig3 (panel b), chain, ddim: clamp of the posterior estimate.",
                       lower_bound=1e-6, upper_bound=1 - 1e-9)


def args_for(figure: str) -> types.SimpleNamespace:
    """The options one figure's ``run(args)`` reads."""
    return types.SimpleNamespace(out=FLAGS.out, n=N_DEFAULT[figure] if FLAGS.n is None else FLAGS.n,
                                 steps=FLAGS.steps, chunk=FLAGS.chunk, seed=FLAGS.seed,
                                 no_progress=not FLAGS.progress, replot=FLAGS.replot, n_track=FLAGS.n_track,
                                 update_variance=_update_variance(), p_max=FLAGS.p_max)


def _update_variance() -> str:
    if FLAGS.variance is None:
        return FLAGS.update_variance
    new = {"posterior": "beta_tilde"}.get(FLAGS.variance, FLAGS.variance)
    print(f"--variance is deprecated: use --update_variance={new}", file=sys.stderr)
    return new


def main(argv):
    from . import appendix, chain, ddim, extensions, fig1, fig3, samplers
    runs = {"fig1": fig1.run, "fig3": fig3.run, "appendix": appendix.run, "chain": chain.run, "ddim": ddim.run,
            "extensions": extensions.run, "samplers": samplers.run}
    names = FIGURES if FLAGS.figure == "all" else (FLAGS.figure,)
    with cli.user_errors():
        for name in names:
            if name != "appendix" and args_for(name).n == 0:
                raise ValueError(f"--n=0 only makes sense for the appendix (fields only); {name} samples")
        cli.check_writable_folder(FLAGS.out, "--out")
        cache = os.path.join(FLAGS.out, "fig1_samples.npz")
        if FLAGS.replot and "fig1" in names and not os.path.isfile(cache):
            raise FileNotFoundError(f"--replot reuses {cache}, which does not exist: run fig1 once without --replot")
    cli.on_interrupt(f"the figures finished so far are in {FLAGS.out}; nothing resumes: rerunning the same "
                     "command makes them all again (--figure=NAME makes one)")
    for name in names:
        if len(names) > 1:
            print(f"\n===== {name} =====", flush=True)
        runs[name](args_for(name))


def cli_main():
    cli.run(main, define_flags, doc=__doc__)


if __name__ == "__main__":
    cli_main()
