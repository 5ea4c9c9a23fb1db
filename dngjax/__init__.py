"""dngjax: Dynamic Negative Guidance of diffusion models in JAX/Flax."""

from .schedules import Schedule, linear_schedule, respace
from .denoiser import Denoiser, denoiser, as_denoiser
from .guidance import (Rule, GuidanceRule, rule_class, NoGuidance, NegativePrompting, ClassifierFreeGuidance,
                       SafeLatentDiffusion, DynamicNegativeGuidance, ExactDynamicNegativeGuidance,
                       Step, ddpm_mean)
from .sampler import sample, sweep, sample_chunks, keys_from_seeds, Trace, Chunk

__version__ = "0.1.0"
