r"""MVDream's multi-view fine-tuning as a loss on the shared ``Trainer`` ("MVDream: Multi-view Diffusion for 3D
Generation", arXiv 2308.16512).

The model is a ``UNet2DConditionModel`` made multi-view in place (``multiview_unet``, i.e.
``pipelines.three_d.multiview_attention.make_multiview``: self-attention across each object's ``N`` views, the camera
embedding added to the timestep embedding). The ``Trainer`` trains it as any denoiser, with a LoRA adapter on its
attention projections when ``TrainingConfig.lora_rank`` is set (the toy run's default) or whole without; the camera
MLP, which the loss uses besides the model, is trained whole by the same optimizer (``trainable_modules``). The loss
is the diffusion loss on the views of one object, noised at one timestep ``t`` per object (the views are denoised
together, so they share their noise level at sampling)::

    t ~ U{0, ..., T-1} per object,   eps ~ N(0, I) per view,   x_t = alpha_t x_0 + sigma_t eps
    L = || unet(x_t, t, c, cameras) - target ||^2        (target: eps, x_0 or v, the scheduler's prediction type)

2D data mixing. As the authors do, a share of the training batches are 2D images (with probability
``single_view_probability`` per batch, the paper's 30%): the model then runs as the 2D model, each image attending
to itself only (``single_view_attention``, the authors' ``num_frames=1``) and without a camera (``camera=None``).
The paper's 2D data is a text-image set (LAION); here, with no such set, a 2D batch is the batch's rendered views
taken as independent images (their cameras dropped), which keeps the model able to denoise a single view alone.

Data (``RenderedShapeViews``): random unions of coloured primitives (``pipelines.three_d.shapes.random_shape``)
rendered on the fly (``pipelines.three_d.rendering.render``) from ``N`` cameras evenly spaced in azimuth (a random
starting azimuth and one random elevation per object), as the authors render Objaverse objects from orbits.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from ..diffusion_math import alpha_sigma_function, default_prediction_type, prediction_from_x0_and_eps
from ..pipelines.three_d.multiview_attention import (
    CameraEmbedding,
    camera_embedding_of,
    make_multiview,
    multiview_num_views,
    single_view_attention,
)
from ..pipelines.three_d.rendering import orbit_cameras, render
from ..pipelines.three_d.shapes import random_shape

# The authors' share of 2D batches: the paper's implementation details mix 2D text-image data in with probability
# 0.3 (the value as recalled from the paper; its PDF could not be opened here to re-check it).
PAPER_SINGLE_VIEW_PROBABILITY = 0.3
CAMERA_EMBEDDING_FOLDER = "camera_embedding"


def multiview_unet(unet: torch.nn.Module, num_views: int) -> tuple[torch.nn.Module, CameraEmbedding]:
    """``unet`` (a 2D ``UNet2DConditionModel``) made multi-view in place for ``num_views`` views, with a new
    ``CameraEmbedding`` (returned; pass it to ``MultiViewObjective`` to train it)."""
    camera_embedding = CameraEmbedding(unet.time_embedding.linear_2.out_features)
    make_multiview(unet, num_views, camera_embedding)
    return unet, camera_embedding


class MultiViewObjective:
    """MVDream's loss (module docstring) on batches ``{"views": (B, N, C, H, W), "cameras": (B, N, 4, 4)}`` and
    optionally ``"prompt_embeds"`` ``(B, L, D)``; ``views`` in the model's range (``[-1, 1]`` pixels or latents).
    The model is a multi-view UNet (``multiview_unet``) or a denoiser taking ``cameras=`` (the exact oracle).

    Args:
        scheduler: the training scheduler (its VP ``config`` is read: betas, ``prediction_type``).
        camera_embedding: the UNet's camera embedding, trained with it (``trainable_modules``); ``None`` for a
            denoiser without one.
        single_view_probability: the share of batches trained as 2D images (the paper's 0.3).
        prompt_embeds: the text embedding ``(1, L, D)`` for batches without one (a zero embedding for an
            unconditional model).
    """

    name = "multiview"

    def __init__(self, scheduler: Any, camera_embedding: CameraEmbedding | None = None,
                 single_view_probability: float = PAPER_SINGLE_VIEW_PROBABILITY,
                 prompt_embeds: torch.Tensor | None = None):
        if isinstance(single_view_probability, bool) or not 0 <= single_view_probability <= 1:
            raise ValueError(f"single_view_probability must be a number in [0, 1], got {single_view_probability!r}")
        config = getattr(scheduler, "config", None)
        if not isinstance(config, Mapping) or "beta_schedule" not in config:
            raise ValueError("scheduler must be a diffusers VP scheduler with a config (DDPMScheduler, DDIMScheduler, "
                             f"...), got {type(scheduler).__name__}")
        self.alpha_sigma = alpha_sigma_function(config)
        self.prediction_type = default_prediction_type(config)
        self.num_train_timesteps = int(config.get("num_train_timesteps", 1000))
        self.single_view_probability = float(single_view_probability)
        self.camera_embedding = camera_embedding
        self.prompt_embeds = prompt_embeds
        self.last_terms: dict[str, float] = {}

    def trainable_modules(self) -> dict[str, torch.nn.Module]:
        """The camera MLP, trained whole by the Trainer's optimizer next to the UNet (or its adapter)."""
        return {"camera_embedding": self.camera_embedding} if self.camera_embedding is not None else {}

    def _inputs(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if not isinstance(batch, Mapping) or "views" not in batch or "cameras" not in batch:
            raise ValueError("a multiview batch is a dict with 'views' (B, N, C, H, W) and 'cameras' (B, N, 4, 4)")
        views, cameras = batch["views"], batch["cameras"]
        if views.ndim != 5 or cameras.shape != (*views.shape[:2], 4, 4):
            raise ValueError(f"views must be (B, N, C, H, W) and cameras (B, N, 4, 4), got {tuple(views.shape)} and "
                             f"{tuple(cameras.shape)}")
        prompt_embeds = batch.get("prompt_embeds", self.prompt_embeds)
        if prompt_embeds is None:
            raise ValueError("the batch has no prompt_embeds and the objective none to fall back on")
        return views, cameras, prompt_embeds.to(views.device)

    def loss(self, model: torch.nn.Module, batch: Any, generator: torch.Generator) -> torch.Tensor:
        views, cameras, prompt_embeds = self._inputs(batch)
        objects, num_views = views.shape[:2]
        denoiser = getattr(model, "module", model)  # inside a distributed wrapper
        built_for = multiview_num_views(denoiser)
        if num_views != built_for:
            raise ValueError(f"the batch has {num_views} views per object; the model is built for {built_for}")
        single_view = bool(torch.rand((), generator=generator) < self.single_view_probability)
        images = views.reshape(objects * num_views, *views.shape[2:])
        timesteps = torch.randint(0, self.num_train_timesteps, (objects,), generator=generator)
        timesteps = timesteps.repeat_interleave(num_views).to(images.device)
        noise = torch.randn(images.shape, generator=generator, dtype=images.dtype).to(images.device)
        alpha, sigma = (value.to(images.dtype)[:, None, None, None] for value in self.alpha_sigma(timesteps))
        noisy = alpha * images + sigma * noise
        target = prediction_from_x0_and_eps(images, noise, alpha, sigma, self.prediction_type)
        text = prompt_embeds.expand(objects, *prompt_embeds.shape[1:]).repeat_interleave(num_views, dim=0)
        if single_view:  # a 2D batch: every image on its own, no camera
            with single_view_attention(denoiser):
                prediction = model(noisy, timesteps, encoder_hidden_states=text, return_dict=False)[0]
        else:
            prediction = model(noisy, timesteps, encoder_hidden_states=text, cameras=cameras.reshape(-1, 4, 4),
                               return_dict=False)[0]
        loss = torch.nn.functional.mse_loss(prediction.float(), target.float())
        self.last_terms = {"single_view": float(single_view)}
        return loss


def _item_seed(seed: int, index: int) -> int:
    # torch's CPU generator keeps 32 bits of its seed: mix (seed, index) into 32 well-spread bits.
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


class RenderedShapeViews(Dataset):
    """``num_objects`` random shapes (``shapes.random_shape``), each rendered from ``num_views`` cameras evenly spaced
    in azimuth from a random start, at one random elevation in ``elevation_range`` (degrees), drawn on the fly from a
    generator seeded by ``(seed, index)``: the same item every time, nothing stored. Item: ``{"views": (N, 3, size,
    size)`` in ``[-1, 1]`` (white background), ``"cameras": (N, 4, 4)``}.

    Args:
        num_objects: the data set's length.
        num_views: views per object.
        size: image height and width in pixels.
        elevation_range: the elevations drawn, in degrees.
        resolution: the shapes' voxel resolution.
        seed: which shapes.
    """

    def __init__(self, num_objects: int, num_views: int = 4, size: int = 16,
                 elevation_range: tuple[float, float] = (0.0, 30.0), resolution: int = 16, seed: int = 0):
        for name, value, minimum in (("num_objects", num_objects, 1), ("num_views", num_views, 1), ("size", size, 4),
                                     ("resolution", resolution, 2)):
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
        if not elevation_range[0] <= elevation_range[1]:
            raise ValueError(f"elevation_range must be (low, high) with low <= high, got {elevation_range!r}")
        self.num_objects, self.num_views, self.size = num_objects, num_views, size
        self.elevation_range, self.resolution, self.seed = tuple(elevation_range), resolution, seed

    def __len__(self) -> int:
        return self.num_objects

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not 0 <= index < self.num_objects:
            raise IndexError(f"object {index} of a data set of {self.num_objects}")
        generator = torch.Generator().manual_seed(_item_seed(self.seed, index))
        shape = random_shape(generator, resolution=self.resolution)
        low, high = self.elevation_range
        elevation = low + (high - low) * float(torch.rand((), generator=generator))
        start_azimuth = 360.0 * float(torch.rand((), generator=generator))
        cameras = orbit_cameras(self.num_views, elevation=elevation, start_azimuth=start_azimuth)
        with torch.no_grad():
            views = render(shape, cameras, self.size, self.size)
        return {"views": views * 2 - 1, "cameras": cameras}


# The toy run: 4 views of 16 x 16 RGB pixels (no VAE), unconditional (one zero text token).
TOY_VIEWS = dict(num_views=4, size=16)
TOY_TEXT_WIDTH = 16


def toy_unet(seed: int = 0, size: int = TOY_VIEWS["size"]) -> Any:
    """A tiny random pixel-space ``UNet2DConditionModel`` (3 channels, ``size`` pixels, two levels, attention at
    the coarser one), the same for the same ``seed``: the 2D base model of ``toy_run`` and the
    shipped recipe."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=size, in_channels=3, out_channels=3, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=TOY_TEXT_WIDTH, attention_head_dim=8, norm_num_groups=8)


def toy_run(config: Any, args: Any = None) -> tuple[MultiViewObjective, torch.nn.Module, Dataset]:
    """``diffusers-ext train multiview``: MVDream's loss (2D batches with the paper's probability 0.3, DDPM's linear
    schedule, epsilon prediction) on ``toy_unet(config.seed)`` made multi-view for 4 views (LoRA from
    ``config.lora_rank``, rank 8 by default, or the whole UNet; the camera MLP trained whole), over 1024
    ``RenderedShapeViews`` objects of 16 x 16 pixels, unconditional (a zero text token)."""
    from diffusers import DDPMScheduler

    dataset = RenderedShapeViews(1024, **TOY_VIEWS, seed=config.seed)
    unet, camera_embedding = multiview_unet(toy_unet(config.seed), TOY_VIEWS["num_views"])
    method = MultiViewObjective(DDPMScheduler(), camera_embedding,
                                prompt_embeds=torch.zeros(1, 1, TOY_TEXT_WIDTH))
    return method, unet.train(), dataset


def save_multiview_weights(model: torch.nn.Module, folder: str | Path, *, method_name: str, config: Any,
                           dataset: Any = None) -> Path:
    """The trained weights the diffusers way: the UNet's adapter as ``pytorch_lora_weights.safetensors``
    (``save_lora_weights``: ``pipe.load_lora_weights(folder)``), or without one the whole UNet in ``unet/``, and the
    camera embedding in ``camera_embedding/`` (``CameraEmbedding.from_pretrained(folder,
    subfolder="camera_embedding")``)."""
    from .lora import save_lora_weights

    folder = Path(folder)
    camera_embedding = camera_embedding_of(model)
    if camera_embedding is None:
        raise ValueError("the model has no camera embedding attached: train a multiview_unet")
    if getattr(model, "peft_config", None):
        save_lora_weights(model, folder, method_name=method_name, config=config, card=False)
    else:
        model.save_pretrained(folder / "unet")
    camera_embedding.save_pretrained(folder / CAMERA_EMBEDDING_FOLDER)
    return folder
