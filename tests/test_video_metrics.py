"""Video metrics of moving-shape clips (diffusers_ext.testing.video_metrics): exact values on hand-made clips, the
closed-form Fréchet distance, and each metric separating held-out real clips from the corruption it is meant to
catch (noise and blur for frame quality; shuffled frames and frames from different clips for temporal consistency),
with margin, on two held-out seeds."""

import pytest
import torch

from diffusers_ext.testing.video_metrics import (
    FRAME_FEATURES,
    VideoMetrics,
    area_change,
    centroid_acceleration,
    centroid_speed,
    clean_pixel_fraction,
    colour_change,
    frame_features,
    frechet_distance,
    frechet_distance_from_moments,
    independent_frames,
    shuffled_frames,
)
from diffusers_ext.training.fvdm import BouncingShapes


def bouncing_clips(count: int, seed: int) -> torch.Tensor:
    clips = BouncingShapes(count, num_frames=8, size=16, seed=seed)
    return torch.stack([clips[i] for i in range(count)])


def sliding_square_clip(frames: int = 6) -> torch.Tensor:
    """One 3 x 3 square moving right one pixel a frame and a 2 x 2 square at rest, apart, on black."""
    clip = torch.full((1, 3, frames, 16, 16), -1.0)
    for f in range(frames):
        clip[0, :, f, 2:5, 1 + f:4 + f] = torch.tensor([0.8, -0.2, 0.1])[:, None, None]
        clip[0, :, f, 10:12, 10:12] = 0.5
    return clip


def test_a_square_at_constant_velocity_has_no_acceleration_and_keeps_its_area_colour_and_blobs():
    clip = sliding_square_clip()
    features = frame_features(clip)
    assert features.shape == (1, 6, len(FRAME_FEATURES))
    assert features[..., FRAME_FEATURES.index("area")].tolist() == [[13 / 256] * 6]
    assert features[..., FRAME_FEATURES.index("blobs")].tolist() == [[2.0] * 6]
    assert centroid_acceleration(features, frame_size=16).item() == pytest.approx(0.0, abs=1e-12)
    assert area_change(features).item() == 0.0 and colour_change(features).item() == pytest.approx(0.0, abs=1e-12)
    assert clean_pixel_fraction(clip).eq(1.0).all()
    # The centroid moves 9 / 13 pixel a frame (the moving square holds 9 of the 13 foreground pixels).
    centroid_column = features[0, :, FRAME_FEATURES.index("centroid_column")] * 16
    assert centroid_column.diff().tolist() == pytest.approx([9 / 13] * 5)
    assert centroid_speed(features, frame_size=16).item() == pytest.approx(9 / 13)


def test_a_grey_smear_is_not_clean_and_a_vanishing_shape_changes_area_and_colour():
    clip = sliding_square_clip()
    clip[0, :, 1, 0, :] = -0.8  # a row of grey between the background and every shape colour
    assert clean_pixel_fraction(clip)[0].tolist() == pytest.approx([1.0, 15 / 16, 1.0, 1.0, 1.0, 1.0])
    clip = sliding_square_clip()
    clip[0, :, 3] = -1.0  # every shape gone from frame 3
    features = frame_features(clip)
    assert area_change(features).item() == pytest.approx(2 * 13 / 256 / 5 / (13 / 256 * 5 / 6))
    assert colour_change(features).item() > 0.5


def test_frechet_distance_of_commuting_covariances_is_the_closed_form():
    """For diagonal covariances, ``|m_1 - m_2|^2 + sum (sqrt(s_1) - sqrt(s_2))^2``."""
    mean, reference_mean = torch.tensor([0.0, 1.0, -2.0], dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
    variances = torch.tensor([1.0, 4.0, 0.25], dtype=torch.float64)
    reference_variances = torch.tensor([4.0, 4.0, 1.0], dtype=torch.float64)
    expected = 5.0 + float(((variances.sqrt() - reference_variances.sqrt()) ** 2).sum())
    rotation, _ = torch.linalg.qr(torch.randn(3, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    rotated = [rotation @ torch.diag(v) @ rotation.T for v in (variances, reference_variances)]
    assert frechet_distance_from_moments(rotation @ mean, rotated[0], rotation @ reference_mean,
                                         rotated[1]) == pytest.approx(expected, rel=1e-10)
    samples = torch.randn(4000, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert frechet_distance(samples, samples) == pytest.approx(0.0, abs=1e-9)
    assert frechet_distance(samples + 1.0, samples) == pytest.approx(3.0, rel=1e-9)


@pytest.fixture(scope="module")
def metrics():
    return VideoMetrics(bouncing_clips(128, seed=100))


@pytest.mark.parametrize("held_out_seed", [1, 2])
def test_each_metric_separates_real_clips_from_its_corruption(metrics, held_out_seed):
    real = bouncing_clips(64, held_out_seed)
    generator = torch.Generator().manual_seed(held_out_seed)
    corrupted = {
        "shuffled": shuffled_frames(real, generator),
        "independent": independent_frames(real, generator),
        "noise": (real + 0.1 * torch.randn(real.shape, generator=generator)).clamp(-1, 1),
        "blur": torch.nn.functional.avg_pool3d(real, (1, 3, 3), stride=1, padding=(0, 1, 1), count_include_pad=False),
    }
    scores = {name: metrics(clips) for name, clips in {"real": real, **corrupted}.items()}
    for name, values in scores.items():
        print(f"\nseed {held_out_seed} {name:12s}", {metric: round(value, 4) for metric, value in values.items()})
    real_scores = scores["real"]
    assert real_scores["clean_fraction"] == 1.0
    # Frame quality: noise and blur, not the order or origin of frames (the same frames, so the same figures).
    for name in ("noise", "blur"):
        assert scores[name]["clean_fraction"] < 0.95
        assert scores[name]["frame_fd"] > 10 * real_scores["frame_fd"]
        assert scores[name]["clip_fd"] > 10 * real_scores["clip_fd"]
    for name in ("shuffled", "independent"):
        assert scores[name]["clean_fraction"] == 1.0
        assert scores[name]["frame_fd"] == pytest.approx(real_scores["frame_fd"], rel=1e-6, abs=1e-9)
    # Motion: shuffled frames and frames of other clips jump about.
    for name in ("shuffled", "independent"):
        assert scores[name]["centroid_acceleration"] > 3 * real_scores["centroid_acceleration"]
        assert scores[name]["clip_fd"] > 20 * real_scores["clip_fd"]
    # Persistence: frames of other clips change their objects' area and colour; shuffling one clip does not.
    assert scores["independent"]["area_change"] > 3 * real_scores["area_change"]
    assert scores["independent"]["colour_change"] > 10 * real_scores["colour_change"]


def test_bootstrap_standard_errors_match_the_spread_of_a_mean(metrics):
    clips = bouncing_clips(64, seed=3)
    features = frame_features(clips)
    errors = metrics.standard_errors(clips, resamples=400)
    for key, per_clip in (("centroid_acceleration", centroid_acceleration(features, 16)),
                          ("centroid_speed", centroid_speed(features, 16)), ("area_change", area_change(features))):
        assert errors[key] == pytest.approx(float(per_clip.std() / len(clips) ** 0.5), rel=0.2), key
    assert errors["clean_fraction"] == 0.0 and errors["frame_fd"] > 0 and errors["clip_fd"] > 0


def test_bad_clips_raise_value_errors():
    with pytest.raises(ValueError, match=r"\(B, 3, F, H, W\)"):
        frame_features(torch.zeros(2, 3, 8, 16))
    with pytest.raises(ValueError, match=r"reference_clips must be RGB clips .* at least 3 frames"):
        VideoMetrics(torch.zeros(2, 3, 2, 16, 16))
    with pytest.raises(ValueError, match="reference clips' frame count and size"):
        VideoMetrics(torch.zeros(2, 3, 4, 16, 16))(torch.zeros(2, 3, 8, 16, 16))
    with pytest.raises(ValueError, match="at least 2 vectors"):
        frechet_distance(torch.zeros(1, 3), torch.zeros(5, 3))
