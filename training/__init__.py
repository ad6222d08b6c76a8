"""Trainers on accelerate + PEFT: one trainer core, each method a loss plugged into it."""

from .ddpo import DDIMPolicy, DDPOObjective
from .domainstudio import DomainStudioObjective, DomainStudioValidation, pairwise_diversity
from .lcm_lora import LCMLoRADistillation, lcm_lora_pipeline, lcm_lora_sample
from .masked_diffusion_lm import MaskedDiffusionLMObjective
from .paired_restoration import PairedRestorationObjective
from .policy_gradient import PolicyGradientObjective, RewardNormalizer
from .rlcm import LCMPolicy, RLCMObjective
from .smooth_lora import ISTDValidation, SmoothLoRAObjective, interpolation_std
from .spm import SPMConceptData, SPMObjective, SPMTransport, SPMValidation, load_spm, save_spm
from .text_data import pydoc_paragraphs, token_chunks, train_and_held_out, train_tokenizer
from .trainer import Trainer, TrainingConfig, TrainingMethod, TrainingResult, latest_checkpoint

__all__ = [
    "DDIMPolicy",
    "DDPOObjective",
    "DomainStudioObjective",
    "DomainStudioValidation",
    "ISTDValidation",
    "LCMLoRADistillation",
    "LCMPolicy",
    "MaskedDiffusionLMObjective",
    "PairedRestorationObjective",
    "PolicyGradientObjective",
    "RLCMObjective",
    "RewardNormalizer",
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
