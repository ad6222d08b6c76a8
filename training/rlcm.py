"""RLCM: reward fine-tuning of a latent consistency model by a PPO-clipped policy gradient over its multistep sampler.

Paper: "RL for Consistency Models: Faster Reward Guided Text-to-Image Generation", Owen Oertell, Jonathan D. Chang,
Yiyi Zhang, Kianté Brantley, Wen Sun (arXiv 2404.03673); official code github.com/Owen-Oertell/rlcm, whose
compressibility defaults these are (8 steps, clip range 1e-4, advantage clip 10, per-prompt statistics over 16
rewards).

The policy is LCM's multistep sampler (``LCMPolicy``) on the timesteps ``tau_0 > ... > tau_{N-1}`` of
``LCMScheduler.set_timesteps(N)``: with ``abar = alphas_cumprod``, step ``k < N - 1`` is the Gaussian

    x0       = the guided UNet output read as x0 at tau_k      (``x0_and_eps_from_prediction``)
    f(x_k)   = c_skip(tau_k) x_k + c_out(tau_k) x0              (the consistency function, ``lcm_boundary_scalings``)
    x_{k+1} ~ N(sqrt(abar_{tau_{k+1}}) f(x_k), (1 - abar_{tau_{k+1}}) I)

and the last step returns ``f(x_{N-1})`` with no noise, so a trajectory has ``N - 1`` stochastic transitions. This is
what ``LCMScheduler.step`` draws, so the trained model is sampled with the stock pipeline and ``LCMScheduler``. The
loss and the sampling phase are ``policy_gradient.PolicyGradientObjective``'s.

The official code also draws a last, N-th transition around ``sqrt(abar) f(x_{N-1})`` and trains on its
log-probability, though the image is ``f(x_{N-1})`` itself: that action does not change the reward, so its term has
zero expected gradient and only adds variance; it is left out here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..diffusion_math import x0_and_eps_from_prediction
from .ddpo import TOY_PROMPTS, at_steps, check_policy_scheduler, check_step_count, clipped_x0, toy_reward_run
from .lcm_lora import lcm_boundary_scalings
from .policy_gradient import Conditioning, PolicyGradientObjective, Reward


class LCMPolicy:
    """LCM's multistep sampler as a policy (see the module docstring), from the pipeline's ``LCMScheduler``."""

    def __init__(self, scheduler: Any, num_inference_steps: int = 8, guidance_scale: float = 1.0):
        from diffusers import LCMScheduler

        check_policy_scheduler(scheduler, LCMScheduler, "RLCM")
        check_step_count(num_inference_steps, 2, "RLCM (one step is deterministic: no policy to train)")
        grid = LCMScheduler.from_config(scheduler.config)
        grid.set_timesteps(num_inference_steps)
        self.config = grid.config
        self.timesteps = grid.timesteps
        alphas_cumprod = grid.alphas_cumprod.double()
        self.alpha, self.sigma = alphas_cumprod[self.timesteps].sqrt(), (1 - alphas_cumprod[self.timesteps]).sqrt()
        self.c_skip, self.c_out = lcm_boundary_scalings(self.timesteps, timestep_scaling=grid.config.timestep_scaling)
        self.num_inference_steps, self.num_transitions = num_inference_steps, num_inference_steps - 1
        self.guidance_scale = float(guidance_scale)

    def consistency_function(self, unet: torch.nn.Module, sample: torch.Tensor, step: torch.Tensor,
                             conditioning: Conditioning) -> torch.Tensor:
        """``f(x_k) = c_skip x_k + c_out x0`` at the steps ``step``."""
        alpha, sigma, c_skip, c_out = (at_steps(v, step, sample) for v in
                                       (self.alpha, self.sigma, self.c_skip, self.c_out))
        prediction = conditioning.predict(unet, sample, self.timesteps.to(step.device)[step]).to(sample)
        x0, _ = x0_and_eps_from_prediction(prediction, sample, alpha, sigma, self.config.prediction_type)
        return c_skip * sample + c_out * clipped_x0(x0, self.config)

    def transition(self, unet: torch.nn.Module, sample: torch.Tensor, step: torch.Tensor,
                   conditioning: Conditioning) -> tuple[torch.Tensor, torch.Tensor]:
        alpha_next, sigma_next = (at_steps(v, step + 1, sample) for v in (self.alpha, self.sigma))
        return alpha_next * self.consistency_function(unet, sample, step, conditioning), sigma_next

    def final(self, unet: torch.nn.Module, sample: torch.Tensor, conditioning: Conditioning) -> torch.Tensor:
        last = torch.full((sample.shape[0],), self.num_inference_steps - 1, device=sample.device)
        return self.consistency_function(unet, sample, last, conditioning)

    def pipeline_arguments(self, height: int, width: int) -> dict[str, Any]:
        """How the stock pipeline samples this policy."""
        return dict(num_inference_steps=self.num_inference_steps, guidance_scale=self.guidance_scale, height=height,
                    width=width)


class RLCMObjective(PolicyGradientObjective):
    """RLCM for the shared ``Trainer``: ``PolicyGradientObjective`` with ``LCMPolicy`` on the pipeline's
    ``LCMScheduler`` (a latent consistency model, or Stable Diffusion with an LCM-LoRA fused in). The data set is
    prompts; ``reward`` scores decoded images in ``[0, 1]``.

    Args:
        pipeline: a ``StableDiffusionPipeline`` or ``StableDiffusionXLPipeline`` with an ``LCMScheduler``.
        reward: ``reward(images) -> (B,)``.
        num_inference_steps: the sampler's steps (RLCM's 8).
        guidance_scale: as the pipeline takes it: the guidance embedding of an LCM-distilled UNet (RLCM's 8), or
            classifier-free guidance for a UNet without one (1, none, for LCM-LoRA).
        policy_options: ``PolicyGradientObjective``'s; RLCM's compressibility run clips advantages at 10.
    """

    name = "rlcm"

    def __init__(self, pipeline: Any, reward: Reward, *, num_inference_steps: int = 8, guidance_scale: float = 1.0,
                 **policy_options: Any):
        policy_options.setdefault("advantage_clip", 10.0)
        policy = LCMPolicy(pipeline.scheduler, num_inference_steps, guidance_scale)
        super().__init__(pipeline, policy, reward, **policy_options)


def toy_run(config: Any, args: Any = None, prompts: Sequence[str] = TOY_PROMPTS
            ) -> tuple[RLCMObjective, torch.nn.Module, list[str]]:
    """``diffusers-ext train rlcm``: RLCM on JPEG compressibility with the random ``ddpo.toy_pipeline`` sampled by
    ``LCMScheduler`` (saved to ``output_dir/base_pipeline``), 4 steps, four prompts. Without ``lora_rank`` it
    fine-tunes the whole toy UNet."""
    from diffusers import LCMScheduler

    from ..guidance.rewards import jpeg_compressibility

    scheduler = LCMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    return toy_reward_run(config, scheduler, lambda pipe: RLCMObjective(
        pipe, jpeg_compressibility, num_inference_steps=4, images_per_prompt=4, min_count=4,
        validation_prompts=prompts[:1]), prompts)
