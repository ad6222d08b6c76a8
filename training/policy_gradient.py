"""Reward fine-tuning of a stochastic sampler by a PPO-clipped policy gradient: the machine DDPO and RLCM share.

A text-to-image sampler whose steps add fresh noise is a policy. Step ``k`` of a trajectory draws

    x_{k+1} ~ pi_theta(. | x_k, k, c) = N(mu_theta(x_k, k, c), s_k^2 I)

and ``final(x_K)`` is the generated latent, decoded and scored by a reward ``r``. What differs between methods is
only the policy (``DenoisingPolicy``: ``mu_theta`` and ``s_k`` of DDIM for DDPO, of LCM's multistep sampler for
RLCM); this module holds the rest, as in DDPO's official code (github.com/kvablack/ddpo-pytorch):

    sampling phase (``collect``, no gradient): for each prompt c of the batch, K trajectories from the current policy;
        log pi_old_k = mean_d log N(x_{k+1, d}; mu_d, s_k^2)        (per dimension d, as the official code)
        A = (r - mean_c r) / (std_c r + 1e-6)                        (per-prompt normalisation, ``RewardNormalizer``)
    update (``loss``, on shuffled minibatches of transitions (x_k, x_{k+1}, k, c, log pi_old_k, A)):
        rho = exp(log pi_theta_k - log pi_old_k)
        L   = mean max(-A' rho, -A' clip(rho, 1 - epsilon, 1 + epsilon)),     A' = clip(A, -A_max, A_max)

Per-prompt statistics come from a buffer of each prompt's last ``buffer_size`` rewards once it holds ``min_count``
of them, from the whole round's rewards before. The official code accumulates the gradient over every timestep of a
trajectory minibatch before an optimizer step: set ``TrainingConfig.gradient_accumulation_steps`` to the number of
micro-batches that makes one update (``policy.num_transitions`` for a minibatch of one trajectory per timestep).
Under several processes the round's rewards are gathered from all of them before normalisation, as in the official
code.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

import torch
from accelerate.utils import extract_model_from_parallel, gather_object

from ..guidance.steering import check_reward_values
from ..pipelines.restoration.pipeline_restoration import decode_latents
from .lora import unet_swapped
from .trainer import process_state

Reward = Callable[[torch.Tensor], torch.Tensor]
NORMALIZER_EPSILON = 1e-6
LOG_SQRT_TWO_PI = 0.5 * math.log(2 * math.pi)


class DenoisingPolicy(Protocol):
    """A sampler seen as a policy: ``num_transitions`` stochastic steps, each a Gaussian, then a final map."""

    num_transitions: int
    guidance_scale: float

    def transition(self, unet: torch.nn.Module, sample: torch.Tensor, step: torch.Tensor,
                   conditioning: Conditioning) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mean, std)`` of ``x_{k+1}`` given ``x_k = sample`` at step indices ``step`` (one per sample)."""

    def final(self, unet: torch.nn.Module, sample: torch.Tensor, conditioning: Conditioning) -> torch.Tensor:
        """The generated latents, from the state after the last transition."""

    def pipeline_arguments(self, height: int, width: int) -> dict[str, Any]:
        """The stock pipeline's arguments that sample this policy."""


@dataclass
class Conditioning:
    """A batch's prompt embeddings and how the UNet is guided, the way the Stable Diffusion pipelines do it:
    classifier-free guidance when ``guidance_scale > 1`` and the UNet takes no guidance embedding, the guidance
    embedding (``timestep_cond``, LCM-distilled UNets) when it takes one; SDXL's pooled text embeddings and size
    conditioning (``added_cond_kwargs``, each ``(negative, positive)``) when the pipeline encodes them."""

    prompt_embeds: torch.Tensor
    negative_prompt_embeds: torch.Tensor
    guidance_scale: float
    timestep_cond: torch.Tensor | None = None
    added_cond: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None

    @classmethod
    def for_pipeline(cls, pipeline: Any, prompts: Sequence[str], device: torch.device, guidance_scale: float,
                     height: int, width: int) -> Conditioning:
        # No negative prompt: the pipeline's own unconditional embeddings (SDXL's are zeros by default).
        encoded = pipeline.encode_prompt(prompt=list(prompts), device=device, num_images_per_prompt=1,
                                         do_classifier_free_guidance=True)
        prompt_embeds, negative_prompt_embeds = encoded[:2]
        added_cond = None
        if len(encoded) == 4:  # SDXL: pooled embeddings, and the sizes as (original, crop top-left, target)
            pooled, negative_pooled = encoded[2:]
            time_ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=prompt_embeds.dtype,
                                    device=device).repeat(len(prompts), 1)
            added_cond = {"text_embeds": (negative_pooled, pooled), "time_ids": (time_ids, time_ids)}
        timestep_cond = None
        if pipeline.unet.config.time_cond_proj_dim is not None:
            scale = torch.full((len(prompts),), guidance_scale - 1.0)
            timestep_cond = pipeline.get_guidance_scale_embedding(
                scale, embedding_dim=pipeline.unet.config.time_cond_proj_dim).to(prompt_embeds)
        return cls(prompt_embeds, negative_prompt_embeds, guidance_scale, timestep_cond, added_cond)

    @property
    def classifier_free(self) -> bool:
        return self.guidance_scale > 1 and self.timestep_cond is None

    def to(self, device: torch.device | str) -> Conditioning:
        return replace(self, prompt_embeds=self.prompt_embeds.to(device),
                       negative_prompt_embeds=self.negative_prompt_embeds.to(device),
                       timestep_cond=None if self.timestep_cond is None else self.timestep_cond.to(device),
                       added_cond=None if self.added_cond is None else
                       {k: (negative.to(device), positive.to(device)) for k, (negative, positive) in
                        self.added_cond.items()})

    def select(self, index: torch.Tensor) -> Conditioning:
        """The conditioning of the samples ``index``."""
        return replace(self, prompt_embeds=self.prompt_embeds[index],
                       negative_prompt_embeds=self.negative_prompt_embeds[index],
                       timestep_cond=None if self.timestep_cond is None else self.timestep_cond[index],
                       added_cond=None if self.added_cond is None else
                       {k: (negative[index], positive[index]) for k, (negative, positive) in self.added_cond.items()})

    def predict(self, unet: torch.nn.Module, sample: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The guided model output at ``sample`` and ``timesteps``."""
        if not self.classifier_free:
            added = None if self.added_cond is None else {k: v[1] for k, v in self.added_cond.items()}
            return unet(sample, timesteps, encoder_hidden_states=self.prompt_embeds, timestep_cond=self.timestep_cond,
                        added_cond_kwargs=added).sample
        added = None if self.added_cond is None else {k: torch.cat(v) for k, v in self.added_cond.items()}
        unconditional, conditional = unet(
            torch.cat([sample, sample]), torch.cat([timesteps, timesteps]),
            encoder_hidden_states=torch.cat([self.negative_prompt_embeds, self.prompt_embeds]),
            added_cond_kwargs=added).sample.chunk(2)
        return unconditional + self.guidance_scale * (conditional - unconditional)


def gaussian_log_density(value: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """``mean_d log N(value_d; mean_d, std^2)`` per sample, ``(B,)``: DDPO's per-dimension log-probability. In
    float32 whatever the inputs' precision: PPO's ratio of two of them is clipped at ``1 +- 1e-4``."""
    value, mean, std = value.float(), mean.float(), std.float().expand_as(mean)
    log_density = -((value - mean) ** 2) / (2 * std**2) - std.log() - LOG_SQRT_TWO_PI
    return log_density.flatten(1).mean(dim=1)


def ppo_clipped_loss(log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor,
                     clip_range: float, advantage_clip: float) -> torch.Tensor:
    """``mean max(-A' rho, -A' clip(rho, 1 - clip_range, 1 + clip_range))``, ``rho = exp(log_prob - old_log_prob)``,
    ``A' = clip(A, -advantage_clip, advantage_clip)``."""
    advantages = advantages.clamp(-advantage_clip, advantage_clip)
    ratio = torch.exp(log_prob - old_log_prob)
    clipped_ratio = ratio.clamp(1 - clip_range, 1 + clip_range)
    return torch.maximum(-advantages * ratio, -advantages * clipped_ratio).mean()


class RewardNormalizer:
    """Per-prompt advantages ``(r - mean) / (std + 1e-6)`` with the statistics of the prompt's last ``buffer_size``
    rewards once there are ``min_count`` of them, of the whole call's rewards before (DDPO's stat tracker)."""

    def __init__(self, buffer_size: int = 16, min_count: int = 16):
        if not 1 <= min_count <= buffer_size:
            raise ValueError(f"reward normalisation needs 1 <= min_count <= buffer_size, got min_count={min_count}, "
                             f"buffer_size={buffer_size}")
        self.buffer_size, self.min_count = buffer_size, min_count
        self.buffers: dict[str, deque[float]] = {}

    def __call__(self, prompts: Sequence[str], rewards: torch.Tensor) -> torch.Tensor:
        rewards = rewards.double()
        advantages = torch.empty_like(rewards)
        for prompt in dict.fromkeys(prompts):
            mine = torch.tensor([p == prompt for p in prompts])
            buffer = self.buffers.setdefault(prompt, deque(maxlen=self.buffer_size))
            buffer.extend(rewards[mine].tolist())
            reference = torch.tensor(list(buffer), dtype=torch.float64) if len(buffer) >= self.min_count else rewards
            advantages[mine] = (rewards[mine] - reference.mean()) / (reference.std(correction=0) + NORMALIZER_EPSILON)
        return advantages.float()

    def state_dict(self) -> dict[str, list[float]]:
        return {prompt: list(buffer) for prompt, buffer in self.buffers.items()}

    def load_state_dict(self, state: Mapping[str, list[float]]) -> None:
        self.buffers = {prompt: deque(values, maxlen=self.buffer_size) for prompt, values in state.items()}


@dataclass
class Round:
    """One sampling phase: trajectories' states ``(B, K + 1, ...)``, transition log-probabilities ``(B, K)``,
    advantages ``(B,)`` and conditioning."""

    states: torch.Tensor
    log_probs: torch.Tensor
    advantages: torch.Tensor
    conditioning: Conditioning


class PolicyGradientObjective:
    """The sampling phase and the PPO loss for the shared ``Trainer``, around a ``DenoisingPolicy``; DDPO and RLCM
    are this with their policies. The data set is prompts (strings); train the pipeline's UNet, usually as a LoRA
    (``TrainingConfig(lora_rank=...)``). Each loader batch of ``B`` prompts becomes ``B * images_per_prompt``
    trajectories, whose transitions, shuffled, make ``num_inner_epochs`` passes of minibatches of
    ``transitions_per_batch``.

    Args:
        pipeline: a Stable Diffusion 1.x / 2.x or SDXL pipeline (tokenizers, text encoders, VAE) whose UNet is
            trained; save its adapter with ``save_lora_weights(..., pipeline_class=type(pipeline))``.
        policy: the sampler as a policy.
        reward: ``reward(images) -> (B,)``, images ``(B, 3, H, W)`` in ``[0, 1]``; higher is better. Not
            differentiated; any callable, e.g. ``diffusers_ext.guidance.rewards.jpeg_compressibility``.
        images_per_prompt: trajectories per prompt in a round.
        height, width: image size (default: the UNet's ``sample_size`` times the VAE's scale factor).
        clip_range, advantage_clip: PPO's ``epsilon`` and ``A_max``.
        buffer_size, min_count: the per-prompt reward statistics (``RewardNormalizer``).
        transitions_per_batch: transitions per micro-batch. One round's policy gradient is mostly noise unless it
            averages many trajectories (at toy scale, one round of 16 trajectories has a signal-to-noise ratio of
            0.0036 for RLCM and one too small to measure over 12 rounds for DDPO, and the reward gained became a
            matter of the seed); the tests' toy runs take 64 trajectories a round and update on half of a round's
            transitions at a time.
        num_inner_epochs: passes over a round's transitions.
        validation_prompts, validation_seeds: ``validate`` returns the pipeline's own images for each prompt and
            seed (``validation_images``).

    ``last_terms`` holds the last sampling phase's mean reward and its spread (over all processes), which the
    trainer logs.
    """

    name = "policy-gradient"

    def __init__(self, pipeline: Any, policy: DenoisingPolicy, reward: Reward, *, images_per_prompt: int = 4,
                 height: int | None = None, width: int | None = None, clip_range: float = 1e-4,
                 advantage_clip: float = 5.0, buffer_size: int = 16, min_count: int = 16,
                 transitions_per_batch: int = 1, num_inner_epochs: int = 1,
                 validation_prompts: Sequence[str] = (), validation_seeds: Sequence[int] = (0,)):
        if getattr(pipeline, "tokenizer", None) is None or getattr(pipeline, "text_encoder", None) is None:
            raise ValueError(f"{self.name} samples from prompts, so the pipeline needs a tokenizer and a text encoder")
        if not callable(reward):
            raise ValueError(f"reward must be a callable images -> (B,) rewards, got {type(reward).__name__}")
        for name, value in (("images_per_prompt", images_per_prompt), ("transitions_per_batch", transitions_per_batch),
                            ("num_inner_epochs", num_inner_epochs)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not clip_range > 0 or not advantage_clip > 0:
            raise ValueError(f"clip_range and advantage_clip must be positive, got {clip_range}, {advantage_clip}")
        scale = pipeline.vae_scale_factor
        self.height = height or pipeline.unet.config.sample_size * scale
        self.width = width or pipeline.unet.config.sample_size * scale
        if self.height % scale or self.width % scale:
            raise ValueError(f"height and width must be multiples of the VAE's scale factor {scale}, got "
                             f"{self.height} x {self.width}")
        self.pipeline, self.policy, self.reward = pipeline, policy, reward
        self.images_per_prompt, self.transitions_per_batch = images_per_prompt, transitions_per_batch
        self.num_inner_epochs = num_inner_epochs
        self.clip_range, self.advantage_clip = clip_range, advantage_clip
        self.normalizer = RewardNormalizer(buffer_size, min_count)
        self.validation_prompts, self.validation_seeds = list(validation_prompts), list(validation_seeds)
        self.last_terms: dict[str, float] = {}

    def state_dict(self) -> dict[str, Any]:
        return {"reward_buffers": self.normalizer.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.normalizer.load_state_dict(state["reward_buffers"])

    def conditioning(self, prompts: Sequence[str], device: torch.device) -> Conditioning:
        return Conditioning.for_pipeline(self.pipeline, prompts, device, self.policy.guidance_scale, self.height,
                                         self.width)

    def sample(self, unet: torch.nn.Module, prompts: Sequence[str], generator: torch.Generator
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Conditioning]:
        """One trajectory per prompt: the states ``(B, K + 1, C, h, w)``, the log-probabilities ``(B, K)`` of
        their transitions, the images ``(B, 3, H, W)`` in ``[0, 1]``, and the prompts' ``Conditioning``."""
        device = next(unet.parameters()).device
        conditioning = self.conditioning(prompts, device)
        shape = (len(prompts), unet.config.in_channels, self.height // self.pipeline.vae_scale_factor,
                 self.width // self.pipeline.vae_scale_factor)
        sample = torch.randn(shape, generator=generator).to(device, conditioning.prompt_embeds.dtype)
        states, log_probs = [sample], []
        for k in range(self.policy.num_transitions):
            step = torch.full((len(prompts),), k, device=device)
            mean, std = self.policy.transition(unet, sample, step, conditioning)
            sample = mean + std * torch.randn(shape, generator=generator).to(sample)
            states.append(sample)
            log_probs.append(gaussian_log_density(sample, mean, std))
        latents = self.policy.final(unet, sample, conditioning)
        images = (decode_latents(self.pipeline.vae, latents).float() / 2 + 0.5).clamp(0, 1)
        return torch.stack(states, dim=1), torch.stack(log_probs, dim=1), images, conditioning

    @torch.no_grad()
    def collect(self, model: torch.nn.Module, prompts: Sequence[str], generator: torch.Generator) -> list[dict]:
        prompts = [p for p in prompts for _ in range(self.images_per_prompt)]
        states, log_probs, images, conditioning = self.sample(model, prompts, generator)
        advantages = self.advantages(prompts, self.reward(images))
        # One copy of the round, on the CPU (checkpoints keep it); each batch names its transitions in it.
        sampled = Round(states.cpu(), log_probs.cpu(), advantages, conditioning.to("cpu"))
        trajectory, step = torch.meshgrid(torch.arange(len(prompts)), torch.arange(self.policy.num_transitions),
                                          indexing="ij")
        trajectory, step = trajectory.flatten(), step.flatten()
        return [{"round": sampled, "trajectory": trajectory[chunk], "step": step[chunk]}
                for _ in range(self.num_inner_epochs)
                for chunk in torch.randperm(len(trajectory), generator=generator).split(self.transitions_per_batch)]

    def advantages(self, prompts: Sequence[str], rewards: Any) -> torch.Tensor:
        """This process's normalised rewards; every process normalises the whole round (gathered), so that their
        statistics agree, and raises together when any reward is bad (a lone raise would leave the others waiting)."""
        try:
            pairs, problem = list(zip(prompts, check_reward_values(rewards, len(prompts), "the reward").tolist(),
                                      strict=True)), None
        except ValueError as error:
            pairs, problem = [], str(error)
        everyone = gather_object([(problem, pairs)])
        problems = [problem for problem, _ in everyone if problem]
        if problems:
            raise ValueError(problems[0])
        pairs = [pair for _, process_pairs in everyone for pair in process_pairs]
        all_prompts, all_rewards = [p for p, _ in pairs], torch.tensor([r for _, r in pairs])
        self.last_terms = {"reward": float(all_rewards.mean()), "reward_std": float(all_rewards.std(correction=0))}
        start = process_state().process_index * len(prompts)
        return self.normalizer(all_prompts, all_rewards)[start:start + len(prompts)]

    def loss(self, model: torch.nn.Module, batch: Mapping[str, Any], generator: torch.Generator) -> torch.Tensor:
        sampled, trajectory, step = batch["round"], batch["trajectory"].cpu(), batch["step"].cpu()
        device = next(model.parameters()).device
        sample = sampled.states[trajectory, step].to(device)
        mean, std = self.policy.transition(model, sample, step.to(device),
                                           sampled.conditioning.select(trajectory).to(device))
        log_prob = gaussian_log_density(sampled.states[trajectory, step + 1].to(device), mean, std)
        return ppo_clipped_loss(log_prob, sampled.log_probs[trajectory, step].to(device),
                                sampled.advantages[trajectory].to(device), self.clip_range, self.advantage_clip)

    def validate(self, model: torch.nn.Module, step: int, folder: Any) -> list:
        if not self.validation_prompts:
            raise ValueError(f"the {self.name} method validates only with validation_prompts")
        return validation_images(self.pipeline, extract_model_from_parallel(model), self.validation_prompts,
                                 self.validation_seeds, **self.policy.pipeline_arguments(self.height, self.width))


def validation_images(pipeline: Any, unet: torch.nn.Module, prompts: Sequence[str], seeds: Sequence[int],
                      **pipeline_arguments: Any) -> list:
    """The pipeline's own PIL images with ``unet`` in it, one per prompt and seed (each seed its own generator): what
    ``validate`` saves, and what a stock pipeline that ``load_lora_weights`` the adapter reproduces."""
    with unet_swapped(pipeline, unet) as pipe:
        return [image for prompt in prompts
                for image in pipe(prompt, num_images_per_prompt=len(seeds), output_type="pil",
                                  generator=[torch.Generator().manual_seed(s) for s in seeds],
                                  **pipeline_arguments).images]
