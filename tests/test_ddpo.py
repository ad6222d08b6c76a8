"""DDPO and RLCM on the shared trainer: their policies are exactly the stock schedulers' steps, the PPO pieces are
the official code's formulas, and at toy scale both raise the JPEG compressibility of held-out prompts' images.

The effect runs share one recipe (a rank-8 LoRA on LCM-LoRA's targets, learning rate 1e-2, PPO clip range 1e-2, four
prompts x 16 images a round, two updates a round on half of its transitions each) for 100 rounds of RLCM (4 steps)
and 60 of DDPO (10 steps). At this scale one round's policy gradient is nearly all noise: at the base model its
signal-to-noise ratio ``|E g|^2 / tr Cov g`` for 16 trajectories is 0.0036 for RLCM, with 89 % of its variance from
the first transition (t = 999 -> 759, where LCM's consistency function divides the noise prediction by
sqrt(alphas_cumprod) = 0.068), and for DDPO too small to tell from zero over 12 rounds (the unbiased estimate of
``|E g|^2`` came out negative; ``python benchmarks/reward_finetuning.py snr``). With 16 trajectories a round and
updates on 16 transitions (the former recipe) the held-out gain was a lottery over training seeds and floating-point
rounding: RLCM +0.0017 to +0.0146 kB over seeds 0-5, -0.0001 for seed 5 with SSE4.2 kernels (and -0.0009 on another
machine's CPU); DDPO -0.0001 to +0.0104. Four times the trajectories a round cost little more here (the tiny UNet's
time goes to per-call overhead) and make every update average 96 (RLCM) or 320 (DDPO) transitions.

Measured with this recipe over training seeds 0-4 (``python benchmarks/reward_finetuning.py seeds --recipes tests``;
each +- 0.0006 to 0.0008): RLCM +0.0196 to +0.0262 kB (+0.0183 to +0.0241 with SSE4.2-class kernels, seeds 0, 3, 4);
DDPO +0.0048 to +0.0171 (+0.0056 for seed 4 with SSE4.2-class kernels). DDPO at 30 rounds gave +0.0024 to +0.0134,
too close to four standard errors on two seeds. ``snr`` prints the signal-to-noise figures.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, LCMScheduler
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image
from tiny_pipelines import tiny_sdxl

from diffusers_ext.guidance.rewards import jpeg_compressibility
from diffusers_ext.training import Trainer, TrainingConfig
from diffusers_ext.training.cli import FINAL_FOLDER
from diffusers_ext.training.cli import main as train_main
from diffusers_ext.training.ddpo import DDIMPolicy, DDPOObjective, toy_pipeline
from diffusers_ext.training.lcm_lora import LCM_LORA_TARGET_MODULES
from diffusers_ext.training.lora import save_lora_weights
from diffusers_ext.training.policy_gradient import (
    Conditioning,
    RewardNormalizer,
    gaussian_log_density,
    ppo_clipped_loss,
    validation_images,
)
from diffusers_ext.training.rlcm import LCMPolicy, RLCMObjective

SD_SCHEDULE = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
TRAIN_PROMPTS = ["a cat", "a dog", "a bird", "a fish"]
HELD_OUT_PROMPTS = ["a horse", "a cow"]
HELD_OUT_SEEDS = 32
IMAGES_PER_PROMPT, UPDATES_PER_ROUND, ROUNDS = 16, 2, {"ddpo": 60, "rlcm": 100}
TRANSITIONS = {"ddpo": 10, "rlcm": 3}  # a trajectory's stochastic steps: DDIM's 10; LCM's 4 but the exact last one
# The held-out reward must rise by at least this much (kilobytes of JPEG per 16 x 16 image; the base model's is
# 0.863 kB), about half the smallest gain measured over training seeds 0-4 (module docstring), and by more than 4
# paired standard errors.
MARGIN_KB = {"ddpo": 0.002, "rlcm": 0.01}


def ddim_pipeline(**scheduler_options):
    return toy_pipeline(DDIMScheduler(**SD_SCHEDULE, clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                                      **scheduler_options))


def lcm_pipeline():
    return toy_pipeline(LCMScheduler(**SD_SCHEDULE))


def ddpo(pipe, **options):
    return DDPOObjective(pipe, jpeg_compressibility, **dict(num_inference_steps=10, guidance_scale=3.0,
                                                            images_per_prompt=4, min_count=4) | options)


def rlcm(pipe, **options):
    return RLCMObjective(pipe, jpeg_compressibility, **dict(num_inference_steps=4, images_per_prompt=4,
                                                            min_count=4) | options)


def conditioning(pipe, policy, batch_size):
    return Conditioning.for_pipeline(pipe, ["a cat"] * batch_size, "cpu", policy.guidance_scale, 16, 16)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("clip_sample", [False, True])
@pytest.mark.parametrize("set_alpha_to_one", [False, True])
def test_the_ddim_policy_draws_what_ddimscheduler_steps_to(prediction_type, clip_sample, set_alpha_to_one):
    pipe = ddim_pipeline(prediction_type=prediction_type)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, clip_sample=clip_sample, clip_sample_range=0.5,
                                               set_alpha_to_one=set_alpha_to_one)
    policy = DDIMPolicy(pipe.scheduler, num_inference_steps=5, eta=0.7, guidance_scale=3.0)
    # Landing on alphas_cumprod = 1, the last step has no noise: it belongs to ``final``, not to the policy.
    assert policy.num_transitions == (4 if set_alpha_to_one else 5)
    cond = conditioning(pipe, policy, 2)
    stock = DDIMScheduler.from_config(pipe.scheduler.config)
    stock.set_timesteps(5)
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 4, 8, 8, generator=generator)
    with torch.no_grad():
        for k, t in enumerate(stock.timesteps):
            noise = torch.randn(sample.shape, generator=generator)
            guided = cond.predict(pipe.unet, sample, torch.full((2,), int(t)))
            expected = stock.step(guided, t, sample, eta=0.7, variance_noise=noise).prev_sample
            if k == policy.num_transitions:
                torch.testing.assert_close(policy.final(pipe.unet, sample, cond), expected, rtol=1e-5, atol=1e-5)
                break
            mean, std = policy.transition(pipe.unet, sample, torch.full((2,), k), cond)
            torch.testing.assert_close(mean + std * noise, expected, rtol=1e-5, atol=1e-5)
            assert std.min() > 0
            sample = expected
        else:
            torch.testing.assert_close(policy.final(pipe.unet, sample, cond), sample)


def test_the_lcm_policy_draws_what_lcmscheduler_steps_to_and_ends_on_its_denoised_sample():
    pipe = lcm_pipeline()
    policy = LCMPolicy(pipe.scheduler, num_inference_steps=4)
    cond = conditioning(pipe, policy, 2)
    stock = LCMScheduler.from_config(pipe.scheduler.config)
    stock.set_timesteps(4)
    sample = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    assert policy.num_transitions == 3
    with torch.no_grad():
        for k, t in enumerate(stock.timesteps):
            prediction = pipe.unet(sample, t, encoder_hidden_states=cond.prompt_embeds).sample
            output = stock.step(prediction, t, sample, generator=torch.Generator().manual_seed(k))
            if k == 3:
                torch.testing.assert_close(policy.final(pipe.unet, sample, cond), output.prev_sample)
                torch.testing.assert_close(output.prev_sample, output.denoised)
                break
            noise = randn_tensor(sample.shape, generator=torch.Generator().manual_seed(k))
            mean, std = policy.transition(pipe.unet, sample, torch.full((2,), k), cond)
            torch.testing.assert_close(mean + std * noise, output.prev_sample, rtol=1e-5, atol=1e-5)
            sample = output.prev_sample


def lcm_distilled_pipeline():
    """An LCM-distilled UNet takes the guidance scale as an embedding (``time_cond_proj_dim``) instead of CFG."""
    from diffusers import UNet2DConditionModel

    pipe = lcm_pipeline()
    torch.manual_seed(1)
    pipe.unet = UNet2DConditionModel(**{**pipe.unet.config, "time_cond_proj_dim": 8}).eval()
    return pipe


def sdxl_pipeline():
    return tiny_sdxl(DDIMScheduler(**SD_SCHEDULE, clip_sample=False, set_alpha_to_one=False, steps_offset=1))


@pytest.mark.parametrize("case", ["ddpo", "ddpo-sdxl", "rlcm", "rlcm-guidance-embedding"])
def test_a_rollout_is_the_stock_pipelines_sample_for_the_same_generator(case):
    if case.startswith("ddpo"):
        method = ddpo(ddim_pipeline() if case == "ddpo" else sdxl_pipeline())
    else:
        method = rlcm(lcm_pipeline() if case == "rlcm" else lcm_distilled_pipeline(),
                      guidance_scale=1.0 if case == "rlcm" else 3.0)
    pipe = method.pipeline
    prompts = ["a cat", "a cat", "a cat"]
    with torch.no_grad():
        _, _, images, _ = method.sample(pipe.unet, prompts, torch.Generator().manual_seed(7))
    stock = pipe(prompts[0], num_images_per_prompt=3, output_type="pt", generator=torch.Generator().manual_seed(7),
                 **method.policy.pipeline_arguments(method.height, method.width)).images
    torch.testing.assert_close(images, stock, rtol=1e-4, atol=1e-5)


def test_log_density_clipped_loss_and_per_prompt_normalisation_are_the_official_formulas():
    generator = torch.Generator().manual_seed(0)
    value, mean = torch.randn(3, 2, 4, 4, generator=generator), torch.randn(3, 2, 4, 4, generator=generator)
    std = torch.tensor([0.5, 1.0, 2.0]).view(3, 1, 1, 1)
    normal = torch.distributions.Normal(mean, std.expand_as(mean))
    torch.testing.assert_close(gaussian_log_density(value, mean, std), normal.log_prob(value).mean(dim=(1, 2, 3)))

    log_prob, old = torch.tensor([0.0, 0.3, -0.3, 0.01]), torch.zeros(4)
    advantages = torch.tensor([1.0, 2.0, -1.0, 20.0])
    ratio = log_prob.exp()
    # By hand, clip range 0.1 and advantages clipped at 5: max(-A r, -A clip(r)) per element.
    expected = torch.tensor([-1.0 * ratio[0], -2.0 * 1.1, 1.0 * 0.9, -5.0 * ratio[3]]).mean()
    torch.testing.assert_close(ppo_clipped_loss(log_prob, old, advantages, 0.1, 5.0), expected)

    normalizer = RewardNormalizer(buffer_size=3, min_count=3)
    first = normalizer(["a", "a", "b"], torch.tensor([1.0, 3.0, 5.0]))
    batch = torch.tensor([1.0, 3.0, 5.0], dtype=torch.float64)  # fewer than 3 rewards per prompt: the call's stats
    torch.testing.assert_close(first, ((batch - batch.mean()) / (batch.std(correction=0) + 1e-6)).float())
    second = normalizer(["a", "a"], torch.tensor([2.0, 4.0]))
    buffer = torch.tensor([3.0, 2.0, 4.0], dtype=torch.float64)  # the last 3 of 1, 3, 2, 4
    expected = (torch.tensor([2.0, 4.0], dtype=torch.float64) - buffer.mean()) / (buffer.std(correction=0) + 1e-6)
    torch.testing.assert_close(second, expected.float())


@pytest.mark.parametrize("objective", [ddpo, rlcm], ids=["ddpo", "rlcm"])
def test_the_first_update_sees_a_ratio_of_one_on_every_collected_transition(objective):
    pipe = ddim_pipeline() if objective is ddpo else lcm_pipeline()
    method = objective(pipe, transitions_per_batch=5, advantage_clip=1.0)
    batches = method.collect(pipe.unet.eval(), TRAIN_PROMPTS[:2], torch.Generator().manual_seed(0))
    transitions = sorted((int(i), int(k)) for batch in batches
                         for i, k in zip(batch["trajectory"], batch["step"], strict=True))
    assert transitions == [(i, k) for i in range(2 * 4) for k in range(method.policy.num_transitions)]
    pipe.unet.train()
    for batch in batches:
        with torch.no_grad():
            loss = method.loss(pipe.unet, batch, torch.Generator())
        # With the ratio at 1 the clipped objective is minus the mean (clipped) advantage of the batch's trajectories.
        advantages = batch["round"].advantages[batch["trajectory"]]
        torch.testing.assert_close(loss, -advantages.clamp(-1, 1).mean())


def held_out_rewards(method, unet) -> torch.Tensor:
    prompts = [p for p in HELD_OUT_PROMPTS for _ in range(HELD_OUT_SEEDS)]
    unet.eval()
    with torch.no_grad():
        images = method.sample(unet, prompts, torch.Generator().manual_seed(1000))[2]
    return jpeg_compressibility(images)


@pytest.fixture(scope="module", params=["ddpo", "rlcm"])
def trained(request, tmp_path_factory, training_seed):
    name = request.param
    pipe = ddim_pipeline() if name == "ddpo" else lcm_pipeline()
    round_transitions = len(TRAIN_PROMPTS) * IMAGES_PER_PROMPT * TRANSITIONS[name]
    method = (ddpo if name == "ddpo" else rlcm)(pipe, images_per_prompt=IMAGES_PER_PROMPT, min_count=IMAGES_PER_PROMPT,
                                                clip_range=1e-2,
                                                transitions_per_batch=round_transitions // UPDATES_PER_ROUND,
                                                validation_prompts=HELD_OUT_PROMPTS[:1], validation_seeds=[5, 6])
    assert method.policy.num_transitions == TRANSITIONS[name]
    base = held_out_rewards(method, pipe.unet)
    output_dir = tmp_path_factory.mktemp(name)
    steps = ROUNDS[name] * UPDATES_PER_ROUND
    config = TrainingConfig(output_dir=str(output_dir), max_steps=steps, batch_size=len(TRAIN_PROMPTS),
                            learning_rate=1e-2, lora_rank=8, lora_target_modules=LCM_LORA_TARGET_MODULES,
                            validation_every=steps, seed=training_seed)
    result = Trainer(method, pipe.unet.train(), TRAIN_PROMPTS, config).train()
    save_lora_weights(result.model, output_dir / "lora", method_name=method.name, config=config)
    return dict(name=name, method=method, base=base, trained=held_out_rewards(method, result.model),
                output_dir=output_dir, steps=steps)


@pytest.mark.effect
def test_rl_fine_tuning_raises_held_out_compressibility(trained):
    gain = trained["trained"] - trained["base"]  # paired: the same held-out prompts and initial noises
    standard_error = float(gain.std() / len(gain) ** 0.5)
    print(f"\n{trained['name']}: held-out JPEG compressibility {float(trained['base'].mean()):.4f} -> "
          f"{float(trained['trained'].mean()):.4f} kB (gain {float(gain.mean()):.4f} +- {standard_error:.4f})")
    assert float(gain.mean()) > MARGIN_KB[trained["name"]]
    assert float(gain.mean()) > 4 * standard_error


def test_the_saved_adapter_reproduces_the_validation_images_in_a_fresh_stock_pipeline(trained):
    stock = ddim_pipeline() if trained["name"] == "ddpo" else lcm_pipeline()
    stock.load_lora_weights(trained["output_dir"] / "lora")
    method = trained["method"]
    images = validation_images(stock, stock.unet, method.validation_prompts, method.validation_seeds,
                               **method.policy.pipeline_arguments(method.height, method.width))
    saved = sorted((trained["output_dir"] / "validation" / f"step-{trained['steps']}").glob("image-*.png"))
    assert len(saved) == len(images) == 2
    for path, image in zip(saved, images, strict=True):
        np.testing.assert_array_equal(np.asarray(Image.open(path)), np.asarray(image))


def test_an_sdxl_adapter_reproduces_the_validation_images_in_a_fresh_stock_sdxl_pipeline(tmp_path):
    from diffusers import StableDiffusionXLPipeline

    method = ddpo(sdxl_pipeline(), num_inference_steps=4, images_per_prompt=2, min_count=2,
                  validation_prompts=["a cow"], validation_seeds=[3])
    config = TrainingConfig(output_dir=str(tmp_path), max_steps=4, batch_size=2, learning_rate=1e-2, lora_rank=2,
                            validation_every=4)
    result = Trainer(method, method.pipeline.unet.train(), TRAIN_PROMPTS, config).train()
    save_lora_weights(result.model, tmp_path / "lora", pipeline_class=StableDiffusionXLPipeline, method_name="ddpo",
                      config=config)
    stock = sdxl_pipeline()
    before = validation_images(stock, stock.unet, ["a cow"], [3], **method.policy.pipeline_arguments(8, 8))
    stock.load_lora_weights(tmp_path / "lora")
    after = validation_images(stock, stock.unet, ["a cow"], [3], **method.policy.pipeline_arguments(8, 8))
    saved = np.asarray(Image.open(tmp_path / "validation" / "step-4" / "image-0.png"))
    np.testing.assert_array_equal(saved, np.asarray(after[0]))
    assert not np.array_equal(saved, np.asarray(before[0]))  # the adapter is what reproduces them


def test_a_run_interrupted_mid_round_resumes_to_the_uninterrupted_weights(tmp_path):
    def run(output_dir, max_steps, resume_from=None):
        pipe = ddim_pipeline()
        config = TrainingConfig(output_dir=str(output_dir), max_steps=max_steps, batch_size=2, learning_rate=1e-3,
                                lora_rank=2, checkpoint_every=3, resume_from=resume_from)
        # 2 prompts x 2 images x 10 steps in minibatches of 8: 5 steps a round, so checkpoint 3 lies mid-round.
        method = DDPOObjective(pipe, jpeg_compressibility, num_inference_steps=10, images_per_prompt=2, min_count=2,
                               transitions_per_batch=8)
        return Trainer(method, pipe.unet.train(), TRAIN_PROMPTS, config).train()

    uninterrupted = run(tmp_path / "a", 7)
    run(tmp_path / "b", 3)
    resumed = run(tmp_path / "b", 7, resume_from="latest")
    assert resumed.losses == pytest.approx(uninterrupted.losses[3:], rel=1e-5)
    for (name, expected), actual in zip(uninterrupted.model.state_dict().items(), resumed.model.state_dict().values(),
                                        strict=True):
        torch.testing.assert_close(actual, expected, msg=name)


def test_bad_inputs_are_clear_errors(tmp_path):
    pipe = ddim_pipeline()
    with pytest.raises(ValueError, match=r"set pipe\.scheduler = DDIMScheduler"):
        ddpo(lcm_pipeline())
    with pytest.raises(ValueError, match=r"set pipe\.scheduler = LCMScheduler"):
        rlcm(pipe)
    with pytest.raises(ValueError, match="eta > 0"):
        DDPOObjective(pipe, jpeg_compressibility, eta=0.0)
    with pytest.raises(ValueError, match="num_inference_steps >= 2"):
        RLCMObjective(lcm_pipeline(), jpeg_compressibility, num_inference_steps=1)
    with pytest.raises(ValueError, match="tokenizer and a text encoder"):
        ddpo(type(pipe)(**{**pipe.components, "text_encoder": None}))
    with pytest.raises(ValueError, match="images_per_prompt must be a positive integer"):
        ddpo(pipe, images_per_prompt=0)
    with pytest.raises(ValueError, match="min_count <= buffer_size"):
        ddpo(pipe, min_count=32)
    config = TrainingConfig(output_dir=str(tmp_path / "nan"), max_steps=2, batch_size=2, lora_rank=2,
                            checkpoint_every=1)
    nan_reward = DDPOObjective(pipe, lambda images: torch.full((len(images),), float("nan")), num_inference_steps=2)
    with pytest.raises(ValueError, match=r"the reward returned non-finite values \(NaN or inf\)"):
        Trainer(nan_reward, pipe.unet.train(), TRAIN_PROMPTS, config).train()
    assert not list((tmp_path / "nan").glob("checkpoint-*"))
    wrong_shape = DDPOObjective(ddim_pipeline(), lambda images: torch.zeros(len(images), 2), num_inference_steps=2)
    with pytest.raises(ValueError, match="one value per sample"):
        Trainer(wrong_shape, wrong_shape.pipeline.unet.train(), TRAIN_PROMPTS,
                TrainingConfig(output_dir=str(tmp_path / "shape"), max_steps=1, batch_size=2, lora_rank=2)).train()


@pytest.mark.parametrize("method", ["ddpo", "rlcm"])
def test_the_train_command_saves_an_adapter_that_loads_into_the_saved_base_pipeline(method, tmp_path):
    from diffusers import StableDiffusionPipeline

    assert train_main([method, "--output_dir", str(tmp_path), "--max_steps", "3", "--batch_size", "2",
                       "--lora_rank", "2"]) == 0
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "base_pipeline")
    pipe.load_lora_weights(tmp_path / FINAL_FOLDER)
    assert pipe.get_active_adapters()


def launch_two_processes(*arguments: str) -> str:
    accelerate = Path(sys.executable).with_name("accelerate")
    command = Path(sys.executable).with_name("diffusers-ext")
    env = os.environ | {"ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    return subprocess.run([str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                           "--mixed_precision", "no", "--dynamo_backend", "no", str(command), "train", "ddpo",
                           *arguments], check=True, env=env, capture_output=True, text=True, timeout=300).stdout


@pytest.mark.slow
def test_two_process_launch_of_ddpo_saves_one_adapter_and_resumes_mid_round(tmp_path):
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file

    # 2 prompts x 4 images x 10 steps a process: 80 one-transition micro-batches a round, so step 2 is mid-round.
    run = ["--max_steps", "4", "--batch_size", "2", "--lora_rank", "2", "--checkpoint_every", "2"]
    output = launch_two_processes("--output_dir", str(tmp_path / "a"), *run)
    assert output.count("trained ddpo to step 4") == 1  # one run of two processes, not two runs of one
    assert sorted(p.name for p in (tmp_path / "a").glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    final = tmp_path / "a" / FINAL_FOLDER
    assert [p.name for p in final.glob("*.safetensors")] == ["pytorch_lora_weights.safetensors"]
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "a" / "base_pipeline")
    pipe.load_lora_weights(final)
    assert pipe.get_active_adapters()

    # Each process resumes its own generator and its own untaken transitions.
    launch_two_processes("--output_dir", str(tmp_path / "b"), *run[:-2], "--checkpoint_every", "2",
                         "--max_steps", "2")
    launch_two_processes("--output_dir", str(tmp_path / "b"), *run, "--resume", "latest")
    resumed = load_file(tmp_path / "b" / FINAL_FOLDER / "pytorch_lora_weights.safetensors")
    for name, weight in load_file(final / "pytorch_lora_weights.safetensors").items():
        torch.testing.assert_close(resumed[name], weight, msg=name)
