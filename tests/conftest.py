import pytest
import torch
from diffusers import DDIMScheduler

from diffusers_ext.testing import GaussianMixture, GaussianMixtureDenoiser, GaussianMixtureSamplingPipeline

# `make test` runs two workers on two cores: one thread each avoids oversubscription, which slows torch's CPU
# kernels by an order of magnitude.
torch.set_num_threads(1)

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
