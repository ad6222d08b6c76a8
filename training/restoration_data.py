"""Data for paired image restoration: synthetic degradations, the colour photos scikit-image ships, random patches,
data sets of ``{"clean": x0, "degraded": y}`` pairs, and the PSNR / SSIM metrics.

Images follow diffusers' convention: float tensors ``(C, H, W)`` (batched ``(B, C, H, W)``) with values in [-1, 1].
Every random choice is drawn from an explicit ``torch.Generator``; a data set's item is a deterministic function of
its index, which the trainer's exact resume relies on.
"""

from __future__ import annotations

import inspect
import io
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from ..pipelines.restoration.pipeline_restoration import upscale_bicubic

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")

DegradationFunction = Callable[[Tensor, "torch.Generator | None"], Tensor]


# --------------------------------------------------------------------------------------------------------------------
# Conversions and checks
# --------------------------------------------------------------------------------------------------------------------


def uint8_to_tensor(array: np.ndarray) -> Tensor:
    """An ``(H, W, 3)`` uint8 array as a float32 ``(3, H, W)`` tensor in [-1, 1]."""
    # A copy: Pillow's and scikit-image's arrays may be read-only, which torch warns about.
    return torch.from_numpy(np.array(array, dtype=np.uint8)).permute(2, 0, 1).float().div(127.5).sub(1.0)


def tensor_to_uint8(image: Tensor) -> np.ndarray:
    """A ``(3, H, W)`` tensor in [-1, 1] as an ``(H, W, 3)`` uint8 array (clipped and rounded)."""
    return image.detach().float().cpu().add(1.0).mul(127.5).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()


def _require_batch(images: Tensor, what: str) -> None:
    if not isinstance(images, Tensor) or images.ndim != 4:
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"{what} expects a batch of images (B, C, H, W), got {shape}")


def _require_number(name: str, value: Any, low: float, high: float, *, include_low: bool = False) -> None:
    """``low < value <= high`` (or ``low <= value`` with ``include_low``), for a real, non-boolean number."""
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    above_low = is_number and (value >= low if include_low else value > low)
    if not (is_number and above_low and value <= high):
        interval = f"{'[' if include_low else '('}{low}, {high}]"
        raise ValueError(f"{name} must be a number in {interval}, got {value!r}")


def _require_integer(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _standard_normal(shape: Sequence[int], like: Tensor, generator: torch.Generator | None) -> Tensor:
    # Drawn on the generator's device (a CPU generator cannot fill a CUDA tensor), then moved to the images'.
    device = generator.device if generator is not None else like.device
    return torch.randn(tuple(shape), generator=generator, device=device, dtype=like.dtype).to(like.device)


def _uniform(shape: Sequence[int], like: Tensor, generator: torch.Generator | None) -> Tensor:
    device = generator.device if generator is not None else like.device
    return torch.rand(tuple(shape), generator=generator, device=device, dtype=like.dtype).to(like.device)


# --------------------------------------------------------------------------------------------------------------------
# Degradations: pure functions (clean (B, C, H, W) in [-1, 1], generator) -> degraded
# --------------------------------------------------------------------------------------------------------------------


def _check_gaussian_noise(std: float = 0.1, clip: bool = False) -> None:
    _require_number("std", std, 0.0, 1.0)
    if not isinstance(clip, bool):
        raise ValueError(f"clip must be True or False, got {clip!r}")


def gaussian_noise(clean: Tensor, generator: torch.Generator | None = None, *, std: float = 0.1,
                   clip: bool = False) -> Tensor:
    """Additive white Gaussian noise. ``std`` is on the [0, 1] intensity scale, so ``std=25/255`` is the usual
    "sigma 25" denoising benchmark; on the [-1, 1] scale the noise's standard deviation is ``2 * std``.
    Not clipped by default: the benchmark's noise is exactly Gaussian, so values may leave [-1, 1] slightly."""
    _require_batch(clean, "gaussian_noise")
    _check_gaussian_noise(std, clip)
    noisy = clean + 2.0 * std * _standard_normal(clean.shape, clean, generator)
    return noisy.clamp(-1, 1) if clip else noisy


def _gaussian_kernel_1d(sigma: float, radius: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    return (kernel / kernel.sum()).to(dtype=dtype, device=device)


def _check_gaussian_blur(sigma: float = 1.5) -> None:
    _require_number("sigma", sigma, 0.0, 50.0)


def gaussian_blur(clean: Tensor, generator: torch.Generator | None = None, *, sigma: float = 1.5) -> Tensor:
    """Isotropic Gaussian blur with standard deviation ``sigma`` pixels: a separable kernel of radius
    ``ceil(3 * sigma)``, reflect padding (so the borders are not darkened). Deterministic; ``generator`` is unused."""
    _require_batch(clean, "gaussian_blur")
    _check_gaussian_blur(sigma)
    radius = max(1, math.ceil(3 * sigma))
    batch, channels, height, width = clean.shape
    if min(height, width) <= radius:
        raise ValueError(f"gaussian_blur(sigma={sigma}) needs images larger than {radius} pixels on each side (its "
                         f"reflect padding), got {height}x{width}")
    kernel = _gaussian_kernel_1d(sigma, radius, clean.dtype, clean.device)
    # Every channel is blurred on its own: fold channels into the batch and run one single-channel convolution.
    planes = clean.reshape(batch * channels, 1, height, width)
    planes = F.conv2d(F.pad(planes, (radius, radius, 0, 0), mode="reflect"), kernel.view(1, 1, 1, -1))
    planes = F.conv2d(F.pad(planes, (0, 0, radius, radius), mode="reflect"), kernel.view(1, 1, -1, 1))
    return planes.reshape(batch, channels, height, width)


def _check_downscale(factor: int = 4) -> None:
    _require_integer("factor", factor, 2)


def downscale(clean: Tensor, generator: torch.Generator | None = None, *, factor: int = 4) -> Tensor:
    """The low-resolution image for super-resolution: antialiased bicubic downsampling by an integer ``factor``,
    ``(B, C, H / factor, W / factor)``, clipped to [-1, 1] (bicubic overshoots at edges; a real low-resolution image
    is in range). Deterministic; ``generator`` is unused. ``upscale_bicubic`` brings it back to the target size."""
    _require_batch(clean, "downscale")
    _check_downscale(factor)
    height, width = clean.shape[-2:]
    if height % factor or width % factor:
        raise ValueError(f"downscale(factor={factor}) needs a height and width divisible by {factor}, got "
                         f"{height}x{width}")
    lowres = F.interpolate(clean, size=(height // factor, width // factor), mode="bicubic", align_corners=False,
                           antialias=True)
    return lowres.clamp(-1, 1)


def _check_jpeg(quality: int = 20) -> None:
    _require_integer("quality", quality, 1)
    if quality > 100:
        raise ValueError(f"quality must be an integer in [1, 100], got {quality!r}")


def jpeg(clean: Tensor, generator: torch.Generator | None = None, *, quality: int = 20) -> Tensor:
    """JPEG compression artefacts: each image is quantized to 8 bits, encoded by Pillow at ``quality`` (1 worst,
    100 best; Pillow's default 4:2:0 chroma subsampling) and decoded. Needs 3 channels. Deterministic; ``generator``
    is unused."""
    _require_batch(clean, "jpeg")
    _check_jpeg(quality)
    if clean.shape[1] != 3:
        raise ValueError(f"jpeg expects RGB images (3 channels), got {clean.shape[1]}")
    decoded = []
    for image in clean:
        buffer = io.BytesIO()
        PIL.Image.fromarray(tensor_to_uint8(image)).save(buffer, format="JPEG", quality=quality)
        buffer.seek(0)
        with PIL.Image.open(buffer) as compressed:
            decoded.append(uint8_to_tensor(np.asarray(compressed.convert("RGB"))))
    return torch.stack(decoded).to(device=clean.device, dtype=clean.dtype)


def _check_synthetic_rain(density: float = 0.004, length: int = 15, angle: float = 15.0,
                          intensity: float = 0.5) -> None:
    _require_number("density", density, 0.0, 1.0)
    _require_integer("length", length, 1)
    _require_number("angle", angle, -90.0, 90.0, include_low=True)
    _require_number("intensity", intensity, 0.0, 1.0)


def rain_streak_kernel(length: int, angle: float) -> Tensor:
    """A ``(k, k)`` kernel holding one antialiased straight line of ``length`` pixels through its centre, tilted
    ``angle`` degrees from vertical (positive: the lower end to the right, like ``\\``); values in [0, 1]."""
    size = length if length % 2 else length + 1
    centre = (size - 1) / 2
    radians = math.radians(angle)
    direction = torch.tensor([math.cos(radians), math.sin(radians)], dtype=torch.float64)  # (row, column)
    rows, columns = torch.meshgrid(torch.arange(size, dtype=torch.float64) - centre,
                                   torch.arange(size, dtype=torch.float64) - centre, indexing="ij")
    points = torch.stack([rows, columns], dim=-1)
    # Distance from each pixel centre to the segment; a pixel's value falls linearly to 0 one pixel away (antialiasing).
    along = (points @ direction).clamp(-(length - 1) / 2, (length - 1) / 2)
    distance = (points - along[..., None] * direction).norm(dim=-1)
    return (1.0 - distance).clamp(min=0.0).float()


def synthetic_rain(clean: Tensor, generator: torch.Generator | None = None, *, density: float = 0.004,
                   length: int = 15, angle: float = 15.0, intensity: float = 0.5) -> Tensor:
    """Rain streaks: a sparse random seed map (each pixel a streak's centre with probability ``density``, with a
    random brightness in [0.5, 1]) convolved with a line kernel (``rain_streak_kernel(length, angle)``), scaled by
    ``intensity`` (on the [0, 1] scale), added to every channel alike (rain is grey-white) and clipped at white:
    only brightens."""
    _require_batch(clean, "synthetic_rain")
    _check_synthetic_rain(density, length, angle, intensity)
    batch, _, height, width = clean.shape
    is_seed = _uniform((batch, 1, height, width), clean, generator) < density
    brightness = 0.5 + 0.5 * _uniform((batch, 1, height, width), clean, generator)
    kernel = rain_streak_kernel(length, angle).to(device=clean.device, dtype=clean.dtype)
    streaks = F.conv2d(is_seed * brightness, kernel[None, None], padding=kernel.shape[-1] // 2)
    # Overlapping streaks saturate rather than add up without bound; 2 * intensity converts to the [-1, 1] scale.
    return (clean + 2.0 * intensity * streaks.clamp(max=1.0)).clamp(max=1.0)


DEGRADATIONS: dict[str, DegradationFunction] = {
    "gaussian_noise": gaussian_noise,
    "gaussian_blur": gaussian_blur,
    "downscale": downscale,
    "jpeg": jpeg,
    "synthetic_rain": synthetic_rain,
}

_PARAMETER_CHECKS: dict[str, Callable[..., None]] = {
    "gaussian_noise": _check_gaussian_noise,
    "gaussian_blur": _check_gaussian_blur,
    "downscale": _check_downscale,
    "jpeg": _check_jpeg,
    "synthetic_rain": _check_synthetic_rain,
}


def degradation_parameters(name: str) -> dict[str, Any]:
    """The parameters a registered degradation takes, with their defaults."""
    if name not in DEGRADATIONS:
        raise ValueError(f"unknown degradation {name!r}; known: {sorted(DEGRADATIONS)}")
    signature = inspect.signature(DEGRADATIONS[name])
    return {p.name: p.default for p in signature.parameters.values() if p.kind is inspect.Parameter.KEYWORD_ONLY}


@dataclass(frozen=True)
class Degradation:
    """A registered degradation with its parameters bound: ``degradation(clean, generator) -> degraded``.
    A plain, picklable value (name and parameters), so data-loader worker processes can carry it; build it with
    ``make_degradation``."""

    name: str
    params: dict[str, Any] = field(default_factory=dict)

    def __call__(self, clean: Tensor, generator: torch.Generator | None = None) -> Tensor:
        return DEGRADATIONS[self.name](clean, generator, **self.params)

    @property
    def downscale_factor(self) -> int:
        """How much smaller the degraded image is than the clean one (1 unless this is ``downscale``)."""
        if self.name != "downscale":
            return 1
        return self.params.get("factor", degradation_parameters("downscale")["factor"])


def make_degradation(name: str, **params: Any) -> Degradation:
    """The registered degradation ``name`` (see ``DEGRADATIONS``) with ``params`` checked now, not at the first
    batch: an unknown name or parameter, or a value out of range, raises a ``ValueError`` that says which."""
    accepted = degradation_parameters(name)
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise ValueError(f"degradation {name!r} has no parameter(s) {unknown}; it takes {sorted(accepted)}")
    _PARAMETER_CHECKS[name](**params)
    return Degradation(name, dict(params))


def _as_degradation(degradation: str | DegradationFunction) -> DegradationFunction:
    if isinstance(degradation, str):
        return make_degradation(degradation)
    if not callable(degradation):
        raise ValueError(f"degradation must be a registered name {sorted(DEGRADATIONS)} or a callable "
                         f"(clean, generator) -> degraded, got {degradation!r}")
    return degradation


# --------------------------------------------------------------------------------------------------------------------
# The built-in photos
# --------------------------------------------------------------------------------------------------------------------


def _skimage_photo(name: str) -> np.ndarray:
    import skimage.data

    if name == "motorcycle":
        return skimage.data.stereo_motorcycle()[0]  # the left view; the right one is a near-duplicate
    return getattr(skimage.data, name)()


# Colour photos that ship inside scikit-image's wheel (no download). ``skimage.data.cat`` is ``chelsea`` under another
# name, so it is left out: it would put a held-out photo into training.
SCIKIT_IMAGE_PHOTOS: dict[str, tuple[str, ...]] = {
    "train": ("astronaut", "rocket", "motorcycle", "immunohistochemistry", "hubble_deep_field", "retina"),
    "held_out": ("chelsea", "coffee"),
}


def scikit_image_photos(split: str = "train") -> list[Tensor]:
    """The colour photos scikit-image ships (offline), as float ``(3, H, W)`` tensors in [-1, 1], in the order of
    ``SCIKIT_IMAGE_PHOTOS[split]``. The split is fixed: the ``"held_out"`` photos (chelsea, coffee) are never part
    of ``"train"``, so evaluating on them measures generalisation to unseen images."""
    if split not in SCIKIT_IMAGE_PHOTOS:
        raise ValueError(f"split must be one of {sorted(SCIKIT_IMAGE_PHOTOS)}, got {split!r}")
    return [uint8_to_tensor(_skimage_photo(name)) for name in SCIKIT_IMAGE_PHOTOS[split]]


# --------------------------------------------------------------------------------------------------------------------
# Patches
# --------------------------------------------------------------------------------------------------------------------


def dihedral_transform(image: Tensor, which: int) -> Tensor:
    """One of the 8 symmetries of the square on the last two axes: a rotation by ``which % 4`` quarter turns, then a
    horizontal flip when ``which >= 4``. ``which = 0`` is the identity."""
    rotated = torch.rot90(image, which % 4, dims=(-2, -1))
    return rotated.flip(-1) if which >= 4 else rotated


def _item_generator(seed: int, index: int) -> torch.Generator:
    # SeedSequence mixes (seed, index) into well-separated streams: no two pairs share a seed, unlike seed + index.
    state = np.random.SeedSequence([seed, index]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


def random_patches(images: Sequence[Tensor], patch_size: int, count: int, seed: int) -> Tensor:
    """``count`` random square crops of side ``patch_size``, ``(count, C, p, p)``: each from an image drawn uniformly
    (so a large photo does not dominate), at a uniform position, under a random flip / quarter-turn. A function of
    ``seed``."""
    _require_integer("patch_size", patch_size, 1)
    _require_integer("count", count, 1)
    _require_integer("seed", seed, 0)
    if isinstance(images, Tensor) and images.ndim == 3:
        images = [images]
    if len(images) == 0:
        raise ValueError("random_patches needs at least one image")
    for number, image in enumerate(images):
        if not isinstance(image, Tensor) or image.ndim != 3:
            shape = tuple(image.shape) if isinstance(image, Tensor) else type(image).__name__
            raise ValueError(f"image {number} must be a (C, H, W) tensor, got {shape}")
        if min(image.shape[-2:]) < patch_size:
            raise ValueError(f"image {number} is {image.shape[-2]}x{image.shape[-1]}, smaller than patch_size "
                             f"{patch_size}")
    if len({image.shape[0] for image in images}) > 1:
        raise ValueError(f"all images need the same number of channels, got {sorted({i.shape[0] for i in images})}")
    generator = torch.Generator().manual_seed(seed)
    sources = torch.randint(len(images), (count,), generator=generator).tolist()
    positions = torch.rand(count, 2, generator=generator, dtype=torch.float64)
    symmetries = torch.randint(8, (count,), generator=generator).tolist()
    patches = []
    for source, (row_fraction, column_fraction), symmetry in zip(sources, positions.tolist(), symmetries, strict=True):
        image = images[source]
        top = int(row_fraction * (image.shape[-2] - patch_size + 1))
        left = int(column_fraction * (image.shape[-1] - patch_size + 1))
        patches.append(dihedral_transform(image[:, top:top + patch_size, left:left + patch_size], symmetry))
    return torch.stack(patches).contiguous()


# --------------------------------------------------------------------------------------------------------------------
# Data sets
# --------------------------------------------------------------------------------------------------------------------


def _as_low_resolution(clean_size: tuple[int, int], degraded_size: tuple[int, int], name: str) -> int:
    """The integer factor by which a degraded image is smaller than its clean one (1 for equal sizes); a clear error
    for any other pair of sizes. Sizes are (height, width)."""
    if clean_size == degraded_size:
        return 1
    (clean_height, clean_width), (height, width) = clean_size, degraded_size
    if height and width and clean_height % height == 0 and clean_width % width == 0:
        factor = clean_height // height
        if factor == clean_width // width and factor > 1:
            return factor
    raise ValueError(f"{name}: the degraded image is {height}x{width} and the clean one {clean_height}x{clean_width};"
                     f" they must be the same size, or the degraded one smaller by the same integer factor on both "
                     f"sides (a low-resolution input)")


class DegradedPatchDataset(Dataset):
    """Pairs made on the fly from clean patches: item ``i`` is ``{"clean": x0, "degraded": y}`` with
    ``y = degradation(x0)`` under a generator seeded from ``(seed, i)``, so an item is a function of its index (the
    same noise every epoch; what exact resume needs). A degradation that shrinks the image (``downscale``) is a
    super-resolution input: the item also holds the low-resolution image as ``"lowres"``, and ``"degraded"`` is its
    ``upscale_bicubic`` back to the patch size, so every method sees ``y`` in the clean image's space.

    ``degradation``: a registered name (default parameters), a ``make_degradation(...)`` value, or any callable
    ``(clean (B, C, H, W), generator) -> degraded``."""

    def __init__(self, clean_patches: Tensor, degradation: str | DegradationFunction, seed: int = 0):
        if not isinstance(clean_patches, Tensor) or clean_patches.ndim != 4 or len(clean_patches) == 0:
            shape = tuple(clean_patches.shape) if isinstance(clean_patches, Tensor) else type(clean_patches).__name__
            raise ValueError(f"clean_patches must be a non-empty (N, C, H, W) tensor, got {shape}")
        _require_integer("seed", seed, 0)
        self.clean_patches, self.degradation, self.seed = clean_patches, _as_degradation(degradation), seed

    def __len__(self) -> int:
        return len(self.clean_patches)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} patches")
        index %= len(self)
        clean = self.clean_patches[index]
        degraded = self.degradation(clean[None], _item_generator(self.seed, index))[0]
        factor = _as_low_resolution(tuple(clean.shape[-2:]), tuple(degraded.shape[-2:]), f"patch {index}")
        if factor == 1:
            return {"clean": clean, "degraded": degraded}
        return {"clean": clean, "degraded": upscale_bicubic(degraded[None], factor)[0], "lowres": degraded}


def _image_files(folder: Path) -> dict[str, Path]:
    """The images in a folder by file stem (a clean ``a.png`` pairs with a degraded ``a.jpg``)."""
    if not folder.is_dir():
        raise ValueError(f"missing folder {folder}")
    files: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.is_file() and not path.name.startswith(".") and path.suffix.lower() in IMAGE_EXTENSIONS:
            if path.stem in files:
                raise ValueError(f"{folder} holds two images named {path.stem!r} ({files[path.stem].name} and "
                                 f"{path.name}): names must identify a pair")
            files[path.stem] = path
    if not files:
        raise ValueError(f"{folder} contains no images ({', '.join(IMAGE_EXTENSIONS)})")
    return files


def _image_size(path: Path) -> tuple[int, int]:
    """(height, width) from the file's header; a ``ValueError`` naming the file if Pillow cannot read it."""
    try:
        with PIL.Image.open(path) as image:
            width, height = image.size
    except (OSError, PIL.UnidentifiedImageError, ValueError) as error:
        raise ValueError(f"cannot read image file {path}: {error}") from error
    return height, width


def load_image(path: str | Path) -> Tensor:
    """An image file as a float ``(3, H, W)`` tensor in [-1, 1] (grey or RGBA converted to RGB); a ``ValueError``
    naming the file if it cannot be decoded."""
    try:
        with PIL.Image.open(path) as image:
            array = np.asarray(image.convert("RGB"))
    except (OSError, PIL.UnidentifiedImageError, ValueError) as error:
        raise ValueError(f"cannot read image file {path}: {error}") from error
    return uint8_to_tensor(array)


class PairedImageFolder(Dataset):
    """Real pairs from a folder ``root`` holding ``clean/`` and ``degraded/`` with files of the same names (the stem:
    ``clean/a.png`` pairs with ``degraded/a.jpg``; png, jpg, jpeg, bmp, webp). Item ``i`` is ``{"clean": x0,
    "degraded": y}`` (float ``(3, H, W)`` in [-1, 1]).

    A degraded image the same size as its clean one is used as is. One smaller by an integer factor is a
    low-resolution input: like ``DegradedPatchDataset``, the item holds it as ``"lowres"`` and ``"degraded"`` is its
    bicubic upscale. Every pair in a folder must share that factor (batches need the same keys and shapes).

    ``patch_size``: a random aligned crop of that side per item, at a position drawn from ``(seed, i)``; ``None``
    gives whole images (batch them only if all are the same size). ``augment``: a random flip / quarter-turn, the
    same for both images. ``allow_unmatched``: skip files without a partner instead of raising.

    Sizes and readability are checked from the file headers when the data set is built; pixels are decoded per
    item."""

    def __init__(self, root: str | Path, patch_size: int | None = None, seed: int = 0, augment: bool = False,
                 allow_unmatched: bool = False):
        root = Path(root)
        if not root.is_dir():
            raise ValueError(f"missing folder {root}")
        clean_files, degraded_files = _image_files(root / "clean"), _image_files(root / "degraded")
        unmatched = sorted(set(clean_files) ^ set(degraded_files))
        names = sorted(set(clean_files) & set(degraded_files))
        if not names or (unmatched and not allow_unmatched):
            shown = [(clean_files.get(name) or degraded_files[name]).relative_to(root).as_posix()
                     for name in unmatched[:5]]
            listing = ", ".join(shown) + (f" and {len(unmatched) - 5} more" if len(unmatched) > 5 else "")
            if not names:
                raise ValueError(f"{root}: no image in clean/ has a partner of the same name in degraded/ "
                                 f"(unmatched: {listing})")
            raise ValueError(f"{root}: {len(unmatched)} image(s) have no partner of the same name (unmatched: "
                             f"{listing}); pass allow_unmatched=True to skip them")
        if patch_size is not None:
            _require_integer("patch_size", patch_size, 1)
        _require_integer("seed", seed, 0)
        self.root, self.patch_size, self.seed, self.augment = root, patch_size, seed, augment
        self.pairs = [(clean_files[name], degraded_files[name]) for name in names]

        factors = {}
        for clean_path, degraded_path in self.pairs:
            clean_size = _image_size(clean_path)
            factor = _as_low_resolution(clean_size, _image_size(degraded_path), clean_path.stem)
            factors.setdefault(factor, clean_path.stem)
            if patch_size is not None and min(clean_size) < patch_size:
                raise ValueError(f"{clean_path} is {clean_size[0]}x{clean_size[1]}, smaller than patch_size "
                                 f"{patch_size}")
        if len(factors) > 1:
            examples = ", ".join(f"{name!r} x{factor}" for factor, name in sorted(factors.items()))
            raise ValueError(f"{root}: the degraded images are smaller than the clean ones by different factors "
                             f"({examples}); one folder needs one factor")
        self.downscale_factor = next(iter(factors))
        if patch_size is not None and patch_size % self.downscale_factor:
            raise ValueError(f"patch_size {patch_size} must be divisible by the low-resolution factor "
                             f"{self.downscale_factor} (crops align with low-resolution pixels)")

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} pairs")
        index %= len(self)
        clean_path, degraded_path = self.pairs[index]
        clean, degraded = load_image(clean_path), load_image(degraded_path)
        factor = self.downscale_factor
        if (clean.shape[-2] // factor, clean.shape[-1] // factor) != tuple(degraded.shape[-2:]):
            raise ValueError(f"{clean_path.stem}: the images changed size since the data set was built")
        generator = _item_generator(self.seed, index)
        if self.patch_size is not None:
            # Crop positions on the low-resolution grid, so both crops show exactly the same scene.
            low_patch = self.patch_size // factor
            top = int(torch.randint(degraded.shape[-2] - low_patch + 1, (), generator=generator))
            left = int(torch.randint(degraded.shape[-1] - low_patch + 1, (), generator=generator))
            degraded = degraded[:, top:top + low_patch, left:left + low_patch]
            clean = clean[:, top * factor:(top + low_patch) * factor, left * factor:(left + low_patch) * factor]
        if self.augment:
            symmetry = int(torch.randint(8, (), generator=generator))
            clean, degraded = dihedral_transform(clean, symmetry), dihedral_transform(degraded, symmetry)
        clean, degraded = clean.contiguous(), degraded.contiguous()
        if factor == 1:
            return {"clean": clean, "degraded": degraded}
        return {"clean": clean, "degraded": upscale_bicubic(degraded[None], factor)[0], "lowres": degraded}


def restoration_dataset(source: str | Path, degradation: str | DegradationFunction | None = None,
                        patch_size: int | None = 64, num_patches: int | None = None, seed: int = 0,
                        split: str = "train") -> Dataset:
    """A restoration data set from one argument:

    - ``"scikit-image"``: ``num_patches`` (default 1024) random patches of the built-in photos' ``split``, degraded
      on the fly by ``degradation`` (``DegradedPatchDataset``);
    - a folder with ``clean/`` and ``degraded/``: its pairs (``PairedImageFolder``; one item per pair, so
      ``degradation`` and ``num_patches`` must stay ``None``);
    - any other folder: its images are clean images, loaded, cut into ``num_patches`` patches and degraded on the fly.
    """
    if source != "scikit-image" and not Path(source).is_dir():
        raise ValueError(f"source must be 'scikit-image' or a folder, got {str(source)!r} (no such folder)")
    if source != "scikit-image" and split != "train":
        raise ValueError(f"split chooses among the built-in photos; a folder has none, got split={split!r}")
    if source != "scikit-image" and (Path(source) / "clean").is_dir():
        if degradation is not None:
            raise ValueError(f"{source} holds clean/ and degraded/ pairs already; degradation must be None, got "
                             f"{degradation!r}")
        if num_patches is not None:
            raise ValueError(f"{source} holds clean/ and degraded/ pairs, one item per pair: num_patches must be "
                             f"None, got {num_patches!r}")
        return PairedImageFolder(source, patch_size=patch_size, seed=seed)
    if degradation is None:
        raise ValueError(f"source {str(source)!r} holds clean images only: pass a degradation, one of "
                         f"{sorted(DEGRADATIONS)} or make_degradation(...)")
    if patch_size is None:
        raise ValueError("patch_size is needed to cut clean images into training patches")
    if source == "scikit-image":
        images = scikit_image_photos(split)
    else:
        images = [load_image(path) for path in _image_files(Path(source)).values()]
    patches = random_patches(images, patch_size, 1024 if num_patches is None else num_patches, seed)
    return DegradedPatchDataset(patches, degradation, seed)


# --------------------------------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------------------------------


def _require_pair(x: Tensor, y: Tensor, what: str) -> None:
    _require_batch(x, what)
    _require_batch(y, what)
    if x.shape != y.shape:
        raise ValueError(f"{what} needs images of the same shape, got {tuple(x.shape)} and {tuple(y.shape)}")


def psnr(x: Tensor, y: Tensor) -> Tensor:
    """Peak signal-to-noise ratio in dB of images in [-1, 1], measured on the [0, 1] scale (peak 1), per image:
    ``(B,)``. ``inf`` for identical images."""
    _require_pair(x, y, "psnr")
    # Halving the difference maps it to the [0, 1] scale.
    mse = ((x - y) / 2).pow(2).flatten(1).mean(dim=1)
    return 10 * torch.log10(1.0 / mse)


def _ssim_window(dtype: torch.dtype, device: torch.device) -> Tensor:
    # scipy's gaussian_filter (which scikit-image uses) with sigma 1.5 and truncate 3.5: radius 5, an 11-tap window.
    return _gaussian_kernel_1d(1.5, 5, dtype, device)


def ssim(x: Tensor, y: Tensor) -> Tensor:
    """Structural similarity of images in [-1, 1] on the [0, 1] scale, per image ``(B,)``: Wang et al.'s Gaussian
    window (11 taps, sigma 1.5), K1 = 0.01, K2 = 0.03, population (not sample) covariances, averaged over the pixels
    the window fits inside and over channels. Equals ``skimage.metrics.structural_similarity(..., data_range=1,
    gaussian_weights=True, sigma=1.5, use_sample_covariance=False)``, which also averages only those pixels."""
    _require_pair(x, y, "ssim")
    batch, channels, height, width = x.shape
    if min(height, width) < 11:
        raise ValueError(f"ssim needs images of at least 11x11 pixels (its window), got {height}x{width}")
    window = _ssim_window(x.dtype, x.device)
    c1, c2 = 0.01**2, 0.03**2
    # Five local averages at once, each channel separately; "valid" filtering is the interior scikit-image averages.
    x, y = (x + 1) / 2, (y + 1) / 2
    stacked = torch.stack([x, y, x * x, y * y, x * y], dim=1).reshape(-1, 1, height, width)
    local = F.conv2d(F.conv2d(stacked, window.view(1, 1, 1, -1)), window.view(1, 1, -1, 1))
    mean_x, mean_y, mean_xx, mean_yy, mean_xy = local.reshape(batch, 5, channels, *local.shape[-2:]).unbind(1)
    variance_x, variance_y = mean_xx - mean_x**2, mean_yy - mean_y**2
    covariance = mean_xy - mean_x * mean_y
    similarity = ((2 * mean_x * mean_y + c1) * (2 * covariance + c2)
                  / ((mean_x**2 + mean_y**2 + c1) * (variance_x + variance_y + c2)))
    return similarity.flatten(1).mean(dim=1)


__all__ = [
    "DEGRADATIONS",
    "IMAGE_EXTENSIONS",
    "SCIKIT_IMAGE_PHOTOS",
    "Degradation",
    "DegradedPatchDataset",
    "PairedImageFolder",
    "degradation_parameters",
    "dihedral_transform",
    "downscale",
    "gaussian_blur",
    "gaussian_noise",
    "jpeg",
    "load_image",
    "make_degradation",
    "psnr",
    "rain_streak_kernel",
    "random_patches",
    "restoration_dataset",
    "scikit_image_photos",
    "ssim",
    "synthetic_rain",
    "tensor_to_uint8",
    "uint8_to_tensor",
    "upscale_bicubic",
]
