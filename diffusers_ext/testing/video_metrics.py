r"""Frame quality and temporal consistency of clips of moving shapes on a black background (``BouncingShapes``,
``diffusers_ext.training.fvdm``), measured from the pixels: cheap figures that need no pretrained network.

Clips are ``(B, C, F, H, W)`` in ``[-1, 1]``; the background is ``-1`` in every channel and every shape colour has
each channel in ``[-0.5, 1]``. A pixel is *foreground* when its brightest channel exceeds ``-0.75``, halfway between
the two. From each frame's foreground (``frame_features``):

- **per-frame quality**: ``clean_pixel_fraction``, the share of pixels that are background (every channel within
  ``tolerance`` of ``-1``) or a shape colour (every channel above ``-0.5 - tolerance``), 1 on real frames; and the
  Fréchet distance of per-frame features (area, colours, centroid, spread, blob count, clean fraction) to real frames'.
- **object persistence**: how much the foreground's area (relative to its mean) and mean colour change from one frame
  to the next; 0 for shapes that neither fade, appear nor change colour (real clips: only occlusions change them).
- **motion smoothness**: the foreground centroid's mean second difference in pixels, ``|c_{f+1} - 2 c_f + c_{f-1}|``,
  near 0 for shapes at constant velocity except at bounces and occlusions (and for still clips: its mean speed
  ``|c_{f+1} - c_f|`` says how much a clip moves).
- **clip Fréchet distance**: the Fréchet distance of per-clip features (the frame features' means and spreads over
  the clip, their frame-to-frame changes, the centroid's speed and second difference in pixels and the mean absolute
  pixel change) to real clips'.

The Fréchet distance is FID's: ``|mu_1 - mu_2|^2 + tr(S_1 + S_2 - 2 (S_1^{1/2} S_2 S_1^{1/2})^{1/2})`` between the
Gaussians with the two feature sets' means and covariances. The features are in their natural units (fractions of
the frame, colour values, frame units), not standardised: a real set's feature can be constant (the background's
deviation from black is exactly 0), and dividing by its spread would make any deviation from it infinite. A finite
sample's distance to another sample of the same law is not 0: compare with two real sets (``VideoMetrics`` of real
clips against the reference) as the floor.
"""

from __future__ import annotations

import torch
from scipy import ndimage

BACKGROUND = -1.0
DARKEST_SHAPE_CHANNEL = -0.5
FOREGROUND_THRESHOLD = (BACKGROUND + DARKEST_SHAPE_CHANNEL) / 2
CLEAN_TOLERANCE = 0.15

FRAME_FEATURES = ("area", "colour_r", "colour_g", "colour_b", "colour_spread_r", "colour_spread_g",
                  "colour_spread_b", "background_deviation", "centroid_row", "centroid_column", "spread_row",
                  "spread_column", "blobs", "clean_fraction")


def check_clips(clips: torch.Tensor, name: str = "clips") -> torch.Tensor:
    """``clips`` as float64 on the CPU after checking it is ``(B, 3, F, H, W)`` with ``F >= 3`` (a second difference
    needs three frames)."""
    if not torch.is_tensor(clips) or clips.ndim != 5 or clips.shape[1] != 3 or clips.shape[2] < 3:
        shape = tuple(clips.shape) if torch.is_tensor(clips) else type(clips).__name__
        raise ValueError(f"{name} must be RGB clips of shape (B, 3, F, H, W) with at least 3 frames, got {shape}")
    return clips.detach().to("cpu", torch.float64)


def foreground_mask(clips: torch.Tensor) -> torch.Tensor:
    """``(B, F, H, W)`` bool: pixels whose brightest channel exceeds ``FOREGROUND_THRESHOLD``."""
    return clips.amax(dim=1) > FOREGROUND_THRESHOLD


def clean_pixel_fraction(clips: torch.Tensor, tolerance: float = CLEAN_TOLERANCE) -> torch.Tensor:
    """``(B, F)``: the share of each frame's pixels that are background (every channel within ``tolerance`` of
    ``-1``) or a shape colour (every channel above ``-0.5 - tolerance``); smears, blur and noise are neither."""
    clips = check_clips(clips)
    background = (clips < BACKGROUND + tolerance).all(dim=1)
    shape = (clips > DARKEST_SHAPE_CHANNEL - tolerance).all(dim=1)
    return (background | shape).double().mean(dim=(-2, -1))


def blob_counts(mask: torch.Tensor) -> torch.Tensor:
    """``mask.shape[:-2]``: the 4-connected foreground components of each frame."""
    flat = mask.reshape(-1, *mask.shape[-2:]).numpy()
    counts = [ndimage.label(frame)[1] for frame in flat]
    return torch.tensor(counts, dtype=torch.float64).reshape(mask.shape[:-2])


def _masked_mean_and_std(values: torch.Tensor, weights: torch.Tensor, empty: float) -> tuple[torch.Tensor, ...]:
    """Mean and standard deviation of ``values`` over the last two axes weighted by the 0/1 ``weights``; ``empty``
    and 0 where no weight is set."""
    count = weights.sum(dim=(-2, -1))
    safe = count.clamp(min=1)
    mean = (values * weights).sum(dim=(-2, -1)) / safe
    variance = (((values - mean[..., None, None]) ** 2) * weights).sum(dim=(-2, -1)) / safe
    has = count > 0
    return torch.where(has, mean, torch.full_like(mean, empty)), torch.where(has, variance.sqrt(), 0.0)


def frame_features(clips: torch.Tensor) -> torch.Tensor:
    """``(B, F, len(FRAME_FEATURES))`` float64: per frame the foreground's area (share of the frame), mean colour and
    colour spread per channel (background colour and 0 without foreground), the background's mean deviation from
    black (brightest channel), the foreground centroid and spread (row, column) in frame units (the frame's centre
    and 0 without foreground), its number of 4-connected blobs, and ``clean_pixel_fraction``."""
    clips = check_clips(clips)
    mask = foreground_mask(clips)
    weights = mask.double()
    colour, colour_spread = (torch.stack(values, dim=-1) for values in zip(
        *(_masked_mean_and_std(clips[:, c], weights, BACKGROUND) for c in range(3)), strict=True))
    background_deviation, _ = _masked_mean_and_std(clips.amax(dim=1) - BACKGROUND, 1 - weights, 0.0)
    height, width = clips.shape[-2:]
    rows = ((torch.arange(height, dtype=torch.float64) + 0.5) / height)[:, None].expand(height, width)
    columns = ((torch.arange(width, dtype=torch.float64) + 0.5) / width)[None, :].expand(height, width)
    centroid, spread = (torch.stack(values, dim=-1) for values in zip(
        *(_masked_mean_and_std(grid, weights, 0.5) for grid in (rows, columns)), strict=True))
    return torch.cat([weights.mean(dim=(-2, -1))[..., None], colour, colour_spread, background_deviation[..., None],
                      centroid, spread, blob_counts(mask)[..., None], clean_pixel_fraction(clips)[..., None]], dim=-1)


def _feature(features: torch.Tensor, *names: str) -> torch.Tensor:
    return features[..., [FRAME_FEATURES.index(name) for name in names]]


def area_change(features: torch.Tensor) -> torch.Tensor:
    """``(B,)``: the mean absolute frame-to-frame change of the foreground area over the clip's mean area (0 for a
    clip without foreground anywhere)."""
    area = _feature(features, "area")[..., 0]
    return area.diff(dim=1).abs().mean(dim=1) / area.mean(dim=1).clamp(min=1e-12)


def colour_change(features: torch.Tensor) -> torch.Tensor:
    """``(B,)``: the mean frame-to-frame distance (RGB, colour units) of the foreground's mean colour."""
    return _feature(features, "colour_r", "colour_g", "colour_b").diff(dim=1).norm(dim=-1).mean(dim=1)


def centroid_speed(features: torch.Tensor, frame_size: int) -> torch.Tensor:
    """``(B,)``: the foreground centroid's mean displacement between consecutive frames, in pixels of a
    ``frame_size`` frame: how much the clip moves (a still clip has no acceleration either)."""
    centroid = _feature(features, "centroid_row", "centroid_column") * frame_size
    return centroid.diff(dim=1).norm(dim=-1).mean(dim=1)


def centroid_acceleration(features: torch.Tensor, frame_size: int) -> torch.Tensor:
    """``(B,)``: the mean over interior frames of the foreground centroid's second difference, in pixels of a
    ``frame_size`` frame."""
    centroid = _feature(features, "centroid_row", "centroid_column") * frame_size
    return centroid.diff(n=2, dim=1).norm(dim=-1).mean(dim=1)


def clip_features(clips: torch.Tensor, features: torch.Tensor | None = None) -> torch.Tensor:
    """``(B, D)`` float64 per-clip features for the clip Fréchet distance: the frame features' means over the clip,
    the spread over the clip of the area, mean colour and blob count, the mean absolute frame-to-frame change of every
    frame feature, the centroid's mean speed and second difference in pixels (``centroid_speed``,
    ``centroid_acceleration``: on the frame units of the other features, jerky motion would weigh almost nothing next
    to colour) and the mean absolute pixel change between consecutive frames. ``features``: the clips'
    ``frame_features`` when already computed."""
    clips = check_clips(clips)
    features = frame_features(clips) if features is None else features
    steadiness = _feature(features, "area", "colour_r", "colour_g", "colour_b", "blobs").std(dim=1)
    changes = features.diff(dim=1).abs().mean(dim=1)
    motion = torch.stack([centroid_speed(features, clips.shape[-1]), centroid_acceleration(features, clips.shape[-1])],
                         dim=1)
    pixel_change = clips.diff(dim=2).abs().mean(dim=(1, 2, 3, 4))[:, None]
    return torch.cat([features.mean(dim=1), steadiness, changes, motion, pixel_change], dim=1)


def frechet_distance_from_moments(mean: torch.Tensor, covariance: torch.Tensor, reference_mean: torch.Tensor,
                                  reference_covariance: torch.Tensor) -> float:
    """``|m_1 - m_2|^2 + tr(S_1 + S_2 - 2 (S_1^{1/2} S_2 S_1^{1/2})^{1/2})``, the squared 2-Wasserstein distance
    between two Gaussians, through symmetric eigendecompositions (no non-symmetric matrix square root)."""
    eigenvalues, eigenvectors = torch.linalg.eigh(covariance)
    root = eigenvectors @ torch.diag(eigenvalues.clamp(min=0).sqrt()) @ eigenvectors.T
    cross = torch.linalg.eigvalsh(root @ reference_covariance @ root).clamp(min=0).sqrt().sum()
    distance = (mean - reference_mean).square().sum() + covariance.trace() + reference_covariance.trace() - 2 * cross
    return float(distance.clamp(min=0))


def frechet_distance(features: torch.Tensor, reference_features: torch.Tensor) -> float:
    """The Fréchet distance between two sets of feature vectors ``(N, D)`` (each set's mean and covariance)."""
    features, reference_features = (f.reshape(-1, f.shape[-1]).to(torch.float64) for f in (features,
                                                                                          reference_features))
    if features.shape[1] != reference_features.shape[1] or min(len(features), len(reference_features)) < 2:
        raise ValueError(f"the Fréchet distance needs two sets of at least 2 vectors of one dimension, got "
                         f"{tuple(features.shape)} and {tuple(reference_features.shape)}")
    return frechet_distance_from_moments(features.mean(dim=0), features.T.cov(), reference_features.mean(dim=0),
                                         reference_features.T.cov())


class VideoMetrics:
    """The figures of the module docstring against a fixed set of real ``reference_clips`` (whose features are
    computed once). ``VideoMetrics(reference_clips)(clips)``, for clips of the same frame count and size, gives
    ``clean_fraction`` (higher is better; 1 on real frames), ``frame_fd`` and ``clip_fd`` (lower is better),
    ``area_change``, ``colour_change`` and ``centroid_acceleration`` (pixels; lower is better, but a still clip scores
    low too) and ``centroid_speed`` (pixels a frame; compare with real clips'), each but the distances the mean over
    the clips; ``standard_errors(clips)`` their spread over bootstrap resamples of the clips."""

    def __init__(self, reference_clips: torch.Tensor):
        reference_clips = check_clips(reference_clips, "reference_clips")
        self.clip_shape = tuple(reference_clips.shape[2:])
        self.frame_features = frame_features(reference_clips)
        self.clip_features = clip_features(reference_clips, self.frame_features)

    def _features(self, clips: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        clips = check_clips(clips)
        if tuple(clips.shape[2:]) != self.clip_shape:
            raise ValueError(f"clips {tuple(clips.shape)} must have the reference clips' frame count and size "
                             f"{self.clip_shape}")
        features = frame_features(clips)
        return features, clip_features(clips, features)

    def _figures(self, features: torch.Tensor, per_clip_features: torch.Tensor) -> dict[str, float]:
        frame_size = self.clip_shape[-1]
        return {
            "clean_fraction": float(_feature(features, "clean_fraction").mean()),
            "frame_fd": frechet_distance(features, self.frame_features),
            "area_change": float(area_change(features).mean()),
            "colour_change": float(colour_change(features).mean()),
            "centroid_speed": float(centroid_speed(features, frame_size).mean()),
            "centroid_acceleration": float(centroid_acceleration(features, frame_size).mean()),
            "clip_fd": frechet_distance(per_clip_features, self.clip_features),
        }

    def __call__(self, clips: torch.Tensor) -> dict[str, float]:
        return self._figures(*self._features(clips))

    def standard_errors(self, clips: torch.Tensor, resamples: int = 100, seed: int = 0) -> dict[str, float]:
        """Each figure's standard deviation over ``resamples`` bootstrap resamples of ``clips`` (drawn with
        replacement, the reference fixed): how much the figure owes to which clips were sampled."""
        features, per_clip_features = self._features(clips)
        generator = torch.Generator().manual_seed(seed)
        draws = [self._figures(features[picks], per_clip_features[picks]) for picks in
                 torch.randint(len(features), (resamples, len(features)), generator=generator)]
        return {key: float(torch.tensor([draw[key] for draw in draws], dtype=torch.float64).std()) for key in draws[0]}


def shuffled_frames(clips: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Each clip's frames in a random order of their own: the same frames, the motion destroyed."""
    order = torch.stack([torch.randperm(clips.shape[2], generator=generator) for _ in range(clips.shape[0])])
    return clips.gather(2, order[:, None, :, None, None].expand_as(clips).to(clips.device))


def independent_frames(clips: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Frame ``f`` of clip ``b`` taken from clip ``pi_f(b)`` for an independent random permutation ``pi_f`` per frame
    index: every frame as good as before, no temporal link between a clip's frames."""
    sources = torch.stack([torch.randperm(clips.shape[0], generator=generator) for _ in range(clips.shape[2])])
    return torch.stack([clips[sources[f], :, f] for f in range(clips.shape[2])], dim=2)

