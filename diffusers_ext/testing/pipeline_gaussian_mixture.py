"""``GaussianMixtureSamplingPipeline``: the standard diffusers sampling loop on an oracle, returning raw samples."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from diffusers import DiffusionPipeline
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor


@dataclass
class GaussianMixtureSamplingPipelineOutput(BaseOutput):
    """``samples``: ``(batch_size, D)`` points in the oracle's data space, unclamped."""

    samples: torch.Tensor | np.ndarray


class GaussianMixtureSamplingPipeline(DiffusionPipeline):
    """Sample a ``GaussianMixtureDenoiser`` (or any ``unet``) with any diffusers scheduler.

    The loop is the one stock pipelines run (``set_timesteps`` -> ``scale_model_input`` -> model -> ``step``), but the
    result is returned in data space without ``DDPMPipeline``'s ``[-1, 1] -> [0, 1]`` clamp, so sampler error can be
    measured. Works with VP schedulers (DDIM, DPM-Solver, UniPC, Euler, DEIS, ...) and flow-matching ones.
    """

    model_cpu_offload_seq = "unet"
    _callback_tensor_inputs = ["latents"]

    def __init__(self, unet, scheduler):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)

    @torch.no_grad()
    def __call__(
        self,
        batch_size: int = 1,
        num_inference_steps: int = 50,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pt",
        return_dict: bool = True,
        callback_on_step_end: Callable[[DiffusionPipeline, int, torch.Tensor, dict], dict] | None = None,
    ) -> GaussianMixtureSamplingPipelineOutput | tuple:
        """
        Args:
            batch_size: number of samples.
            num_inference_steps: passed to ``scheduler.set_timesteps``.
            generator: for the starting noise and stochastic schedulers.
            latents: starting noise ``x_T`` of shape ``(batch_size, *unet.sample_shape)``, before
                ``init_noise_sigma`` scaling; drawn with ``randn_tensor`` when omitted.
            output_type: ``"pt"`` or ``"np"``.
            callback_on_step_end: ``callback(pipe, i, t, {"latents": ...}) -> dict``, as in stock pipelines.
        """
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if output_type not in ("pt", "np"):
            raise ValueError(f"output_type must be 'pt' or 'np', got {output_type!r}")
        shape = (batch_size, *self.unet.sample_shape)
        # As in stock pipelines: timesteps first, since init_noise_sigma may depend on them.
        self.scheduler.set_timesteps(num_inference_steps, device=self._execution_device)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=self._execution_device, dtype=self.unet.dtype)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape}, got {tuple(latents.shape)}")
        # Flow-matching schedulers have no init_noise_sigma: their x_T is the unit-variance noise itself.
        latents = latents.to(self._execution_device) * getattr(self.scheduler, "init_noise_sigma", 1.0)

        step_kwargs = {"generator": generator} if "generator" in inspect.signature(self.scheduler.step).parameters else {}
        for i, t in enumerate(self.progress_bar(self.scheduler.timesteps)):
            model_input = self.scheduler.scale_model_input(latents, t) if hasattr(self.scheduler, "scale_model_input") else latents
            model_output = self.unet(model_input, t).sample
            latents = self.scheduler.step(model_output, t, latents, **step_kwargs).prev_sample
            if callback_on_step_end is not None:
                latents = callback_on_step_end(self, i, t, {"latents": latents}).pop("latents", latents)

        samples = latents.reshape(batch_size, -1)
        if output_type == "np":
            samples = samples.cpu().numpy()
        self.maybe_free_model_hooks()
        return GaussianMixtureSamplingPipelineOutput(samples=samples) if return_dict else (samples,)
