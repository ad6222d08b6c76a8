"""The restoration part of ``diffusers-ext demo`` and the ``diffusers-ext restore`` command: the shipped tiny ResShift
model super-resolves (4x) a photo it was not trained on, next to bicubic upsampling and the reference."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import PIL.Image
import torch

from ...shipped import load_pipeline_or_shipped
from ...training.restoration_data import make_degradation, psnr, scikit_image_photos, ssim, upscale_bicubic
from .pipeline_restoration import RestorationPipeline

SHIPPED_MODEL = "tiny-resshift-sr4"


def load_restoration_pipeline(model: str | Path | None = None, trust_remote_code: bool = False) -> RestorationPipeline:
    """The shipped model (``model=None``), or a restoration pipeline from a folder or Hub id."""
    return load_pipeline_or_shipped(RestorationPipeline, SHIPPED_MODEL, model, trust_remote_code)


def restore_file(input_path: str | Path, output_path: str | Path, model: str | Path | None = None,
                 num_inference_steps: int | None = None, upscale_factor: int | None = None, seed: int = 0,
                 trust_remote_code: bool = False) -> float:
    """Restore the image file ``input_path`` into ``output_path``; returns the seconds the restoration took."""
    input_path = Path(input_path)
    if not input_path.is_file():
        raise ValueError(f"no input image at {input_path}")
    try:
        image = PIL.Image.open(input_path)
        image.load()
    except (OSError, PIL.UnidentifiedImageError) as error:
        raise ValueError(f"cannot read {input_path} as an image: {error}") from error
    pipe = load_restoration_pipeline(model, trust_remote_code)
    start = time.perf_counter()
    restored = pipe(image, num_inference_steps=num_inference_steps, upscale_factor=upscale_factor,
                    generator=torch.Generator().manual_seed(seed)).images[0]
    seconds = time.perf_counter() - start
    Path(output_path).parent.mkdir(parents=True, exist_ok=True)
    restored.save(output_path)
    return seconds


def _to_pil(image: torch.Tensor) -> PIL.Image.Image:
    """One image (C, H, W) in [-1, 1] as a PIL image."""
    array = ((image.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return PIL.Image.fromarray(array)


def held_out_crops(crop: int = 128, tiles: int = 1) -> torch.Tensor:
    """``(photos * tiles^2, 3, crop, crop)`` crops of the held-out photos: a ``tiles x tiles`` grid around each
    photo's centre."""
    crops = []
    for photo in scikit_image_photos("held_out"):
        top, left = (photo.shape[1] - tiles * crop) // 2, (photo.shape[2] - tiles * crop) // 2
        if min(top, left) < 0:
            raise ValueError(f"a {tiles}x{tiles} grid of {crop} px crops does not fit a {tuple(photo.shape[1:])} photo")
        for row in range(tiles):
            for column in range(tiles):
                y, x = top + row * crop, left + column * crop
                crops.append(photo[:, y:y + crop, x:x + crop])
    return torch.stack(crops)


def super_resolve_held_out(pipe: RestorationPipeline, crop: int = 128, tiles: int = 1,
                           num_inference_steps: int | None = None, seed: int = 0) -> dict[str, torch.Tensor]:
    """Low-resolution, bicubic, restored and reference versions of ``held_out_crops(crop, tiles)``."""
    factor = pipe.config.upscale_factor
    reference = held_out_crops(crop, tiles)
    lowres = make_degradation("downscale", factor=factor)(reference, torch.Generator().manual_seed(seed))
    restored = pipe((lowres + 1) / 2, num_inference_steps=num_inference_steps, output_type="pt",
                    generator=torch.Generator().manual_seed(seed)).images * 2 - 1
    return {"low resolution": lowres, "bicubic": upscale_bicubic(lowres, factor), "restored": restored,
            "reference": reference}


def run_restoration_demo(output: Path) -> dict[str, tuple[float, float]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    output.mkdir(parents=True, exist_ok=True)
    pipe = load_restoration_pipeline()
    pipe.set_progress_bar_config(disable=True)
    start = time.perf_counter()
    images = super_resolve_held_out(pipe)
    seconds = time.perf_counter() - start
    reference = images["reference"]
    scores = {name: (float(psnr(images[name], reference).mean()), float(ssim(images[name], reference).mean()))
              for name in ("bicubic", "restored")}

    columns = list(images)
    figure, axes = plt.subplots(len(reference), len(columns), figsize=(3 * len(columns), 3 * len(reference)),
                                squeeze=False)
    for row in range(len(reference)):
        for column, name in enumerate(columns):
            image = _to_pil(images[name][row])
            if row == 0:
                image.save(output / f"{name.replace(' ', '_')}.png")
            axes[row, column].imshow(np.asarray(image), interpolation="nearest")
            axes[row, column].set_axis_off()
            score = scores.get(name)
            label = name if score is None else f"{name}\nPSNR {float(psnr(images[name][row:row + 1], reference[row:row + 1])):.2f} dB"
            axes[row, column].set_title(label, fontsize=9)
    figure.tight_layout()
    figure.savefig(output / "restoration.png", dpi=100)
    plt.close(figure)

    steps = len(pipe.scheduler.timesteps)
    lines = [f"4x super-resolution of {len(reference)} held-out photo crops ({reference.shape[-1]} px), shipped tiny "
             f"ResShift model, {steps} steps (the model's default), {seconds:.1f} s; means over the crops:",
             f"  {'':<10}{'PSNR (dB)':>10}{'SSIM':>8}"]
    lines += [f"  {name:<10}{p:>10.2f}{s:>8.3f}" for name, (p, s) in scores.items()]
    gains = (psnr(images["restored"], reference) - psnr(images["bicubic"], reference)).tolist()
    lines.append(f"  restored minus bicubic, per crop: {', '.join(f'{gain:+.2f}' for gain in gains)} dB "
                 f"(better on {sum(gain > 0 for gain in gains)} of {len(gains)})")
    lines.append("  the model card has the same comparison on 8 crops (diffusers_ext/assets/tiny-resshift-sr4)")
    text = "\n".join(lines)
    print(text)
    (output / "restoration.txt").write_text(text + "\n", encoding="utf-8")
    print(f"\nwritten to {output}/: restoration.png, restoration.txt, and one PNG per column")
    return scores
