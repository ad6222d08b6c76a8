r"""``JointImageVideoPipeline``: JVID's joint image-video sampling, an image model and a video model taking turns on
one latent video.

Paper: *JVID: Joint Video-Image Diffusion for Visual-Quality and Temporal-Consistency in Video Generation*, Reynaud
et al., arXiv 2409.14149.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from accelerate.utils import extract_model_from_parallel
from diffusers import UNet2DConditionModel, UNet2DModel
from diffusers.utils import BaseOutput

from ...testing.video_oracle import VideoGaussianMixtureDenoiser, per_frame_values
from .backbones import PER_FRAME_BACKBONES, check_per_frame_backbone, per_frame_prediction
from .frame_plan import FrameTimestepPlan, latent_frame_count
from .pipeline_frame_aware import FrameAwareVideoPipeline

DENOISERS = ("video", "image")
SCHEDULE_PRESETS = ("alternate", "random", "video", "image")
PAPER_SCHEDULE = "alternate"
IMAGE_BACKBONES = ("UNet2DModel", "UNet2DConditionModel", *PER_FRAME_BACKBONES)


@dataclass
class JointImageVideoPipelineOutput(BaseOutput):
    """``frames`` and ``plan`` as ``FrameAwareVideoPipelineOutput``'s; ``denoisers``: per window, the model that
    denoised at each step (``"video"`` or ``"image"``)."""

    frames: Any
    plan: Any
    denoisers: list[list[str]]


def denoiser_schedule(schedule: str | Sequence[str], num_steps: int, generator: torch.Generator | None = None,
                      video_probability: float = 0.5) -> list[str]:
    """The model that denoises at each of ``num_steps`` steps, ``"video"`` or ``"image"``:

    - ``"alternate"`` (the default, JVID's as the pipeline reads it): the video model at even steps (first at the
      noisiest, where the clip's layout and motion are decided), the image model at odd ones;
    - ``"random"``: each step the video model with probability ``video_probability``, drawn from ``generator``;
    - ``"video"`` / ``"image"``: one model throughout (each model alone, the comparison JVID makes);
    - a sequence of ``num_steps`` names: your own.
    """
    if isinstance(schedule, str):
        if schedule == "alternate":
            return [DENOISERS[step % 2] for step in range(num_steps)]
        if schedule == "random":
            device = generator.device if generator is not None else "cpu"
            draws = torch.rand(num_steps, generator=generator, device=device)
            return ["video" if float(u) < video_probability else "image" for u in draws]
        return [schedule] * num_steps
    return list(schedule)


def check_denoiser_schedule(schedule: Any, step_counts: Sequence[int], video_probability: float) -> None:
    """A ``ValueError`` unless ``schedule`` is a preset (``SCHEDULE_PRESETS``) or has one name from ``DENOISERS`` per
    step of every window (``step_counts``), and ``video_probability`` is in [0, 1]."""
    if isinstance(video_probability, bool) or not isinstance(video_probability, int | float) \
            or not 0 <= video_probability <= 1:
        raise ValueError(f"video_probability must be a number in [0, 1], got {video_probability!r}")
    if isinstance(schedule, str):
        if schedule not in SCHEDULE_PRESETS:
            raise ValueError(f"denoiser_schedule must be one of {SCHEDULE_PRESETS} or a list of {DENOISERS} (one per "
                             f"step), got {schedule!r}")
        return
    names = list(schedule) if isinstance(schedule, Sequence) else None
    if names is None or any(name not in DENOISERS for name in names):
        raise ValueError(f"denoiser_schedule must be one of {SCHEDULE_PRESETS} or a list of {DENOISERS} (one per "
                         f"step), got {schedule!r}")
    for count in sorted(set(step_counts)):
        if len(names) != count:
            raise ValueError(f"denoiser_schedule has {len(names)} entries; every window walks {count} steps "
                             f"(num_inference_steps, or the plan's steps)")


def _backbone(model: torch.nn.Module) -> torch.nn.Module:
    return extract_model_from_parallel(model, keep_torch_compile=False)


def _latent_channels(model: torch.nn.Module) -> tuple[int, int]:
    """``(in, out)`` channels of a backbone or of the exact oracle (which names the clip shape it takes)."""
    backbone = _backbone(model)
    if isinstance(backbone, VideoGaussianMixtureDenoiser):
        return backbone.sample_shape[0], backbone.sample_shape[0]
    channels = backbone.config.get("in_channels")
    return channels, backbone.config.get("out_channels") or channels


def check_image_denoiser(image_model: torch.nn.Module, video_model: torch.nn.Module) -> None:
    """A ``ValueError`` unless ``image_model`` denoises single frames of ``video_model``'s latent space: a 2D UNet
    (``UNet2DModel``, ``UNet2DConditionModel``) or a per-frame video backbone (called on one frame at a time; the
    exact oracle of 1-frame clips), with the video model's channels (and, for two oracles, its frame shape and
    prediction type)."""
    backbone = _backbone(image_model)
    if not isinstance(backbone, UNet2DModel | UNet2DConditionModel):
        try:
            check_per_frame_backbone(backbone)
        except ValueError:
            raise ValueError(f"image_transformer must be one of {', '.join(IMAGE_BACKBONES)} (a 2D model, or a video "
                             f"backbone called on one frame at a time), got {type(backbone).__name__}") from None
    video = _backbone(video_model)
    if _latent_channels(backbone) != _latent_channels(video):
        raise ValueError(f"the image and video models must share one latent space: the image model takes / returns "
                         f"{_latent_channels(backbone)} channels, the video model {_latent_channels(video)}")
    if isinstance(backbone, VideoGaussianMixtureDenoiser):
        if backbone.sample_shape[1] != 1:
            raise ValueError("an oracle image model denoises 1-frame clips (num_frames=1), got one of "
                             f"{backbone.sample_shape[1]} frames")
        if isinstance(video, VideoGaussianMixtureDenoiser):
            image_frame, video_frame = tuple(backbone.law.frame_shape), tuple(video.law.frame_shape)
            if image_frame != video_frame:
                raise ValueError(f"the image and video oracles must share one latent space: frames {image_frame} vs "
                                 f"{video_frame}")
            if backbone.config.prediction_type != video.config.prediction_type:
                raise ValueError("the image and video oracles must predict the same target (one scheduler serves "
                                 f"both): {backbone.config.prediction_type!r} vs {video.config.prediction_type!r}")


def image_prediction(model: torch.nn.Module, latents: torch.Tensor, frame_timesteps: torch.Tensor | float,
                     encoder_hidden_states: torch.Tensor | None = None, **model_kwargs: Any) -> torch.Tensor:
    """An image model's prediction for every frame of ``latents`` ``(B, C, F, H, W)`` on its own, frame ``f`` at its
    timestep ``tau^f`` (``frame_timesteps``: a scalar, ``(B,)`` or ``(B, F)``): the frames become a batch of ``B F``
    images (each clip's text embeddings repeated for its frames), given to a 2D UNet as ``(B F, C, H, W)`` or to a
    per-frame video backbone as 1-frame clips ``(B F, C, 1, H, W)`` (``per_frame_prediction``)."""
    batch, channels, num_frames, height, width = latents.shape
    timesteps = per_frame_values(frame_timesteps, batch, num_frames, "frame_timesteps", latents.device).reshape(-1)
    images = latents.transpose(1, 2).reshape(batch * num_frames, channels, height, width)
    text = None if encoder_hidden_states is None else encoder_hidden_states.repeat_interleave(num_frames, dim=0)
    backbone = _backbone(model)
    if isinstance(backbone, UNet2DModel):
        output = model(images, timesteps, return_dict=False, **model_kwargs)[0]
    elif isinstance(backbone, UNet2DConditionModel):
        output = model(images, timesteps, text, return_dict=False, **model_kwargs)[0]
    else:
        output = per_frame_prediction(model, images[:, :, None], timesteps[:, None], text, **model_kwargs)[:, :, 0]
    return output.reshape(batch, num_frames, -1, height, width).transpose(1, 2)


class JointImageVideoPipeline(FrameAwareVideoPipeline):
    r"""JVID sampling: one reverse process on one latent video, denoised at each step by either an image model (every
    frame on its own, for the frames' visual quality) or a video model (all frames together, for temporal
    consistency).

    Paper: *JVID: Joint Video-Image Diffusion for Visual-Quality and Temporal-Consistency in Video Generation*,
    Reynaud et al., arXiv 2409.14149.

    With the frame-aware scheduler's step ``X <- step(m, sigma_k, X, sigma_{k+1})`` (``FrameAwareVideoPipeline``) and
    the schedule ``d_k`` in {video, image} (``denoiser_schedule``), step ``k`` uses

        m = v_video(X, tau_k)                                          if d_k = video
        m^f = v_image(x^f, tau_k^f)   for every frame f on its own    if d_k = image

    (with classifier-free guidance, each model's ``m = m(0) + w (m(c) - m(0))``). Both models predict the same target
    on the same noise path and latent space (one ``scheduler`` serves both, one VAE decodes the result). JVID selects
    one model per step (its figure 1: "at each step, we select one model"); the default ``"alternate"`` (video,
    image, video, ...) follows the account of the paper as alternating the two, and ``"random"`` (a draw per step) is
    the other reading: neither has been checked against the paper's algorithm, whose text was not available here.
    ``"video"`` / ``"image"`` run one model alone, and a list gives your own (measured on toy data in
    ``benchmarks/joint_image_video.py``: which schedule helps depends on the two models). With a second-order
    scheduler (``solver_order=2``) the history is the previous step's ``x0`` estimate, whichever model made it.

    Everything else is ``FrameAwareVideoPipeline``'s: plans (image-to-video, interpolation, your own), rolling
    windows (each window walks the schedule from its start), ``output_type``, ``callback_on_step_end``, the progress
    bar.

    Components: ``transformer``, the video model (``PER_FRAME_BACKBONES``); ``image_transformer``, the image model: a
    ``UNet2DModel`` / ``UNet2DConditionModel`` or a per-frame video backbone run on one frame at a time (e.g. a Wan
    transformer trained on single frames, or the exact oracle of 1-frame clips), with the video model's latent
    channels; ``scheduler`` (frame-aware), and optionally ``vae``, ``text_encoder`` and ``tokenizer`` shared by both.
    """

    model_cpu_offload_seq = "text_encoder->transformer->image_transformer->vae"

    def __init__(self, transformer, image_transformer, scheduler, vae=None, text_encoder=None, tokenizer=None):
        check_image_denoiser(image_transformer, transformer)
        super().__init__(transformer, scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer)
        self.register_modules(image_transformer=image_transformer)

    def _denoise_window(self, latents, plan, *args, **kwargs):
        generator = kwargs["generator"]
        generator = generator[0] if isinstance(generator, list) else generator
        # Drawn after the window's starting noise, so a random schedule leaves the starting latents as they are.
        window = denoiser_schedule(self._schedule, plan.num_steps, generator, self._video_probability)
        self._denoisers.append(window)
        self._next_denoiser = iter(window)
        return super()._denoise_window(latents, plan, *args, **kwargs)

    def _predict(self, latents, levels, embeds, guidance_scale, backbone_kwargs):
        if next(self._next_denoiser) == "video":
            return super()._predict(latents, levels, embeds, guidance_scale, backbone_kwargs)
        return self._guided_prediction(image_prediction, self.image_transformer, latents, levels, embeds,
                                       guidance_scale, backbone_kwargs)

    @torch.no_grad()
    def __call__(self, prompt: str | list[str] | None = None, *,
                 denoiser_schedule: str | Sequence[str] = PAPER_SCHEDULE, video_probability: float = 0.5,
                 **kwargs) -> JointImageVideoPipelineOutput | tuple:
        r"""``FrameAwareVideoPipeline.__call__``'s arguments (keywords after ``prompt``), and:

        Args:
            denoiser_schedule: which model denoises at each step of a window: ``"alternate"`` (default, JVID's),
                ``"random"``, ``"video"``, ``"image"``, or a list of ``"video"`` / ``"image"``, one per step of every
                window (``denoiser_schedule``).
            video_probability: the chance of the video model at each step of the ``"random"`` schedule.

        Returns ``JointImageVideoPipelineOutput`` (``frames``, ``plan``, ``denoisers``), or the tuple
        ``(frames, plan, denoisers)`` with ``return_dict=False``.
        """
        call = inspect.signature(FrameAwareVideoPipeline.__call__).bind(self, prompt, **kwargs)
        call.apply_defaults()
        call = call.arguments
        plan, steps, window = call["plan"], call["num_inference_steps"], call["window_frames"]
        step_counts = [plan.num_steps if isinstance(plan, FrameTimestepPlan) else steps]
        if window is not None and window < latent_frame_count(call["num_frames"], self.temporal_compression):
            step_counts.append(steps)  # later windows walk the scheduler's grid
        check_denoiser_schedule(denoiser_schedule, step_counts, video_probability)
        self._schedule, self._video_probability, self._denoisers = denoiser_schedule, video_probability, []
        return_dict = call.pop("return_dict")
        output = super().__call__(**{name: value for name, value in call.items() if name != "self"})
        if not return_dict:
            return output.frames, output.plan, self._denoisers
        return JointImageVideoPipelineOutput(frames=output.frames, plan=output.plan, denoisers=self._denoisers)
