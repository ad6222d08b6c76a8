"""DDPO: reward fine-tuning of a text-to-image diffusion model by a PPO-clipped policy gradient over its DDIM steps.

Paper: "Training Diffusion Models with Reinforcement Learning", Kevin Black, Michael Janner, Yilun Du, Ilya Kostrikov,
Sergey Levine (ICLR 2024, arXiv 2305.13301); official code github.com/kvablack/ddpo-pytorch, whose defaults these
are (50 steps, eta 1, guidance 5, clip range 1e-4, advantage clip 5, per-prompt statistics over 16 rewards).

The policy is DDIM with ``eta > 0`` (``DDIMPolicy``): at timestep ``t_k`` with ``abar = alphas_cumprod``,
``alpha = sqrt(abar_t)``, ``sigma = sqrt(1 - abar_t)`` and the next timestep's ``alpha', sigma'``
(``t_k - T / N``, or the scheduler's ``final_alpha_cumprod`` after the last),

    x0, eps  = the guided UNet output read as (x0, eps)    (``x0_and_eps_from_prediction``; x0 clipped when the
                                                           scheduler's ``clip_sample`` is set, as DDIMScheduler does)
    c        = eta sigma' sqrt(1 - (sigma' alpha / (alpha' sigma))^2)
    x_{k+1} ~ N(alpha' x0 + sqrt(sigma'^2 - c^2) eps, c^2 I)       (``ddim_step_distribution``)

which is exactly what ``DDIMScheduler.step(..., eta=eta)`` draws, so the trained model is sampled with the stock
pipeline at the same ``eta``. The loss and the sampling phase are ``policy_gradient.PolicyGradientObjective``'s.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..diffusion_math import ddim_step_distribution, per_sample, x0_and_eps_from_prediction
from .policy_gradient import Conditioning, PolicyGradientObjective, Reward
from .trainer import process_state


def at_steps(values: torch.Tensor, step: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A per-step table's values at each sample's step index, broadcasting against ``like``."""
    return per_sample(values.to(step.device)[step], like)


def clipped_x0(x0: torch.Tensor, scheduler_config: Any) -> torch.Tensor:
    """``x0`` clipped to ``clip_sample_range`` when the scheduler config asks for it."""
    if scheduler_config.get("clip_sample", False):
        limit = scheduler_config["clip_sample_range"]
        return x0.clamp(-limit, limit)
    return x0


def check_step_count(num_inference_steps: Any, minimum: int, method: str) -> None:
    if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int) or num_inference_steps < minimum:
        raise ValueError(f"{method} needs an integer num_inference_steps >= {minimum}, got {num_inference_steps!r}")


def check_policy_scheduler(scheduler: Any, expected: type, method: str) -> None:
    if not isinstance(scheduler, expected):
        raise ValueError(f"{method} trains the policy of {expected.__name__}, and the pipeline samples with "
                         f"{type(scheduler).__name__}; set pipe.scheduler = {expected.__name__}.from_config("
                         "pipe.scheduler.config) first, so that the trained model is sampled the way it was trained")
    if scheduler.config.get("thresholding", False):
        raise ValueError("dynamic thresholding makes the step non-Gaussian; use a scheduler without thresholding")


class DDIMPolicy:
    """DDIM with ``eta > 0`` as a policy (see the module docstring), from the pipeline's ``DDIMScheduler``."""

    def __init__(self, scheduler: Any, num_inference_steps: int = 50, eta: float = 1.0, guidance_scale: float = 5.0):
        from diffusers import DDIMScheduler

        check_policy_scheduler(scheduler, DDIMScheduler, "DDPO")
        if not eta > 0:
            raise ValueError(f"DDPO needs a stochastic sampler (eta > 0); eta = {eta!r} makes every step deterministic")
        check_step_count(num_inference_steps, 1, "DDPO")
        grid = DDIMScheduler.from_config(scheduler.config)
        grid.set_timesteps(num_inference_steps)
        self.config = grid.config
        self.timesteps = grid.timesteps
        following = self.timesteps - grid.config.num_train_timesteps // num_inference_steps
        alphas_cumprod = grid.alphas_cumprod.double()
        following_cumprod = torch.where(following >= 0, alphas_cumprod[following.clamp(min=0)],
                                        torch.as_tensor(grid.final_alpha_cumprod, dtype=torch.float64))
        self.alpha, self.sigma = alphas_cumprod[self.timesteps].sqrt(), (1 - alphas_cumprod[self.timesteps]).sqrt()
        self.alpha_next, self.sigma_next = following_cumprod.sqrt(), (1 - following_cumprod).sqrt()
        # With set_alpha_to_one the last step lands on abar = 1: no noise, so no policy; it is part of ``final``.
        self.num_inference_steps = num_inference_steps
        self.num_transitions = num_inference_steps - int(self.sigma_next[-1] == 0)
        self.eta, self.guidance_scale = float(eta), float(guidance_scale)

    def transition(self, unet: torch.nn.Module, sample: torch.Tensor, step: torch.Tensor,
                   conditioning: Conditioning) -> tuple[torch.Tensor, torch.Tensor]:
        alpha, sigma, alpha_next, sigma_next = (at_steps(v, step, sample) for v in
                                                (self.alpha, self.sigma, self.alpha_next, self.sigma_next))
        prediction = conditioning.predict(unet, sample, self.timesteps.to(step.device)[step]).to(sample)
        x0, eps = x0_and_eps_from_prediction(prediction, sample, alpha, sigma, self.config.prediction_type)
        return ddim_step_distribution(clipped_x0(x0, self.config), eps, alpha, sigma, alpha_next, sigma_next,
                                      self.eta)

    def final(self, unet: torch.nn.Module, sample: torch.Tensor, conditioning: Conditioning) -> torch.Tensor:
        if self.num_transitions == self.num_inference_steps:
            return sample
        last = torch.full((sample.shape[0],), self.num_inference_steps - 1, device=sample.device)
        return self.transition(unet, sample, last, conditioning)[0]

    def pipeline_arguments(self, height: int, width: int) -> dict[str, Any]:
        """How the stock pipeline samples this policy."""
        return dict(num_inference_steps=self.num_inference_steps, guidance_scale=self.guidance_scale, eta=self.eta,
                    height=height, width=width)


class DDPOObjective(PolicyGradientObjective):
    """DDPO for the shared ``Trainer``: ``PolicyGradientObjective`` with ``DDIMPolicy`` on the pipeline's
    ``DDIMScheduler``. The data set is prompts; ``reward`` scores decoded images in ``[0, 1]``.

    Args:
        pipeline: a ``StableDiffusionPipeline`` or ``StableDiffusionXLPipeline`` with a ``DDIMScheduler``.
        reward: ``reward(images) -> (B,)``; ``diffusers_ext.guidance.rewards.jpeg_compressibility`` for the paper's
            compressibility task.
        num_inference_steps, eta, guidance_scale: the sampler (DDPO's 50, 1.0 and 5.0).
        policy_options: ``PolicyGradientObjective``'s (``images_per_prompt``, ``clip_range``, ``advantage_clip``,
            ``buffer_size``, ``min_count``, ``transitions_per_batch``, ``num_inner_epochs``, ``validation_prompts``,
            ``validation_seeds``, ``height``, ``width``).
    """

    name = "ddpo"

    def __init__(self, pipeline: Any, reward: Reward, *, num_inference_steps: int = 50, eta: float = 1.0,
                 guidance_scale: float = 5.0, **policy_options: Any):
        policy = DDIMPolicy(pipeline.scheduler, num_inference_steps, eta, guidance_scale)
        super().__init__(pipeline, policy, reward, **policy_options)


TOY_PROMPTS = ("a cat", "a dog", "a bird", "a fish")


def toy_pipeline(scheduler: Any, seed: int = 0) -> Any:
    """A tiny random Stable Diffusion pipeline (16 x 16 images from 4 x 8 x 8 latents) with the config-built CLIP
    tokenizer and text encoder: the base model of the RL methods' toy runs."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel

    from ..testing import tiny_clip_text_encoder, tiny_clip_tokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, attention_head_dim=4, norm_num_groups=4,
    )
    vae = AutoencoderKL(block_out_channels=(8, 8), in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=4, sample_size=16)
    pipe = StableDiffusionPipeline(vae=vae.eval(), text_encoder=tiny_clip_text_encoder(seed),
                                   tokenizer=tiny_clip_tokenizer(), unet=unet.eval(), scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def toy_run(config: Any, args: Any = None, prompts: Sequence[str] = TOY_PROMPTS
            ) -> tuple[DDPOObjective, torch.nn.Module, list[str]]:
    """``diffusers-ext train ddpo``: DDPO on JPEG compressibility with ``toy_pipeline`` (saved to
    ``output_dir/base_pipeline``, without which the adapter is useless), 10 DDIM steps at guidance 3, four
    prompts. Without ``lora_rank`` it fine-tunes the whole toy UNet."""
    from diffusers import DDIMScheduler

    from ..guidance.rewards import jpeg_compressibility

    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    return toy_reward_run(config, scheduler, lambda pipe: DDPOObjective(
        pipe, jpeg_compressibility, num_inference_steps=10, guidance_scale=3.0, images_per_prompt=4, min_count=4,
        validation_prompts=prompts[:1]), prompts)


def toy_reward_run(config: Any, scheduler: Any, make_method: Any, prompts: Sequence[str]
                   ) -> tuple[PolicyGradientObjective, torch.nn.Module, list[str]]:
    """``make_method(toy_pipeline(scheduler, config.seed))`` with the pipeline saved to ``output_dir/base_pipeline``
    (without it the adapter is useless), its UNet to train, and the prompts."""
    from pathlib import Path


    pipe = toy_pipeline(scheduler, config.seed)
    if process_state().is_main_process:
        pipe.save_pretrained(Path(config.output_dir) / "base_pipeline")
    return make_method(pipe), pipe.unet.train(), list(prompts)
