"""The volumes of DiffusionMBIR's data (issue 18): ellipsoids render with their analytic volume, phantoms and blobs are
reproducible and in [0, 1], the held-out split is fixed and never a training volume, and the slice data set serves
the volumes' slices in [-1, 1]."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils.data import DataLoader

from diffusers_ext.training.volume_data import (
    HELD_OUT_SEED_START,
    Ellipsoid,
    VolumeSliceDataset,
    held_out_volumes,
    make_volume,
    random_ellipsoid_phantom,
    render_ellipsoids,
    smoothed_binary_blobs,
    training_volume,
)


def rotation_about_z(angle: float) -> torch.Tensor:
    c, s = math.cos(angle), math.sin(angle)
    return torch.tensor([[1.0, 0, 0], [0, c, -s], [0, s, c]], dtype=torch.float64)


@pytest.mark.parametrize("angle", [0.0, 0.7])
def test_an_ellipsoid_renders_with_its_analytic_volume_and_orientation(angle):
    semi_axes = torch.tensor([0.6, 0.5, 0.25], dtype=torch.float64)
    ellipsoid = Ellipsoid(torch.tensor([0.1, -0.05, 0.0], dtype=torch.float64), semi_axes,
                          rotation_about_z(angle), 0.5)
    size = 32
    volume = render_ellipsoids([ellipsoid], size, supersampling=2)
    # Volume 4/3 pi a b c in normalised units, (size / 2)^3 voxels per unit^3; the voxelised surface errs by about
    # one surface layer of sub-voxels both ways, which cancels to well under 1 %.
    expected_voxels = 4 / 3 * math.pi * float(semi_axes.prod()) * (size / 2) ** 3
    assert abs(float(volume.sum()) / 0.5 - expected_voxels) < 0.01 * expected_voxels
    assert float(volume.max()) == 0.5 and float(volume.min()) == 0.0
    # Second moments along H and W: the ellipsoid's in-plane axes turned by the angle.
    mass = volume.double() / volume.sum()
    coordinates = (torch.arange(size, dtype=torch.float64) + 0.5) * (2 / size) - 1
    y = (mass.sum(dim=(0, 2)) * coordinates).sum()
    x = (mass.sum(dim=(0, 1)) * coordinates).sum()
    assert abs(float(y) + 0.05) < 0.01 and abs(float(x)) < 0.01  # the centre
    cross = (mass.sum(dim=0) * (coordinates[:, None] - y) * (coordinates[None, :] - x)).sum()
    # For a uniform ellipsoid E[u v] over the rotated axes: (a^2 - b^2) / 5 * cos sin (a, b the in-plane semi-axes).
    expected_cross = (0.5**2 - 0.25**2) / 5 * math.cos(angle) * math.sin(angle)
    assert abs(float(cross) - expected_cross) < 0.003


def test_phantoms_are_reproducible_head_like_and_in_range():
    first = random_ellipsoid_phantom(32, torch.Generator().manual_seed(5))
    again = random_ellipsoid_phantom(32, torch.Generator().manual_seed(5))
    other = random_ellipsoid_phantom(32, torch.Generator().manual_seed(6))
    assert first.shape == (32, 32, 32) and first.dtype == torch.float32
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert float(first.min()) == 0.0 and float(first.max()) == 1.0  # background and the bright shell
    assert first[0, 0, 0] == 0 and first[16, 16, 16] < 0.7  # corners empty; inside the shell darker than the shell
    # More than two grey levels: the features inside the head.
    assert len(torch.unique((first * 100).round())) > 10


def test_blobs_are_reproducible_smooth_and_in_range():
    blobs = smoothed_binary_blobs(32, torch.Generator().manual_seed(1))
    assert torch.equal(blobs, smoothed_binary_blobs(32, torch.Generator().manual_seed(1)))
    assert not torch.equal(blobs, smoothed_binary_blobs(32, torch.Generator().manual_seed(2)))
    assert blobs.shape == (32, 32, 32) and float(blobs.min()) >= 0 and float(blobs.max()) <= 1
    assert 0.2 < float(blobs.mean()) < 0.4  # volume_fraction 0.3, kept by the smoothing
    sharp = smoothed_binary_blobs(32, torch.Generator().manual_seed(1), smoothing=0.0)
    assert set(torch.unique(sharp).tolist()) == {0.0, 1.0}
    assert blobs.diff(dim=0).abs().max() < 0.5 * sharp.diff(dim=0).abs().max()


@pytest.mark.parametrize("kind", ["phantom", "blobs"])
def test_held_out_volumes_are_fixed_and_never_training_volumes(kind):
    held_out = held_out_volumes(kind, 3, 16)
    assert held_out.shape == (3, 16, 16, 16)
    assert torch.equal(held_out, held_out_volumes(kind, 3, 16))
    torch.testing.assert_close(held_out[1], make_volume(kind, HELD_OUT_SEED_START + 1, 16), rtol=0, atol=0)
    training = torch.stack([training_volume(kind, i, 16) for i in range(6)])
    assert (held_out[:, None] - training[None]).abs().flatten(2).amax(dim=2).min() > 0.1
    with pytest.raises(ValueError, match="index"):
        training_volume(kind, HELD_OUT_SEED_START, 16)


def test_slice_dataset_serves_every_slice_of_its_volumes():
    dataset = VolumeSliceDataset(("phantom", "blobs"), num_volumes=2, size=8, axes=(0, 2))
    assert len(dataset) == 2 * 2 * 2 * 8
    # Item order: kind, volume, axis, position.
    blobs_volume_1 = training_volume("blobs", 1, 8)
    index = ((1 * 2 + 1) * 2 + 1) * 8 + 3
    torch.testing.assert_close(dataset[index], 2 * blobs_volume_1[:, :, 3][None] - 1, rtol=0, atol=0)
    items = torch.stack([dataset[i] for i in range(len(dataset))])
    assert items.shape == (64, 1, 8, 8) and items.dtype == torch.float32
    assert float(items.min()) >= -1 and float(items.max()) <= 1
    assert torch.equal(items[5], VolumeSliceDataset(("phantom", "blobs"), 2, 8, axes=(0, 2))[5])
    batch = next(iter(DataLoader(dataset, batch_size=4, shuffle=True,
                                 generator=torch.Generator().manual_seed(0))))
    assert batch.shape == (4, 1, 8, 8)


@pytest.mark.parametrize("call, match", [
    (lambda: make_volume("cube", 0, 8), "kind"),
    (lambda: make_volume("phantom", -1, 8), "seed"),
    (lambda: random_ellipsoid_phantom(1, torch.Generator()), "size"),
    (lambda: held_out_volumes("blobs", 0, 8), "count"),
    (lambda: smoothed_binary_blobs(8, torch.Generator(), volume_fraction=1.5), "volume_fraction"),
    (lambda: VolumeSliceDataset(("phantom", "phantom"), 1, 8), "kinds"),
    (lambda: VolumeSliceDataset("phantom", 0, 8), "num_volumes"),
    (lambda: VolumeSliceDataset("phantom", 1, 8, axes=(3,)), "axes"),
])
def test_bad_arguments_raise_one_clear_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_out_of_range_items_raise_index_error():
    dataset = VolumeSliceDataset("blobs", 1, 8, axes=(0,))
    with pytest.raises(IndexError):
        dataset[8]
