"""The masked-diffusion language-model objective, as a loss for the shared ``Trainer``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..schedulers.scheduling_masked_diffusion import MaskedDiffusionScheduler, elbo_weight
from .trainer import process_state

TOY_SEQUENCE_LENGTH = 32


class MaskedDiffusionLMObjective:
    r"""MDLM's continuous-time objective, the negative ELBO per token:

        t ~ U(eps, 1) (stratified over the batch),   x_t = add_noise(x0, t)
        L = E_t [ w(t) * sum_{i masked in x_t} -log p_theta(x0^i | x_t) ] / L,   w(t) = -alpha'_t / (1 - alpha_t)

    (``w = 1 / t`` for the log-linear schedule). The model is not given ``t``: RADD's time-independent
    parameterisation, under which this loss is also RADD's ``lambda``-DCE loss with ``lambda = t``. Papers: *Simple
    and Effective Masked Diffusion Language Models*, arXiv 2406.07524; *Your Absorbing Discrete Diffusion Secretly
    Models the Conditional Distributions of Clean Data*, arXiv 2406.03736. ``exp`` of the loss averaged over data is
    an upper bound on the model's perplexity (``negative_elbo``).
    """

    name = "masked-diffusion-lm"

    def __init__(self, scheduler: MaskedDiffusionScheduler, time_epsilon: float = 1e-3):
        if not 0 < time_epsilon < 1:
            raise ValueError(f"time_epsilon must lie in (0, 1), got {time_epsilon}")
        self.scheduler = scheduler
        self.time_epsilon = time_epsilon

    def loss(self, model: torch.nn.Module, batch: torch.LongTensor, generator: torch.Generator) -> torch.Tensor:
        tokens = batch
        size = tokens.shape[0]
        # Stratified times lower the variance of the Monte-Carlo ELBO, as MDLM does.
        offset = torch.rand(1, generator=generator, dtype=torch.float64)
        t = self.time_epsilon + (1 - self.time_epsilon) * ((offset + torch.arange(size) / size) % 1)
        noisy = self.scheduler.add_noise(tokens.cpu(), t, generator=generator).to(tokens.device)
        logits = model(input_ids=noisy).logits
        cross_entropy = F.cross_entropy(logits.transpose(1, 2).float(), tokens, reduction="none")
        masked = noisy == self.scheduler.config.mask_token_id
        weight = elbo_weight(t, self.scheduler.config.noise_schedule).to(logits.device, torch.float32)
        return (weight[:, None] * cross_entropy * masked).sum() / tokens.numel()

    @torch.no_grad()
    def negative_elbo(self, model: torch.nn.Module, tokens: torch.LongTensor, num_samples: int = 8,
                      seed: int = 0) -> float:
        """The loss averaged over ``num_samples`` draws of ``t`` and masks: nats per token, an upper bound on the
        negative log-likelihood (``exp`` of it bounds the perplexity)."""
        generator = torch.Generator().manual_seed(seed)
        return float(torch.stack([self.loss(model, tokens, generator) for _ in range(num_samples)]).mean())


def toy_run(config: Any, args: Any = None) -> tuple[MaskedDiffusionLMObjective, torch.nn.Module, Any]:
    """``diffusers-ext train masked-diffusion-lm``: MDLM / RADD on Python's documentation: a 400-token BPE tokenizer
    (saved to ``output_dir/tokenizer``, without which the model is useless) and a 2-layer BERT, on 32-token
    chunks."""
    from transformers import BertConfig, BertForMaskedLM

    from .text_data import pydoc_paragraphs, token_chunks, train_tokenizer

    paragraphs = pydoc_paragraphs()
    tokenizer = train_tokenizer(paragraphs[:400], vocab_size=400)
    if process_state().is_main_process:
        tokenizer.save_pretrained(Path(config.output_dir) / "tokenizer")
    torch.manual_seed(config.seed)
    model = BertForMaskedLM(BertConfig(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2,
                                       num_attention_heads=2, intermediate_size=128,
                                       max_position_embeddings=TOY_SEQUENCE_LENGTH))
    method = MaskedDiffusionLMObjective(MaskedDiffusionScheduler(mask_token_id=tokenizer.mask_token_id))
    return method, model.train(), token_chunks(tokenizer, paragraphs, TOY_SEQUENCE_LENGTH)
