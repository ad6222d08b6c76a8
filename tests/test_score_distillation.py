"""Score distillation (SDS, SDI) on the exact view-conditioned oracle and inside stock diffusers pipelines."""

import json

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from test_multiview_pipeline import NUM_VIEWS
from test_multiview_pipeline import tiny_pipeline as multiview_pipeline
from test_video_cli import assert_clear_errors_before_torch
from tiny_pipelines import sd_pipeline, sd_scheduler, tiny_sd3, tiny_sdxl

from diffusers_ext.cli import DISTILL_MESH_FORMATS, build_parser, check_distill_arguments, main
from diffusers_ext.diffusion_math import vp_alpha_sigma
from diffusers_ext.pipelines.three_d.mesh_export import MESH_FORMATS, current_umask
from diffusers_ext.pipelines.three_d.rendering import VoxelGrid, orbit_cameras, random_cameras, voxel_iou
from diffusers_ext.pipelines.three_d.score_distillation import (
    ScoreDistillation,
    TextToImagePrior,
    view_dependent_prompt,
)
from diffusers_ext.pipelines.three_d.shapes import Box, Sphere, random_shape, voxelize
from diffusers_ext.testing import GaussianMixture
from diffusers_ext.testing.view_oracle import ViewConditionedGaussianPrior

SIZE, RESOLUTION = 12, 10


def target_shape() -> VoxelGrid:
    return voxelize([Sphere((0.0, 0.1, 0.0), 0.35, (0.9, 0.2, 0.1)), Box((0.0, -0.3, 0.0), (0.4, 0.15, 0.3),
                                                                          (0.1, 0.3, 0.9))], RESOLUTION)


def oracle_distillation(method: str, targets=None, **kwargs) -> ScoreDistillation:
    prior = ViewConditionedGaussianPrior(targets or [target_shape()], SIZE, SIZE, std=0.1,
                                         render_kwargs={"num_samples": 32})
    return ScoreDistillation(prior, method=method, guidance_scale=1.0, inversion_guidance_scale=1.0, **kwargs)


def test_oracle_is_the_exact_gaussian_mixture_posterior():
    generator = torch.Generator().manual_seed(0)
    shapes = [random_shape(torch.Generator().manual_seed(s), resolution=8) for s in (1, 2)]
    prior = ViewConditionedGaussianPrior(shapes, 6, 6, std=0.3, weights=[0.3, 0.7])
    cameras = random_cameras(2, generator)
    timesteps = torch.tensor([300, 700])
    samples = torch.randn(2, 3, 6, 6, generator=generator, dtype=torch.float64)
    posterior_mean, responsibilities = prior.posterior(samples, timesteps, cameras)
    alpha, sigma = vp_alpha_sigma(timesteps, prior.alphas_cumprod)
    means = prior.target_means(cameras)
    for i in range(2):
        law = GaussianMixture(means[:, i].reshape(2, -1), [0.09, 0.09], [0.3, 0.7])
        x = samples[i].reshape(1, -1)
        expected = law.posterior_mean(x, alpha[i], sigma[i]).reshape(3, 6, 6)
        torch.testing.assert_close(posterior_mean[i], expected, atol=1e-10, rtol=0)
        torch.testing.assert_close(responsibilities[i], law.responsibilities(x, alpha[i], sigma[i])[0])
    eps = prior(samples, timesteps, cameras)
    torch.testing.assert_close(eps, (samples - alpha[:, None, None, None] * posterior_mean)
                               / sigma[:, None, None, None])


def test_sdi_inversion_converges_to_the_probability_flow_map():
    """For one Gaussian N(m, s^2 I) the probability-flow ODE maps x0 to alpha m + sqrt(alpha^2 s^2 + sigma^2) / s
    (x0 - m); SDI's DDIM inversion (eta = 0) approaches it at first order in the number of steps."""
    generator = torch.Generator().manual_seed(0)
    prior = ViewConditionedGaussianPrior([random_shape(torch.Generator().manual_seed(1), resolution=8)], 6, 6, std=0.2)
    cameras = random_cameras(2, generator)
    means = prior.target_means(cameras)[0]
    x0 = means + 0.2 * torch.randn(means.shape, generator=generator, dtype=torch.float64)
    timesteps = torch.tensor([500, 900])
    alpha, sigma = (v[:, None, None, None] for v in vp_alpha_sigma(timesteps, prior.alphas_cumprod))
    exact = alpha * means + (alpha**2 * 0.04 + sigma**2).sqrt() / 0.2 * (x0 - means)
    errors = []
    for steps in (50, 200):
        distillation = ScoreDistillation(prior, "sdi", guidance_scale=1.0, inversion_guidance_scale=1.0,
                                         inversion_steps=steps, inversion_eta=0.0)
        inverted = distillation.invert(x0, timesteps, cameras, ["", ""])
        errors.append(((inverted - exact).norm() / (exact - alpha * means).norm()).item())
    assert errors[1] < 0.05 and errors[0] > 2.5 * errors[1], errors


@pytest.mark.parametrize("method", ["sds", "sdi"])
def test_distillation_on_the_oracle_recovers_the_target_shape(method):
    target = target_shape()
    distillation = oracle_distillation(method, [target], inversion_steps=5)
    start = VoxelGrid(resolution=RESOLUTION)
    assert voxel_iou(start.occupancy(), target.occupancy()) == 0.0
    output = distillation("", start, num_iterations=100, views_per_iteration=4, height=SIZE, width=SIZE,
                          learning_rate=0.1, generator=torch.Generator().manual_seed(0), show_progress=False)
    # measured 0.85-0.90 over seeds 0-3 for both methods
    assert voxel_iou(output.representation.occupancy(), target.occupancy()) >= 0.8


def test_a_result_without_a_surface_keeps_its_grid_and_writes_no_turntable(tmp_path):
    distillation = oracle_distillation("sds")
    with pytest.raises(ValueError, match="empty"):
        distillation("", VoxelGrid(resolution=6), num_iterations=1, views_per_iteration=2, height=SIZE, width=SIZE,
                     learning_rate=0.0, output_dir=tmp_path, show_progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["representation"]


def test_same_seed_same_result_and_outputs_written(tmp_path):
    distillation = oracle_distillation("sdi", inversion_steps=2)
    runs = [distillation("", VoxelGrid(resolution=6), num_iterations=3, views_per_iteration=2, height=SIZE,
                         width=SIZE, generator=torch.Generator().manual_seed(seed), show_progress=False)
            for seed in (3, 3, 4)]
    assert torch.equal(runs[0].representation.raw_density, runs[1].representation.raw_density)
    assert not torch.equal(runs[0].representation.raw_density, runs[2].representation.raw_density)
    # started from the target itself, the result has a surface to export
    calls = []
    output = distillation("", target_shape(), num_iterations=2, views_per_iteration=2, height=SIZE, width=SIZE,
                          output_dir=tmp_path, mesh_format="ply", checkpoint_every=1, show_progress=False,
                          turntable_kwargs={"num_frames": 4, "size": 16},
                          callback=lambda i, grid, loss: calls.append((i, type(grid).__name__, loss)))
    assert calls == [(i, "VoxelGrid", loss) for i, loss in enumerate(output.losses)]
    assert output.mesh_path == tmp_path / "mesh.ply" and output.turntable_path == tmp_path / "turntable.gif"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-000001", "checkpoint-000002", "mesh.ply",
                                                          "representation", "turntable.gif"]
    torch.testing.assert_close(VoxelGrid.from_pretrained(tmp_path / "representation").raw_density,
                               output.representation.raw_density, rtol=0, atol=0)
    loaded = VoxelGrid.from_pretrained(tmp_path / "checkpoint-000002")
    assert (tmp_path / "checkpoint-000002").stat().st_mode & 0o777 == 0o777 & ~current_umask()
    assert torch.equal(loaded.raw_density, output.representation.raw_density)


def test_view_dependent_prompts_follow_dreamfusion():
    assert view_dependent_prompt("a cat", 10.0, 0.0) == "a cat, front view"
    assert view_dependent_prompt("a cat", -100.0, 20.0) == "a cat, side view"
    assert view_dependent_prompt("a cat", 170.0, 0.0) == "a cat, back view"
    assert view_dependent_prompt("a cat", 0.0, 70.0) == "a cat, overhead view"


@pytest.mark.parametrize("method", ["sds", "sdi"])
def test_stable_diffusion_prior_inside_the_stock_pipeline(method):
    pipe = sd_pipeline(text_encoder=True)
    distillation = ScoreDistillation(pipe, method=method, inversion_steps=2)
    assert distillation.guidance_scale == {"sds": 100.0, "sdi": 7.5}[method]
    prompts = distillation.prompts_for("a ball", orbit_cameras(4, elevation=0.0))
    assert prompts == ["a ball, front view", "a ball, side view", "a ball, back view", "a ball, side view"]
    runs = [distillation("a ball", VoxelGrid(resolution=6), num_iterations=2, views_per_iteration=2, height=8,
                         width=8, generator=torch.Generator().manual_seed(0), show_progress=False) for _ in range(2)]
    assert torch.equal(runs[0].representation.raw_colour, runs[1].representation.raw_colour)
    assert not torch.equal(runs[0].representation.raw_colour, VoxelGrid(resolution=6).raw_colour)


def test_text_to_image_prior_matches_the_unet_with_guidance():
    pipe = sd_pipeline(text_encoder=True)
    prior = TextToImagePrior(pipe)
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    timesteps = torch.tensor([400])
    cond, uncond = pipe.encode_prompt("a ball", "cpu", 1, True, negative_prompt="")
    with torch.no_grad():
        eps_cond = pipe.unet(latents, timesteps, encoder_hidden_states=cond).sample
        eps_uncond = pipe.unet(latents, timesteps, encoder_hidden_states=uncond).sample
    expected = eps_uncond + 3.0 * (eps_cond - eps_uncond)
    torch.testing.assert_close(prior(latents, timesteps, orbit_cameras(1), ["a ball"], 3.0), expected,
                               atol=1e-5, rtol=1e-4)


def test_sdxl_prior_runs():
    distillation = ScoreDistillation(tiny_sdxl(sd_scheduler()), method="sds")
    output = distillation("a ball", VoxelGrid(resolution=6), num_iterations=1, views_per_iteration=2, height=8,
                          width=8, generator=torch.Generator().manual_seed(0), show_progress=False)
    assert torch.isfinite(torch.tensor(output.losses)).all()


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: ScoreDistillation(tiny_sd3(FlowMatchEulerDiscreteScheduler())), "VP"),
        (lambda: ScoreDistillation(sd_pipeline()), "text encoder"),
        (lambda: oracle_distillation("vsd"), "method"),
        (lambda: oracle_distillation("sds", timestep_range=(0.5, 0.2)), "timestep_range"),
        (lambda: oracle_distillation("sds")("", num_iterations=0), "num_iterations"),
        (lambda: oracle_distillation("sds")("", mesh_format="stl"), "mesh_format"),
        (lambda: oracle_distillation("sds")("", checkpoint_every=5), "checkpoint_every"),
        (lambda: oracle_distillation("sds").prior(torch.zeros(2, 3, SIZE, SIZE), torch.tensor([1, 2]),
                                                  orbit_cameras(3)), "one camera per sample"),
        (lambda: oracle_distillation("sds").prior(torch.zeros(1, 3, SIZE, SIZE), torch.tensor([1]),
                                                  torch.eye(4)), r"\(N, 4, 4\)"),
        (lambda: oracle_distillation("sds").prior(torch.zeros(1, 3, SIZE, SIZE), torch.tensor([1]),
                                                  orbit_cameras(1), guidance_scale=7.5), "guidance_scale"),
        (lambda: oracle_distillation("sds").prior.encode(torch.zeros(1, 3, 4, 4)), "images"),
    ],
)
def test_bad_inputs(make, message):
    with pytest.raises((ValueError, TypeError), match=message):
        make()


@pytest.fixture(scope="module")
def saved_sd_pipeline(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sd")
    sd_pipeline(text_encoder=True).save_pretrained(folder)
    return folder


def test_distill_command_feeds_the_prior_its_own_image_size_by_default(tmp_path, saved_sd_pipeline):
    parser = build_parser()
    base = ["3d", "distill", "a ball", "--pipeline", str(saved_sd_pipeline), "--output", str(tmp_path / "out")]
    unet = json.loads((saved_sd_pipeline / "unet" / "config.json").read_text())
    vae = json.loads((saved_sd_pipeline / "vae" / "config.json").read_text())
    native = unet["sample_size"] * 2 ** (len(vae["block_out_channels"]) - 1)
    assert check_distill_arguments(parser.parse_args(base))["image_size"] == native
    assert check_distill_arguments(parser.parse_args([*base, "--prior-size", "32"]))["image_size"] == 32


def test_distill_command_writes_mesh_and_turntable(tmp_path, saved_sd_pipeline):
    output = tmp_path / "out"
    code = main(["3d", "distill", "a ball", "--pipeline", str(saved_sd_pipeline), "--output", str(output),
                 "--iterations", "2", "--views", "2", "--size", "8", "--resolution", "6", "--mesh-format", "ply",
                 "--turntable-frames", "3", "--turntable-size", "16"])
    assert code == 0
    assert sorted(p.name for p in output.iterdir()) == ["mesh.ply", "representation", "turntable.gif"]
    assert DISTILL_MESH_FORMATS == MESH_FORMATS


def test_distill_command_checks_arguments_before_torch_is_imported(tmp_path, saved_sd_pipeline):
    not_sd = tmp_path / "sd3"
    not_sd.mkdir()
    (not_sd / "model_index.json").write_text(json.dumps(
        {"_class_name": "StableDiffusion3Pipeline", "transformer": ["diffusers", "SD3Transformer2DModel"],
         "vae": ["diffusers", "AutoencoderKL"], "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"]}))
    a_file = tmp_path / "file.txt"
    a_file.write_text("")
    base = ["3d", "distill", "a ball", "--pipeline", str(saved_sd_pipeline), "--output", str(tmp_path / "out")]
    cases = [
        (["3d", "distill", "a ball", "--pipeline", str(tmp_path / "missing"), "--output", str(tmp_path / "o")],
         "no pipeline at"),
        (["3d", "distill", "a ball", "--pipeline", str(not_sd), "--output", str(tmp_path / "o")],
         "has no unet, text_encoder, tokenizer"),
        ([*base, "--prior-size", "7"], "multiple of 2; --prior-size is 7"),
        ([*base, "--lr", "0"], "--lr must be positive"),
        ([*base, "--resolution", "1"], "--resolution must be at least 2"),
        ([*base[:-1], str(a_file)], "is a file"),
        (["3d", "distill", " ", *base[3:]], "the prompt is empty"),
    ]
    assert_clear_errors_before_torch(cases)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt", "sd3"]


def test_multiview_pipeline_is_a_prior_with_one_timestep_and_one_orbit_per_object():
    pipe = multiview_pipeline()
    distillation = ScoreDistillation(pipe, method="sds", guidance_scale=2.0)
    assert distillation.views_per_object == NUM_VIEWS and not distillation.view_dependent_prompts
    timesteps = distillation.timesteps_for(0, 10, 2 * NUM_VIEWS, torch.Generator().manual_seed(0))
    assert timesteps.reshape(2, NUM_VIEWS).unique(dim=1).shape == (2, 1)
    # the prior's guided eps is the multi-view UNet's, as the pipeline's sampling loop computes it
    samples = torch.randn(NUM_VIEWS, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    cameras, t = orbit_cameras(NUM_VIEWS, start_azimuth=30.0), torch.full((NUM_VIEWS,), 300)
    zeros = torch.zeros(NUM_VIEWS, 1, pipe.unet.config.cross_attention_dim)
    with torch.no_grad():
        eps = pipe.unet(samples, t, encoder_hidden_states=zeros, cameras=cameras, return_dict=False)[0]
    torch.testing.assert_close(distillation.prior(samples, t, cameras, [""] * NUM_VIEWS, 2.0), eps)
    output = distillation("", VoxelGrid(resolution=6), num_iterations=2, views_per_iteration=NUM_VIEWS, height=8,
                          width=8, generator=torch.Generator().manual_seed(0), show_progress=False)
    assert torch.isfinite(torch.tensor(output.losses)).all()
    with pytest.raises(ValueError, match="multiple of the multi-view prior's 4 views"):
        distillation("", num_iterations=1, views_per_iteration=3)
