"""Speed hooks together with the rest of the package on one stock pipeline: one of our samplers, a LoRA, a steering
method and two speed hooks at once; everything detached, the pipeline is the LoRA pipeline it was."""

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from peft import LoraConfig
from tiny_pipelines import hook_state, sd3_inputs, stable_diffusion_inputs, tiny_sd3, tiny_stable_diffusion

from diffusers_ext.guidance import FKSteering, FlowChef, jpeg_compressibility
from diffusers_ext.hooks import AttentionEntropyScaling, FasterDiffusion, RegionAdaptiveSampling
from diffusers_ext.schedulers import ERSDESolverScheduler
from diffusers_ext.testing.sampler_accuracy import SD3_SCHEDULER_CONFIG, SD_SCHEDULER_CONFIG


def lora_pipeline():
    pipe = tiny_stable_diffusion(ERSDESolverScheduler.from_config(SD_SCHEDULER_CONFIG, noise_scale="reverse_sde"))
    torch.manual_seed(0)
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                     target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    with torch.no_grad():  # a trained LoRA: PEFT starts B at zero, which would make it a no-op
        for name, parameter in pipe.unet.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.2)
    return pipe


def test_er_sde_sampler_lora_fk_steering_faster_diffusion_and_attention_scaling_on_one_pipeline():
    pipe = lora_pipeline()
    inputs = lambda: stable_diffusion_inputs(num_inference_steps=10, num_images_per_prompt=3, height=16,  # noqa: E731
                                             width=16)
    plain = pipe(**inputs()).images
    before = hook_state(pipe)
    steering = FKSteering(reward=jpeg_compressibility, num_particles=3)
    faster = FasterDiffusion(key_steps=[0, 1, 2, 5, 8], reference_steps=10)
    scaling = AttentionEntropyScaling()
    steering.attach(pipe)
    faster.attach(pipe)
    scaling.attach(pipe)
    first = pipe(**inputs()).images
    second = pipe(**inputs()).images
    assert faster.encoder.calls == {"compute": 10, "reuse": 10}
    assert steering.final_rewards.shape == (3,)
    np.testing.assert_array_equal(first, second)
    assert np.isfinite(first).all() and not np.array_equal(first, plain)
    # Detached in another order than attached.
    faster.detach()
    steering.detach()
    scaling.detach()
    assert hook_state(pipe) == before
    np.testing.assert_array_equal(pipe(**inputs()).images, plain)


def test_lora_weights_count_in_the_reused_and_the_recomputed_parts():
    """With the LoRA disabled the accelerated run changes as the stock one does: the hooks run the model as it is,
    adapters included."""
    pipe = lora_pipeline()
    stock = pipe(**stable_diffusion_inputs(num_inference_steps=10)).images
    pipe.unet.disable_adapters()
    assert np.abs(pipe(**stable_diffusion_inputs(num_inference_steps=10)).images - stock).max() > 1e-3
    pipe.unet.enable_adapters()
    faster = FasterDiffusion(key_steps=[0, 5], reference_steps=10)
    with faster.attached(pipe):
        with_lora = pipe(**stable_diffusion_inputs(num_inference_steps=10)).images
        pipe.unet.disable_adapters()
        without_lora = pipe(**stable_diffusion_inputs(num_inference_steps=10)).images
        pipe.unet.enable_adapters()
    assert np.abs(with_lora - without_lora).max() > 1e-3


def test_ras_with_a_gradient_steering_method_on_sd3():
    pipe = tiny_sd3(FlowMatchEulerDiscreteScheduler.from_config(SD3_SCHEDULER_CONFIG))
    before = hook_state(pipe)
    stock = pipe(**sd3_inputs(height=16, width=16, num_inference_steps=6)).images
    steering = FlowChef(loss=lambda x0: x0.pow(2).flatten(1).mean(1), reward_space="sample")
    ras = RegionAdaptiveSampling(start_step=2, error_reset_steps=[], reference_steps=6)
    with steering.attached(pipe), ras.attached(pipe):
        steered = pipe(**sd3_inputs(height=16, width=16, num_inference_steps=6)).images
    assert ras.calls["partial"] > 0 and np.isfinite(steered).all() and not np.array_equal(steered, stock)
    assert hook_state(pipe) == before
    np.testing.assert_array_equal(pipe(**sd3_inputs(height=16, width=16, num_inference_steps=6)).images, stock)
