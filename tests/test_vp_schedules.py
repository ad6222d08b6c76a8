"""The VP schedulers' training schedule and inference grids: what diffusers' own scheduler tests expect of them."""

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler

from diffusers_ext.schedulers import ERSDESolverScheduler, TimeShiftScheduler
from diffusers_ext.testing.sampler_accuracy import SD_SCHEDULER_CONFIG

VP_SCHEDULERS = [ERSDESolverScheduler, TimeShiftScheduler]


@pytest.mark.parametrize("scheduler_class", VP_SCHEDULERS)
def test_trained_betas_survive_save_and_load(scheduler_class, tmp_path):
    """diffusers' ``SchedulerCommonTest.test_trained_betas``: ``betas`` exist and round-trip through the config."""
    scheduler = scheduler_class(trained_betas=np.array([0.1, 0.3]))
    scheduler.save_pretrained(tmp_path)
    loaded = scheduler_class.from_pretrained(tmp_path)
    assert scheduler.betas.tolist() == loaded.betas.tolist() == pytest.approx([0.1, 0.3])


@pytest.mark.parametrize("scheduler_class", VP_SCHEDULERS)
@pytest.mark.parametrize("config", [SD_SCHEDULER_CONFIG, {"rescale_betas_zero_snr": True}, {}])
def test_betas_and_alphas_are_ddims(scheduler_class, config):
    ours, stock = scheduler_class.from_config(config), DDIMScheduler.from_config(config)
    assert torch.equal(ours.betas, stock.betas)
    assert torch.equal(ours.alphas, stock.alphas)
    assert ours.betas.dtype == torch.float32
