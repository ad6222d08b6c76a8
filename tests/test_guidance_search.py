"""Inference-time search with a verifier: NoiseSearch (random, zero-order, paths) and rollover budget forcing, measured
on an exact Gaussian-mixture oracle (the verifier is the log-density of the mixture's rarest component), run end to
end on stock SD / SD3 pipelines, and refusing bad inputs."""

import itertools

import numpy as np
import pytest
import torch
from conftest import COVARIANCES_2D, MEANS_2D, WEIGHTS_2D
from diffusers import DDIMScheduler, DDPMScheduler, FlowMatchEulerDiscreteScheduler
from tiny_pipelines import sd3_inputs, stable_diffusion_inputs, tiny_sd3, tiny_stable_diffusion

from diffusers_ext.guidance import jpeg_compressibility
from diffusers_ext.guidance.noise_search import NoiseSearch
from diffusers_ext.guidance.rollover_budget_forcing import RolloverBudgetForcing
from diffusers_ext.guidance.steering import SteeredScheduler
from diffusers_ext.testing import (
    GaussianMixture,
    GaussianMixtureDenoiser,
    GaussianMixtureSamplingPipeline,
    SlicedWasserstein2,
    sliced_wasserstein2_noise_floor,
)

LAW = GaussianMixture(MEANS_2D, COVARIANCES_2D, WEIGHTS_2D)
RARE = GaussianMixture(MEANS_2D[2:], COVARIANCES_2D[2:])  # the weight-0.2 component


def rare_component_log_density(x: torch.Tensor) -> torch.Tensor:
    return RARE.log_prob(x.reshape(x.shape[0], -1))


def constant_reward(x: torch.Tensor) -> torch.Tensor:
    return torch.zeros(x.shape[0])


@pytest.fixture(autouse=True)
def one_thread():
    """Every tensor here is tiny: a second intra-op thread only adds wake-up latency, which on a loaded 2-core machine
    made this file five times slower (62 s instead of 12 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def oracle_pipeline(scheduler) -> GaussianMixtureSamplingPipeline:
    pipe = GaussianMixtureSamplingPipeline(GaussianMixtureDenoiser(MEANS_2D, COVARIANCES_2D, WEIGHTS_2D,
                                                                   scheduler.config), scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def ddim():
    return oracle_pipeline(DDIMScheduler(clip_sample=False, timestep_spacing="trailing"))


def ddpm():
    return oracle_pipeline(DDPMScheduler(clip_sample=False))


def flow():
    return oracle_pipeline(FlowMatchEulerDiscreteScheduler(shift=3.0))


def search(pipe, batch: int, steps: int, seed: int, **config):
    method = NoiseSearch(reward=rare_component_log_density, reward_space="sample", seed=seed, **config)
    return method.search(pipe, batch_size=batch, num_inference_steps=steps, generator=seeded(seed))


def mean_and_error(rewards: torch.Tensor) -> tuple[float, float]:
    return float(rewards.mean()), float(rewards.std() / len(rewards) ** 0.5)


def test_random_search_is_best_of_n_and_its_reward_grows_with_the_budget():
    """With a deterministic sampler (DDIM, 50 steps) close to the law, random search with budget N must score what
    the best of N exact draws scores, E[max_i r(x_i)], which grows with N. Each budget uses fresh seeds."""
    elements, steps = 256, 50
    exact = rare_component_log_density(LAW.sample(2**16, seeded(0)))
    pipe, table = ddim(), {}
    for budget in (1, 2, 4, 8, 16):
        found = search(pipe, elements, steps, seed=budget, budget=budget)
        assert found.nfe == budget * steps and found.reward_history.shape == (budget, elements)
        assert torch.equal(found.rewards, found.reward_history.max(0).values)
        best_of_n = exact.reshape(-1, budget).max(1).values
        table[budget] = (*mean_and_error(found.rewards), float(best_of_n.mean()))
    print("\nrandom search, rare-component log-density: budget -> (mean, s.e., exact best-of-N)")
    for budget, row in table.items():
        print(f"  {budget:3d} ({budget * steps:4d} NFE): {row[0]:8.3f} ± {row[1]:.3f}   exact {row[2]:8.3f}")
    means = [row[0] for row in table.values()]
    assert all(later > earlier for earlier, later in itertools.pairwise(means)), table
    for budget, (mean, error, expected) in table.items():
        assert abs(mean - expected) < 4 * error, (budget, table[budget])


def test_zero_order_and_path_search_improve_with_the_budget():
    """Zero-order search on DDIM (lambda = 0.5, 4 neighbours per round) and search over paths on DDPM (the stochastic
    step branches the copies; N = min(2, budget) paths, scored every 5 of 50 steps)."""
    elements, steps, table = 256, 50, {}
    deterministic, stochastic = ddim(), ddpm()
    for budget in (1, 2, 4, 8, 16):
        zero_order = search(deterministic, elements, steps, seed=budget, mode="zero_order", budget=budget)
        paths = search(stochastic, elements * budget, steps, seed=budget, mode="paths", budget=budget,
                       num_paths=min(2, budget))
        assert zero_order.nfe == paths.nfe == budget * steps
        assert paths.output.samples.shape == (elements, 2) and paths.latents is None
        table[budget] = (*mean_and_error(zero_order.rewards), *mean_and_error(paths.rewards))
    print("\nbudget -> zero-order (mean, s.e.) | paths (mean, s.e.)")
    for budget, row in table.items():
        print(f"  {budget:3d}: {row[0]:8.3f} ± {row[1]:.3f} | {row[2]:8.3f} ± {row[3]:.3f}")
    zero_order = {budget: row[:2] for budget, row in table.items()}
    paths = {budget: row[2:] for budget, row in table.items()}
    assert zero_order[16][0] > zero_order[1][0] + 4 * (zero_order[16][1] + zero_order[1][1])
    assert zero_order[16][0] > zero_order[4][0]
    assert all(later[0] > earlier[0] for earlier, later in itertools.pairwise(paths.values())), paths
    assert paths[16][0] > paths[1][0] + 4 * (paths[16][1] + paths[1][1])


def test_zero_order_neighbours_keep_the_gaussian_law():
    """A verifier that improves at every call moves the pivot to each round's last neighbour, 8 rounds deep: the
    noise stays N(0, I) only because n' = sqrt(1 - lambda^2) p + lambda z (p + lambda z would reach variance
    1 + 8 lambda^2 = 3)."""
    calls = itertools.count()

    def improving(x):
        return torch.full((x.shape[0],), float(next(calls)))

    method = NoiseSearch(reward=improving, mode="zero_order", budget=1 + 4 * 8, reward_space="sample")
    found = method.search(ddim(), batch_size=4096, num_inference_steps=2, generator=seeded(0))
    assert torch.equal(found.rewards, found.reward_history[-1])
    noise = found.latents.reshape(-1, 2).double()
    assert noise.mean(0).abs().max() < 0.06 and (noise.var(0) - 1).abs().max() < 0.08, (noise.mean(0), noise.var(0))


def test_stochastic_flow_sampler_without_search_reproduces_the_law():
    """RBF with a constant verifier never accepts a candidate and keeps the first (the VP-SDE step), so it samples
    the law: at 100 steps as close to it as exact samples are (the noise floor; at 50 the stochastic step's
    discretisation error still shows, 0.05-0.10 over seeds); at 5 steps it is not, so the check can fail. The whole
    budget is charged, since no candidate ends a step's search early."""
    num_samples = 4096
    distance = SlicedWasserstein2(LAW.sample(16 * num_samples, seeded(1)), num_samples)
    floor = sliced_wasserstein2_noise_floor(LAW, distance, seed=2)
    pipe, distances = flow(), {}
    for steps in (5, 100):
        method = RolloverBudgetForcing(reward=constant_reward, budget=3 * steps, reward_space="sample")
        with method.attached(pipe):
            samples = pipe(batch_size=num_samples, num_inference_steps=steps, generator=seeded(3)).samples
        assert (method.nfe == 3 * steps).all() and (method.accepted_steps == 0).all()
        distances[steps] = distance(samples)
    print(f"\nstochastic flow sampler: sliced W2 {distances}, noise floor {floor.mean:.4f} ± {floor.std:.4f}")
    assert distances[100] < floor.mean + 3 * floor.std, (distances, floor)
    assert distances[5] > floor.mean + 6 * floor.std, (distances, floor)


def test_rollover_budget_forcing_beats_the_stochastic_sampler_and_best_of_n_at_equal_nfe():
    """Budget N * T for RBF; best-of-N (random noise search on the flow ODE) spends the same N * T. With N = 2 RBF's
    quota is the one candidate the stochastic step proposes anyway, so it cannot choose: the plain sampler's law."""
    elements, steps, pipe, table = 512, 20, flow(), {}
    for n in (1, 2, 4, 8):
        method = RolloverBudgetForcing(reward=rare_component_log_density, budget=n * steps, reward_space="sample",
                                       seed=n)  # the stochastic steps' noise: at eta = 1 x_T is forgotten at sigma = 1
        with method.attached(pipe):
            samples = pipe(batch_size=elements, num_inference_steps=steps, generator=seeded(n)).samples
        assert (method.nfe <= n * steps).all() and (method.nfe >= steps).all()
        torch.testing.assert_close(method.final_rewards, rare_component_log_density(samples).float())
        best_of_n = search(pipe, elements, steps, seed=100 + n, budget=n)
        table[n] = (*mean_and_error(method.final_rewards), float(method.nfe.float().mean()),
                    *mean_and_error(best_of_n.rewards), best_of_n.nfe)
    print("\nN -> RBF (mean, s.e., mean NFE used of N*T) | best-of-N (mean, s.e., NFE)")
    for n, row in table.items():
        print(f"  {n}: {row[0]:8.3f} ± {row[1]:.3f} ({row[2]:5.1f} of {n * steps}) | {row[3]:8.3f} ± {row[4]:.3f} "
              f"({row[5]})")
    plain = table[1]
    assert abs(table[2][0] - plain[0]) < 4 * (table[2][1] + plain[1])
    for n in (4, 8):
        rbf_mean, rbf_error, _, bon_mean, bon_error, _ = table[n]
        assert rbf_mean > plain[0] + 4 * (rbf_error + plain[1])
        assert rbf_mean > bon_mean + 4 * (rbf_error + bon_error)


def test_rollover_budget_forcing_accepts_the_first_improvement_and_rolls_unused_budget_over():
    """Verifiers that read the call count (and, for the second, the step) make the acceptance pattern known.

    Always improving: each step accepts its first candidate, the machine's own stochastic step, so the output is the
    plain stochastic sampler's, with one candidate charged per stochastic step. Improving on steps 0-4 and never after
    (T = 10, budget 40: 30 candidate evaluations, quotas 3 3 4 3 3 4 3 3 4 over the 9 stochastic steps): steps 0-4
    use 1 each and carry 16 - 5 = 11 over; steps 5-8 exhaust 11 + 14, so the whole budget is spent (29 without
    rollover)."""
    pipe, steps = flow(), 10
    calls = itertools.count()

    def improving(x):
        return torch.full((x.shape[0],), float(next(calls)))

    plain = RolloverBudgetForcing(reward=improving, budget=steps, reward_space="sample")
    with plain.attached(pipe):
        expected = pipe(batch_size=8, num_inference_steps=steps, generator=seeded(0)).samples
    method = RolloverBudgetForcing(reward=improving, budget=4 * steps, reward_space="sample")
    with method.attached(pipe):
        steered = pipe(batch_size=8, num_inference_steps=steps, generator=seeded(0)).samples
        torch.testing.assert_close(steered, expected, rtol=0, atol=0)
    assert (method.nfe == steps + steps - 1).all() and (method.accepted_steps == steps - 1).all()

    def improving_early(x):
        sign = 1.0 if method.step_index <= 5 else -1.0  # step_index is i + 1 while step i is steered
        return torch.full((x.shape[0],), sign * next(calls))

    method = RolloverBudgetForcing(reward=improving_early, budget=4 * steps, reward_space="sample")
    with method.attached(pipe):
        pipe(batch_size=8, num_inference_steps=steps)
    assert (method.accepted_steps == 5).all() and (method.nfe == 4 * steps).all(), (method.accepted_steps, method.nfe)


def sd_scheduler():
    return DDIMScheduler(clip_sample=False, set_alpha_to_one=False, steps_offset=1)


def as_images(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(array).permute(0, 3, 1, 2)


def test_noise_search_on_stable_diffusion_leaves_the_pipeline_as_it_was(tmp_path):
    pipe = tiny_stable_diffusion(sd_scheduler())
    config, scheduler = dict(pipe.config), pipe.scheduler
    unsteered = pipe(**stable_diffusion_inputs()).images

    one = NoiseSearch(reward=jpeg_compressibility, budget=1).search(pipe, **stable_diffusion_inputs())
    np.testing.assert_array_equal(one.output.images, unsteered)  # the first run is the pipeline's own
    method = NoiseSearch(reward=jpeg_compressibility, mode="zero_order", budget=5, num_neighbors=2)
    found = method.search(pipe, **stable_diffusion_inputs(num_images_per_prompt=2))
    assert found.output.images.shape == (2, 8, 8, 3) and found.nfe == 5 * 4
    assert torch.equal(found.rewards, found.reward_history.max(0).values)
    np.testing.assert_allclose(found.rewards, jpeg_compressibility(as_images(found.output.images)), atol=0.05)
    # The best latents regenerate the best images through the stock pipeline (DDIM is deterministic).
    regenerated = pipe(**stable_diffusion_inputs(num_images_per_prompt=2, latents=found.latents)).images
    np.testing.assert_allclose(regenerated, found.output.images, atol=1e-6)
    again = method.search(pipe, **stable_diffusion_inputs(num_images_per_prompt=2))
    np.testing.assert_array_equal(again.output.images, found.output.images)

    assert pipe.scheduler is scheduler and dict(pipe.config) == config
    np.testing.assert_array_equal(pipe(**stable_diffusion_inputs()).images, unsteered)

    method.save_pretrained(tmp_path)
    loaded = NoiseSearch.from_pretrained(tmp_path, reward=jpeg_compressibility)
    public = lambda config: {k: v for k, v in config.items() if not k.startswith("_")}  # noqa: E731
    assert public(loaded.config) == public(method.config) and loaded.config.mode == "zero_order"
    reloaded = loaded.search(pipe, **stable_diffusion_inputs(num_images_per_prompt=2))
    np.testing.assert_array_equal(reloaded.output.images, found.output.images)


def test_search_and_rollover_budget_forcing_on_sd3(tmp_path):
    pipe = tiny_sd3(FlowMatchEulerDiscreteScheduler(shift=3.0))
    config, scheduler = dict(pipe.config), pipe.scheduler
    unsteered = pipe(**sd3_inputs(batch_size=2)).images

    found = NoiseSearch(reward=jpeg_compressibility, budget=3).search(pipe, **sd3_inputs(batch_size=2))
    assert found.output.images.shape == (2, 8, 8, 3) and found.latents.shape == (2, 4, 8, 8)
    np.testing.assert_allclose(pipe(**sd3_inputs(batch_size=2, latents=found.latents)).images, found.output.images,
                               atol=1e-6)
    paths = NoiseSearch(reward=jpeg_compressibility, mode="paths", budget=4, branch_every=1)
    with paths.attached(pipe):
        particles = pipe(**sd3_inputs(batch_size=8)).images
        assert isinstance(pipe.scheduler, SteeredScheduler)
    assert particles.shape == (8, 8, 8, 3) and paths.nfe == 4 * 4
    assert (paths.final_rewards.reshape(2, 4).diff(dim=1) <= 0).all()  # each group sorted, best first
    best = paths.search(pipe, **sd3_inputs(batch_size=8))
    np.testing.assert_array_equal(best.output.images, particles[::4])

    method = RolloverBudgetForcing(reward=jpeg_compressibility, budget=12)
    with method.attached(pipe):
        first = pipe(**sd3_inputs(batch_size=2)).images
        nfe, accepted = method.nfe.clone(), method.accepted_steps.clone()
        second = pipe(**sd3_inputs(batch_size=2)).images
    np.testing.assert_array_equal(first, second)
    assert np.isfinite(first).all() and not np.allclose(first, unsteered)
    assert ((nfe > 4) & (nfe <= 12)).all() and (accepted <= 3).all()

    assert pipe.scheduler is scheduler and dict(pipe.config) == config
    np.testing.assert_array_equal(pipe(**sd3_inputs(batch_size=2)).images, unsteered)

    method.save_pretrained(tmp_path)
    loaded = RolloverBudgetForcing.from_pretrained(tmp_path, reward=jpeg_compressibility)
    assert loaded.config.budget == 12 and loaded.config.flow_eta == method.config.flow_eta
    with loaded.attached(pipe):
        np.testing.assert_array_equal(pipe(**sd3_inputs(batch_size=2)).images, first)


def test_bad_rewards_give_clear_errors():
    bad_rewards = {
        "one value per sample": lambda x: torch.zeros(x.shape[0] + 1),
        "non-finite": lambda x: torch.full((x.shape[0],), float("nan")),
    }
    for message, reward in bad_rewards.items():
        for config, make_pipe in ((dict(mode="random"), ddim), (dict(mode="paths", budget=2), ddpm)):
            with pytest.raises(ValueError, match=message):
                NoiseSearch(reward=reward, reward_space="sample", branch_every=1, **config).search(
                    pipe := make_pipe(), batch_size=4, num_inference_steps=3)
            assert not isinstance(pipe.scheduler, SteeredScheduler)
        with RolloverBudgetForcing(reward=reward, budget=9).attached(pipe := flow()), pytest.raises(ValueError,
                                                                                                   match=message):
            pipe(batch_size=4, num_inference_steps=3)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: NoiseSearch(reward=constant_reward, budget=0), "budget must be a positive integer"),
        (lambda: NoiseSearch(reward=constant_reward, budget=-2), "budget must be a positive integer"),
        (lambda: NoiseSearch(reward=constant_reward, mode="beam"), "mode must be one of"),
        (lambda: NoiseSearch(reward=constant_reward, neighborhood=0.0), "neighborhood"),
        (lambda: NoiseSearch(reward=constant_reward, mode="paths", budget=6, num_paths=4), "must divide"),
        (lambda: NoiseSearch(budget=4), "needs a reward"),
        (lambda: RolloverBudgetForcing(reward=constant_reward, budget=0), "budget must be a positive integer"),
        (lambda: RolloverBudgetForcing(reward=constant_reward, flow_eta=0.0), "flow_eta must be positive"),
        (lambda: RolloverBudgetForcing(reward=constant_reward, reward_space="pixels"), "reward_space"),
    ],
)
def test_bad_settings_give_clear_errors(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_bad_uses_give_clear_errors():
    with pytest.raises(ValueError, match=r"supports \('flow',\) pipelines"):
        RolloverBudgetForcing(reward=constant_reward).attach(pipe := ddim())
    assert not isinstance(pipe.scheduler, SteeredScheduler)
    with RolloverBudgetForcing(reward=constant_reward, budget=5).attached(pipe := flow()), pytest.raises(
            ValueError, match="at least 6"):
        pipe(batch_size=2, num_inference_steps=6)
    with pytest.raises(ValueError, match="do not pass `latents`"):
        NoiseSearch(reward=constant_reward).search(ddim(), batch_size=2, latents=torch.zeros(2, 2, 1, 1))
    with NoiseSearch(reward=constant_reward, mode="paths", budget=4).attached(pipe := ddpm()), pytest.raises(
            ValueError, match="num_images_per_prompt=4"):
        pipe(batch_size=6, num_inference_steps=3)
