import os

import pytest
import torch
from diffusers import DDIMScheduler

from diffusers_ext.testing import GaussianMixture, GaussianMixtureDenoiser, GaussianMixtureSamplingPipeline


def integer_from_environment(name: str, default: int, minimum: int) -> int:
    value = os.environ.get(name, str(default))
    if not value.isdigit() or int(value) < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


# `make test` runs two workers on two cores: one thread each avoids oversubscription, which slows torch's CPU
# kernels by an order of magnitude. `make test-numerics` reruns the effect tests with another thread count
# (DIFFUSERS_EXT_TEST_THREADS), with torch's deterministic algorithms (DIFFUSERS_EXT_DETERMINISTIC=1) and with another
# training seed (DIFFUSERS_EXT_TEST_SEED): an effect that holds only under one rounding, or one seed, fails there.
torch.set_num_threads(integer_from_environment("DIFFUSERS_EXT_TEST_THREADS", 1, minimum=1))
torch.use_deterministic_algorithms(bool(integer_from_environment("DIFFUSERS_EXT_DETERMINISTIC", 0, minimum=0)))


@pytest.fixture(scope="session")
def training_seed() -> int:
    """The seed of the effect tests' training runs (``TrainingConfig.seed``): 0 unless DIFFUSERS_EXT_TEST_SEED says
    otherwise. Their bounds hold over the seeds they were measured on, with margin, so they must hold for others."""
    return integer_from_environment("DIFFUSERS_EXT_TEST_SEED", 0, minimum=0)


# A 2-D mixture with full, correlated covariances and unequal weights.
MEANS_2D = [[-1.5, 0.5], [1.0, 1.0], [0.5, -1.5]]
COVARIANCES_2D = [[[0.20, 0.08], [0.08, 0.10]], [[0.05, -0.02], [-0.02, 0.15]], [[0.12, 0.0], [0.0, 0.04]]]
WEIGHTS_2D = [0.5, 0.3, 0.2]


@pytest.fixture
def law_2d() -> GaussianMixture:
    return GaussianMixture(MEANS_2D, COVARIANCES_2D, WEIGHTS_2D)


def make_oracle(scheduler_config=None, **kwargs) -> GaussianMixtureDenoiser:
    return GaussianMixtureDenoiser(MEANS_2D, COVARIANCES_2D, WEIGHTS_2D, scheduler_config=scheduler_config, **kwargs)


@pytest.fixture
def ddim_pipeline() -> GaussianMixtureSamplingPipeline:
    scheduler = DDIMScheduler(clip_sample=False, timestep_spacing="trailing")
    pipe = GaussianMixtureSamplingPipeline(unet=make_oracle(scheduler.config), scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)
