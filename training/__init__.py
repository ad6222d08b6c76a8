"""Trainers on accelerate + PEFT: one trainer core, each method a loss plugged into it."""

from .lcm_lora import LCMLoRADistillation, lcm_lora_pipeline, lcm_lora_sample
from .masked_diffusion_lm import MaskedDiffusionLMObjective
from .paired_restoration import PairedRestorationObjective
from .smooth_lora import ISTDValidation, SmoothLoRAObjective, interpolation_std
from .text_data import pydoc_paragraphs, token_chunks, train_and_held_out, train_tokenizer
from .trainer import Trainer, TrainingConfig, TrainingMethod, TrainingResult, latest_checkpoint

__all__ = [
    "ISTDValidation",
    "LCMLoRADistillation",
    "MaskedDiffusionLMObjective",
    "PairedRestorationObjective",
    "SmoothLoRAObjective",
    "Trainer",
    "TrainingConfig",
    "TrainingMethod",
    "TrainingResult",
    "interpolation_std",
    "latest_checkpoint",
    "lcm_lora_pipeline",
    "lcm_lora_sample",
    "pydoc_paragraphs",
    "token_chunks",
    "train_and_held_out",
    "train_tokenizer",
]
