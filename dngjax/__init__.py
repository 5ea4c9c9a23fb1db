"""dngjax: Dynamic Negative Guidance of diffusion models in JAX/Flax."""

from .schedules import (Schedule, linear_schedule, scaled_linear_schedule, cosine_schedule, schedule_from_betas,
                        schedule_from_alpha_bars, respace, spaced_timesteps)
from .denoiser import Denoiser, denoiser, as_denoiser, to_eps, PREDICTIONS
from .guidance import (Rule, GuidanceRule, rule_class, NoGuidance, NegativePrompting, ClassifierFreeGuidance,
                       SafeLatentDiffusion, DynamicNegativeGuidance, ExactDynamicNegativeGuidance,
                       ExactMultiConceptDynamicNegativeGuidance, PositiveMode, MultiConcept,
                       Step, Tangents, step_mean)
# deprecated: the constructors of PositiveMode(rule) and MultiConcept(DynamicNegativeGuidance(...), K)
from .guidance import (MultiConceptDynamicNegativeGuidance, PositiveNegativePrompting, PositiveSafeLatentDiffusion,
                       PositiveDynamicNegativeGuidance, PositiveExactDynamicNegativeGuidance)
from .sampler import (sample, sweep, sample_chunks, chain_steps, keys_from_seeds, Trace, Chunk,
                      NonFiniteSamplesWarning)
from .calibration import Calibration, calibrate

__version__ = "0.1.0"
