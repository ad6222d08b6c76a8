"""Trainers on accelerate + PEFT: one trainer core, each method a loss plugged into it."""

from .domainstudio import DomainStudioObjective, DomainStudioValidation, pairwise_diversity
from .lcm_lora import LCMLoRADistillation, lcm_lora_pipeline, lcm_lora_sample
from .masked_diffusion_lm import MaskedDiffusionLMObjective
from .paired_restoration import PairedRestorationObjective
from .smooth_lora import ISTDValidation, SmoothLoRAObjective, interpolation_std
from .spm import SPMConceptData, SPMObjective, SPMTransport, SPMValidation, load_spm, save_spm
from .text_data import pydoc_paragraphs, token_chunks, train_and_held_out, train_tokenizer
from .trainer import Trainer, TrainingConfig, TrainingMethod, TrainingResult, latest_checkpoint

__all__ = [
    "DomainStudioObjective",
    "DomainStudioValidation",
    "ISTDValidation",
    "LCMLoRADistillation",
    "MaskedDiffusionLMObjective",
    "PairedRestorationObjective",
    "SPMConceptData",
    "SPMObjective",
    "SPMTransport",
    "SPMValidation",
    "SmoothLoRAObjective",
    "Trainer",
    "TrainingConfig",
    "TrainingMethod",
    "TrainingResult",
    "interpolation_std",
    "latest_checkpoint",
    "lcm_lora_pipeline",
    "lcm_lora_sample",
    "load_spm",
    "pairwise_diversity",
    "pydoc_paragraphs",
    "save_spm",
    "token_chunks",
    "train_and_held_out",
    "train_tokenizer",
]
