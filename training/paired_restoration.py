"""The paired-restoration objective: one loss for RDDM, ResShift, the mean-reverting SDE and the diffusion bridge,
driven by the method's scheduler (its forward process, training-time law and target), on the shared ``Trainer``."""

from __future__ import annotations

from typing import Any

import torch

from ..pipelines.restoration.pipeline_restoration import encode_to_latents
from ..schedulers.restoration import RestorationScheduler

TOY_PATCH_SIZE = 32


class PairedRestorationObjective:
    """``E || model([x_t, y], t) - target ||^2`` with ``t ~ scheduler.sample_training_timesteps``,
    ``x_t = scheduler.add_noise(x0, y, eps, t)`` and ``target = scheduler.training_target(x0, y, eps, t)`` on batches
    ``{"clean": x0, "degraded": y}`` of images in [-1, 1] (``y`` already in ``x0``'s size). With a ``vae`` (frozen)
    both images are encoded first and the process runs on latents, as ResShift does."""

    def __init__(self, scheduler: RestorationScheduler, vae=None):
        if not isinstance(scheduler, RestorationScheduler):
            raise ValueError(f"the paired-restoration objective needs a restoration scheduler, got "
                             f"{type(scheduler).__name__}")
        self.scheduler, self.vae = scheduler, vae
        # The name goes into checkpoints: a run resumes only a run of the same method.
        self.name = f"restoration-{type(scheduler).__name__}"

    def loss(self, model: torch.nn.Module, batch: dict, generator: torch.Generator) -> torch.Tensor:
        clean, degraded = self.encode(batch["clean"]), self.encode(batch["degraded"])
        timesteps = self.scheduler.sample_training_timesteps(clean.shape[0], generator).to(clean.device)
        noise = torch.randn(clean.shape, generator=generator, dtype=clean.dtype).to(clean.device)
        noisy = self.scheduler.add_noise(clean, degraded, noise, timesteps)
        target = self.scheduler.training_target(clean, degraded, noise, timesteps)
        prediction = model(torch.cat([noisy, degraded], dim=1), timesteps).sample
        return torch.nn.functional.mse_loss(prediction.float(), target.float())

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        if self.vae is None:
            return images
        self.vae.to(images.device)
        return encode_to_latents(self.vae, images).to(images.dtype)


def toy_run(config: Any, args: Any = None) -> tuple[PairedRestorationObjective, torch.nn.Module, Any]:
    """``diffusers-ext train restoration``: ResShift denoising (Gaussian noise, std 0.1) on 512 patches of 32 px from
    scikit-image's training photos, with a small ``UNet2DModel`` (one attention level, so that LoRA has attention
    projections to wrap)."""
    from diffusers import UNet2DModel

    from ..schedulers import ResShiftScheduler
    from .restoration_data import DegradedPatchDataset, make_degradation, random_patches, scikit_image_photos

    patches = random_patches(scikit_image_photos("train"), TOY_PATCH_SIZE, count=512, seed=config.seed)
    dataset = DegradedPatchDataset(patches, make_degradation("gaussian_noise", std=0.1, clip=True), seed=config.seed)
    torch.manual_seed(config.seed)
    unet = UNet2DModel(sample_size=TOY_PATCH_SIZE, in_channels=6, out_channels=3, block_out_channels=(16, 32),
                       layers_per_block=1, norm_num_groups=8, attention_head_dim=8,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"))
    method = PairedRestorationObjective(ResShiftScheduler(num_train_timesteps=4, kappa=0.5))
    return method, unet.train(), dataset
