"""Trainers on accelerate + PEFT: one trainer core, each method a loss plugged into it."""

from .masked_diffusion_lm import MaskedDiffusionLMObjective
from .paired_restoration import PairedRestorationObjective
from .text_data import pydoc_paragraphs, token_chunks, train_and_held_out, train_tokenizer
from .trainer import Trainer, TrainingConfig, TrainingMethod, TrainingResult, latest_checkpoint

__all__ = [
    "MaskedDiffusionLMObjective",
    "PairedRestorationObjective",
    "Trainer",
    "TrainingConfig",
    "TrainingMethod",
    "TrainingResult",
    "latest_checkpoint",
    "pydoc_paragraphs",
    "token_chunks",
    "train_and_held_out",
    "train_tokenizer",
]
