"""Diffusion models as ML-EM: cosine/linear schedules, DDPM/DDIM steps as (ML-)EM drifts, a ladder of
depthwise-separable UNets, data, training and sampling. A client of the core, like any user."""

from .data import ImageTensorDataset, celeba_dataset, default_dataset, folder_dataset, load_dataset, split_dataset
from .external import DiffusersModel, KDiffusionModel, is_diffusers_folder, load_diffusers_level
from .levels import DenoiserLevel, LinearPart
from .nested import NESTED_PRESETS, NestedLevel, NestedUNet, build_nested
from .pretrained import load_pretrained
from .sample import SampleResult, build_drift, initial_noise, sample
from .schedule import NoiseSchedule, StepGrid, cosine_alpha_bar, linear_betas, respaced_timesteps
from .train import (TrainConfig, level_differences, load_checkpoint, load_level, save_checkpoint, train_ladder,
                    train_level)
from .unet import PRESETS, SeparableUNet, build_unet, ladder_presets, unet_flops

__all__ = ["NoiseSchedule", "StepGrid", "cosine_alpha_bar", "linear_betas", "respaced_timesteps",
           "DenoiserLevel", "LinearPart", "DiffusersModel", "KDiffusionModel", "load_diffusers_level",
           "is_diffusers_folder", "sample", "SampleResult", "build_drift", "initial_noise",
           "ImageTensorDataset", "default_dataset", "celeba_dataset", "folder_dataset", "load_dataset", "split_dataset",
           "TrainConfig", "train_level", "train_ladder", "load_level", "level_differences", "save_checkpoint",
           "load_checkpoint", "SeparableUNet", "build_unet", "ladder_presets", "unet_flops", "PRESETS",
           "NestedUNet", "NestedLevel", "build_nested", "NESTED_PRESETS", "load_pretrained"]
