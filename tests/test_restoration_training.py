"""The paired-restoration trainer on real photos: a tiny model trained on scikit-image's training photos restores
held-out photo patches better than the degraded input, and a resumed run ends where an uninterrupted one does."""

import pytest
import torch
from diffusers import UNet2DModel

from diffusers_ext.pipelines.restoration import RDDMPipeline, ResShiftPipeline
from diffusers_ext.schedulers import RDDMScheduler, ResShiftScheduler
from diffusers_ext.training import PairedRestorationObjective, Trainer, TrainingConfig
from diffusers_ext.training.restoration_data import (
    DegradedPatchDataset,
    make_degradation,
    psnr,
    random_patches,
    scikit_image_photos,
)

PATCH = 32


def small_unet(output_factor: int = 1) -> UNet2DModel:
    torch.manual_seed(0)
    return UNet2DModel(sample_size=PATCH, in_channels=6, out_channels=3 * output_factor,
                       block_out_channels=(32, 32), layers_per_block=1, norm_num_groups=8,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"))


@pytest.fixture(scope="module")
def noisy_photo_patches():
    degradation = make_degradation("gaussian_noise", std=0.1, clip=True)
    train = DegradedPatchDataset(random_patches(scikit_image_photos("train"), PATCH, count=1024, seed=0),
                                 degradation, seed=0)
    held_out = DegradedPatchDataset(random_patches(scikit_image_photos("held_out"), PATCH, count=32, seed=1),
                                    degradation, seed=1)
    return train, held_out


@pytest.mark.effect
@pytest.mark.parametrize("method", ["resshift", "rddm"])
def test_training_raises_psnr_on_held_out_photos(method, noisy_photo_patches, tmp_path, training_seed):
    train, held_out = noisy_photo_patches
    if method == "resshift":
        scheduler, pipeline_class, steps = ResShiftScheduler(num_train_timesteps=4, kappa=0.5), ResShiftPipeline, 4
    else:
        scheduler, pipeline_class, steps = RDDMScheduler(prediction_type="residual"), RDDMPipeline, 5
    config = TrainingConfig(output_dir=str(tmp_path), max_steps=200, batch_size=16, learning_rate=2e-3,
                            seed=training_seed)
    model = Trainer(PairedRestorationObjective(scheduler), small_unet(), train, config).train().model.eval()

    pipe = pipeline_class(unet=model, scheduler=scheduler, upscale_factor=1)
    pipe.set_progress_bar_config(disable=True)
    clean = torch.stack([held_out[i]["clean"] for i in range(len(held_out))])
    degraded = torch.stack([held_out[i]["degraded"] for i in range(len(held_out))])
    restored = pipe((degraded + 1) / 2, num_inference_steps=steps, output_type="pt",
                    generator=torch.Generator().manual_seed(0)).images * 2 - 1
    before, after = float(psnr(degraded, clean).mean()), float(psnr(restored, clean).mean())
    print(f"\n{method}: held-out PSNR {before:.2f} dB (noisy input) -> {after:.2f} dB (restored)")
    # Measured over training seeds 0-2 (DIFFUSERS_EXT_TEST_SEED): +3.9 to +6.5 dB (ResShift), +8.1 to +8.4 dB (RDDM).
    assert after > before + 2.0


def test_resumed_run_ends_with_the_uninterrupted_weights(noisy_photo_patches, tmp_path):
    train, _ = noisy_photo_patches
    scheduler = ResShiftScheduler(num_train_timesteps=4)

    def run(output_dir, max_steps, resume_from=None):
        config = TrainingConfig(output_dir=str(output_dir), max_steps=max_steps, batch_size=4, learning_rate=1e-3,
                                checkpoint_every=3, resume_from=resume_from)
        return Trainer(PairedRestorationObjective(scheduler), small_unet(), train, config).train()

    uninterrupted = run(tmp_path / "a", 6)
    run(tmp_path / "b", 3)
    resumed = run(tmp_path / "b", 6, resume_from="latest")
    assert resumed.step == 6
    for (name, expected), actual in zip(uninterrupted.model.state_dict().items(),
                                        resumed.model.state_dict().values(), strict=True):
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6, msg=name)


def test_a_checkpoint_of_another_method_is_refused(noisy_photo_patches, tmp_path):
    train, _ = noisy_photo_patches
    config = TrainingConfig(output_dir=str(tmp_path), max_steps=1, batch_size=2, checkpoint_every=1)
    Trainer(PairedRestorationObjective(ResShiftScheduler(num_train_timesteps=4)), small_unet(), train, config).train()
    resume = TrainingConfig(output_dir=str(tmp_path), max_steps=2, batch_size=2, resume_from="latest")
    with pytest.raises(ValueError, match="RDDMScheduler"):
        Trainer(PairedRestorationObjective(RDDMScheduler()), small_unet(), train, resume).train()


def test_the_objective_needs_a_restoration_scheduler():
    from diffusers import DDPMScheduler

    with pytest.raises(ValueError, match="restoration scheduler"):
        PairedRestorationObjective(DDPMScheduler())


def test_with_an_autoencoder_the_loss_is_taken_on_latents():
    from diffusers import AutoencoderKL

    from diffusers_ext.pipelines.restoration.pipeline_restoration import encode_to_latents

    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(8, 8), in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=4, sample_size=16, scaling_factor=0.5).eval()
    unet = UNet2DModel(sample_size=8, in_channels=8, out_channels=4, block_out_channels=(8, 8), layers_per_block=1,
                       norm_num_groups=4, down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2)
    scheduler = ResShiftScheduler(num_train_timesteps=4)
    clean = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    degraded = (clean + 0.2 * torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))).clamp(-1, 1)
    loss = PairedRestorationObjective(scheduler, vae=vae).loss(unet, {"clean": clean, "degraded": degraded},
                                                                torch.Generator().manual_seed(3))

    # The same draws, by hand, on the VAE's scaled latents.
    with torch.no_grad():
        x0, y = encode_to_latents(vae, clean), encode_to_latents(vae, degraded)
    generator = torch.Generator().manual_seed(3)
    timesteps = scheduler.sample_training_timesteps(2, generator)
    noise = torch.randn(x0.shape, generator=generator)
    prediction = unet(torch.cat([scheduler.add_noise(x0, y, noise, timesteps), y], dim=1), timesteps).sample
    expected = torch.nn.functional.mse_loss(prediction, scheduler.training_target(x0, y, noise, timesteps))
    assert x0.shape == (2, 4, 8, 8)
    torch.testing.assert_close(loss, expected)
