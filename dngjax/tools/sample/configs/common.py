"""Shared defaults of the class-removal configs (each ``get_config`` starts from these)."""

import dataclasses

import ml_collections

from dngjax.guidance import DynamicNegativeGuidance, SafeLatentDiffusion


def rule_defaults(cls) -> dict:
    """A rule's hyperparameters as the library defines them, without ``scale`` (swept by the grid).

    The library's defaults are the paper's values (DNG: its MNIST prior 0.25, temperature 0.25, offset
    0; SLD: appendix E's threshold 0.04, s_s 100, beta_m 0.2, s_m 0.1), written once, in dngjax.guidance.
    """
    return {f.name: f.default for f in dataclasses.fields(cls) if f.name != "scale"}


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.name = "class_removal"
    c.dataset = "mnist"
    c.removed_class = 0
    # More classes removed together with removed_class, e.g. (2,): one concept per class, DNG only
    # (dj.MultiConcept over DynamicNegativeGuidance), with the class-conditional model (config.conditional).
    # Paths' "{c}" then reads "0+2" (reference statistics: compute_reference=True computes them).
    c.also_remove = ()
    # Models. "{root}" is replaced by `checkpoints`, "{c}" by the removed class. Relative paths
    # are looked up from the working directory, then from the repository root.
    c.checkpoints = "checkpoints/mnist"
    c.uncond = "{root}/ddpm"
    c.forget = "{root}/forget_{c}"
    c.classifier = "{root}/classifier"
    # One class-conditional model instead of the two above (one network, both predictions): eps_u = eps(x | null
    # label), eps_c = eps(x | removed class), e.g. "{root}/cond". Empty: the unconditional + forget pair.
    c.conditional = ""
    # Reference Gaussian statistics (mu, sigma) of the training set without the removed class,
    # in the feature space of `features` ("classifier": penultimate layer, reported as FD;
    # "inception": pytorch-fid's Inception-v3 pool features, reported as FID).
    c.reference_stats = "{root}/reference_stats/train_without_{c}.npz"
    c.features = "classifier"
    c.fid_weights = ""           # features="inception": pt_inception-2015-12-05-*.pth (or $DNGJAX_FID_WEIGHTS)
    c.compute_reference = False  # if the reference file is missing: compute it from the data set and save it
    c.data_dir = ""              # offline data folder for compute_reference (else $DNGJAX_DATA_DIR)

    # Sampling: N samples per grid point, the same seeds seed..seed+N-1 at every point.
    c.n = 256
    c.seed = 0
    c.T = 1000                   # training chain length: the models' cards decide the schedule; checked against them
    c.steps = 50                 # sampled chain: respaced to this many steps (= T: no respacing)
    c.chunk_size = 128           # seeds per compiled call (times the grid size of the method)
    c.noise = "beta"             # the reverse step's noise variance: "beta" (beta_t) or "beta_tilde" (beta_tilde_t)
    c.solver = "ddpm"            # the step: "ddpm" (ancestral), "ddim" (eta 0), "dpmpp_2m", "euler", "euler_ancestral"
                                 # (deterministic ones need DNG's continuous-time posterior: dng.estimator)
    c.baseline = True            # also sample without guidance (the point "none", scale 0)

    # Guidance: one compiled sweep per method over its grid of scales.
    c.methods = ("NP", "SLD", "DNG")  # DNG:beta_tilde / DNG:beta: DNG with that update variance
    c.grid = ml_collections.ConfigDict()
    c.grid.NP = (0.5, 1.0, 2.0)
    c.grid.SLD = (0.5, 1.0, 2.0)
    c.grid.DNG = (2.0, 5.0, 10.0)
    # (method string, scales) pairs: a method's own grid in place of its base's (a hyperparameter study
    # whose settings reach the same safety at different scales, e.g. mnist.py:select)
    c.method_grids = ()
    c.sld = ml_collections.ConfigDict(rule_defaults(SafeLatentDiffusion))
    # DNG's posterior update divides by sigma_t^2 (dng.update_variance): "beta_tilde" = beta_tilde_t (the authors' code, the
    # library default) or "beta" = beta_t (paper Alg. 2, and the variance of the noise the ancestral
    # sampler actually adds). On the full T = 1000 chain they differ only in the last few steps. On a
    # respaced chain the last step's beta_tilde is ~200x smaller than its beta (25 steps), so with
    # "beta_tilde" the final update of p is dominated by the sampling noise and throws p to p_min or
    # p_max at random, and lambda_t spikes at the last step (see docs/results.md). The respaced
    # configs therefore use "beta"; methods "DNG:beta_tilde" / "DNG:beta" run either variant ("DNG:posterior":
    # the older spelling of "DNG:beta_tilde", kept as the label of the archived runs' points).
    c.dng = ml_collections.ConfigDict(rule_defaults(DynamicNegativeGuidance))

    # Scoring and outputs.
    c.high_safety = 1.0          # % of removed class counted as "high safety" (plots, summary)
    c.select_ceiling = 20.0      # --job=select: a DNG curve still above high_safety at lambda_T = scale *
                                 # odds(prior) >= this never reaches it (dngjax/tools/sample/selection.py, rule 4)
    c.kl_pseudo_count = 0.5      # additive smoothing of the generated histogram (see dngjax.metrics)
    c.bootstrap = 50             # resamples for the standard errors of safety, KL and FD (0: none)
    c.eval_batch = 512
    c.grid_images = 64           # samples per saved grid image
    c.outdir = ""                # default: outputs/class_removal/<name>-<dataset>-c<class>-<UTC time>; "{c}": the class
    # An outdir (or its interrupted <outdir>.partial) holding another run's points -- another config, or
    # other model / reference files (sha256) -- is refused; True moves it aside to <folder>.old-<UTC time>
    # (never deleted). Same config and files: finished points are reused either way.
    c.overwrite = False
    c.save_samples = False       # also write samples.npz (uint8, all points)
    c.progress = True
    return c
