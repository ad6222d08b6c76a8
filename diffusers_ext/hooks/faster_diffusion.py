"""Faster Diffusion: UNet encoder propagation."""

from __future__ import annotations

from typing import Any

import torch
from diffusers import UNet2DConditionModel, UNet2DModel
from diffusers.configuration_utils import register_to_config

from ..guidance.steering import check_positive_int
from .base import (
    CallbackHook,
    ClockReading,
    DenoisingClock,
    SpeedHook,
    check_denoiser_type,
    check_step_indices,
    pipeline_denoiser,
    scaled_step_indices,
)
from .module_reuse import ModuleReuse, denoiser_sample, stored_copy, stream_key

# The paper's key steps for 50-step DDIM on Stable Diffusion (the official code's default "50ls" schedule).
PAPER_KEY_STEPS = (0, 1, 2, 3, 5, 10, 15, 25, 35)


def unet_encoder_modules(unet: torch.nn.Module) -> list[str]:
    """The UNet's encoder: ``conv_in``, every down block and the mid block."""
    names = ["conv_in", *(f"down_blocks.{i}" for i in range(len(unet.down_blocks)))]
    return [*names, "mid_block"] if getattr(unet, "mid_block", None) is not None else names


class FasterDiffusion(SpeedHook):
    r"""Faster Diffusion's encoder propagation for UNet pipelines (SD 1.x / 2.x, SDXL, their img2img, inpainting and
    ControlNet pipelines; also ``UNet2DModel`` pipelines).

    Paper: *Faster Diffusion: Rethinking the Role of the Encoder for Diffusion Model Inference*, Li et al.,
    arXiv 2312.09608.

    The UNet's encoder features change little between adjacent steps. At *key* steps the whole UNet runs and the
    encoder's outputs (``conv_in``, every down block with its skip features, the mid block) are stored; at the other
    steps only the decoder runs, on the stored encoder features and the current time embedding:

        key step t_k:      E_k = encoder(x_{t_k}, t_k, c),  eps = decoder(E_k, t_k, c)
        non-key step t:    eps = decoder(E_k, t, c)          (E_k of the latest key step)

    ControlNet residuals are added to the stored features as the UNet adds them, so they follow the current
    ControlNet call; with ``reuse_controlnet`` the ControlNet itself runs only at key steps too and its outputs are
    reused like the encoder's (the paper propagates ControlNet features the same way), as long as the
    conditioning scale it is called with stays the same.

    Key steps are step indices of a run of ``reference_steps`` denoiser calls; runs of another length use the same
    fractions of the run, ``round(k * num_steps / reference_steps)``. The default is the paper's schedule for 50 DDIM
    steps, dense at the start where features change fastest. With every step a key step the output is the stock
    output, bit for bit. Not implemented: the paper's parallel decoding of several non-key steps in one batch (a
    GPU-throughput device: it does not reduce FLOPs) and its prior noise injection.

    Args:
        key_steps: call indices at which the encoder runs (the first call of a run always does).
        reference_steps: the run length ``key_steps`` are written for.
        reuse_controlnet: also run a pipeline's ``controlnet`` only at key steps.
    """

    supported_denoisers = (UNet2DConditionModel, UNet2DModel)

    @register_to_config
    def __init__(self, *, key_steps: list[int] = PAPER_KEY_STEPS, reference_steps: int = 50,
                 reuse_controlnet: bool = True):
        super().__init__()
        self.key_steps = check_step_indices(key_steps, "key_steps")
        check_positive_int(reference_steps, "reference_steps")
        if not isinstance(reuse_controlnet, bool):
            raise ValueError(f"reuse_controlnet must be True or False, got {reuse_controlnet!r}")
        self.encoder: ModuleReuse | None = None
        self.controlnet_calls = {"compute": 0, "reuse": 0}

    def is_key_step(self, reading: ClockReading) -> bool:
        keys = scaled_step_indices(self.key_steps, self.config.reference_steps, reading.num_calls)
        return reading.index == 0 or reading.index in keys

    def _install(self, pipeline: Any) -> None:
        _, unet = pipeline_denoiser(pipeline, type(self).__name__)
        check_denoiser_type(unet, self.supported_denoisers, type(self).__name__)
        clock = DenoisingClock(pipeline)
        self.encoder = ModuleReuse(self, unet, unet_encoder_modules(unet), clock, self.is_key_step)
        controlnet = getattr(pipeline, "controlnet", None)
        if self.config.reuse_controlnet and isinstance(controlnet, torch.nn.Module):
            self._reuse_controlnet_outputs(controlnet, clock)

    def _reuse_controlnet_outputs(self, controlnet: torch.nn.Module, clock: DenoisingClock) -> None:
        """The ControlNet runs once per step, just before the UNet: at key steps it runs and its residuals are stored
        with the conditioning scale; at other steps they are returned if the scale is unchanged."""
        stored: dict[tuple, tuple[Any, Any]] = {}
        run = [None]

        def forward(original, module, *args, **kwargs):
            stream = ("controlnet", *stream_key(hook.context_name, denoiser_sample(args, kwargs)))
            reading = clock.read(stream)
            if reading.run != run[0]:
                stored.clear()
                run[0] = reading.run
            scale = kwargs.get("conditioning_scale")
            if not self.is_key_step(reading) and stream in stored and stored[stream][0] == scale:
                self.controlnet_calls["reuse"] += 1
                return stored_copy(stored[stream][1])
            self.controlnet_calls["compute"] += 1
            output = original(*args, **kwargs)
            stored[stream] = (scale, stored_copy(output))
            return output

        hook = CallbackHook(new_forward=forward, on_reset=stored.clear)
        self._register_hook(controlnet, hook)
