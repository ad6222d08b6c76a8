"""The video oracle itself: ``VideoGaussianMixture``'s posterior under per-frame noise, its conditional law and its frame
statistics, checked against dense (F D) x (F D) Gaussian algebra, Tweedie's formula and samples; and
``VideoGaussianMixtureDenoiser`` end to end under stock DDIM."""

import math

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, FlowMatchEulerDiscreteScheduler

from diffusers_ext.testing import (
    GaussianMixtureSamplingPipeline,
    SlicedWasserstein2,
    VideoGaussianMixture,
    VideoGaussianMixtureDenoiser,
    autoregressive_video_mixture,
    mixture_weight_error,
    sliced_wasserstein2_noise_floor,
)

# Two AR(1) components on frames of shape (C, H, W) = (2, 1, 2); C != F so that a transposed layout cannot pass.
FRAME_MEANS = [[1.0, -0.5, 0.3, 0.0], [-1.0, 0.5, -0.2, 0.4]]
SCALES = [0.5, 0.3]
CORRELATIONS = [0.8, -0.5]
WEIGHTS = [0.6, 0.4]
FRAME_SHAPE = (2, 1, 2)
NUM_FRAMES = 3


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def ar1_law(num_frames: int = NUM_FRAMES) -> VideoGaussianMixture:
    return autoregressive_video_mixture(FRAME_MEANS, SCALES, CORRELATIONS, num_frames, WEIGHTS, FRAME_SHAPE)


def ar1_parameters(num_frames: int = NUM_FRAMES) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean trajectories (K, F, D) and temporal covariances (K, F, F) written out from the AR(1) definition."""
    means = torch.tensor(FRAME_MEANS, dtype=torch.float64)[:, None].repeat(1, num_frames, 1)
    covariances = torch.empty(2, num_frames, num_frames, dtype=torch.float64)
    for k in range(2):
        for i in range(num_frames):
            for j in range(num_frames):
                covariances[k, i, j] = SCALES[k] ** 2 * CORRELATIONS[k] ** abs(i - j)
    return means, covariances


def general_parameters(num_frames: int = NUM_FRAMES) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-stationary mean trajectories and random SPD temporal covariances."""
    generator = seeded(11)
    means = torch.randn(2, num_frames, 4, generator=generator, dtype=torch.float64)
    factors = torch.randn(2, num_frames, num_frames, generator=generator, dtype=torch.float64)
    return means, 0.3 * factors @ factors.transpose(1, 2) / num_frames + 0.05 * torch.eye(num_frames)


def dense_joint(means: torch.Tensor, covariances: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The mixture in R^(C F H W), clips flattened in (C, F, H, W) order: per component the mean vector, the full
    covariance, and each coordinate's frame index."""
    channels, height, width = FRAME_SHAPE
    num_frames = means.shape[1]
    frame = torch.arange(num_frames)[None, :, None, None].expand(channels, num_frames, height, width).reshape(-1)
    pixel = torch.arange(channels * height * width).reshape(channels, 1, height, width)
    pixel = pixel.expand(channels, num_frames, height, width).reshape(-1)
    dense_means = means[:, frame, pixel]
    same_pixel = (pixel[:, None] == pixel[None, :]).to(torch.float64)
    dense_covariances = covariances[:, frame[:, None], frame[None, :]] * same_pixel
    return dense_means, dense_covariances, frame


def dense_posterior_mean_and_log_prob(means, covariances, weights, x, alpha, sigma):
    """E[x0 | x] and log p(x) by plain Gaussian conditioning on the full (F D)-dimensional vectors, float64."""
    dense_means, dense_covariances, frame = dense_joint(means, covariances)
    posterior_means, log_probs = [], []
    for row, a, s in zip(x.reshape(x.shape[0], -1), alpha, sigma, strict=True):
        a, s = a[frame], s[frame]
        component_means, log_joint = [], []
        for mean, covariance, weight in zip(dense_means, dense_covariances, weights, strict=True):
            observed_covariance = a[:, None] * covariance * a[None, :] + torch.diag(s**2)
            gain = covariance * a[None, :] @ torch.linalg.inv(observed_covariance)
            component_means.append(mean + gain @ (row - a * mean))
            normal = torch.distributions.MultivariateNormal(a * mean, covariance_matrix=observed_covariance)
            log_joint.append(math.log(weight) + normal.log_prob(row))
        log_joint = torch.stack(log_joint)
        posterior_means.append(torch.softmax(log_joint, 0) @ torch.stack(component_means))
        log_probs.append(torch.logsumexp(log_joint, 0))
    return torch.stack(posterior_means).reshape(x.shape), torch.stack(log_probs)


# Per clip and frame: mixed levels; a clean first frame and a pure-noise last one; one shared level; a clean middle one.
ALPHA = torch.tensor([[0.9, 0.5, 0.2], [1.0, 0.6, 0.0], [0.7, 0.7, 0.7], [0.3, 1.0, 0.8]], dtype=torch.float64)
SIGMA = torch.tensor([[0.3, 0.8, 1.0], [0.0, 0.7, 1.0], [0.5, 0.5, 0.5], [0.9, 0.0, 0.1]], dtype=torch.float64)


def noisy_clips(law: VideoGaussianMixture, seed: int) -> torch.Tensor:
    """Noisy clips near the law's mean, between the components, so that both responsibilities matter."""
    generator = seeded(seed)
    clean = law.frame_mean() + 0.3 * torch.randn(ALPHA.shape[0], *law.video_shape, generator=generator, dtype=torch.float64)
    noise = torch.randn(clean.shape, generator=generator, dtype=torch.float64)
    return ALPHA[:, None, :, None, None] * clean + SIGMA[:, None, :, None, None] * noise


@pytest.mark.parametrize("kind", ["ar1", "general"])
def test_posterior_mean_and_log_prob_match_dense_gaussian_conditioning(kind):
    means, covariances = ar1_parameters() if kind == "ar1" else general_parameters()
    law = ar1_law() if kind == "ar1" else VideoGaussianMixture(means, covariances, WEIGHTS, FRAME_SHAPE)
    x = noisy_clips(law, seed=1)
    expected_mean, expected_log_prob = dense_posterior_mean_and_log_prob(means, covariances, WEIGHTS, x, ALPHA, SIGMA)
    torch.testing.assert_close(law.posterior_mean(x, ALPHA, SIGMA), expected_mean, rtol=0, atol=1e-10)
    torch.testing.assert_close(law.log_prob(x, ALPHA, SIGMA), expected_log_prob, rtol=0, atol=1e-10)
    # Clean frames (sigma = 0, alpha = 1) come back exactly.
    denoised = law.posterior_mean(x, ALPHA, SIGMA)
    assert torch.equal(denoised[1, :, 0], x[1, :, 0]) and torch.equal(denoised[3, :, 1], x[3, :, 1])


def test_scalar_and_per_clip_levels_equal_the_same_levels_per_frame():
    law = ar1_law()
    x = noisy_clips(law, seed=2)
    per_clip = torch.tensor([0.9, 0.6, 0.3, 0.95], dtype=torch.float64)
    noise = (1 - per_clip**2).sqrt()
    expanded = law.posterior_mean(x, per_clip[:, None].expand(4, 3), noise[:, None].expand(4, 3))
    assert torch.equal(law.posterior_mean(x, per_clip, noise), expanded)
    assert torch.equal(law.posterior_mean(x, 0.8, 0.6), law.posterior_mean(x, torch.full((4, 3), 0.8), 0.6))


def test_posterior_mean_is_tweedies_formula_on_the_noisy_marginal():
    """E[x0[f] | x] = (x[f] + sigma_f^2 d/dx[f] log p(x)) / alpha_f, the gradient by autograd of the exact marginal;
    checked on every frame with alpha_f > 0 (a pure-noise frame has no x0 to recover from it)."""
    law = VideoGaussianMixture(*general_parameters(), WEIGHTS, FRAME_SHAPE)
    x = noisy_clips(law, seed=3).requires_grad_(True)
    (score,) = torch.autograd.grad(law.log_prob(x, ALPHA, SIGMA).sum(), x)
    alpha, sigma = ALPHA[:, None, :, None, None], SIGMA[:, None, :, None, None]
    has_signal = (alpha > 0).expand_as(x)
    tweedie = (x.detach() + sigma**2 * score) / alpha.clamp(min=1e-300)
    exact = law.posterior_mean(x.detach(), ALPHA, SIGMA)
    torch.testing.assert_close(exact[has_signal], tweedie[has_signal], rtol=1e-9, atol=1e-10)


def test_frame_statistics_are_the_ar1_closed_form_and_stationary():
    law = ar1_law(num_frames=6)
    m, s, rho, w = (torch.tensor(v, dtype=torch.float64) for v in (FRAME_MEANS, SCALES, CORRELATIONS, WEIGHTS))
    mean = w @ m
    for lag in range(4):
        # Cov(x_f, x_{f+lag}) = sum_k w_k (s_k^2 rho_k^lag + m_k^2) - mean^2, per pixel, the same for every f.
        expected = (w[:, None] * (s[:, None] ** 2 * rho[:, None] ** lag + m**2)).sum(0) - mean**2
        expected = expected.reshape(FRAME_SHAPE)[:, None].expand(2, 6 - lag, 1, 2)
        torch.testing.assert_close(law.frame_covariance(lag), expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(law.frame_mean(), mean.reshape(FRAME_SHAPE)[:, None].expand(2, 6, 1, 2))
    correlation = law.frame_covariance(1) / law.frame_covariance(0)[:, :5]
    torch.testing.assert_close(law.frame_correlation(1), correlation, rtol=1e-12, atol=0)


def lagged_covariance_z_scores(videos, mean, covariance, first, second):
    """z-scores of the sample mean of (x[first] - mean[first]) (x[second] - mean[second]) (frames along dim 2) against
    ``covariance``; the products are independent across clips, so their standard error is std / sqrt(n)."""
    products = (videos[:, :, first] - mean[:, first]) * (videos[:, :, second] - mean[:, second])
    return (products.mean(0) - covariance) / (products.std(0) / math.sqrt(videos.shape[0]))


def mean_z_scores(videos, mean):
    return (videos.mean(0) - mean) / (videos.std(0) / math.sqrt(videos.shape[0]))


def test_samples_match_the_exact_frame_statistics():
    law = ar1_law(num_frames=5)
    videos, components = law.sample(20_000, seeded(4), return_components=True)
    assert videos.shape == (20_000, 2, 5, 1, 2)
    mean = law.frame_mean()
    assert mean_z_scores(videos, mean).abs().max() < 4.5
    for lag in range(3):
        frames = torch.arange(5 - lag)
        z = lagged_covariance_z_scores(videos, mean, law.frame_covariance(lag), frames, frames + lag)
        assert z.abs().max() < 4.5, (lag, z)
    fraction = (components == 0).double().mean()
    assert abs(fraction - WEIGHTS[0]) < 4.5 * math.sqrt(WEIGHTS[0] * WEIGHTS[1] / 20_000)


# Given frames between the components: the conditional weights are about 0.52 / 0.48, so both matter.
CLEAN_FRAMES = {0: torch.tensor([[[-0.4, 0.0]], [[0.05, 0.2]]]), 3: torch.tensor([[[-0.3, 0.1]], [[0.0, 0.2]]])}


def test_conditional_law_matches_dense_gaussian_conditioning():
    """Per component: mean M_u + S_uO S_OO^{-1} (x_O - M_O), covariance S_uu - S_uO S_OO^{-1} S_Ou on the full
    (F D)-dimensional vectors; weights proportional to w_k N(x_O; M_O, S_OO)."""
    num_frames = 5
    means, covariances = ar1_parameters(num_frames)
    conditional = ar1_law(num_frames).conditional(CLEAN_FRAMES)
    dense_means, dense_covariances, frame = dense_joint(means, covariances)
    observed = (frame == 0) | (frame == 3)
    given = torch.zeros(2, num_frames, 1, 2, dtype=torch.float64)
    for index, value in CLEAN_FRAMES.items():
        given[:, index] = value
    given = given.reshape(-1)[observed]
    free_means, free_covariances, _ = dense_joint(conditional.means, conditional.temporal_covariances)
    log_weights = []
    for k in range(2):
        mean, covariance = dense_means[k], dense_covariances[k]
        cross = covariance[~observed][:, observed]
        gain = cross @ torch.linalg.inv(covariance[observed][:, observed])
        torch.testing.assert_close(free_means[k], mean[~observed] + gain @ (given - mean[observed]), rtol=0, atol=1e-12)
        expected_covariance = covariance[~observed][:, ~observed] - gain @ cross.T
        torch.testing.assert_close(free_covariances[k], expected_covariance, rtol=0, atol=1e-12)
        normal = torch.distributions.MultivariateNormal(mean[observed], covariance[observed][:, observed])
        log_weights.append(math.log(WEIGHTS[k]) + normal.log_prob(given))
    torch.testing.assert_close(conditional.weights, torch.softmax(torch.stack(log_weights), 0), rtol=0, atol=1e-12)
    assert conditional.num_frames == 3 and conditional.frame_shape == FRAME_SHAPE


def test_conditional_samples_keep_the_clean_frames_and_match_the_conditional_statistics():
    law = ar1_law(num_frames=5)
    videos = law.sample_conditional(CLEAN_FRAMES, 20_000, seeded(5))
    assert videos.shape == (20_000, 2, 5, 1, 2)
    for index, value in CLEAN_FRAMES.items():
        assert torch.equal(videos[:, :, index], value.to(torch.float64).expand(20_000, 2, 1, 2))
    conditional = law.conditional(CLEAN_FRAMES)  # frames 1, 2, 4 of the clip
    free = [1, 2, 4]
    mean = torch.zeros(2, 5, 1, 2, dtype=torch.float64)
    mean[:, free] = conditional.frame_mean()
    assert mean_z_scores(videos[:, :, free], mean[:, free]).abs().max() < 4.5
    for lag in (0, 1):
        first, second = torch.tensor(free[: 3 - lag]), torch.tensor(free[lag:])
        z = lagged_covariance_z_scores(videos, mean, conditional.frame_covariance(lag), first, second)
        assert z.abs().max() < 4.5, (lag, z)


def test_denoiser_given_clean_frames_and_pure_noise_elsewhere_is_the_conditional_mean():
    law = ar1_law(num_frames=5)
    observed = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0], dtype=torch.float64)
    x = torch.randn(1, 2, 5, 1, 2, generator=seeded(6), dtype=torch.float64)
    for index, value in CLEAN_FRAMES.items():
        x[0, :, index] = value
    denoised = law.posterior_mean(x, observed[None], 1 - observed[None])
    assert torch.equal(denoised[:, :, [0, 3]], x[:, :, [0, 3]])
    torch.testing.assert_close(denoised[0][:, [1, 2, 4]], law.conditional(CLEAN_FRAMES).frame_mean(), atol=1e-12, rtol=0)


def make_denoiser(scheduler_config, **kwargs) -> VideoGaussianMixtureDenoiser:
    return VideoGaussianMixtureDenoiser(
        FRAME_MEANS, SCALES, CORRELATIONS, 4, WEIGHTS, FRAME_SHAPE, scheduler_config=scheduler_config, **kwargs
    )


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
def test_denoiser_reads_per_frame_timesteps_on_the_schedulers_scale(prediction_type):
    scheduler = DDPMScheduler()
    model = make_denoiser(scheduler.config, prediction_type=prediction_type)
    timestep = torch.tensor([[0, 10, 500, 999], [250, 250, 250, 250]])
    x = torch.randn(2, 2, 4, 1, 2, generator=seeded(7), dtype=torch.float64)
    abar = scheduler.alphas_cumprod.to(torch.float64)[timestep]
    alpha, sigma = abar.sqrt(), (1 - abar).sqrt()
    x0 = model.law.posterior_mean(x, alpha, sigma)
    alpha, sigma = alpha[:, None, :, None, None], sigma[:, None, :, None, None]
    eps = (x - alpha * x0) / sigma
    expected = {"epsilon": eps, "sample": x0, "v_prediction": alpha * eps - sigma * x0}[prediction_type]
    torch.testing.assert_close(model(x, timestep).sample, expected, rtol=1e-9, atol=1e-9)
    per_clip = model(x, torch.tensor([250, 250]), return_dict=False)[0]
    assert torch.equal(per_clip[1], model(x, timestep).sample[1])
    assert torch.equal(model(x, 250).sample, per_clip)


def test_denoiser_returns_flow_frames_at_time_zero_unchanged():
    """On a flow schedule t = 0 is sigma = 0: an image-to-video model gets its given frame back, bit for bit in
    float32, with zero predicted noise there."""
    sample_model = make_denoiser(FlowMatchEulerDiscreteScheduler().config, prediction_type="sample")
    flow_model = make_denoiser(FlowMatchEulerDiscreteScheduler().config)
    assert flow_model.config.prediction_type == "flow_prediction"
    x = torch.randn(3, 2, 4, 1, 2, generator=seeded(8))
    timestep = torch.tensor([[0.0, 400.0, 700.0, 1000.0]]).expand(3, 4)
    denoised = sample_model(x, timestep).sample
    assert denoised.dtype == torch.float32 and torch.equal(denoised[:, :, 0], x[:, :, 0])
    torch.testing.assert_close(flow_model(x, timestep).sample[:, :, 0], -x[:, :, 0])  # u = eps - x0 = -x0


def test_denoiser_round_trips_through_save_pretrained(tmp_path):
    model = make_denoiser(FlowMatchEulerDiscreteScheduler().config)
    model.save_pretrained(tmp_path)
    loaded = VideoGaussianMixtureDenoiser.from_pretrained(tmp_path)
    x = torch.randn(2, 2, 4, 1, 2, generator=seeded(9))
    assert loaded.sample_shape == (2, 4, 1, 2)
    assert torch.equal(loaded(x, torch.tensor([[0, 300, 600, 900]] * 2)).sample,
                       model(x, torch.tensor([[0, 300, 600, 900]] * 2)).sample)


BAD_INPUTS = [
    (lambda: autoregressive_video_mixture(FRAME_MEANS, SCALES, [1.0, 0.2], 3), "correlations"),
    (lambda: autoregressive_video_mixture(FRAME_MEANS, SCALES, [0.3, -1.2], 3), "correlations"),
    (lambda: autoregressive_video_mixture(FRAME_MEANS, [-0.1, 0.3], CORRELATIONS, 3), "scales"),
    (lambda: autoregressive_video_mixture(FRAME_MEANS, [0.5], CORRELATIONS, 3), "scales"),
    (lambda: autoregressive_video_mixture([1.0, 2.0], SCALES, CORRELATIONS, 3), "frame_means"),
    (lambda: autoregressive_video_mixture(FRAME_MEANS, SCALES, CORRELATIONS, 0), "num_frames"),
    (lambda: autoregressive_video_mixture(FRAME_MEANS, SCALES, CORRELATIONS, 3, frame_shape=(3, 1, 1)), "frame_shape"),
    (lambda: VideoGaussianMixture(torch.zeros(1, 2, 3), -torch.eye(2)[None]), "positive definite"),
    (lambda: VideoGaussianMixture(torch.zeros(1, 2, 3), torch.eye(3)[None]), "temporal_covariances"),
    (lambda: ar1_law().posterior_mean(torch.zeros(4, 3, 2, 1, 2), 0.5, 0.5), "x must be clips"),
    (lambda: ar1_law().posterior_mean(torch.zeros(4, 2, 3, 1, 2), torch.ones(4, 4), 0.5), "alpha must be"),
    (lambda: ar1_law().posterior_mean(torch.zeros(4, 2, 3, 1, 2), 0.5, torch.ones(3)), "sigma must be"),
    (lambda: ar1_law().posterior_mean(torch.zeros(4, 2, 3, 1, 2), 0.5, -0.1), "sigma must be finite and non-neg"),
    (lambda: ar1_law().posterior_mean(torch.zeros(4, 2, 3, 1, 2), 0.0, 0.0), "alpha > 0 or sigma > 0"),
    (lambda: ar1_law().conditional({3: torch.zeros(2, 1, 2)}), "clean_frames keys"),
    (lambda: ar1_law().conditional({}), "clean_frames must be a non-empty"),
    (lambda: ar1_law().conditional({i: torch.zeros(2, 1, 2) for i in range(3)}), "at least one frame"),
    (lambda: ar1_law().sample_conditional({0: torch.zeros(1, 1, 2)}, 4), r"clean_frames\[0\]"),
    (lambda: ar1_law().frame_covariance(3), "lag"),
    (lambda: make_denoiser(None)(torch.zeros(2, 4, 2, 1, 2), 10), "sample must have shape"),
    (lambda: make_denoiser(None)(torch.zeros(2, 2, 4, 1, 2), torch.zeros(2, 3)), "timestep must be"),
    (lambda: make_denoiser(None, prediction_type="flow_prediction"), "flow_prediction"),
]


@pytest.mark.parametrize(("make", "message"), BAD_INPUTS, ids=[message for _, message in BAD_INPUTS])
def test_bad_inputs_raise_value_errors_naming_the_argument(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_stock_ddim_with_the_exact_denoiser_samples_the_law():
    """All frames share DDIM's scalar timestep. With 50 and 250 steps the clips are within the noise floor of sliced W2
    to fresh exact samples, and at 250 steps the per-frame means and the lag-0/1/2 covariances are within sampling
    error of the closed form; 5 (W2) and 10 (covariances) steps are far off, so both checks can fail."""
    scheduler = DDIMScheduler(clip_sample=False, timestep_spacing="trailing")
    model = make_denoiser(scheduler.config)
    law = model.law
    pipe = GaussianMixtureSamplingPipeline(unet=model, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    num_samples = 4000
    noise = torch.randn(num_samples, *model.sample_shape, generator=seeded(10), dtype=torch.float64)
    distance = SlicedWasserstein2(law.sample(16 * num_samples, seeded(11)), num_samples)
    floor = sliced_wasserstein2_noise_floor(law, distance, repeats=16, seed=12)

    def clips(steps):
        samples = pipe(batch_size=num_samples, num_inference_steps=steps, latents=noise.clone()).samples
        return samples.reshape(num_samples, *model.sample_shape)

    def worst_covariance_z(videos):
        frames = torch.arange(4)
        return max(
            lagged_covariance_z_scores(videos, law.frame_mean(), law.frame_covariance(lag), frames[: 4 - lag],
                                       frames[lag:]).abs().max()
            for lag in range(3)
        )

    fine = clips(250)
    assert distance(fine) < floor.mean + 3 * floor.std, (distance(fine), floor)
    assert mean_z_scores(fine, law.frame_mean()).abs().max() < 4.5
    assert worst_covariance_z(fine) < 4.5
    weight_error = mixture_weight_error(fine.reshape(num_samples, -1), law)  # rows in (C, F, H, W) order
    assert weight_error < 4.5 * math.sqrt(WEIGHTS[0] * WEIGHTS[1] / num_samples), weight_error
    moderate, coarse = clips(50), clips(5)
    assert distance(moderate) < floor.mean + 3 * floor.std, (distance(moderate), floor)
    assert distance(coarse) > floor.mean + 6 * floor.std, (distance(coarse), floor)
    assert worst_covariance_z(clips(10)) > 6
