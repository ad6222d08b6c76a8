r"""How each video backbone takes one timestep per latent frame: the single place that knows, for FVDM ("Redefining
Temporal Modeling in Video Diffusion: The Vectorized Timestep Approach", Liu et al., arXiv 2410.03160).

FVDM replaces a clip's scalar timestep ``t`` by the vectorized timestep ``tau = (tau^1, ..., tau^F)``, one per frame,
each frame noised at its own level (``x^i_tau = alpha(tau^i) x^i_0 + sigma(tau^i) eps^i``), and the network becomes
``model(X_tau, tau)``. ``per_frame_prediction(model, latents, frame_timesteps, ...)`` takes
latents ``(B, C, F, H, W)`` and ``tau`` as ``(B, F)`` (or one per clip ``(B,)``, or one scalar) and returns the
model's prediction ``(B, C, F, H, W)``, translating ``tau`` into the timestep shape each diffusers 0.42 backbone
takes:

- ``WanTransformer3DModel``: one timestep per token ``(B, F' h' w')`` after patching with ``patch_size =
  (1, p_h, p_w)`` (``h' = H // p_h``, ``w' = W // p_w``; tokens in ``(frame, row, column)`` order, Wan 2.2's
  expand-timesteps path): ``tau`` repeated ``h' w'`` times per frame.
- ``SkyReelsV2Transformer3DModel``: ``(B, F)`` itself, with ``enable_diffusion_forcing=True``. A model with
  ``inject_sample_info`` also needs ``fps`` (one 0/1 flag per clip, as ``SkyReelsV2DiffusionForcingPipeline`` passes
  it); diffusers 0.42.1 repeats the fps projection over frames in a way that only broadcasts for one clip, so such a
  model is called one clip at a time.
- ``LTXVideoTransformer3DModel``: latents packed to tokens ``(B, F H W / (p_t p^2), C p_t p^2)``
  (``LTXPipeline._pack_latents``), one timestep per token, ``num_frames / height / width`` in patches, and
  ``encoder_attention_mask`` (all ones when not given). ``rope_interpolation_scale`` is passed through untouched:
  ``LTXPipeline`` passes ``(temporal_compression / frame_rate, spatial_compression, spatial_compression)``, without it
  the rotary positions are the raw patch indices.
- ``VideoGaussianMixtureDenoiser`` (the exact test oracle, ``diffusers_ext.testing``): ``(B, F)`` itself; it models an
  unconditional law, so ``encoder_hidden_states`` is accepted and ignored.

Every family needs a temporal patch size of 1 (one token row per latent frame), as all released Wan, SkyReels-V2 and
LTX-Video checkpoints have. Backbones that embed only one timestep per clip (CogVideoX, HunyuanVideo, Mochi,
UNet3D, ...) raise a ``ValueError`` naming the ones above (``check_per_frame_backbone``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from accelerate.utils import extract_model_from_parallel
from diffusers import LTXVideoTransformer3DModel, SkyReelsV2Transformer3DModel, WanTransformer3DModel

from ...testing.video_oracle import VideoGaussianMixtureDenoiser, per_frame_values

PER_FRAME_BACKBONES = (
    "WanTransformer3DModel",
    "SkyReelsV2Transformer3DModel",
    "LTXVideoTransformer3DModel",
    "VideoGaussianMixtureDenoiser",
)


def token_timesteps(frame_timesteps: torch.Tensor, tokens_per_frame: int) -> torch.Tensor:
    """``(B, F) -> (B, F * tokens_per_frame)``: each frame's timestep for each of its tokens, tokens in frame-major
    order."""
    return frame_timesteps.repeat_interleave(tokens_per_frame, dim=1)


def _check_temporal_patch(model: torch.nn.Module, temporal_patch: int) -> None:
    if temporal_patch != 1:
        raise ValueError(
            f"per-frame timesteps need one token row per latent frame (temporal patch size 1); this "
            f"{type(model).__name__} has temporal patch size {temporal_patch}"
        )


def _text_embeddings(model: torch.nn.Module, encoder_hidden_states: torch.Tensor | None) -> torch.Tensor:
    if encoder_hidden_states is None:
        raise ValueError(f"{type(model).__name__} needs encoder_hidden_states (B, L, D); an unconditional run passes "
                         "a fixed embedding, e.g. zeros")
    return encoder_hidden_states


def _wan_prediction(model, backbone, latents, frame_timesteps, encoder_hidden_states, **model_kwargs):
    temporal_patch, patch_height, patch_width = backbone.config.patch_size
    _check_temporal_patch(backbone, temporal_patch)
    height, width = latents.shape[-2:]
    timesteps = token_timesteps(frame_timesteps, (height // patch_height) * (width // patch_width))
    text = _text_embeddings(backbone, encoder_hidden_states)
    return model(latents, timesteps, text, return_dict=False, **model_kwargs)[0]


def _skyreels_prediction(model, backbone, latents, frame_timesteps, encoder_hidden_states, **model_kwargs):
    _check_temporal_patch(backbone, backbone.config.patch_size[0])
    text = _text_embeddings(backbone, encoder_hidden_states)
    if not backbone.config.inject_sample_info:
        return model(latents, frame_timesteps, text, enable_diffusion_forcing=True, return_dict=False,
                     **model_kwargs)[0]
    fps = model_kwargs.pop("fps", None)
    if fps is None:
        raise ValueError("this SkyReelsV2Transformer3DModel has inject_sample_info=True: pass fps, one 0/1 flag per "
                         "clip (SkyReelsV2DiffusionForcingPipeline: 0 for 16 fps, 1 otherwise)")
    fps = torch.as_tensor(fps).reshape(-1).expand(latents.shape[0])
    # diffusers 0.42.1 repeats the fps projection F times along the batch axis, which broadcasts for one clip only.
    outputs = []
    for index in range(latents.shape[0]):
        clip = slice(index, index + 1)
        clip_kwargs = {name: value[clip] if torch.is_tensor(value) and value.shape[:1] == latents.shape[:1] else value
                       for name, value in model_kwargs.items()}
        outputs.append(model(latents[clip], frame_timesteps[clip], text[clip], enable_diffusion_forcing=True,
                             fps=fps[clip].tolist(), return_dict=False, **clip_kwargs)[0])
    return torch.cat(outputs)


def _ltx_prediction(model, backbone, latents, frame_timesteps, encoder_hidden_states, **model_kwargs):
    from diffusers import LTXPipeline

    patch, temporal_patch = backbone.config.patch_size, backbone.config.patch_size_t
    _check_temporal_patch(backbone, temporal_patch)
    text = _text_embeddings(backbone, encoder_hidden_states)
    num_frames, height, width = latents.shape[2], latents.shape[3] // patch, latents.shape[4] // patch
    mask = model_kwargs.pop("encoder_attention_mask", None)
    if mask is None:
        mask = torch.ones(text.shape[:2], dtype=text.dtype, device=text.device)
    tokens = LTXPipeline._pack_latents(latents, patch, temporal_patch)
    timesteps = token_timesteps(frame_timesteps, height * width)
    output = model(tokens, text, timesteps, mask, num_frames=num_frames, height=height, width=width,
                   return_dict=False, **model_kwargs)[0]
    return LTXPipeline._unpack_latents(output, num_frames, height, width, patch, temporal_patch)


def _oracle_prediction(model, backbone, latents, frame_timesteps, encoder_hidden_states, **model_kwargs):
    return model(latents, frame_timesteps, return_dict=False, **model_kwargs)[0]


_PREDICTIONS: tuple[tuple[type, Callable[..., torch.Tensor]], ...] = (
    (WanTransformer3DModel, _wan_prediction),
    (SkyReelsV2Transformer3DModel, _skyreels_prediction),
    (LTXVideoTransformer3DModel, _ltx_prediction),
    (VideoGaussianMixtureDenoiser, _oracle_prediction),
)


def _backbone_and_prediction(model: torch.nn.Module) -> tuple[torch.nn.Module, Callable[..., torch.Tensor]]:
    backbone = extract_model_from_parallel(model, keep_torch_compile=False)  # DDP / compiled wrappers
    for backbone_class, prediction in _PREDICTIONS:
        if isinstance(backbone, backbone_class):
            return backbone, prediction
    raise ValueError(
        f"{type(backbone).__name__} takes one timestep per clip, not one per frame; per-frame (FVDM) timesteps need "
        f"one of {', '.join(PER_FRAME_BACKBONES)}"
    )


def check_per_frame_backbone(model: torch.nn.Module) -> None:
    """Raises a ``ValueError`` naming the supported backbones (``PER_FRAME_BACKBONES``) unless ``model`` (or the
    model inside an accelerate / DDP / ``torch.compile`` wrapper) takes per-frame timesteps, FVDM's vectorized
    timestep ``tau = (tau^1, ..., tau^F)`` (arXiv 2410.03160)."""
    _backbone_and_prediction(model)


def per_frame_prediction(
    model: torch.nn.Module,
    latents: torch.Tensor,
    frame_timesteps: torch.Tensor | float,
    encoder_hidden_states: torch.Tensor | None = None,
    **model_kwargs: Any,
) -> torch.Tensor:
    """``model(X_tau, tau)`` with FVDM's vectorized timestep (arXiv 2410.03160, module docstring): the backbone's
    prediction for every frame ``i`` at its own timestep ``tau^i``, shape ``(B, C_out, F, H, W)``.

    Args:
        model: a backbone in ``PER_FRAME_BACKBONES`` (possibly wrapped by accelerate, DDP or ``torch.compile``);
            it is called as given, so gradients and hooks pass through.
        latents: ``X_tau``, ``(B, C, F, H, W)``.
        frame_timesteps: ``tau`` on the backbone's own timestep scale, ``(B, F)``, one per clip ``(B,)`` or a scalar.
        encoder_hidden_states: text embeddings ``(B, L, D)``; required by Wan, SkyReels-V2 and LTX-Video, ignored by
            the oracle.
        model_kwargs: passed to the backbone's forward (``attention_kwargs``, ``encoder_hidden_states_image``, SkyReels'
            ``fps``, LTX's ``encoder_attention_mask`` and ``rope_interpolation_scale``, ...).
    """
    backbone, prediction = _backbone_and_prediction(model)
    if not torch.is_tensor(latents) or latents.ndim != 5:
        raise ValueError(f"latents must be a (B, C, F, H, W) tensor, got "
                         f"{tuple(latents.shape) if torch.is_tensor(latents) else type(latents).__name__}")
    batch, num_frames = latents.shape[0], latents.shape[2]
    frame_timesteps = per_frame_values(frame_timesteps, batch, num_frames, "frame_timesteps", latents.device)
    return prediction(model, backbone, latents, frame_timesteps, encoder_hidden_states, **model_kwargs)
