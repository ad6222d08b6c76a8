"""LCM-LoRA (latent consistency distillation into a LoRA adapter) on the shared trainer, on a stock tiny Stable
Diffusion pipeline built from random components.

The teacher is that pipeline with DDIM, 50 steps at guidance scale 2. A randomly initialised UNet models no data but
its own samples, so the student is distilled on 64 of them (the toy's stand-in for distilling Stable Diffusion on the
images it was trained on; distilled on unrelated latents, the student's trajectories never meet the teacher's). Every
comparison is on 8 held-out seeds, each output against the teacher's 50-step output from the same initial noise.

Measured (``OMP_NUM_THREADS=1 pytest -q -s tests/test_lcm_lora.py``; per-element latent MSE, teacher variance 180):

- one step: the student (LCMScheduler, 1 step, guidance 1) 3.6; the base model at 1 step with the same
  LCMScheduler at guidance 2, 7.3, with trailing-spaced DDIM, 7.2: the distilled consistency function halves the
  error on every seed, and matches the base model's best 4-step sampler (trailing DDIM, 3.6) in one step.
- four steps, the issue's claim: the student (LCMScheduler, guidance 1) 31; the base model with the same
  LCMScheduler 31, with trailing DDIM 3.6, with Stable Diffusion's default DDIM (leading spacing, first step at
  t = 751) 83. Beating the last is the sampler's doing, not the adapter's, and against the others the claim does not
  hold here: LCM's multistep sampling re-noises its estimate with fresh noise and relies on the teacher denoising it
  again, which a random-weight teacher does not (``test_four_step_student...`` is a strict xfail recording this).

With a trained teacher (the paper's setting) the claim does not reproduce at this scale either; see that test.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler, LCMScheduler
from peft import LoraConfig
from PIL import Image
from tiny_pipelines import TEXT_DIM, sd_pipeline, sd_scheduler, stable_diffusion_inputs

from diffusers_ext.training import Trainer, TrainingConfig
from diffusers_ext.training.lcm_lora import (
    LCM_LORA_TARGET_MODULES,
    LCMLoRADistillation,
    ddim_solver_timesteps,
    lcm_boundary_scalings,
    lcm_lora_pipeline,
    lcm_lora_sample,
    teacher_samples,
)
from diffusers_ext.training.lora import save_lora_weights

GUIDANCE = 2.0
TRAINING_SEED, HELD_OUT_SEEDS, VALIDATION_SEEDS = 1000, list(range(8)), (0, 1)
STEPS = 120
# The reference script's targets less the attention projections: ``save_lora_weights`` rewrites those keys to
# diffusers' old format but leaves the others in PEFT's, and ``load_lora_weights`` then drops the attention layers of
# a file that holds both (``test_an_adapter_on_the_reference_targets_round_trips`` records it).
ROUND_TRIPPING_TARGETS = [name for name in LCM_LORA_TARGET_MODULES if not name.startswith("to_")]


def attention_lora() -> LoraConfig:
    return LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_k", "to_v", "to_out.0"])


def trailing_ddim(pipe):
    """The pipeline with DDIM on trailing timesteps (its first step at t = 999): the base model's best few-step
    DDIM."""
    trailing = pipe.from_pipe(pipe, scheduler=DDIMScheduler.from_config(pipe.scheduler.config,
                                                                         timestep_spacing="trailing"))
    trailing.set_progress_bar_config(disable=True)
    return trailing


PROMPT = stable_diffusion_inputs()["prompt_embeds"]
NEGATIVE = torch.zeros_like(PROMPT)


def latents(pipe, steps: int, guidance_scale: float, seeds=HELD_OUT_SEEDS) -> torch.Tensor:
    """The pipeline's final latents, one per seed, each from its own generator (the same initial noise in every
    pipeline)."""
    with torch.no_grad():
        return pipe(prompt_embeds=PROMPT, negative_prompt_embeds=NEGATIVE, num_images_per_prompt=len(seeds),
                    generator=[torch.Generator().manual_seed(s) for s in seeds], num_inference_steps=steps,
                    guidance_scale=guidance_scale, output_type="latent").images


def per_seed_mse(outputs: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    return (outputs - reference).pow(2).mean(dim=(1, 2, 3))


@pytest.fixture(scope="module")
def distilled(tmp_path_factory, training_seed):
    output_dir = tmp_path_factory.mktemp("lcm-lora")
    base = sd_pipeline()
    data_latents = teacher_samples(base.unet, base.scheduler.config, PROMPT, NEGATIVE, count=64,
                                   latent_shape=(4, 8, 8), guidance_scale=GUIDANCE,
                                   generator=torch.Generator().manual_seed(TRAINING_SEED))
    data = [{"latents": x0, "prompt_embeds": PROMPT[0], "negative_prompt_embeds": NEGATIVE[0]} for x0 in data_latents]
    config = TrainingConfig(output_dir=str(output_dir), max_steps=STEPS, batch_size=16, learning_rate=1e-2,
                            lora_rank=8, lora_target_modules=ROUND_TRIPPING_TARGETS, validation_every=STEPS,
                            seed=training_seed)
    method = LCMLoRADistillation(base.scheduler.config, w_min=GUIDANCE, w_max=GUIDANCE, validation_pipeline=base,
                                 validation_prompt_embeds=PROMPT, validation_seeds=VALIDATION_SEEDS)
    result = Trainer(method, sd_pipeline().unet.train(), data, config).train()
    save_lora_weights(result.model, output_dir / "lora", method_name=method.name, config=config)
    student = lcm_lora_pipeline(base, unet=result.model.eval())
    return {"base": base, "student": student, "output_dir": output_dir, "teacher": latents(base, 50, GUIDANCE)}


@pytest.mark.effect
def test_one_step_student_is_closer_to_the_teachers_50_step_output_than_the_base_model_at_one_step(distilled):
    base, teacher = distilled["base"], distilled["teacher"]
    student = per_seed_mse(latents(distilled["student"], 1, 1.0), teacher)
    base_lcm = per_seed_mse(latents(lcm_lora_pipeline(base), 1, GUIDANCE), teacher)
    base_ddim = per_seed_mse(latents(trailing_ddim(base), 1, GUIDANCE), teacher)
    print(f"\nMSE to the teacher at 1 step: student {student.mean():.2f}, base (LCMScheduler) {base_lcm.mean():.2f}, "
          f"base (trailing DDIM) {base_ddim.mean():.2f}; teacher variance {teacher.var():.1f}")
    assert (student < base_lcm).all() and (student < base_ddim).all()
    # Measured over training seeds 0-4 (DIFFUSERS_EXT_TEST_SEED): 0.49 to 0.56 (student 3.55 to 4.02 vs 7.26 and
    # 7.21); an untrained adapter gives 1.
    assert student.mean() < 0.7 * min(base_lcm.mean(), base_ddim.mean())


@pytest.mark.effect
@pytest.mark.xfail(strict=True, reason="not at toy scale: random teacher, student 31 vs base 3.6 (trailing DDIM); "
                                       "trained teacher, student 1.06-1.42 vs base 0.42 (default DDIM) and 0.10 "
                                       "(trailing), and a perfect consistency model's LCM 4-step floor (0.46-0.72) "
                                       "is above the base's default DDIM; see the docstring")
def test_four_step_student_is_closer_to_the_teachers_50_step_output_than_the_base_model_at_four_steps(distilled):
    """The issue's claim, per held-out seed against the teacher's 50-step DDIM output. It fails here, with the random
    teacher of ``distilled`` (the module docstring's figures) and with a trained one.

    Trained teacher (measured once, outside this file: it takes 35 s to 2 min of CPU): ``sd_pipeline().unet`` fully
    trained with ``SmoothLoRAObjective(regularization_weight=0)`` (plain epsilon MSE, ``STABLE_DIFFUSION_SCHEDULE``)
    on ``PrototypeLatents(64, (4, 8, 8), (4, TEXT_DIM), num_prompts=1, prototypes_per_prompt=4, jitter=0.1)``, batch
    16, learning rate 2e-3, then distilled at guidance 1 (one prompt, no unconditional model) into a rank-8 LoRA on
    ``ROUND_TRIPPING_TARGETS``, batch 16. 64 held-out seeds (10000-10063); per-element latent MSE to the teacher's
    50-step DDIM; "near" is the RMS distance to the nearest prototype (the data's is 0.1); SW2 the sliced W2 distance
    to 64 other teacher samples (seeds 20000-20063; teacher against teacher: 0.41, 0.34).

    =================================  ==========  ==========  ==========  ==========  ==========  ==========
    base steps / distillation          student 4   student 1   base DDIM   base DDIM   base LCM 4  perfect CM
                                                               4 default   4 trailing              LCM 4
    =================================  ==========  ==========  ==========  ==========  ==========  ==========
    1500 / 120 steps, lr 1e-2, data    1.19        2.27        0.42        0.10        1.09        0.72
    1500 / 500, lr 1e-2, teacher's     1.42        2.32        0.42        0.10        1.09        0.72
    1500 / 500, lr 1e-3, teacher's     1.06        1.65        0.42        0.10        1.09        0.72
    4000 / 500, lr 1e-2, teacher's     1.10        1.68        0.43        0.13        1.00        0.46
    =================================  ==========  ==========  ==========  ==========  ==========  ==========

    (Base 1-step trailing DDIM: 2.19 and 1.66; teacher's 50-step samples: near 0.94 and 0.70.) The distributional
    measures do not favour the student either: SW2 0.47 to 0.68 against the base's 0.45 / 0.37 (trailing DDIM) and
    0.55 / 0.46 (default); near 0.83 to 1.09 against 0.51 / 0.38 (default DDIM). "Perfect CM" is the LCM 4-step
    sampler (timesteps 999, 759, 499, 259, fresh noise between steps) with the teacher's own 50-step PF-ODE as the
    consistency function: no student can do better in expectation, and it is above the base's default DDIM. What
    blocks the claim is the toy law, not the distillation alone: four well-separated prototypes make the few-step
    DDIM trajectory nearly straight, so 4-step DDIM is already close to the 50-step output, while LCM's re-noising
    moves each sample off the teacher's trajectory. With the exact (analytic) denoiser of that law, 4-step DDIM is
    at 0.30 (default, leading spacing) and 0.002 (trailing) against the perfect consistency model's 0.06: a student
    could beat the default DDIM only with a much better teacher than 1500-4000 steps give, and never the trailing
    one. On Stable Diffusion 4-step DDIM is far from the 50-step image (the paper's premise), which this law lacks.
    """
    base, teacher = distilled["base"], distilled["teacher"]
    student = per_seed_mse(latents(distilled["student"], 4, 1.0), teacher).mean()
    base_four_step = {"LCMScheduler": latents(lcm_lora_pipeline(base), 4, GUIDANCE),
                      "default DDIM": latents(base, 4, GUIDANCE),
                      "trailing DDIM": latents(trailing_ddim(base), 4, GUIDANCE)}
    base_mse = {name: per_seed_mse(output, teacher).mean() for name, output in base_four_step.items()}
    print(f"\nMSE to the teacher at 4 steps: student {student:.2f}, base "
          + ", ".join(f"{name} {value:.2f}" for name, value in base_mse.items()))
    assert student < min(base_mse.values())


def test_the_saved_adapter_reproduces_the_trainers_validation_images_in_a_stock_pipeline(distilled):
    folder = distilled["output_dir"] / "validation" / f"step-{STEPS}"
    validation = [np.asarray(Image.open(folder / f"image-{i}.png")) for i in range(len(VALIDATION_SEEDS))]
    stock = sd_pipeline()
    stock.scheduler = LCMScheduler.from_config(stock.scheduler.config)
    stock.load_lora_weights(distilled["output_dir"] / "lora")
    reloaded = lcm_lora_sample(stock, PROMPT, VALIDATION_SEEDS)
    for expected, image in zip(validation, reloaded, strict=True):
        np.testing.assert_array_equal(np.asarray(image), expected)
    assert torch.equal(latents(stock, 4, 1.0), latents(distilled["student"], 4, 1.0))
    assert not torch.equal(latents(stock, 4, 1.0), latents(lcm_lora_pipeline(sd_pipeline()), 4, 1.0))


def test_an_adapter_on_the_reference_targets_round_trips_through_save_lora_weights(tmp_path):
    unet = sd_pipeline().unet
    unet.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=LCM_LORA_TARGET_MODULES))
    with torch.no_grad():
        for name, parameter in unet.named_parameters():
            if "lora_B" in name:  # as if trained: B starts at zero
                parameter.normal_(std=0.1, generator=torch.Generator().manual_seed(1))
    save_lora_weights(unet, tmp_path, method_name="lcm-lora", config=TrainingConfig(lora_rank=2))
    stock = sd_pipeline()
    stock.load_lora_weights(tmp_path)
    sample, timesteps = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2)), torch.tensor([999, 259])
    with torch.no_grad():
        assert torch.equal(stock.unet(sample, timesteps, encoder_hidden_states=PROMPT.expand(2, -1, -1)).sample,
                           unet(sample, timesteps, encoder_hidden_states=PROMPT.expand(2, -1, -1)).sample)


def test_the_loss_is_the_reference_scripts_consistency_distillation_loss():
    """One loss evaluation against the reference script's formulas, written with diffusers' own schedulers: DDPM's
    ``add_noise``, the teacher's DDIM step on ``alphas_cumprod`` and LCMScheduler's boundary scalings."""
    unet = sd_pipeline().unet
    unet.add_adapter(attention_lora())
    with torch.no_grad():  # a trained-looking adapter: the student differs from the teacher
        for name, parameter in unet.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.05, generator=torch.Generator().manual_seed(3))
    size, w = 3, 2.5
    # Embeddings ten times the pipelines' make the random UNet's guidance term large enough to check.
    batch = {"latents": torch.randn(size, 4, 8, 8, generator=torch.Generator().manual_seed(4)),
             "prompt_embeds": 10 * PROMPT.expand(size, -1, -1), "negative_prompt_embeds": NEGATIVE.expand(size, -1, -1)}
    method = LCMLoRADistillation(sd_scheduler().config, w_min=w, w_max=w, num_ddim_timesteps=50)
    loss = method.loss(unet, batch, torch.Generator().manual_seed(5))
    loss.backward()
    trained = {n for n, p in unet.named_parameters() if p.grad is not None}
    assert trained and all("lora_" in n for n in trained)
    assert all(p.requires_grad for n, p in unet.named_parameters() if "lora_" in n)  # the adapter is on again

    generator = torch.Generator().manual_seed(5)  # the method's draws, in its order
    index = torch.randint(0, 50, (size,), generator=generator)
    noise = torch.randn(batch["latents"].shape, generator=generator)
    scheduler = sd_scheduler()
    abar = scheduler.alphas_cumprod
    start = index * 20 + 19
    end = (start - 20).clamp(min=0)
    noisy = scheduler.add_noise(batch["latents"], noise, start)

    def column(values):
        return values.view(-1, 1, 1, 1)

    def x0_from_eps(eps, x, t):
        return (x - column((1 - abar[t]).sqrt()) * eps) / column(abar[t].sqrt())

    def consistency(x, t):
        eps = unet(x, t, encoder_hidden_states=batch["prompt_embeds"]).sample
        c_skip, c_out = LCMScheduler().get_scalings_for_boundary_condition_discrete(t)
        return column(c_skip) * x + column(c_out) * x0_from_eps(eps, x, t)

    with torch.no_grad():
        unet.disable_adapters()
        conditional = unet(noisy, start, encoder_hidden_states=batch["prompt_embeds"]).sample
        unconditional = unet(noisy, start, encoder_hidden_states=batch["negative_prompt_embeds"]).sample
        unet.enable_adapters()
        eps = unconditional + w * (conditional - unconditional)
        previous = (column(abar[end].sqrt()) * x0_from_eps(eps, noisy, start)
                    + column((1 - abar[end]).sqrt()) * eps)
        target = consistency(previous, end)
        expected = (consistency(noisy, start) - target).pow(2).mean()
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-4, atol=0)

    huber = LCMLoRADistillation(sd_scheduler().config, w_min=w, w_max=w, loss_type="huber", huber_c=0.001)
    huber_loss = huber.loss(unet, batch, torch.Generator().manual_seed(5)).detach()
    difference = consistency(noisy, start).detach() - target
    torch.testing.assert_close(huber_loss, ((difference**2 + 1e-6).sqrt() - 1e-3).mean(), rtol=1e-4, atol=0)


def test_the_solver_grid_and_boundary_scalings_are_lcmschedulers():
    lcm = LCMScheduler.from_config(sd_scheduler().config)
    lcm.set_timesteps(50)
    assert torch.equal(ddim_solver_timesteps(1000, 50), lcm.timesteps.flip(0).long())
    lcm.set_timesteps(4)
    assert set(lcm.timesteps.tolist()) <= set(ddim_solver_timesteps(1000, 50).tolist())
    timesteps = torch.tensor([0, 1, 19, 259, 999])
    c_skip, c_out = lcm_boundary_scalings(timesteps)
    for t, skip, out in zip(timesteps.tolist(), c_skip, c_out, strict=True):
        torch.testing.assert_close((skip.item(), out.item()), lcm.get_scalings_for_boundary_condition_discrete(t))
    assert c_skip[0] == 1 and c_out[0] == 0  # the boundary condition f(x, 0) = x


def test_bad_inputs_are_clear_errors(tmp_path):
    config = sd_scheduler().config
    with pytest.raises(ValueError, match=r"num_ddim_timesteps must divide num_train_timesteps \(1000\).*got 30"):
        LCMLoRADistillation(config, num_ddim_timesteps=30)
    with pytest.raises(ValueError, match=r"0 < w_min <= w_max, got w_min=8.0, w_max=3.0"):
        LCMLoRADistillation(config, w_min=8.0, w_max=3.0)
    with pytest.raises(ValueError, match="loss_type must be one of"):
        LCMLoRADistillation(config, loss_type="l1")
    with pytest.raises(ValueError, match="needs a VP"):
        LCMLoRADistillation(FlowMatchEulerDiscreteScheduler().config)
    with pytest.raises(ValueError, match="zero-terminal-SNR"):
        LCMLoRADistillation({**config, "rescale_betas_zero_snr": True})
    with pytest.raises(ValueError, match="both validation_pipeline and validation_prompt_embeds"):
        LCMLoRADistillation(config, validation_pipeline=sd_pipeline())

    batch = {"latents": torch.randn(2, 4, 8, 8), "prompt_embeds": torch.randn(2, 4, TEXT_DIM)}
    plain_unet = sd_pipeline().unet
    with pytest.raises(ValueError, match=r"UNet2DConditionModel has no diffusers LoRA adapter; train it with "
                                         r"TrainingConfig\(lora_rank=...\)"):
        LCMLoRADistillation(config).loss(plain_unet, batch, torch.Generator())
    with pytest.raises(ValueError, match="has no diffusers LoRA adapter"):  # the trainer without lora_rank
        Trainer(LCMLoRADistillation(config), plain_unet.train(), [dict(batch, latents=batch["latents"][0],
                                                                       prompt_embeds=batch["prompt_embeds"][0])],
                TrainingConfig(output_dir=str(tmp_path), max_steps=1, batch_size=1)).train()
    plain_unet.add_adapter(attention_lora())
    with pytest.raises(ValueError, match="needs the batch's negative_prompt_embeds"):
        LCMLoRADistillation(config).loss(plain_unet, batch, torch.Generator())
