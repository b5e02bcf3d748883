"""Diffusion models as ML-EM: cosine/linear schedules, DDPM/DDIM steps as (ML-)EM drifts, a ladder of
depthwise-separable UNets, data, training and sampling. A client of the core, like any user."""

from .levels import DenoiserLevel, LinearPart
from .sample import SampleResult, build_drift, initial_noise, sample
from .schedule import NoiseSchedule, StepGrid, cosine_alpha_bar, linear_betas, respaced_timesteps

__all__ = ["NoiseSchedule", "StepGrid", "cosine_alpha_bar", "linear_betas", "respaced_timesteps",
           "DenoiserLevel", "LinearPart", "sample", "SampleResult", "build_drift", "initial_noise"]
