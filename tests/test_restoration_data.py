"""The data side of paired restoration: each degradation does what its name says, items are functions of their index,
the held-out photos stay out of training, folders of pairs load (including low-resolution inputs), bad inputs give
clear errors, and PSNR / SSIM agree with scikit-image."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import scipy.ndimage
import skimage.data
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity
from torch.utils.data import DataLoader

from diffusers_ext.training.restoration_data import (
    DEGRADATIONS,
    SCIKIT_IMAGE_PHOTOS,
    DegradedPatchDataset,
    PairedImageFolder,
    dihedral_transform,
    downscale,
    gaussian_blur,
    gaussian_noise,
    jpeg,
    make_degradation,
    psnr,
    rain_streak_kernel,
    random_patches,
    restoration_dataset,
    scikit_image_photos,
    ssim,
    synthetic_rain,
    tensor_to_uint8,
    uint8_to_tensor,
    upscale_bicubic,
)


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def training_photos() -> list[torch.Tensor]:
    return scikit_image_photos("train")


@pytest.fixture(scope="module")
def photo_patches(training_photos) -> torch.Tensor:
    """Eight textured patches (the photos have flat areas, such as the retina's black surround, which every
    degradation leaves nearly unchanged)."""
    patches = random_patches(training_photos, patch_size=64, count=32, seed=3)
    return patches[patches.flatten(1).std(dim=1) > 0.1][:8]


def smooth_images(batch: int = 2, height: int = 64, width: int = 96) -> torch.Tensor:
    """Low-frequency colour gradients and waves: what bicubic interpolation reproduces almost exactly."""
    rows = torch.linspace(0, 1, height).view(1, 1, -1, 1)
    columns = torch.linspace(0, 1, width).view(1, 1, 1, -1)
    phases = torch.arange(batch * 3, dtype=torch.float32).view(batch, 3, 1, 1)
    return 0.6 * torch.sin(2.0 * rows + 1.5 * columns + phases) * torch.cos(1.2 * columns - rows)


def high_frequency_energy(images: torch.Tensor) -> float:
    """Mean squared Laplacian: large for fine detail and noise, small for smooth images."""
    laplacian = (images[..., 1:-1, :-2] + images[..., 1:-1, 2:] + images[..., :-2, 1:-1] + images[..., 2:, 1:-1]
                 - 4 * images[..., 1:-1, 1:-1])
    return float(laplacian.pow(2).mean())


# ---- degradations -----------------------------------------------------------------------------------------------


def test_gaussian_noise_has_the_requested_std_on_the_unit_scale():
    clean = torch.zeros(4, 3, 64, 64)
    noisy = gaussian_noise(clean, seeded(), std=0.1)
    # On the [0, 1] scale a difference is halved.
    assert ((noisy - clean) / 2).std().item() == pytest.approx(0.1, rel=0.03)
    assert ((noisy - clean) / 2).mean().abs().item() < 0.005
    assert noisy.shape == clean.shape
    clipped = gaussian_noise(torch.full((1, 3, 32, 32), 0.95), seeded(), std=0.2, clip=True)
    assert clipped.max().item() == 1.0 and clipped.min().item() >= -1.0


def test_gaussian_blur_is_a_separable_gaussian_with_reflect_padding(photo_patches):
    blurred = gaussian_blur(photo_patches, sigma=1.5)
    assert blurred.shape == photo_patches.shape
    assert high_frequency_energy(blurred) < 0.1 * high_frequency_energy(photo_patches)
    # scipy's "mirror" is torch's "reflect"; truncate 3 gives the same radius ceil(3 sigma) = 5.
    reference = scipy.ndimage.gaussian_filter(photo_patches.double().numpy(), sigma=(0, 0, 1.5, 1.5), mode="mirror",
                                              truncate=3.0)
    torch.testing.assert_close(blurred.double(), torch.from_numpy(reference), atol=1e-5, rtol=0)
    # Reflect padding keeps a flat image flat up to its borders (zero padding would darken them).
    flat = torch.full((1, 3, 20, 20), 0.3)
    torch.testing.assert_close(gaussian_blur(flat, sigma=2.0), flat)


def test_downscale_gives_the_low_resolution_image_and_bicubic_upscaling_restores_smooth_images(photo_patches):
    smooth = smooth_images()
    lowres = downscale(smooth, factor=4)
    assert lowres.shape == (2, 3, 16, 24)
    assert lowres.abs().max() <= 1
    # Antialiased: a 4x4 block's low-resolution pixel is close to the block's mean on a smooth image.
    block_means = torch.nn.functional.avg_pool2d(smooth, 4)
    assert (lowres - block_means).abs().max() < 0.02
    upscaled = upscale_bicubic(lowres, 4)
    assert upscaled.shape == smooth.shape
    assert psnr(smooth, upscaled).min() > 35
    # Detail is lost for real: photo patches come back much worse than smooth images do.
    assert psnr(photo_patches, upscale_bicubic(downscale(photo_patches, factor=4), 4)).median() < 30
    assert downscale(smooth, factor=2).shape == (2, 3, 32, 48)
    # Antialiased: stripes with a 4-pixel period average out instead of aliasing into a strong pattern (away from the
    # borders, where the filter is renormalised).
    stripes = (0.8 * torch.cos(torch.pi / 2 * torch.arange(64) + 0.4)).expand(1, 3, 32, 64)
    assert downscale(stripes, factor=4)[..., 2:-2].abs().max() < 0.01


def test_jpeg_adds_compression_artefacts_that_shrink_with_quality(photo_patches):
    low_quality = jpeg(photo_patches, quality=10)
    high_quality = jpeg(photo_patches, quality=90)
    assert low_quality.shape == photo_patches.shape
    assert not torch.equal(low_quality, photo_patches)
    low_psnr, high_psnr = psnr(photo_patches, low_quality), psnr(photo_patches, high_quality)
    assert ((low_psnr > 18) & (low_psnr < 38)).all(), low_psnr
    assert (high_psnr > low_psnr + 3).all()
    torch.testing.assert_close(jpeg(photo_patches, quality=10), low_quality)
    # 8-bit output: every value is one of the 256 levels.
    levels = (low_quality + 1) * 127.5
    torch.testing.assert_close(levels, levels.round(), atol=1e-4, rtol=0)


def test_synthetic_rain_only_adds_grey_bright_streaks_driven_by_the_generator():
    clean = torch.full((2, 3, 64, 64), -0.6) + 0.2 * torch.arange(3.0).view(1, 3, 1, 1)
    rainy = synthetic_rain(clean, seeded(1), density=0.005, length=11, angle=20.0, intensity=0.5)
    added = rainy - clean
    assert added.min() >= 0
    changed = (added > 1e-6).float().mean().item()
    assert 0.01 < changed < 0.5
    # The same streak brightens every channel alike (nothing is clipped here: the image is dark).
    torch.testing.assert_close(added[:, 0], added[:, 2])
    torch.testing.assert_close(synthetic_rain(clean, seeded(1), density=0.005, length=11, angle=20.0), rainy)
    assert not torch.equal(synthetic_rain(clean, seeded(2), density=0.005, length=11, angle=20.0), rainy)
    # Clipped at white: bright pixels stay at 1.
    assert synthetic_rain(torch.full((1, 3, 32, 32), 0.9), seeded(), density=0.05).max() == 1.0


def test_rain_streak_kernel_draws_a_line_of_the_requested_length_and_angle():
    vertical = rain_streak_kernel(7, 0.0)
    expected = torch.zeros(7, 7)
    expected[:, 3] = 1
    torch.testing.assert_close(vertical, expected)
    torch.testing.assert_close(rain_streak_kernel(7, 90.0), expected.T)
    leaning = rain_streak_kernel(9, 30.0)
    rows, columns = torch.nonzero(leaning > 0.5, as_tuple=True)
    # Lower rows lie further right: a positive angle leans like a backslash.
    assert np.corrcoef(rows.numpy(), columns.numpy())[0, 1] > 0.9


# ---- the factory ------------------------------------------------------------------------------------------------


def test_make_degradation_binds_checked_parameters(photo_patches):
    assert set(DEGRADATIONS) == {"gaussian_noise", "gaussian_blur", "downscale", "jpeg", "synthetic_rain"}
    noise = make_degradation("gaussian_noise", std=0.05)
    torch.testing.assert_close(noise(photo_patches, seeded(4)), gaussian_noise(photo_patches, seeded(4), std=0.05))
    assert make_degradation("downscale", factor=2).downscale_factor == 2
    assert make_degradation("downscale").downscale_factor == 4
    assert make_degradation("jpeg").downscale_factor == 1


@pytest.mark.parametrize(("name", "params", "match"), [
    ("sharpen", {}, r"unknown degradation 'sharpen'; known: \['downscale'"),
    ("gaussian_noise", {"sigma": 0.1}, r"no parameter\(s\) \['sigma'\]; it takes \['clip', 'std'\]"),
    ("gaussian_noise", {"std": -0.1}, r"std must be a number in \(0.0, 1.0\], got -0.1"),
    ("gaussian_noise", {"std": True}, r"std must be a number"),
    ("gaussian_blur", {"sigma": 0}, r"sigma must be a number in \(0.0, 50.0\], got 0"),
    ("downscale", {"factor": 1}, r"factor must be an integer >= 2, got 1"),
    ("downscale", {"factor": 2.0}, r"factor must be an integer >= 2, got 2.0"),
    ("jpeg", {"quality": 0}, r"quality must be an integer >= 1, got 0"),
    ("jpeg", {"quality": 101}, r"quality must be an integer in \[1, 100\], got 101"),
    ("synthetic_rain", {"density": 1.5}, r"density must be a number in \(0.0, 1.0\], got 1.5"),
    ("synthetic_rain", {"length": 0}, r"length must be an integer >= 1, got 0"),
    ("synthetic_rain", {"angle": float("nan")}, r"angle must be a number in \[-90.0, 90.0\]"),
])
def test_make_degradation_rejects_bad_names_and_parameters(name, params, match):
    with pytest.raises(ValueError, match=match):
        make_degradation(name, **params)


def test_degradations_reject_images_they_cannot_handle():
    with pytest.raises(ValueError, match=r"downscale\(factor=4\) needs a height and width divisible by 4, got 30x32"):
        downscale(torch.zeros(1, 3, 30, 32), factor=4)
    with pytest.raises(ValueError, match=r"gaussian_noise expects a batch of images \(B, C, H, W\), got \(3, 8, 8\)"):
        gaussian_noise(torch.zeros(3, 8, 8), seeded())
    with pytest.raises(ValueError, match=r"needs images larger than 5 pixels on each side .* got 4x16"):
        gaussian_blur(torch.zeros(1, 3, 4, 16), sigma=1.5)
    with pytest.raises(ValueError, match=r"jpeg expects RGB images \(3 channels\), got 1"):
        jpeg(torch.zeros(1, 1, 8, 8))


# ---- photos and patches -----------------------------------------------------------------------------------------


def test_held_out_photos_never_appear_in_the_training_split(training_photos):
    held_out = scikit_image_photos("held_out")
    assert len(held_out) >= 2 and len(training_photos) >= 4
    assert not set(SCIKIT_IMAGE_PHOTOS["train"]) & set(SCIKIT_IMAGE_PHOTOS["held_out"])
    # By content, not only by name (skimage.data.cat is chelsea under another name).
    for photo in held_out:
        assert not any(p.shape == photo.shape and torch.equal(p, photo) for p in training_photos)
    assert any(torch.equal(uint8_to_tensor(skimage.data.cat()), photo) for photo in held_out)
    for photo in training_photos + held_out:
        assert photo.dtype == torch.float32 and photo.shape[0] == 3
        assert photo.min() >= -1 and photo.max() <= 1 and photo.std() > 0.05
    with pytest.raises(ValueError, match=r"split must be one of \['held_out', 'train'\], got 'test'"):
        scikit_image_photos("test")


def test_random_patches_are_seeded_crops_under_flips_and_quarter_turns():
    # Every pixel value is unique, so a patch identifies its source crop.
    images = [torch.arange(3 * 20 * 24, dtype=torch.float32).view(3, 20, 24),
              1e4 + torch.arange(3 * 16 * 16, dtype=torch.float32).view(3, 16, 16)]
    patches = random_patches(images, patch_size=8, count=64, seed=5)
    assert patches.shape == (64, 3, 8, 8)
    torch.testing.assert_close(random_patches(images, patch_size=8, count=64, seed=5), patches)
    assert not torch.equal(random_patches(images, patch_size=8, count=64, seed=6), patches)
    symmetries_seen, sources_seen = set(), set()
    for patch in patches:
        source = int(patch[0, 0, 0] >= 1e4)
        image = images[source]
        # Values grow along rows and columns, so the crop's smallest value sits at its top-left corner.
        top, left = divmod(int(patch.min() - images[source].min()), image.shape[2])
        crop = image[:, top:top + 8, left:left + 8]
        matches = [which for which in range(8) if torch.equal(dihedral_transform(crop, which), patch)]
        assert len(matches) == 1
        symmetries_seen.add(matches[0])
        sources_seen.add(source)
    assert symmetries_seen == set(range(8)) and sources_seen == {0, 1}
    with pytest.raises(ValueError, match=r"image 1 is 16x16, smaller than patch_size 17"):
        random_patches(images, patch_size=17, count=1, seed=0)
    with pytest.raises(ValueError, match=r"random_patches needs at least one image"):
        random_patches([], patch_size=8, count=1, seed=0)


# ---- data sets --------------------------------------------------------------------------------------------------


def test_degraded_patch_items_are_functions_of_their_index(photo_patches):
    dataset = DegradedPatchDataset(photo_patches, make_degradation("gaussian_noise", std=0.1), seed=7)
    torch.manual_seed(0)
    first = dataset[2]
    torch.manual_seed(1)  # the global RNG plays no part
    again = DegradedPatchDataset(photo_patches, make_degradation("gaussian_noise", std=0.1), seed=7)[2]
    torch.testing.assert_close(first["degraded"], again["degraded"])
    torch.testing.assert_close(first["clean"], photo_patches[2])
    # Another index of the same clean patch gets other noise; another seed too.
    repeated = DegradedPatchDataset(photo_patches[:1].expand(3, -1, -1, -1), "gaussian_noise", seed=7)
    noise_0 = repeated[0]["degraded"] - repeated[0]["clean"]
    noise_1 = repeated[1]["degraded"] - repeated[1]["clean"]
    assert (noise_0 - noise_1).abs().mean() > 0.05
    other_seed = DegradedPatchDataset(photo_patches, make_degradation("gaussian_noise", std=0.1), seed=8)[2]
    assert (other_seed["degraded"] - first["degraded"]).abs().mean() > 0.05
    assert len(dataset) == 8 and dataset[-1]["clean"].shape == (3, 64, 64)
    with pytest.raises(IndexError):
        dataset[8]


def test_super_resolution_items_hold_the_low_resolution_image_and_its_upscale(photo_patches):
    dataset = DegradedPatchDataset(photo_patches, make_degradation("downscale", factor=4), seed=0)
    item = dataset[1]
    assert set(item) == {"clean", "degraded", "lowres"}
    torch.testing.assert_close(item["lowres"], downscale(photo_patches[1:2], factor=4)[0])
    torch.testing.assert_close(item["degraded"], upscale_bicubic(item["lowres"][None], 4)[0])
    # The trainer's default collate batches these dicts.
    batch = next(iter(DataLoader(dataset, batch_size=4)))
    assert batch["clean"].shape == batch["degraded"].shape == (4, 3, 64, 64)
    assert batch["lowres"].shape == (4, 3, 16, 16)


def write_png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    PIL.Image.fromarray(array).save(path)


def random_uint8(seed: int, height: int, width: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def test_paired_image_folder_pairs_files_by_name(tmp_path):
    for number, name in enumerate(["a", "b", "c"]):
        clean = random_uint8(number, 24, 32)
        write_png(tmp_path / "clean" / f"{name}.png", clean)
        write_png(tmp_path / "degraded" / f"{name}.png", 255 - clean)
    (tmp_path / "clean" / "notes.txt").write_text("not an image, ignored")
    dataset = PairedImageFolder(tmp_path)
    assert len(dataset) == 3
    item = dataset[1]
    assert set(item) == {"clean", "degraded"}
    np.testing.assert_array_equal(tensor_to_uint8(item["clean"]), random_uint8(1, 24, 32))
    torch.testing.assert_close(item["degraded"], -item["clean"])

    patches = PairedImageFolder(tmp_path, patch_size=16, seed=2, augment=True)
    item = patches[0]
    assert item["clean"].shape == item["degraded"].shape == (3, 16, 16)
    torch.testing.assert_close(item["degraded"], -item["clean"])  # the same crop and symmetry for both
    torch.testing.assert_close(PairedImageFolder(tmp_path, patch_size=16, seed=2, augment=True)[0]["clean"],
                               item["clean"])
    assert next(iter(DataLoader(patches, batch_size=3)))["clean"].shape == (3, 3, 16, 16)


def test_paired_image_folder_upscales_a_smaller_degraded_image_and_aligns_crops(tmp_path):
    clean = random_uint8(0, 32, 48)
    write_png(tmp_path / "clean" / "x.png", clean)
    write_png(tmp_path / "degraded" / "x.png", clean[::2, ::2])  # every second pixel: alignment shows exactly
    whole = PairedImageFolder(tmp_path)[0]
    assert whole["lowres"].shape == (3, 16, 24) and whole["degraded"].shape == whole["clean"].shape == (3, 32, 48)
    torch.testing.assert_close(whole["degraded"], upscale_bicubic(whole["lowres"][None], 2)[0])
    for seed in range(4):
        item = PairedImageFolder(tmp_path, patch_size=8, seed=seed)[0]
        assert item["lowres"].shape == (3, 4, 4) and item["clean"].shape == (3, 8, 8)
        torch.testing.assert_close(item["lowres"], item["clean"][:, ::2, ::2])


def test_restoration_dataset_builds_each_kind_of_source(tmp_path):
    builtin = restoration_dataset("scikit-image", degradation="gaussian_blur", patch_size=32, num_patches=5, seed=1)
    assert isinstance(builtin, DegradedPatchDataset) and len(builtin) == 5
    assert builtin[4]["degraded"].shape == (3, 32, 32)
    held_out = restoration_dataset("scikit-image", "jpeg", patch_size=32, num_patches=3, split="held_out")
    assert not torch.equal(held_out[0]["clean"], builtin[0]["clean"])

    write_png(tmp_path / "photos" / "one.png", random_uint8(1, 40, 40))
    write_png(tmp_path / "photos" / "two.jpg", random_uint8(2, 36, 50))
    clean_folder = restoration_dataset(tmp_path / "photos", make_degradation("downscale", factor=2), patch_size=16,
                                       num_patches=6)
    assert len(clean_folder) == 6 and clean_folder[5]["lowres"].shape == (3, 8, 8)

    write_png(tmp_path / "pairs" / "clean" / "p.png", random_uint8(3, 20, 20))
    write_png(tmp_path / "pairs" / "degraded" / "p.png", random_uint8(4, 20, 20))
    pairs = restoration_dataset(tmp_path / "pairs", patch_size=None)
    assert isinstance(pairs, PairedImageFolder) and pairs[0]["clean"].shape == (3, 20, 20)


# ---- bad inputs -------------------------------------------------------------------------------------------------


def test_paired_image_folder_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match=r"missing folder .*nowhere"):
        PairedImageFolder(tmp_path / "nowhere")
    write_png(tmp_path / "clean" / "a.png", random_uint8(0, 16, 16))
    with pytest.raises(ValueError, match=r"missing folder .*degraded"):
        PairedImageFolder(tmp_path)
    (tmp_path / "degraded").mkdir()
    (tmp_path / "degraded" / "readme.txt").write_text("no images here")
    with pytest.raises(ValueError, match=r"degraded contains no images \(.png, .jpg"):
        PairedImageFolder(tmp_path)
    write_png(tmp_path / "degraded" / "b.png", random_uint8(1, 16, 16))
    with pytest.raises(ValueError, match=r"no image in clean/ has a partner .*unmatched: clean/a.png, degraded/b.png"):
        PairedImageFolder(tmp_path)
    write_png(tmp_path / "degraded" / "a.png", random_uint8(2, 16, 16))
    with pytest.raises(ValueError, match=r"1 image\(s\) have no partner .*degraded/b.png.*allow_unmatched=True"):
        PairedImageFolder(tmp_path)
    assert len(PairedImageFolder(tmp_path, allow_unmatched=True)) == 1
    with pytest.raises(ValueError, match=r"smaller than patch_size 17"):
        PairedImageFolder(tmp_path, patch_size=17, allow_unmatched=True)


def test_paired_image_folder_rejects_unreadable_and_mismatched_images(tmp_path):
    write_png(tmp_path / "clean" / "a.png", random_uint8(0, 16, 16))
    write_png(tmp_path / "degraded" / "a.png", random_uint8(1, 16, 12))
    with pytest.raises(ValueError, match=r"a: the degraded image is 16x12 and the clean one 16x16; they must be"):
        PairedImageFolder(tmp_path)
    write_png(tmp_path / "degraded" / "a.png", random_uint8(1, 8, 4))  # 2x smaller in height, 4x in width
    with pytest.raises(ValueError, match=r"the degraded image is 8x4 and the clean one 16x16"):
        PairedImageFolder(tmp_path)
    write_png(tmp_path / "degraded" / "a.png", random_uint8(1, 8, 8))
    write_png(tmp_path / "clean" / "b.png", random_uint8(2, 16, 16))
    write_png(tmp_path / "degraded" / "b.png", random_uint8(3, 4, 4))
    with pytest.raises(ValueError, match=r"smaller than the clean ones by different factors \('a' x2, 'b' x4\)"):
        PairedImageFolder(tmp_path)
    write_png(tmp_path / "degraded" / "b.png", random_uint8(3, 8, 8))
    with pytest.raises(ValueError, match=r"patch_size 9 must be divisible by the low-resolution factor 2"):
        PairedImageFolder(tmp_path, patch_size=9)
    (tmp_path / "degraded" / "b.png").write_bytes(b"this is not a PNG")
    with pytest.raises(ValueError, match=r"cannot read image file .*degraded/b.png"):
        PairedImageFolder(tmp_path)
    (tmp_path / "degraded" / "b.jpg").write_bytes(b"")
    with pytest.raises(ValueError, match=r"holds two images named 'b' \(b.jpg and b.png\)"):
        PairedImageFolder(tmp_path)


def test_dataset_constructors_reject_bad_arguments(tmp_path, photo_patches):
    with pytest.raises(ValueError, match=r"clean_patches must be a non-empty \(N, C, H, W\) tensor, got \(3, 8, 8\)"):
        DegradedPatchDataset(torch.zeros(3, 8, 8), "jpeg")
    with pytest.raises(ValueError, match=r"degradation must be a registered name .* got 3"):
        DegradedPatchDataset(photo_patches, 3)
    with pytest.raises(ValueError, match=r"the degraded image is 64x32 and the clean one 64x64"):
        DegradedPatchDataset(photo_patches, lambda clean, generator: clean[..., ::2])[0]
    with pytest.raises(ValueError, match=r"pass a degradation, one of \['downscale'"):
        restoration_dataset("scikit-image")
    with pytest.raises(ValueError, match=r"must be 'scikit-image' or a folder, got '.*missing'"):
        restoration_dataset(tmp_path / "missing", "jpeg")
    write_png(tmp_path / "clean" / "a.png", random_uint8(0, 16, 16))
    write_png(tmp_path / "degraded" / "a.png", random_uint8(1, 16, 16))
    with pytest.raises(ValueError, match=r"holds clean/ and degraded/ pairs already; degradation must be None"):
        restoration_dataset(tmp_path, "jpeg")
    with pytest.raises(ValueError, match=r"num_patches must be None, got 10"):
        restoration_dataset(tmp_path, num_patches=10)


# ---- metrics ----------------------------------------------------------------------------------------------------


def test_psnr_and_ssim_agree_with_scikit_image(training_photos, photo_patches):
    clean = photo_patches[:4].double()
    degraded = torch.cat([
        gaussian_noise(clean[:1], seeded(), std=0.05, clip=True),
        gaussian_blur(clean[1:2], sigma=2.0),
        jpeg(clean[2:3], quality=15),
        upscale_bicubic(downscale(clean[3:4], factor=4), 4),
    ])
    ours_psnr, ours_ssim = psnr(clean, degraded), ssim(clean, degraded)
    for index in range(4):
        reference = ((clean[index] + 1) / 2).permute(1, 2, 0).numpy()
        test = ((degraded[index] + 1) / 2).permute(1, 2, 0).numpy()
        assert ours_psnr[index].item() == pytest.approx(peak_signal_noise_ratio(reference, test, data_range=1),
                                                        abs=1e-9)
        expected_ssim = structural_similarity(reference, test, gaussian_weights=True, sigma=1.5,
                                              use_sample_covariance=False, data_range=1, channel_axis=-1)
        assert ours_ssim[index].item() == pytest.approx(expected_ssim, abs=1e-9)
    # The values differ between pairs (so the per-image comparison above is not trivially met), float32 is close.
    assert ours_ssim.std() > 0.02 and ours_psnr.std() > 1
    torch.testing.assert_close(ssim(clean.float(), degraded.float()), ours_ssim.float(), atol=2e-5, rtol=0)
    # A non-square crop of a whole photo against its degraded version.
    photo = training_photos[0][None, :, :120, :90].double()
    noisy = gaussian_noise(photo, seeded(1), std=0.1, clip=True)
    expected = structural_similarity(((photo[0] + 1) / 2).numpy(), ((noisy[0] + 1) / 2).numpy(),
                                     gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1,
                                     channel_axis=0)
    assert ssim(photo, noisy).item() == pytest.approx(expected, abs=1e-9)
    assert ssim(clean, clean).tolist() == pytest.approx([1.0] * 4)
    assert torch.isinf(psnr(clean, clean)).all()


def test_metrics_reject_mismatched_or_tiny_images():
    with pytest.raises(ValueError, match=r"psnr needs images of the same shape, got \(1, 3, 16, 16\) and "
                                         r"\(1, 3, 16, 8\)"):
        psnr(torch.zeros(1, 3, 16, 16), torch.zeros(1, 3, 16, 8))
    with pytest.raises(ValueError, match=r"ssim needs images of at least 11x11 pixels \(its window\), got 10x16"):
        ssim(torch.zeros(1, 3, 10, 16), torch.zeros(1, 3, 10, 16))
    with pytest.raises(ValueError, match=r"ssim expects a batch of images"):
        ssim(torch.zeros(3, 16, 16), torch.zeros(3, 16, 16))
