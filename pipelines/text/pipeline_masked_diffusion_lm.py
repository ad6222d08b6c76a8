"""``MaskedDiffusionLMPipeline``: text generation and infilling with any masked LM as a masked-diffusion denoiser."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from diffusers import DiffusionPipeline
from diffusers.utils import BaseOutput

from ...schedulers.scheduling_masked_diffusion import RADDLogitsCache


@dataclass
class MaskedDiffusionLMPipelineOutput(BaseOutput):
    """``texts``: the decoded sequences (``output_type="text"``); ``token_ids``: (B, L); ``num_model_calls``: denoiser
    calls, in units of the full batch (fewer than the steps when RADD caching skips unchanged sequences)."""

    texts: list[str] | None
    token_ids: torch.LongTensor
    num_model_calls: float


class MaskedDiffusionLMPipeline(DiffusionPipeline):
    r"""Generate or infill text with a masked (absorbing-state) diffusion language model.

    Components: a ``tokenizer`` with a mask token, a ``model`` mapping ``input_ids`` (B, L) to logits (B, L, V), as a
    tensor or as ``.logits`` (any ``transformers`` ``AutoModelForMaskedLM``, e.g. BERT or RoBERTa, a bidirectional
    transformer trained with the MDLM / RADD objective, or a plain ``torch.nn.Module``; saving the pipeline needs a
    model with ``save_pretrained``), and a ``MaskedDiffusionScheduler`` whose ``mask_token_id`` is the tokenizer's. The
    model takes no time input (RADD's time-independent parameterisation), so when a step reveals no token of a
    sequence its logits are reused instead of recomputed (``cache_model_output``).

    Inputs: nothing (unconditional), ``prompt`` (a prefix kept as given; the rest of ``sequence_length`` is
    generated), or ``infill`` (a template whose ``tokenizer.mask_token`` occurrences are filled, the rest kept).
    """

    model_cpu_offload_seq = "model"
    _callback_tensor_inputs = ["tokens"]

    def __init__(self, tokenizer, model, scheduler):
        super().__init__()
        self.register_modules(tokenizer=tokenizer, model=model, scheduler=scheduler)

    @property
    def device(self) -> torch.device:
        """diffusers' ``device``, which reads ``module.device``; a plain ``torch.nn.Module`` has none, and its
        parameters tell (CPU for a model without parameters)."""
        if hasattr(self.model, "device"):
            return super().device
        parameter = next(iter(self.model.parameters()), None)
        return parameter.device if parameter is not None else torch.device("cpu")

    def _logits(self, input_ids: torch.LongTensor) -> torch.Tensor:
        output = self.model(input_ids=input_ids)
        return output if isinstance(output, torch.Tensor) else output.logits

    def _check_components(self) -> int:
        mask_id = self.tokenizer.mask_token_id
        if mask_id is None:
            raise ValueError("the tokenizer has no mask token; masked diffusion needs one (tokenizer.mask_token)")
        if self.scheduler.config.mask_token_id != mask_id:
            raise ValueError(f"the scheduler's mask_token_id ({self.scheduler.config.mask_token_id}) is not the "
                             f"tokenizer's ({mask_id})")
        model_vocab = getattr(getattr(self.model, "config", None), "vocab_size", None)
        if model_vocab is not None and model_vocab < len(self.tokenizer):
            raise ValueError(f"the model's vocabulary ({model_vocab}) is smaller than the tokenizer's "
                             f"({len(self.tokenizer)}); they were not made for each other")
        return mask_id

    def _check_length(self, tokens: torch.LongTensor, infill) -> None:
        """Positional models (BERT's ``max_position_embeddings``) cannot read sequences longer than their positions."""
        limit = getattr(getattr(self.model, "config", None), "max_position_embeddings", None)
        if limit is not None and tokens.shape[1] > limit:
            what = "the infill template has" if infill is not None else "sequence_length is"
            raise ValueError(f"{what} {tokens.shape[1]} tokens, more than the model's {limit} positions "
                             f"(model.config.max_position_embeddings); pass a sequence_length of at most {limit}")

    def _initial_tokens(self, prompt, infill, num_sequences: int, sequence_length: int, mask_id: int):
        if prompt is not None and infill is not None:
            raise ValueError("pass either prompt (a prefix) or infill (a template), not both")
        if infill is not None:
            texts = [infill] if isinstance(infill, str) else list(infill)
            rows = [self.tokenizer(text, add_special_tokens=False).input_ids for text in texts]
            for text, row in zip(texts, rows, strict=True):
                if mask_id not in row:
                    raise ValueError(f"the infill template has no {self.tokenizer.mask_token!r} to fill: {text!r}")
            sequence_length = max(len(row) for row in rows)
        else:
            texts = [""] if prompt is None else ([prompt] if isinstance(prompt, str) else list(prompt))
            rows = [self.tokenizer(text, add_special_tokens=False).input_ids if text else [] for text in texts]
            for text, row in zip(texts, rows, strict=True):
                if len(row) >= sequence_length:
                    raise ValueError(f"the prompt has {len(row)} tokens, sequence_length={sequence_length} leaves "
                                     f"nothing to generate: {text!r}")
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else mask_id
        tokens = torch.full((len(rows), sequence_length), mask_id, dtype=torch.long)
        for i, row in enumerate(rows):
            tokens[i, : len(row)] = torch.tensor(row, dtype=torch.long)
            if infill is not None:
                tokens[i, len(row):] = pad
        return tokens.repeat_interleave(num_sequences, dim=0)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        infill: str | list[str] | None = None,
        num_sequences_per_prompt: int = 1,
        sequence_length: int = 64,
        num_inference_steps: int | None = None,
        temperature: float = 1.0,
        cache_model_output: bool = True,
        generator: torch.Generator | None = None,
        output_type: str = "text",
        return_dict: bool = True,
        callback_on_step_end: Callable[[DiffusionPipeline, int, torch.Tensor, dict], dict] | None = None,
    ) -> MaskedDiffusionLMPipelineOutput | tuple:
        """
        Args:
            prompt: a prefix (or a list, one per batch row) that is kept; the rest is generated.
            infill: a template (or list) with ``tokenizer.mask_token`` where text is to be filled.
            num_sequences_per_prompt: sequences generated per prompt / template.
            sequence_length: tokens per sequence (prompt included; templates set their own length).
            num_inference_steps: the scheduler's steps; by default one per masked token (first-hitting,
                one-token parallel) or 1000 (ancestral).
            temperature: logits are divided by it; positive.
            cache_model_output: reuse a sequence's logits after a step that revealed none of its tokens.
            generator: for reproducible sampling.
            output_type: ``"text"`` (decoded strings and ids) or ``"ids"``.
            callback_on_step_end: ``callback(pipe, i, t, {"tokens": ...}) -> dict``.
        """
        if output_type not in ("text", "ids"):
            raise ValueError(f"output_type must be 'text' or 'ids', got {output_type!r}")
        if not temperature > 0:
            raise ValueError(f"temperature must be positive, got {temperature!r}")
        if isinstance(num_sequences_per_prompt, bool) or not isinstance(num_sequences_per_prompt, int) \
                or num_sequences_per_prompt < 1:
            raise ValueError(f"num_sequences_per_prompt must be a positive integer, got {num_sequences_per_prompt!r}")
        mask_id = self._check_components()
        tokens = self._initial_tokens(prompt, infill, num_sequences_per_prompt, sequence_length, mask_id)
        tokens = tokens.to(self._execution_device)
        masked_count = int((tokens == mask_id).sum(1).max())
        if num_inference_steps is None:
            num_inference_steps = 1000 if self.scheduler.config.sampler == "ancestral" else masked_count
        self._check_length(tokens, infill)
        self.scheduler.set_timesteps(num_inference_steps, device=self._execution_device)
        self.scheduler.check_enough_steps(masked_count)

        denoiser = RADDLogitsCache(lambda ids: self._logits(ids) / temperature, cache_model_output)
        for i, t in enumerate(self.progress_bar(self.scheduler.timesteps)):
            output = self.scheduler.step(denoiser(tokens), t, tokens, generator=generator)
            tokens = output.prev_sample
            denoiser.mark_stale(output.changed)
            if callback_on_step_end is not None:
                returned = callback_on_step_end(self, i, t, {"tokens": tokens}).pop("tokens", tokens)
                if returned is not tokens:
                    tokens = returned
                    denoiser.invalidate()
        calls = denoiser.calls

        texts = self.tokenizer.batch_decode(tokens, skip_special_tokens=True) if output_type == "text" else None
        self.maybe_free_model_hooks()
        if not return_dict:
            return texts, tokens, calls
        return MaskedDiffusionLMPipelineOutput(texts=texts, token_ids=tokens, num_model_calls=calls)
