"""dngjax: Dynamic Negative Guidance of diffusion models in JAX/Flax."""

from .schedules import Schedule, linear_schedule, respace
from .denoiser import Denoiser, denoiser, as_denoiser
from .guidance import (GuidanceRule, NoGuidance, NegativePrompting, ClassifierFreeGuidance,
                       SafeLatentDiffusion, DynamicNegativeGuidance, ExactDynamicNegativeGuidance,
                       Step, ddpm_mean)
from .sampler import sample, sweep, keys_from_seeds, Trace, trace_count

__version__ = "0.1.0"
