"""Masked (absorbing-state) diffusion for discrete sequences: MDLM's ancestral sampler, the first-hitting sampler and
parallel decoding in an adaptive order."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from diffusers import SchedulerMixin
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.utils import BaseOutput

NOISE_SCHEDULES = ("loglinear", "cosine")
SAMPLERS = ("ancestral", "first_hitting", "parallel")
UNMASKING_ORDERS = ("random", "confidence", "margin", "entropy")
PRECISIONS = {"float64": torch.float64, "float32": torch.float32}


def unmasked_fraction(t: torch.Tensor, schedule: str) -> torch.Tensor:
    """``alpha_t``: the probability that a token is still clean at time ``t`` in ``[0, 1]``."""
    if schedule == "loglinear":
        return 1 - t
    return torch.cos(math.pi / 2 * t)


def elbo_weight(t: torch.Tensor, schedule: str) -> torch.Tensor:
    """``-alpha'_t / (1 - alpha_t)``: the weight of a masked token's cross-entropy in the continuous-time ELBO
    (``1 / t`` for ``loglinear``)."""
    if schedule == "loglinear":
        return 1 / t
    angle = math.pi / 2 * t
    return (math.pi / 2) * torch.sin(angle) / (1 - torch.cos(angle))


def time_of_unmasked_fraction(alpha: torch.Tensor, schedule: str) -> torch.Tensor:
    """The inverse of ``unmasked_fraction``."""
    if schedule == "loglinear":
        return 1 - alpha
    return torch.arccos(alpha.clamp(0, 1)) * 2 / math.pi


def gumbel_max_sample(logits: torch.Tensor, generator: torch.Generator | None, dtype: torch.dtype) -> torch.Tensor:
    """``argmax(logits + g)``, ``g = -log(-log u)``, ``u ~ U[0, 1)`` drawn in ``dtype``: an exact categorical draw in
    float64. In float32 ``u`` is a multiple of ``2^-24``, which caps ``g`` at about 16.6 and so under-samples
    tokens whose logit lies far below the best one: a lower effective temperature."""
    uniform = torch.rand(logits.shape, generator=generator, dtype=dtype, device="cpu").to(logits.device)
    gumbel = -torch.log(-torch.log(uniform))
    return (logits.to(dtype) + gumbel).argmax(-1)


def first_hitting_time(t: torch.Tensor, num_masked: torch.Tensor, uniform: torch.Tensor, schedule: str) -> torch.Tensor:
    """The time the next of ``n`` masked tokens is revealed, going backward from ``t``: each masked token's reveal time
    ``T`` has ``P(T < s | T < t) = (1 - alpha_s) / (1 - alpha_t)``, so the latest of ``n`` solves
    ``1 - alpha_s = (1 - alpha_t) u^(1/n)``."""
    masked_probability = (1 - unmasked_fraction(t, schedule)) * uniform ** (1 / num_masked.clamp(min=1))
    return time_of_unmasked_fraction(1 - masked_probability, schedule)


def token_logits(model_output: torch.Tensor, mask_token_id: int) -> torch.Tensor:
    """The model's logits in float64 with the mask token excluded (a clean token is never the mask)."""
    logits = model_output.to(torch.float64).clone()
    logits[..., mask_token_id] = -math.inf
    return logits


def ordering_scores(logits: torch.Tensor, order: str, generator: torch.Generator | None) -> torch.Tensor:
    """Higher is decoded first. ``confidence``: top-1 probability; ``margin``: top-1 minus top-2; ``entropy``:
    minus the entropy; ``random``: uniform. Each depends only on the current sequence, never on a drawn token, so
    one token per step stays an exact sampler whatever the order."""
    if order == "random":
        return torch.rand(logits.shape[:-1], generator=generator, dtype=torch.float64).to(logits.device)
    probabilities = logits.softmax(-1)
    if order == "confidence":
        return probabilities.amax(-1)
    if order == "margin":
        top2 = probabilities.topk(2, dim=-1).values
        return top2[..., 0] - top2[..., 1]
    return (probabilities * probabilities.clamp_min(1e-300).log()).sum(-1)


@dataclass
class MaskedDiffusionSchedulerOutput(BaseOutput):
    """``prev_sample``: the sequence after the step (B, L); ``changed``: (B,) whether the step revealed any token, so
    that a time-independent (RADD) denoiser need not be called again when no sequence changed; ``timestep``: (B,) the
    new time (first hitting: per sequence). Tokens are drawn only where they are revealed, so there is no
    ``pred_original_sample``: a draw at every position of (B, L, V) would cost most of the step."""

    prev_sample: torch.LongTensor
    changed: torch.BoolTensor
    timestep: torch.Tensor


class RADDLogitsCache:
    """RADD's caching for a time-independent denoiser: its logits depend on the sequence only, so after a step a
    sequence's logits are recomputed only if the step revealed one of its tokens (``stale``, the step output's
    ``changed``). ``calls`` counts denoiser evaluations in units of the full batch.

    ``logits_of(tokens)`` maps (B, L) token ids to (B, L, V) logits; ``enabled=False`` recomputes every step."""

    def __init__(self, logits_of: Callable[[torch.LongTensor], torch.Tensor], enabled: bool = True):
        self.logits_of = logits_of
        self.enabled = enabled
        self.logits: torch.Tensor | None = None
        self.stale: torch.BoolTensor | None = None
        self.calls = 0.0

    def __call__(self, tokens: torch.LongTensor) -> torch.Tensor:
        if self.logits is None or not self.enabled:
            self.logits, self.calls = self.logits_of(tokens), self.calls + 1
        elif self.stale.any():
            self.logits[self.stale] = self.logits_of(tokens[self.stale])
            self.calls += float(self.stale.sum()) / tokens.shape[0]
        return self.logits

    def mark_stale(self, changed: torch.BoolTensor) -> None:
        self.stale = changed

    def invalidate(self) -> None:
        """The tokens were edited outside the scheduler: recompute everything at the next call."""
        self.logits = None


class MaskedDiffusionScheduler(SchedulerMixin, ConfigMixin):
    r"""Absorbing-state ("masked") diffusion over token sequences, with three samplers.

    Papers: *Simple and Effective Masked Diffusion Language Models* (MDLM), Sahoo et al., arXiv 2406.07524;
    *Masked Diffusion Models are Secretly Time-Agnostic Masked Models and Exploit Inaccurate Categorical Sampling*
    (first-hitting sampler, float32 Gumbel flaw), Zheng et al., arXiv 2409.02908; *Your Absorbing Discrete Diffusion
    Secretly Models the Conditional Distributions of Clean Data* (RADD), Ou et al., arXiv 2406.03736; *Train for the
    Worst, Plan for the Best: Understanding Token Ordering in Masked Diffusions* (adaptive order), Kim et al.,
    arXiv 2502.06768.

    Forward process: each token is independently replaced by ``mask_token_id`` with probability ``1 - alpha_t``,
    ``alpha_t = 1 - t`` (``loglinear``) or ``cos(pi t / 2)`` (``cosine``). The model maps a sequence to logits
    ``(B, L, V)`` of ``p(x0^i | x_t)`` at every position; only masked positions are used, and the mask token's own logit
    is ignored. Categorical draws use the Gumbel-max trick in ``sampling_precision``.

    - ``ancestral`` (MDLM), ``num_inference_steps`` = T, times ``t_i = 1 - i / T``: from ``t`` to ``s`` every masked
      token is revealed independently with probability ``(alpha_s - alpha_t) / (1 - alpha_t)``, its value drawn from
      ``p(x0^i | x_t)``.
    - ``first_hitting``: one token per step, at a masked position chosen uniformly, its value drawn from
      ``p(x0^i | x_t)``; the time moves to the exact first-hitting time of the ``n`` masked tokens,
      ``1 - alpha_s = (1 - alpha_t) u^(1/n)`` (reported per sequence, for time-conditioned models). Exact in law for an
      exact denoiser. ``num_inference_steps`` must be at least the number of masked tokens (``step`` raises
      otherwise: several tokens per step would not be first hitting); steps after the last reveal change nothing.
    - ``parallel``: at step ``i`` of ``T``, ``ceil(n / (T - i))`` masked tokens are revealed, the positions ranked by
      ``unmasking_order`` (``confidence``, ``margin``, ``entropy`` or ``random``); ``T = L`` is one token per step.

    With ``block_length``, ``first_hitting`` and ``parallel`` decode semi-autoregressively: positions are revealed
    block by block from the left (a step that reveals more tokens than the current block holds continues into the
    next). A step whose ``changed`` is False for every sequence leaves the input of a
    time-independent denoiser unchanged (RADD's caching): ``RADDLogitsCache`` reuses the last logits.

    ``compatibles`` is empty on purpose: diffusers' discrete schedulers cannot stand in for this one or it for them.
    ``BlockRefinementScheduler`` (LLaDA2, DiffusionGemma) takes ``mask_token_id`` and sampling settings in ``step``
    and returns ``transfer_index`` / ``sampled_tokens``; ``DiscreteDDIMScheduler`` and ``EntropyBoundScheduler`` are
    for uniform corruption, with no mask token. ``from_config`` across them either fails (no ``mask_token_id``) or
    builds a scheduler whose step the other pipeline cannot drive.

    Args:
        mask_token_id: the absorbing state's token id.
        noise_schedule: ``loglinear`` or ``cosine``.
        sampler: ``ancestral``, ``first_hitting`` or ``parallel``.
        unmasking_order: the ``parallel`` sampler's order.
        block_length: semi-autoregressive block size, or ``None``.
        sampling_precision: ``float64`` (exact) or ``float32`` (shows the flaw).
    """

    order = 1

    @register_to_config
    def __init__(
        self,
        mask_token_id: int | None = None,
        noise_schedule: str = "loglinear",
        sampler: str = "ancestral",
        unmasking_order: str = "random",
        block_length: int | None = None,
        sampling_precision: str = "float64",
    ):
        if isinstance(mask_token_id, bool) or not isinstance(mask_token_id, int) or mask_token_id < 0:
            raise ValueError(f"mask_token_id must be a non-negative token id, got {mask_token_id!r}")
        for name, value, allowed in (("noise_schedule", noise_schedule, NOISE_SCHEDULES), ("sampler", sampler, SAMPLERS),
                                     ("unmasking_order", unmasking_order, UNMASKING_ORDERS),
                                     ("sampling_precision", sampling_precision, tuple(PRECISIONS))):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
        if block_length is not None and (isinstance(block_length, bool) or not isinstance(block_length, int)
                                         or block_length < 1):
            raise ValueError(f"block_length must be a positive integer or None, got {block_length!r}")
        if block_length is not None and sampler == "ancestral":
            raise ValueError("block_length (semi-autoregressive decoding) needs sampler='first_hitting' or 'parallel'")
        self.num_inference_steps = None
        self.timesteps = torch.tensor([1.0], dtype=torch.float64)
        self._step_index = None
        self._times = None

    @property
    def step_index(self) -> int | None:
        return self._step_index

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        """``num_inference_steps``: T for ``ancestral`` and ``parallel``; for ``first_hitting`` the number of tokens
        to reveal (the sequence length, or the masked count of a prompt or template)."""
        if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be a positive integer, got {num_inference_steps!r}")
        self.num_inference_steps = num_inference_steps
        self.timesteps = torch.linspace(1, 0, num_inference_steps + 1, dtype=torch.float64)[:-1].to(device)
        self._step_index = 0
        self._times = None

    def add_noise(self, original_samples: torch.LongTensor, timesteps: torch.Tensor,
                  generator: torch.Generator | None = None) -> torch.LongTensor:
        """Mask each token independently with probability ``1 - alpha_t`` (``timesteps``: (B,) times in [0, 1])."""
        t = torch.as_tensor(timesteps, dtype=torch.float64).reshape(-1, 1)
        if ((t < 0) | (t > 1)).any():
            raise ValueError(f"timesteps must lie in [0, 1], got {timesteps}")
        keep = unmasked_fraction(t, self.config.noise_schedule)
        draw = torch.rand(original_samples.shape, generator=generator, dtype=torch.float64)
        masked = (draw >= keep).to(original_samples.device)
        return torch.where(masked, self.config.mask_token_id, original_samples)

    def _block_rank_offset(self, sample: torch.LongTensor) -> torch.Tensor:
        """Semi-autoregressive decoding ranks every position of an earlier block above any of a later one: minus a
        large multiple of the block index, added to the ordering scores (all of magnitude below ``1e3``)."""
        if self.config.block_length is None:
            return torch.zeros(sample.shape[1], dtype=torch.float64, device=sample.device)
        block = torch.arange(sample.shape[1], device=sample.device) // self.config.block_length
        return -1e4 * block.to(torch.float64)

    def check_enough_steps(self, num_masked: int) -> None:
        """``first_hitting`` reveals one token per step, so the steps left must cover the ``num_masked`` tokens still
        masked; otherwise a ``ValueError`` (the run would end with masked tokens)."""
        if self.config.sampler != "first_hitting" or self.num_inference_steps is None:
            return
        steps_left = self.num_inference_steps - self._step_index
        if num_masked > steps_left:
            raise ValueError(
                f"sampler='first_hitting' reveals one token per step: {num_masked} masked tokens need "
                f"num_inference_steps >= {num_masked + self._step_index}, got {self.num_inference_steps}; for fewer "
                "steps use sampler='parallel' (several tokens per step, not exact in law)"
            )

    def step(
        self,
        model_output: torch.Tensor,
        timestep: float | torch.Tensor,
        sample: torch.LongTensor,
        generator: torch.Generator | None = None,
        return_dict: bool = True,
    ) -> MaskedDiffusionSchedulerOutput | tuple:
        """Reveal tokens of ``sample`` (B, L) given the model's logits (B, L, V) at this step."""
        if self._step_index is None:
            raise ValueError("call set_timesteps before step")
        if self._step_index >= self.num_inference_steps:
            raise ValueError(f"step called {self._step_index + 1} times for {self.num_inference_steps} steps")
        if model_output.ndim != 3 or model_output.shape[:2] != sample.shape:
            raise ValueError(f"model_output must be logits (B, L, V) for a sample {tuple(sample.shape)}, got "
                             f"{tuple(model_output.shape)}")
        mask_id = self.config.mask_token_id
        if mask_id >= model_output.shape[-1]:
            raise ValueError(f"mask_token_id {mask_id} is outside the model's vocabulary of {model_output.shape[-1]}")
        masked = sample == mask_id
        batch = sample.shape[0]
        if self._times is None:
            self._times = torch.ones(batch, dtype=torch.float64)

        sampler = self.config.sampler
        if sampler == "ancestral":
            t = self.timesteps[self._step_index].cpu()
            s = self.timesteps[self._step_index + 1].cpu() if self._step_index + 1 < self.num_inference_steps else 0.0
            alpha_t, alpha_s = (unmasked_fraction(torch.as_tensor(v, dtype=torch.float64), self.config.noise_schedule)
                                for v in (t, s))
            reveal_probability = (alpha_s - alpha_t) / (1 - alpha_t)
            draw = torch.rand(sample.shape, generator=generator, dtype=torch.float64).to(sample.device)
            reveal = masked & (draw < reveal_probability)
            self._times = torch.full((batch,), float(s), dtype=torch.float64)
        else:
            num_masked = masked.sum(1)
            if sampler == "first_hitting":
                self.check_enough_steps(int(num_masked.max()))
                count = (num_masked > 0).long()
                scores = ordering_scores(model_output, "random", generator)
                uniform = torch.rand(batch, generator=generator, dtype=torch.float64)
                self._times = torch.where(num_masked.cpu() > 0, first_hitting_time(
                    self._times, num_masked.cpu().double(), uniform, self.config.noise_schedule), self._times)
            else:
                steps_left = self.num_inference_steps - self._step_index
                count = (num_masked + steps_left - 1) // steps_left
                order = self.config.unmasking_order
                scores = ordering_scores(model_output if order == "random" else token_logits(model_output, mask_id),
                                         order, generator)
            scores = torch.where(masked, scores.to(torch.float64) + self._block_rank_offset(sample), -math.inf)
            ranks = scores.argsort(1, descending=True).argsort(1)
            reveal = masked & (ranks < count[:, None])
        # Only the revealed positions need a token: drawing one at every position of (B, L, V) cost most of a step.
        prev_sample = sample.clone()
        prev_sample[reveal] = gumbel_max_sample(token_logits(model_output[reveal], mask_id), generator,
                                                PRECISIONS[self.config.sampling_precision])
        self._step_index += 1
        changed = reveal.any(1)
        timestep_out = self._times.clone()
        if not return_dict:
            return prev_sample, changed, timestep_out
        return MaskedDiffusionSchedulerOutput(prev_sample=prev_sample, changed=changed, timestep=timestep_out)
