"""Trainers on accelerate + PEFT: one trainer core, each method a loss plugged into it.

Names are imported from their modules on first use (as ``diffusers_ext`` does), so that ``diffusers-ext train``
parses its arguments and prints its help without importing torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_MODULES = {
    "causal_video": ["CausalVideoObjective"],
    "config": ["TrainingConfig", "latest_checkpoint"],
    "crepa": ["CREPAObjective", "RandomConvFrameEncoder"],
    "ddpo": ["DDIMPolicy", "DDPOObjective"],
    "denoising": ["DenoisingObjective"],
    "domainstudio": ["DomainStudioObjective", "DomainStudioValidation", "pairwise_diversity"],
    "fvdm": ["BouncingShapes", "FVDMObjective", "ptss_unit_times"],
    "lcm_lora": ["LCMLoRADistillation", "lcm_lora_pipeline", "lcm_lora_sample"],
    "masked_diffusion_lm": ["MaskedDiffusionLMObjective"],
    "multiview": ["MultiViewObjective", "RenderedShapeViews", "multiview_unet"],
    "paired_restoration": ["PairedRestorationObjective"],
    "policy_gradient": ["PolicyGradientObjective", "RewardNormalizer"],
    "rlcm": ["LCMPolicy", "RLCMObjective"],
    "smooth_lora": ["ISTDValidation", "SmoothLoRAObjective", "interpolation_std"],
    "spm": ["SPMConceptData", "SPMObjective", "SPMTransport", "SPMValidation", "load_spm", "save_spm"],
    "text_data": ["pydoc_paragraphs", "token_chunks", "train_and_held_out", "train_tokenizer"],
    "trainer": ["Trainer", "TrainingMethod", "TrainingResult"],
    "volume_data": ["VolumeSliceDataset", "held_out_volumes", "random_ellipsoid_phantom", "smoothed_binary_blobs"],
}
_LAZY = {name: module for module, names in _MODULES.items() for name in names}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
