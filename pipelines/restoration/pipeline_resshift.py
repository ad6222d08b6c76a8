"""``ResShiftPipeline``: 4x super-resolution (or same-size restoration) by residual shifting, in pixel or latent space.

"ResShift: Efficient Diffusion Model for Image Super-resolution by Residual Shifting" (Yue, Wang, Loy; arXiv
2307.12348). The Markov chain shifts the residual ``y - x0`` between the bicubic-upsampled input ``y`` and the image
over a short chain (15 steps, or 4 in the extension arXiv 2403.07319); the paper works on a VQGAN's latents, which
this pipeline does when given a ``vae``. The update is ``ResShiftScheduler``'s.
"""

from __future__ import annotations

from ...schedulers.scheduling_resshift import ResShiftScheduler
from .pipeline_restoration import RestorationPipeline


class ResShiftPipeline(RestorationPipeline):
    r"""Super-resolve (``upscale_factor=4``, the paper's task) or restore an image with a ResShift model.

    ``pipe(low_res_image).images[0]`` samples with ``config.default_num_inference_steps`` when the model records
    one (its best measured step count), else the whole trained chain; ``num_inference_steps`` below
    ``scheduler.config.num_train_timesteps`` samples a sub-grid of it. See ``RestorationPipeline`` for the
    components and the call's arguments.
    """

    scheduler_class = ResShiftScheduler

    def __init__(self, unet, scheduler: ResShiftScheduler | None = None, vae=None, upscale_factor: int = 4,
                 default_num_inference_steps: int | None = None):
        super().__init__(unet=unet, scheduler=scheduler, vae=vae, upscale_factor=upscale_factor,
                         default_num_inference_steps=default_num_inference_steps)

    @property
    def method_num_inference_steps(self) -> int:
        return self.scheduler.config.num_train_timesteps
