import pytest
import torch
from conftest import make_oracle
from diffusers import DDIMScheduler, DEISMultistepScheduler, HeunDiscreteScheduler
from diffusers.utils import logging

from diffusers_ext.schedulers import ERSDESolverScheduler
from diffusers_ext.testing import GaussianMixtureSamplingPipeline
from diffusers_ext.testing.sampler_accuracy import (
    SD_SCHEDULER_CONFIG,
    law_family,
    measure_law_family,
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


def test_law_family_spans_dimensions_and_is_drawn_from_its_seed():
    family, redrawn, other = law_family(0), law_family(0), law_family(1)
    assert len(family) >= 6 and {law.dim for law in family.values()} >= {2, 256}
    for name, law in family.items():
        assert torch.equal(law.means, redrawn[name].means)
        assert other[name].dim == law.dim and not torch.equal(other[name].means, law.means)


def test_family_report_ratios_are_to_the_best_built_in_per_law():
    laws = {name: law for name, law in law_family(0).items() if name in ("ring-2d", "blobs-8d")}
    report = measure_law_family({"DDIM": DDIMScheduler, "DEIS": DEISMultistepScheduler,
                                 "DDIM instance": DDIMScheduler.from_config(SD_SCHEDULER_CONFIG)},
                                laws=laws, nfes=(4,), num_samples=256, progress=False)
    assert report.builtins == ["DDIM", "DEIS"]
    for (law, _), ratio in report.ratios("DEIS", 4).items():
        excess = {r.sampler: r.sw2_excess for r in report.rows if r.law == law}
        assert ratio == pytest.approx(excess["DEIS"] / min(excess["DDIM"], excess["DEIS"]))
        assert report.ratios("DDIM instance", 4, reference="DDIM")[law, "vp"] == pytest.approx(1.0)
    assert "median" in report.summary_table() and "ring-2d" in report.table()


@pytest.mark.parametrize("seed", [0, 1])
def test_er_sde_default_schedule_beats_the_old_default_grid(seed):
    """On SD 1.x's schedule the default (``sampling_schedule="auto"``: Align Your Steps' table) against the old
    default (``timestep_spacing="linspace"``), from the same noise: sliced W2 ratios 0.44-0.56 on overlap-16d at
    NFE 5 and 10, and 0.37-0.62 on ring-2d at NFE 5, over noise seeds 0-3 (2048 samples)."""
    family = law_family(0)
    samplers = {"default": ERSDESolverScheduler.from_config(SD_SCHEDULER_CONFIG),
                "old": ERSDESolverScheduler.from_config(SD_SCHEDULER_CONFIG, sampling_schedule=None)}
    for law, nfes, bound in (("overlap-16d", (5, 10), 0.7), ("ring-2d", (5,), 0.8)):
        report = measure_law_family(samplers, laws={law: family[law]}, nfes=nfes, num_samples=2048, seed=seed,
                                    progress=False)
        for nfe in nfes:
            sw2 = {r.sampler: r.sw2 for r in report.rows if r.nfe == nfe}
            assert sw2["default"] < bound * sw2["old"], (law, nfe, sw2)
