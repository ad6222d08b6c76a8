"""FK steering against the exactly tilted law, and the steering machine's contract on stock pipelines: attach,
steer, detach leaving the pipeline as it was; clear errors for bad rewards and unsupported pipelines."""

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)
from diffusers.configuration_utils import register_to_config
from tiny_pipelines import flux_inputs, sd3_inputs, stable_diffusion_inputs, tiny_flux, tiny_sd3, tiny_stable_diffusion

import diffusers_ext
from diffusers_ext.guidance import FKSteering, NoiseSearch, jpeg_compressibility
from diffusers_ext.guidance.steering import SteeredScheduler, SteeringMethod, reindex_batch_state
from diffusers_ext.schedulers import ERSDESolverScheduler
from diffusers_ext.testing import (
    GaussianMixture,
    GaussianMixtureDenoiser,
    GaussianMixtureSamplingPipeline,
    mixture_weight_error,
    sliced_wasserstein2,
)

MEANS = [[-2.0, 0.0], [2.0, 0.0]]
VARIANCES = [0.25, 0.25]
WEIGHTS = [0.5, 0.5]
TILT = torch.tensor([0.5, 0.0], dtype=torch.float64)


def linear_reward(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], -1).double() @ TILT


def oracle_pipeline(scheduler) -> GaussianMixtureSamplingPipeline:
    pipe = GaussianMixtureSamplingPipeline(GaussianMixtureDenoiser(MEANS, VARIANCES, WEIGHTS, scheduler.config), scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sd_scheduler():
    return DDIMScheduler(clip_sample=False, set_alpha_to_one=False, steps_offset=1)


def test_exponential_tilt_matches_importance_weighting():
    law = GaussianMixture([[-1.0, 0.5], [1.5, 0.0]], [[0.3, 0.1], [0.2, 0.4]], [0.7, 0.3])
    draws = law.sample(400_000, torch.Generator().manual_seed(0))
    weights = torch.softmax(draws @ TILT, 0)
    tilted = law.exponentially_tilted(TILT)
    exact_mean = tilted.weights @ tilted.means
    torch.testing.assert_close(weights @ draws, exact_mean, atol=0.01, rtol=0)
    with pytest.raises(ValueError, match="direction"):
        law.exponentially_tilted([1.0])


def tilted_8d_mixture():
    """An 8-D four-component mixture and a linear reward direction: the tilt moves the weights from
    [0.4, 0.3, 0.2, 0.1] to [0.73, 0.03, 0.19, 0.05]."""
    generator = torch.Generator().manual_seed(0)
    means = torch.randn(4, 8, generator=generator, dtype=torch.float64) * 1.5
    tilt = torch.randn(8, generator=generator, dtype=torch.float64) * 0.4
    return GaussianMixture(means, [0.3] * 4, [0.4, 0.3, 0.2, 0.1]), tilt


def test_fk_steering_at_its_defaults_converges_to_the_tilted_law_as_particles_grow():
    """After the final resampling every particle is a draw from the tilted law as K grows; 1000 groups, DDPM 25
    steps, three seeds: the error in the tilted law's component weights falls with K (0.30 / 0.06-0.08 /
    0.011-0.019 measured). The former defaults (``max`` potential, resampling at every step) gave 0.07-0.10 / 0.20 /
    0.24 at K = 4 / 16 / 64: worse with more particles."""
    law, tilt = tilted_8d_mixture()
    target = law.exponentially_tilted(tilt)
    scheduler = DDPMScheduler(clip_sample=False)
    pipe = GaussianMixtureSamplingPipeline(
        GaussianMixtureDenoiser(law.means.tolist(), [0.3] * 4, law.weights.tolist(), scheduler.config), scheduler)
    pipe.set_progress_bar_config(disable=True)
    groups = 1000

    def reward(x):
        return x.reshape(x.shape[0], -1).double() @ tilt

    for seed in range(3):
        errors, resampled = {}, {}
        for particles in (1, 4, 16):
            with FKSteering(reward=reward, num_particles=particles, reward_scale=1.0, reward_space="sample",
                            seed=seed).attached(pipe):
                samples = pipe(batch_size=groups * particles, num_inference_steps=25,
                               generator=torch.Generator().manual_seed(seed)).samples
            errors[particles] = mixture_weight_error(samples, target)
            # The baseline: keep one of K exact prior draws with probability proportional to exp(reward).
            draws = law.sample(groups * particles, torch.Generator().manual_seed(seed)).reshape(groups, particles, -1)
            keep = torch.multinomial(torch.softmax(draws @ tilt, 1), 1, generator=torch.Generator().manual_seed(99))
            resampled[particles] = mixture_weight_error(draws[torch.arange(groups), keep[:, 0]], target)
        print(f"\nseed {seed}, weight error at K = 1 / 4 / 16: FK steering "
              f"{' / '.join(f'{e:.3f}' for e in errors.values())}; importance resampling of K exact prior draws "
              f"(one per group) {' / '.join(f'{e:.3f}' for e in resampled.values())}")
        assert errors[4] < 0.6 * errors[1] and errors[16] < 0.5 * errors[4], errors


def test_fk_steering_with_a_multistep_stochastic_scheduler_of_ours():
    """ER-SDE-Solver 3 keeps past x0 predictions; resampling must carry them along with the particles (without that
    the samples land far off: SW2 19.3 in this set-up). The full reverse SDE is used: resampled copies diverge only
    through the sampler's noise, and er_sde_5's smaller noise leaves K=8 at SW2 0.89 here."""
    config = DDPMScheduler(clip_sample=False).config
    scheduler = ERSDESolverScheduler.from_config(config, noise_scale="reverse_sde")
    pipe = oracle_pipeline(scheduler)
    target = GaussianMixture(MEANS, VARIANCES, WEIGHTS).exponentially_tilted(TILT)
    reference = target.sample(50_000, torch.Generator().manual_seed(1))
    unsteered = pipe(batch_size=500, num_inference_steps=25, generator=torch.Generator().manual_seed(0)).samples
    steering = FKSteering(reward=linear_reward, num_particles=8, potential="difference", reward_scale=1.0,
                          reward_space="sample")
    with steering.attached(pipe):
        samples = pipe(batch_size=4000, num_inference_steps=25, generator=torch.Generator().manual_seed(0)).samples
    steered = sliced_wasserstein2(samples.reshape(500, 8, -1)[:, 0], reference)
    print(f"\nER-SDE + FK (K=8): SW2 to the tilted law {steered:.3f}, unsteered "
          f"{sliced_wasserstein2(unsteered, reference):.3f}")
    assert steered < 0.5 * sliced_wasserstein2(unsteered, reference)


def test_fk_steering_on_stable_diffusion_and_detach_restores_the_pipeline(tmp_path):
    pipe = tiny_stable_diffusion(sd_scheduler())
    config, scheduler = dict(pipe.config), pipe.scheduler
    unsteered = pipe(**stable_diffusion_inputs()).images
    steering = FKSteering(reward=jpeg_compressibility, num_particles=3)
    with steering.attached(pipe):
        assert isinstance(pipe.scheduler, SteeredScheduler)
        first = pipe(**stable_diffusion_inputs(num_images_per_prompt=3, eta=1.0)).images
        rewards = steering.final_rewards
        second = pipe(**stable_diffusion_inputs(num_images_per_prompt=3, eta=1.0)).images
    np.testing.assert_array_equal(first, second)
    assert first.shape == (3, 8, 8, 3) and rewards.shape == (3,)
    np.testing.assert_allclose(rewards.numpy(), jpeg_compressibility(torch.from_numpy(first).permute(0, 3, 1, 2)),
                               atol=0.05)
    assert pipe.scheduler is scheduler and dict(pipe.config) == config
    np.testing.assert_array_equal(pipe(**stable_diffusion_inputs()).images, unsteered)

    steering.save_pretrained(tmp_path)
    loaded = FKSteering.from_pretrained(tmp_path, reward=jpeg_compressibility)
    public = lambda config: {k: v for k, v in config.items() if not k.startswith("_")}  # noqa: E731
    assert public(loaded.config) == public(steering.config) and loaded.config.num_particles == 3
    with loaded.attached(pipe):
        np.testing.assert_array_equal(pipe(**stable_diffusion_inputs(num_images_per_prompt=3, eta=1.0)).images, first)


def test_fk_steering_on_sd3_steps_the_flow_stochastically():
    pipe = tiny_sd3(FlowMatchEulerDiscreteScheduler(shift=3.0))
    unsteered = pipe(**sd3_inputs(batch_size=2)).images
    steering = FKSteering(reward=jpeg_compressibility, num_particles=2, resample_every=2)
    with steering.attached(pipe):
        steered = pipe(**sd3_inputs(batch_size=2)).images
    assert np.isfinite(steered).all() and not np.allclose(steered, unsteered)
    np.testing.assert_array_equal(pipe(**sd3_inputs(batch_size=2)).images, unsteered)


def test_stochastic_flow_steps_follow_the_pipelines_generator():
    """From pure noise a stochastic flow step keeps nothing of x_T; the method's noise is derived from the run's first
    sample so that the pipeline's generator still decides the output."""
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    pipe = oracle_pipeline(scheduler)
    steering = FKSteering(reward=linear_reward, num_particles=2, reward_space="sample")
    with steering.attached(pipe):
        runs = [pipe(batch_size=4, num_inference_steps=5, generator=torch.Generator().manual_seed(seed)).samples
                for seed in (0, 0, 1)]
    torch.testing.assert_close(runs[0], runs[1], rtol=0, atol=0)
    assert not torch.allclose(runs[0], runs[2])


class ReplayProbe(SteeringMethod):
    """Replays the pipeline's denoiser call at the step's own input, and at the next timestep on the next sample,
    to compare with what the pipeline computes there."""

    uses_denoiser = True

    @register_to_config
    def __init__(self):
        super().__init__()
        self.same_call_error, self.next_call_error, self._forecast = [], [], None

    def after_step(self, step, prev_sample):
        self.same_call_error.append(float((self.denoise(step.sample, step.timestep, step) - step.model_output).abs().max()))
        if self._forecast is not None:
            self.next_call_error.append(float((self._forecast - step.model_output).abs().max()))
        timesteps = self.scheduler.timesteps
        later = timesteps[timesteps < step.timestep.to(timesteps.device)]
        self._forecast = self.denoise(prev_sample, later[0], step) if len(later) else None
        return prev_sample


@pytest.mark.parametrize("family", ["sd", "sd3", "flux"])
def test_denoiser_replay_reproduces_the_pipelines_own_predictions(family):
    """With CFG (SD, SD3) and with Flux's timestep / 1000 and packed latents, the replayed call equals the
    pipeline's, at the recorded step and at the next timestep."""
    pipe, inputs = {
        "sd": lambda: (tiny_stable_diffusion(sd_scheduler()), stable_diffusion_inputs(num_images_per_prompt=2)),
        "sd3": lambda: (tiny_sd3(FlowMatchEulerDiscreteScheduler(shift=3.0)), sd3_inputs(batch_size=2)),
        "flux": lambda: (tiny_flux(), flux_inputs(batch_size=2)),
    }[family]()
    probe = ReplayProbe()
    with probe.attached(pipe):
        pipe(**inputs)
    assert len(probe.same_call_error) == 4 and len(probe.next_call_error) == 3
    assert max(probe.same_call_error) < 1e-5 and max(probe.next_call_error) < 1e-5, probe.__dict__


def test_fk_steering_and_loss_guidance_on_flux():
    pipe = tiny_flux()
    unsteered = pipe(**flux_inputs(batch_size=2)).images
    steering = FKSteering(reward=lambda x: -x.reshape(x.shape[0], -1).pow(2).mean(1), num_particles=2,
                          reward_space="sample")
    with steering.attached(pipe):
        steered = pipe(**flux_inputs(batch_size=2)).images
    assert steered.shape == unsteered.shape and not np.allclose(steered, unsteered)
    with pytest.raises(ValueError, match="packed latents"), FKSteering(reward=jpeg_compressibility).attached(pipe):
        pipe(**flux_inputs(batch_size=4))
    np.testing.assert_array_equal(pipe(**flux_inputs(batch_size=2)).images, unsteered)


def test_resampling_reorders_a_multistep_schedulers_history():
    scheduler = DPMSolverMultistepScheduler()
    scheduler.set_timesteps(5)
    sample = torch.arange(3.0)[:, None, None, None].expand(3, 4, 2, 2).clone()
    scheduler.model_outputs = [None, sample.clone()]
    scheduler.timesteps = scheduler.timesteps[:3]  # same leading size as the batch: must not be touched
    timesteps = scheduler.timesteps.clone()
    reindex_batch_state(scheduler, torch.tensor([2, 2, 0]), sample.shape)
    assert scheduler.model_outputs[0] is None
    assert scheduler.model_outputs[1][:, 0, 0, 0].tolist() == [2.0, 2.0, 0.0]
    assert torch.equal(scheduler.timesteps, timesteps)


def test_particle_methods_refuse_samplers_under_which_copies_stay_identical():
    """FK steering and path search branch resampled copies through the sampler's noise. They used to return K
    identical particles on SD 1.5's default PNDM, or on DDIM at its default eta=0, with no warning."""
    pndm = tiny_stable_diffusion(PNDMScheduler.from_config(sd_scheduler().config, skip_prk_steps=True))
    for method in (FKSteering(reward=jpeg_compressibility, num_particles=2),
                   NoiseSearch(reward=jpeg_compressibility, mode="paths", budget=2, num_paths=1)):
        with pytest.raises(ValueError, match=r"needs a stochastic sampler.*PNDMScheduler's deterministic step"):
            method.attach(pndm)
        assert not isinstance(pndm.scheduler, SteeredScheduler)
    NoiseSearch(reward=jpeg_compressibility, mode="random").attach(pndm).detach()  # needs no noise

    for scheduler in (DPMSolverMultistepScheduler(), UniPCMultistepScheduler()):
        with pytest.raises(ValueError, match="needs a stochastic sampler"):
            FKSteering(reward=linear_reward).attach(oracle_pipeline(scheduler))
    with pytest.raises(ValueError, match="flow_eta must be positive"):
        FKSteering(reward=linear_reward, flow_eta=0.0).attach(oracle_pipeline(FlowMatchEulerDiscreteScheduler()))

    pipe = tiny_stable_diffusion(sd_scheduler())
    steering = FKSteering(reward=jpeg_compressibility, num_particles=2)
    with steering.attached(pipe), pytest.raises(ValueError, match=r"stepping with eta=0.*pass eta=1\.0"):
        pipe(**stable_diffusion_inputs(num_images_per_prompt=2))
    with steering.attached(pipe):
        assert np.isfinite(pipe(**stable_diffusion_inputs(num_images_per_prompt=2, eta=1.0)).images).all()
    sde = DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++")
    with FKSteering(reward=linear_reward, num_particles=2, reward_space="sample").attached(pipe := oracle_pipeline(sde)):
        assert pipe(batch_size=4, num_inference_steps=5).samples.isfinite().all()


def test_every_steering_method_is_exported_from_the_package():
    import diffusers_ext.guidance as guidance

    names = [c.name for c in diffusers_ext.list_components("guidance")]
    assert len(names) == 6
    for name in names:
        assert getattr(diffusers_ext, name) is getattr(guidance, name)
        assert issubclass(getattr(guidance, name), guidance.SteeringMethod)


@pytest.mark.parametrize(
    "reward, message",
    [
        (lambda x: torch.zeros(x.shape[0] + 1), "one value per sample"),
        (lambda x: torch.full((x.shape[0],), float("nan")), "non-finite"),
        (lambda x: [0.0] * x.shape[0], "torch.Tensor"),
    ],
)
def test_bad_rewards_give_clear_errors(reward, message):
    pipe = oracle_pipeline(DDPMScheduler(clip_sample=False))
    with FKSteering(reward=reward, num_particles=2).attached(pipe), pytest.raises(ValueError, match=message):
        pipe(batch_size=4, num_inference_steps=3)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_particles=0), "num_particles"),
        (dict(potential="mean"), "potential"),
        (dict(ess_threshold=1.5), "ess_threshold"),
        (dict(reward_space="pixels"), "reward_space"),
        (dict(reward=None), "needs a reward"),
    ],
)
def test_bad_settings_give_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        FKSteering(**({"reward": linear_reward} | kwargs))


def test_batch_that_does_not_split_into_particles_is_refused():
    pipe = oracle_pipeline(DDPMScheduler(clip_sample=False))
    with FKSteering(reward=linear_reward, num_particles=4).attached(pipe), pytest.raises(ValueError, match="num_images_per"):
        pipe(batch_size=6, num_inference_steps=3)


def test_unsupported_pipelines_are_refused():
    steering = FKSteering(reward=linear_reward)
    euler = tiny_stable_diffusion(EulerDiscreteScheduler.from_config(sd_scheduler().config))
    with pytest.raises(ValueError, match="sigma-scaled"):
        steering.attach(euler)
    assert not isinstance(euler.scheduler, SteeredScheduler)
    pipe = tiny_stable_diffusion(sd_scheduler())
    steering.attach(pipe)
    with pytest.raises(ValueError, match="already"):
        FKSteering(reward=linear_reward).attach(pipe)
    steering.detach()
    steering.detach()  # idempotent
    assert not isinstance(pipe.scheduler, SteeredScheduler)
