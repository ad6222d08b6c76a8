import pytest
import torch
from conftest import make_oracle
from diffusers import DDIMScheduler, HeunDiscreteScheduler
from diffusers.utils import logging

from diffusers_ext.testing import GaussianMixtureSamplingPipeline
from diffusers_ext.testing.sampler_accuracy import (
    measure_sampler_accuracy,
    plot_accuracy,
    plot_samples_2d,
    steps_for_budget,
)


def test_nfe_is_counted_not_assumed():
    heun = HeunDiscreteScheduler()
    pipe = GaussianMixtureSamplingPipeline(unet=make_oracle(heun.config), scheduler=heun)
    pipe.set_progress_bar_config(disable=True)
    assert steps_for_budget(pipe, 9) == (5, 9)  # Heun: 2 * steps - 1 calls
    ddim = DDIMScheduler()
    pipe = GaussianMixtureSamplingPipeline(unet=make_oracle(ddim.config), scheduler=ddim)
    pipe.set_progress_bar_config(disable=True)
    assert steps_for_budget(pipe, 7) == (7, 7)


def test_report_error_falls_with_nfe_and_plots(tmp_path):
    verbosity = logging.get_verbosity()
    report = measure_sampler_accuracy(
        schedulers={"DDIM": DDIMScheduler, "Heun": HeunDiscreteScheduler},
        dims=(2,), nfes=(4, 40), num_samples=256, progress=False,
    )
    assert logging.get_verbosity() == verbosity
    for name in ("DDIM", "Heun"):
        coarse, fine = (r for r in report.rows if r.scheduler == name)
        assert fine.nfe <= 40 and coarse.nfe <= 4
        assert fine.ode_error < coarse.ode_error / 3, (coarse, fine)
    assert report.floors[2, "vp"] > 0
    assert "DDIM" in report.table()
    plot_accuracy(report, tmp_path / "accuracy.png")
    plot_samples_2d(report, tmp_path / "samples.png")
    report.write_csv(tmp_path / "rows.csv")
    assert (tmp_path / "accuracy.png").stat().st_size > 10_000
    assert (tmp_path / "rows.csv").read_text().count("\n") == 5


def test_sampling_pipeline_bad_inputs(ddim_pipeline):
    with pytest.raises(ValueError, match="batch_size"):
        ddim_pipeline(batch_size=0)
    with pytest.raises(ValueError, match="latents must have shape"):
        ddim_pipeline(batch_size=2, latents=torch.zeros(3, 2, 1, 1))
    with pytest.raises(ValueError, match="output_type"):
        ddim_pipeline(batch_size=2, output_type="pil")


def test_sampling_pipeline_callback_can_replace_latents(ddim_pipeline):
    seen = []

    def callback(pipe, i, t, tensors):
        seen.append(int(t))
        return {"latents": torch.zeros_like(tensors["latents"])} if i == 2 else {}

    out = ddim_pipeline(batch_size=2, num_inference_steps=3, callback_on_step_end=callback).samples
    assert len(seen) == 3
    assert torch.equal(out, torch.zeros_like(out))
