"""The overhead of FK steering: K particles against K independent samples plus the reward calls.

    python benchmarks/guidance_overhead.py [--particles 4] [--steps 10] [--repeats 5] [--size 16]

On a small random Stable Diffusion pipeline (UNet2DConditionModel, AutoencoderKL, DDIM with eta = 1, CFG), each repeat
times, back to back:

- ``independent``: ``pipe(num_images_per_prompt=K)``, K unsteered samples in one batch;
- ``steered``: the same call with ``FKSteering`` attached (reward read at every step, resampling when the ESS falls
  below K / 2), with the time spent inside the reward (VAE decode + JPEG size of every x0 prediction) recorded
  separately.

It prints the median of ``steered / (independent + reward time)``: what the steering machine itself costs; the
target is at most 1.1.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

from diffusers_ext.guidance import FKSteering, jpeg_compressibility

TEXT_DIM = 64


def small_stable_diffusion(latent_size: int) -> StableDiffusionPipeline:
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=2, sample_size=latent_size, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=TEXT_DIM, attention_head_dim=8, norm_num_groups=8,
    )
    vae = AutoencoderKL(
        block_out_channels=(16, 32), in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
    )
    scheduler = DDIMScheduler(clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae.eval(), text_encoder=None, tokenizer=None, unet=unet.eval(),
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


class TimedReward:
    """Decode latents with the pipeline's VAE and score JPEG compressibility, adding up the time spent."""

    def __init__(self, pipe: StableDiffusionPipeline):
        self.pipe = pipe
        self.seconds = 0.0

    def __call__(self, latents: torch.Tensor) -> torch.Tensor:
        start = time.perf_counter()
        images = self.pipe.vae.decode(latents / self.pipe.vae.config.scaling_factor, return_dict=False)[0]
        rewards = jpeg_compressibility((images / 2 + 0.5).clamp(0, 1))
        self.seconds += time.perf_counter() - start
        return rewards


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--particles", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--size", type=int, default=16, help="latent height and width")
    args = parser.parse_args()

    pipe = small_stable_diffusion(args.size)
    embeds = torch.randn(1, 8, TEXT_DIM, generator=torch.Generator().manual_seed(0))
    inputs = dict(prompt_embeds=embeds, negative_prompt_embeds=torch.zeros_like(embeds), guidance_scale=5.0,
                  num_inference_steps=args.steps, num_images_per_prompt=args.particles, eta=1.0,
                  height=8 * args.size, width=8 * args.size, output_type="latent")
    reward = TimedReward(pipe)
    steering = FKSteering(reward=reward, num_particles=args.particles, reward_space="sample")

    pipe(**inputs, generator=torch.Generator().manual_seed(0))  # warm-up
    ratios = []
    for repeat in range(args.repeats):
        start = time.perf_counter()
        pipe(**inputs, generator=torch.Generator().manual_seed(repeat))
        independent = time.perf_counter() - start
        reward.seconds = 0.0
        with steering.attached(pipe):
            start = time.perf_counter()
            pipe(**inputs, generator=torch.Generator().manual_seed(repeat))
            steered = time.perf_counter() - start
        ratio = steered / (independent + reward.seconds)
        ratios.append(ratio)
        print(f"repeat {repeat}: independent {independent:.2f} s, steered {steered:.2f} s "
              f"(reward {reward.seconds:.2f} s) -> ratio {ratio:.3f}")
    print(f"\nFK steering, K={args.particles}, {args.steps} steps, {args.size}x{args.size} latents: "
          f"steered / (independent + reward) = {statistics.median(ratios):.3f} (median of {args.repeats}; target <= 1.1)")


if __name__ == "__main__":
    main()
