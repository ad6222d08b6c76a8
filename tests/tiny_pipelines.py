"""Stock diffusers pipelines built from tiny random components: with precomputed prompt embeddings, or (``text_encoder=
True``) with a CLIP tokenizer and text encoder built from configs (``diffusers_ext.testing.tiny_text``), since none can
be downloaded here."""

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)

from diffusers_ext.testing import tiny_clip_text_encoder, tiny_clip_tokenizer
from diffusers_ext.testing.tiny_text import TINY_TEXT_WIDTH

TEXT_DIM = TINY_TEXT_WIDTH


def tiny_stable_diffusion(scheduler, text_encoder: bool = False) -> StableDiffusionPipeline:
    """8 x 8 images from 4 x 8 x 8 latents; ``text_encoder=True`` gives it the tiny CLIP, so that it takes prompts."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=TEXT_DIM, attention_head_dim=4, norm_num_groups=4,
    )
    vae = AutoencoderKL(
        block_out_channels=(8,), in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",), latent_channels=4, norm_num_groups=4, sample_size=8,
    )
    pipe = StableDiffusionPipeline(
        vae=vae.eval(), text_encoder=tiny_clip_text_encoder() if text_encoder else None,
        tokenizer=tiny_clip_tokenizer() if text_encoder else None, unet=unet.eval(), scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


# Stable Diffusion 1.5's shipped DDIM sampler (its scheduler_config.json), the tests' text-to-image sampler.
STABLE_DIFFUSION_DDIM = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
                         "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1}


def sd_scheduler() -> DDIMScheduler:
    return DDIMScheduler(**STABLE_DIFFUSION_DDIM)


def sd_pipeline(text_encoder: bool = False) -> StableDiffusionPipeline:
    """``tiny_stable_diffusion`` sampling with Stable Diffusion's DDIM (``STABLE_DIFFUSION_DDIM``)."""
    return tiny_stable_diffusion(sd_scheduler(), text_encoder=text_encoder)


def stable_diffusion_inputs(seed: int = 0, **overrides) -> dict:
    embeds = torch.randn(1, 4, TEXT_DIM, generator=torch.Generator().manual_seed(123))
    inputs = dict(prompt_embeds=embeds, negative_prompt_embeds=torch.zeros_like(embeds), num_inference_steps=4,
                  guidance_scale=2.0, height=8, width=8, output_type="np", generator=torch.Generator().manual_seed(seed))
    return inputs | overrides


def tiny_sd3(scheduler, latent_channels: int = 4) -> StableDiffusion3Pipeline:
    """``latent_channels=16``: SD3's own latent width, which its inpainting pipeline requires."""
    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=1, in_channels=latent_channels, num_layers=1, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=TEXT_DIM, caption_projection_dim=16,
        pooled_projection_dim=TEXT_DIM, out_channels=latent_channels,
    )
    vae = AutoencoderKL(
        block_out_channels=(8,), in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",), latent_channels=latent_channels, norm_num_groups=4, sample_size=8,
        shift_factor=0.0609, scaling_factor=1.5035, use_quant_conv=False, use_post_quant_conv=False,
    )
    pipe = StableDiffusion3Pipeline(
        transformer=transformer.eval(), scheduler=scheduler, vae=vae.eval(), text_encoder=None, tokenizer=None,
        text_encoder_2=None, tokenizer_2=None, text_encoder_3=None, tokenizer_3=None,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pooled_prompt_embeddings(batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One prompt's sequence and pooled embeddings, tiled ``batch_size`` times: SD3 and Flux do not repeat
    precomputed embeddings for ``num_images_per_prompt``."""
    generator = torch.Generator().manual_seed(123)
    embeds = torch.randn(1, 4, TEXT_DIM, generator=generator).repeat(batch_size, 1, 1)
    pooled = torch.randn(1, TEXT_DIM, generator=generator).repeat(batch_size, 1)
    return embeds, pooled


def sd3_inputs(seed: int = 0, batch_size: int = 1, **overrides) -> dict:
    embeds, pooled = pooled_prompt_embeddings(batch_size)
    inputs = dict(prompt_embeds=embeds, negative_prompt_embeds=torch.zeros_like(embeds), pooled_prompt_embeds=pooled,
                  negative_pooled_prompt_embeds=torch.zeros_like(pooled), num_inference_steps=4, guidance_scale=2.0,
                  height=8, width=8, output_type="np", generator=torch.Generator().manual_seed(seed))
    return inputs | overrides


def tiny_flux() -> FluxPipeline:
    """Flux: packed latents, the timestep divided by 1000 before the transformer, no classifier-free guidance."""
    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=TEXT_DIM, pooled_projection_dim=TEXT_DIM, axes_dims_rope=[2, 2, 4],
    )
    vae = AutoencoderKL(
        block_out_channels=(8, 16), in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4, sample_size=16,
        shift_factor=0.0609, scaling_factor=1.5035, use_quant_conv=False, use_post_quant_conv=False,
    )
    pipe = FluxPipeline(transformer=transformer.eval(), scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae.eval(),
                        text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def flux_inputs(seed: int = 0, batch_size: int = 1, **overrides) -> dict:
    embeds, pooled = pooled_prompt_embeddings(batch_size)
    inputs = dict(prompt_embeds=embeds, pooled_prompt_embeds=pooled, num_inference_steps=4, height=16, width=16,
                  max_sequence_length=4, output_type="np", generator=torch.Generator().manual_seed(seed))
    return inputs | overrides


def tiny_sdxl(scheduler) -> StableDiffusionXLPipeline:
    """SDXL's layout in miniature: two CLIP encoders (the second with projection, for pooled embeddings), the
    sequence embeddings concatenated (64 wide), and the "text_time" added conditioning (pooled text + 6 size ids)."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=2 * TEXT_DIM, attention_head_dim=4, norm_num_groups=4, addition_embed_type="text_time",
        addition_time_embed_dim=4, projection_class_embeddings_input_dim=TEXT_DIM + 6 * 4,
    )
    vae = AutoencoderKL(
        block_out_channels=(8,), in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",), latent_channels=4, norm_num_groups=4, sample_size=8,
    )
    pipe = StableDiffusionXLPipeline(
        vae=vae.eval(), text_encoder=tiny_clip_text_encoder(), tokenizer=tiny_clip_tokenizer(),
        text_encoder_2=tiny_clip_text_encoder(seed=1, with_projection=True), tokenizer_2=tiny_clip_tokenizer(),
        unet=unet.eval(), scheduler=scheduler,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_controlnet_stable_diffusion(scheduler):
    """``tiny_stable_diffusion`` with a ControlNet built from its UNet (``ControlNetModel.from_unet``); the control
    image is 8 x 8 like the output (the conditioning embedding does not downsample)."""
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline

    base = tiny_stable_diffusion(scheduler)
    torch.manual_seed(1)
    controlnet = ControlNetModel.from_unet(base.unet, conditioning_embedding_out_channels=(8,))
    # from_unet copies the UNet's weights and zero-initialises the residual outputs; random outputs make the
    # residuals matter in tests.
    for block in [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block]:
        torch.nn.init.normal_(block.weight, std=0.1)
    pipe = StableDiffusionControlNetPipeline(**base.components, controlnet=controlnet.eval())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def control_image(seed: int = 0) -> torch.Tensor:
    return torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


def hook_state(pipe) -> dict:
    """What a detached hook must leave as it found it: the scheduler object, every attention processor object, and
    which modules carry a diffusers hook registry or an instance-level ``forward``."""
    state = {"scheduler": pipe.scheduler}
    for name, component in pipe.components.items():
        if not isinstance(component, torch.nn.Module):
            continue
        for module_name, module in component.named_modules():
            key = f"{name}.{module_name}"
            state[key] = (hasattr(module, "_diffusers_hook"), "forward" in vars(module),
                          getattr(module, "processor", None))
    return state
