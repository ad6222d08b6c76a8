"""The ``diffusers-ext`` command: ``list``, ``demo``, ``bench``, ``restore``, ``video``, ``train``.

Arguments are checked before anything heavy is imported or computed; a user error is one line on stderr and exit
status 2.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .components import COMPONENTS, components_markdown_table, list_components

# The restored image is computed at full output resolution; the shipped model needs about 1.6 GB per megapixel.
MAX_RESTORE_PIXELS = 2048 * 2048
DEMO_PARTS = ("samplers", "steering", "text", "restoration", "video", "3d", "3d_inverse")


def _list(args: argparse.Namespace) -> None:
    if args.markdown:
        print(components_markdown_table())
        return
    for c in list_components(args.kind):
        paper = f"{c.paper} (arXiv:{c.arxiv})" if c.paper else "—"
        print(f"{c.name:<34}{c.kind:<11}{c.status:<13}{paper}")


def resolve_scheduler(spec: str) -> tuple[str, type]:
    """``(name, class)`` of a scheduler given as a name in ``BUILTIN_SCHEDULERS``, a class exported by diffusers or
    diffusers-ext (``DEISMultistepScheduler``, ``ERSDESolverScheduler``), or ``module:ClassName``."""
    from diffusers.schedulers.scheduling_utils import SchedulerMixin

    from .testing.sampler_accuracy import BUILTIN_SCHEDULERS

    if spec in BUILTIN_SCHEDULERS:
        return spec, BUILTIN_SCHEDULERS[spec]
    module_name, _, name = spec.rpartition(":")
    candidates = [module_name] if module_name else ["diffusers", "diffusers_ext"]
    for candidate in candidates:
        try:
            found = getattr(importlib.import_module(candidate), name, None)
        except ImportError as error:
            raise ValueError(f"--scheduler {spec!r}: cannot import {candidate!r} ({error})") from None
        if isinstance(found, type) and issubclass(found, SchedulerMixin):
            return name, found
    raise ValueError(f"--scheduler {spec!r} is not a scheduler: use one of {list(BUILTIN_SCHEDULERS)}, a scheduler "
                     f"class of diffusers or diffusers-ext, or module:ClassName")


def run_sampler_accuracy(output: Path, num_samples: int, dims, nfes, schedulers=None, scatter_2d: bool = True) -> None:
    from .testing.sampler_accuracy import measure_sampler_accuracy, plot_accuracy, plot_samples_2d

    output.mkdir(parents=True, exist_ok=True)
    report = measure_sampler_accuracy(schedulers=schedulers, dims=dims, nfes=nfes, num_samples=num_samples)
    table = report.table()
    print(table)
    (output / "sampler_accuracy.txt").write_text(table + "\n", encoding="utf-8")
    report.write_csv(output / "sampler_accuracy.csv")
    plot_accuracy(report, output / "sampler_accuracy.png")
    written = ["sampler_accuracy.png", "sampler_accuracy.txt", "sampler_accuracy.csv"]
    if 2 in dims and scatter_2d:
        plot_samples_2d(report, output / "samples_2d.png")
        written.append("samples_2d.png")
    print()
    for dim in dims:
        for nfe in sorted({r.nfe for r in report.rows if r.dim == dim}):
            if sum(r.dim == dim and r.nfe == nfe for r in report.rows) < 2:  # e.g. a 2-call-per-step sampler's odd NFE
                continue
            best = report.best(dim, nfe, "ode_error")
            print(f"{dim:>3}-D, NFE {nfe:>2}: closest to the exact ODE solution: {best.scheduler} "
                  f"(mean distance {best.ode_error:.2e})")
    print(f"\nwritten to {output}/: {', '.join(written)}")


def _demo_schedulers(full: bool) -> dict[str, type]:
    """diffusers' built-ins (the quick demo leaves out Euler, the least accurate) and ours."""
    from .schedulers import ERSDESolverScheduler, RFSolverScheduler, TimeShiftScheduler
    from .testing.sampler_accuracy import BUILTIN_SCHEDULERS

    builtins = {name: cls for name, cls in BUILTIN_SCHEDULERS.items() if full or name != "Euler"}
    return builtins | {"ER-SDE (ours)": ERSDESolverScheduler, "TimeShift (ours)": TimeShiftScheduler,
                       "RF-Solver (ours)": RFSolverScheduler}


def _demo(args: argparse.Namespace) -> None:
    import diffusers.utils.logging
    import transformers.utils.logging

    start = time.perf_counter()
    output = Path(args.output)
    seconds = {}
    diffusers.utils.logging.disable_progress_bar()  # the loading bars of the shipped models say nothing here
    transformers.utils.logging.disable_progress_bar()
    for part in args.parts or DEMO_PARTS:
        part_start = time.perf_counter()
        if part == "samplers":
            print("Samplers on the exact Gaussian-mixture oracle: diffusers' built-ins next to diffusers-ext's\n")
            run_sampler_accuracy(output / "sampler_accuracy", args.num_samples or (2048 if args.full else 512),
                                 (2, 64), (5, 10, 20, 50) if args.full else (5, 10), _demo_schedulers(args.full))
        elif part == "steering":
            print("Steering hooks on the exact 2-D oracle: steered versus unsteered, next to the exact target law\n")
            from .guidance.demo import run_steering_demo

            run_steering_demo(output / "steering", num_samples=2000 if args.full else 500)
        elif part == "text":
            print("The shipped tiny masked-diffusion language model (trained on Python's documentation)\n")
            from .pipelines.text.demo import run_text_demo

            run_text_demo(output / "text")
        elif part == "restoration":
            print("The shipped tiny ResShift model: 4x super-resolution of photos it was not trained on\n")
            from .pipelines.restoration.demo import run_restoration_demo

            run_restoration_demo(output / "restoration")
        elif part == "3d":
            print("Score distillation (SDS, SDI) to meshes and multi-view sampling, on exact 3D oracles\n")
            from .pipelines.three_d.demo import run_3d_demo

            run_3d_demo(output / "3d")
        elif part == "3d_inverse":
            print("The shipped tiny slice prior with DiffusionMBIR: held-out volumes from 8 CT views, a 90-degree "
                  "wedge and every 4th slice, next to FBP / interpolation and the slice-wise ablation\n")
            from .pipelines.three_d.volume_demo import run_volume_demo

            run_volume_demo(output / "3d_inverse")
        else:
            print("The shipped tiny FVDM video model: generation, image-to-video, interpolation and a long video, "
                  "next to held-out clips\n")
            from .pipelines.video.demo import run_video_demo

            run_video_demo(output / "video")
            print("\nThe shipped tiny causal video model (the FVDM model fine-tuned frame-causal): held-out clips "
                  "extended chunk by chunk with a KV cache, next to their own continuation\n")
            from .pipelines.video.causal_demo import run_causal_video_demo

            run_causal_video_demo(output / "video")
        seconds[part] = time.perf_counter() - part_start
        print()
    parts = ", ".join(f"{part} {value:.0f} s" for part, value in seconds.items())
    print(f"demo finished in {time.perf_counter() - start:.0f} s on {os.cpu_count()} CPU cores ({parts}); open "
          f"{output}/ to look at the plots")


def _bench(args: argparse.Namespace) -> None:
    schedulers = dict(resolve_scheduler(spec) for spec in args.scheduler) if args.scheduler else None
    run_sampler_accuracy(Path(args.output), args.num_samples, tuple(args.dims), tuple(args.nfe), schedulers)


def check_writable(target: Path) -> None:
    """Raise ``ValueError`` unless ``target`` can be written (its nearest existing folder is writable)."""
    existing = next(folder for folder in (target.absolute().parent, *target.absolute().parents) if folder.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK):
        raise ValueError(f"cannot write {target}: {existing} is not a writable folder")


def _check_restore_arguments(args: argparse.Namespace) -> None:
    """Everything about ``restore``'s files and sizes that can be known before a model is loaded."""
    import PIL.Image

    source, target = Path(args.input), Path(args.output)
    if not source.is_file():
        raise ValueError(f"no input image at {source}")
    try:
        with PIL.Image.open(source) as image:
            width, height = image.size
    except (OSError, PIL.UnidentifiedImageError) as error:
        raise ValueError(f"cannot read {source} as an image: {error}") from None
    PIL.Image.init()
    if target.suffix.lower() not in PIL.Image.registered_extensions():
        raise ValueError(f"cannot write an image as {target.name!r}: use an image extension such as .png or .jpg")
    check_writable(target)
    scale = args.scale or 4  # the shipped model's factor; another --model's own factor is checked when it loads
    pixels = width * height * scale**2
    if pixels > MAX_RESTORE_PIXELS:
        raise ValueError(f"restoring {source.name} ({width}x{height}) at scale {scale} makes a {width * scale}x"
                         f"{height * scale} image ({pixels / 1e6:.1f} MP), above this command's "
                         f"{MAX_RESTORE_PIXELS / 1e6:.1f} MP limit (the shipped model needs about 1.6 GB of memory per "
                         f"MP): pass a smaller --scale or crop the input")


def _restore(args: argparse.Namespace) -> None:
    _check_restore_arguments(args)
    from .pipelines.restoration.demo import restore_file

    seconds = restore_file(args.input, args.output, model=args.model, num_inference_steps=args.steps,
                           upscale_factor=args.scale, seed=args.seed, trust_remote_code=args.trust_remote_code)
    print(f"wrote {args.output} in {seconds:.1f} s")


# ``diffusers-ext video``: the user's files, sizes and frame counts are checked here, before torch is imported or a
# model is loaded; the work is in pipelines/video/demo.py.
SHIPPED_VIDEO_MODEL = "tiny-fvdm-shapes"
VIDEO_TASKS = ("generate", "i2v", "interpolate", "extend")
VIDEO_SUFFIXES = (".gif", ".mp4")
VIDEO_STEPS = 20  # the steps the shipped model's recipe evaluates it at
VIDEO_FPS = 8
# FrameAwareVideoPipeline's defaults where a model's files do not say otherwise (tests/test_video_cli.py checks them
# against the pipeline): 8 frames, frames of sample_size 16 latent pixels, 1 context frame.
PIPELINE_NUM_FRAMES, PIPELINE_SAMPLE_SIZE, PIPELINE_CONTEXT_FRAMES = 8, 16, 1
CAUSAL_CHUNK_FRAMES = 2  # pixel frames a CausalVideoPipeline adds at a time, as diffusers-ext train causal-video trains
STOCK_LIBRARIES = ("diffusers", "transformers", None)


@dataclass(frozen=True)
class VideoModel:
    """What ``diffusers-ext video`` knows of a ``FrameAwareVideoPipeline`` from its JSON files, before loading it.

    Attributes:
        source: what ``DiffusionPipeline.from_pretrained`` takes (a folder or a Hub id).
        trust_remote_code: whether to run its loader files (the shipped model's, or the user said so).
        clip_frames: pixel frames per model call (the clips it was trained on, as its training report records them;
            None where it has none): longer videos roll a window.
        context_frames: latent frames each window after the first takes from the one before.
        frame_size: ``(height, width)`` of its frames in pixels; None where its VAE's config does not say.
        temporal_compression: pixel frames per latent frame after the first; None where its VAE's config does not say.
    """

    source: str
    trust_remote_code: bool
    clip_frames: int | None
    context_frames: int | None  # None: a causal model whose trained context is not recorded
    frame_size: tuple[int, int] | None
    temporal_compression: int | None
    causal: bool = False  # a CausalVideoPipeline (it extends videos chunk by chunk), not a FrameAwareVideoPipeline


def _read_json(path: Path, model: str) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"--model {model}: no {path.name} in it; is it a diffusers pipeline saved with "
                         "save_pretrained or save_for_hub?") from None
    except (OSError, ValueError) as error:
        raise ValueError(f"--model {model}: cannot read {path}: {error}") from None


def _model_files(model: str) -> Path:
    """The local folder of ``model`` (a folder, or a Hub id whose JSON files are fetched into the Hub cache)."""
    if Path(model).is_dir():
        return Path(model)
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(model, allow_patterns=["*.json"]))
    except (OSError, ValueError) as error:
        raise ValueError(f"--model {model} is neither a folder nor a Hub repository that can be reached: "
                         f"{error}") from None


def video_model(model: str, trust_remote_code: bool) -> VideoModel:
    """A shipped model by name (trusted: its loader files are the package's), or a ``FrameAwareVideoPipeline`` folder
    or Hub id, as ``VideoModel``."""
    from .shipped import SHIPPED_MODELS, shipped_model_path

    shipped = model in SHIPPED_MODELS
    folder = shipped_model_path(model) if shipped else _model_files(model)
    index = _read_json(folder / "model_index.json", model)
    class_name = index.get("_class_name")
    pipeline_class = class_name[-1] if isinstance(class_name, list) else class_name
    if pipeline_class not in ("FrameAwareVideoPipeline", "CausalVideoPipeline"):
        raise ValueError(f"--model {model} holds a {class_name}, not a FrameAwareVideoPipeline (or, for extend, a "
                         "CausalVideoPipeline)")
    # save_for_hub's layout: the pipeline and our components load through one-line loader files (custom code).
    custom = isinstance(class_name, list) or any(
        isinstance(entry, list) and entry[:1] and entry[0] not in STOCK_LIBRARIES for entry in index.values())
    trusted = shipped or trust_remote_code
    if custom and not trusted:
        raise ValueError(f"--model {model} loads its classes through loader files (each imports a class from the "
                         "installed diffusers_ext; read them first): pass --trust-remote-code to run them")
    transformer = _read_json(folder / "transformer" / "config.json", model)
    spatial = temporal = 1
    if (index.get("vae") or [None])[0] is not None:
        vae = _read_json(folder / "vae" / "config.json", model)
        spatial, temporal = vae.get("scale_factor_spatial"), vae.get("scale_factor_temporal")
    side = (transformer.get("sample_size") or PIPELINE_SAMPLE_SIZE) * spatial if spatial else None
    # The clips it was trained on, as the shipped models' training reports record them.
    report = folder / "training_report.json"
    recorded = _read_json(report, model) if report.is_file() else {}
    clip, causal = recorded.get("clip", {}), pipeline_class == "CausalVideoPipeline"
    context = clip.get("context_frames", PIPELINE_CONTEXT_FRAMES)
    if causal:  # the longest context it was trained to see (teacher forcing); unknown: all of it
        trained = recorded.get("teacher_forcing", {}).get("context_frames")
        context = max(trained) if trained else None
    return VideoModel(str(folder if shipped else model), trusted, clip.get("num_frames"), context,
                      (side, side) if side else None, temporal, causal)


def _frame_size_text(height: int, width: int) -> str:
    return f"{width}x{height} pixels (width x height)"


def _check_frame_size(image: Any, name: str, model: VideoModel) -> None:
    if model.frame_size is not None and (image.height, image.width) != model.frame_size:
        raise ValueError(f"{name} is {_frame_size_text(image.height, image.width)}; the model's frames are "
                         f"{_frame_size_text(*model.frame_size)}")


def _check_ffmpeg(path: Path, use: str) -> None:
    if not all(importlib.util.find_spec(module) for module in ("imageio", "imageio_ffmpeg")):
        raise ValueError(f"{use} {path.name} needs imageio and imageio-ffmpeg (pip install 'diffusers-ext[video]'); "
                         "or use a .gif")


def read_image(path: str, option: str) -> Any:
    """The image file at ``path`` as an RGB PIL image."""
    import PIL.Image

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{option} {path}: no such file")
    try:
        with PIL.Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, PIL.UnidentifiedImageError) as error:
        raise ValueError(f"{option} {path}: cannot read it as an image ({error})") from None


def read_video(path: str, option: str) -> list[Any]:
    """The frames of the GIF or MP4 at ``path`` as RGB PIL images."""
    import PIL.Image
    import PIL.ImageSequence

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{option} {path}: no such file")
    if path.suffix.lower() not in VIDEO_SUFFIXES:
        raise ValueError(f"{option} {path}: read videos are .gif or .mp4")
    try:
        if path.suffix.lower() == ".gif":
            with PIL.Image.open(path) as video:
                return [frame.convert("RGB") for frame in PIL.ImageSequence.Iterator(video)]
        _check_ffmpeg(path, "reading")
        import imageio.v2

        return [PIL.Image.fromarray(frame).convert("RGB")
                for frame in imageio.v2.mimread(path, format="FFMPEG", memtest=False)]
    except (OSError, PIL.UnidentifiedImageError, RuntimeError) as error:
        raise ValueError(f"{option} {path}: cannot read it as a video ({error})") from None


def _key_frames(args: argparse.Namespace, num_frames: int, model: VideoModel) -> dict[int, Any]:
    """``interpolate``'s key frames ``{frame index: image}`` from ``--first``/``--last`` or ``--key-frames``."""
    if args.key_frames and (args.first or args.last):
        raise ValueError("give the key frames either as --first/--last or as --key-frames, not both")
    if not args.key_frames and not (args.first and args.last):
        raise ValueError("interpolate needs --first PATH and --last PATH, or --key-frames INDEX=PATH ...")
    given = [(0, args.first, "--first"), (num_frames - 1, args.last, "--last")] if not args.key_frames else []
    for text in args.key_frames or []:
        index, separator, path = text.partition("=")
        try:
            index = int(index)
        except ValueError:
            separator = ""
        if not separator or not path:
            raise ValueError(f"--key-frames {text!r}: expected INDEX=PATH, e.g. 0=first.png")
        given.append((index, path, f"--key-frames {text}"))
    frames = {}
    for index, path, option in given:
        if not 0 <= index < num_frames:
            raise ValueError(f"key frame index {index} is outside the {num_frames} frames 0 to {num_frames - 1} "
                             "(--frames)")
        if index in frames:
            raise ValueError(f"two key frames at frame {index}")
        frames[index] = read_image(path, option)
        _check_frame_size(frames[index], option, model)
    if len(frames) < 2:
        raise ValueError("interpolate needs at least two key frames")
    return frames


def _check_frame_count(num_frames: int, model: VideoModel, option: str) -> None:
    ratio = model.temporal_compression
    if ratio and (num_frames - 1) % ratio:
        below = (num_frames - 1) // ratio * ratio + 1
        raise ValueError(f"{option} {num_frames}: this model's VAE encodes 1 + a multiple of {ratio} frames (e.g. "
                         f"{option} {below} or {below + ratio})")


def check_video_arguments(args: argparse.Namespace) -> dict[str, Any]:
    """Everything about ``video``'s files, sizes and frame counts that can be known before a model is loaded; returns
    the keyword arguments of ``pipelines.video.demo.make_video_file``, with the input images read."""
    output = Path(args.output)
    if output.suffix.lower() not in VIDEO_SUFFIXES:
        raise ValueError(f"--output {output.name}: write a .gif or an .mp4")
    if output.suffix.lower() == ".mp4":
        _check_ffmpeg(output, "writing")
    check_writable(output)
    model = video_model(args.model, args.trust_remote_code)
    if model.causal or getattr(args, "chunk_frames", None):
        return check_causal_extend_arguments(args, output, model)
    window, context, ratio = args.window or model.clip_frames, args.context_frames or model.context_frames, \
        model.temporal_compression
    if window:
        _check_frame_count(window, model, "--window")
    conditioning, video = {}, None
    num_frames = made_frames = args.frames or window or PIPELINE_NUM_FRAMES
    if args.task == "i2v":
        conditioning = {0: read_image(args.image, "--image")}
        _check_frame_size(conditioning[0], "--image", model)
    elif args.task == "interpolate":
        if window and num_frames > window:
            raise ValueError(f"interpolate makes at most {window} frames with this model (one window; all key frames "
                             f"must lie in it), got --frames {num_frames}")
        if ratio and ratio > 1:
            raise ValueError(f"interpolate needs a model whose VAE does not compress time; this one's packs {ratio} "
                             "frames into each latent frame, so only the first frame can be given (use i2v)")
        conditioning = _key_frames(args, num_frames, model)
    elif args.task == "extend":
        video = read_video(args.video, "--video")
        num_frames = args.frames or len(video) + (window or PIPELINE_NUM_FRAMES)
        if num_frames <= len(video):
            raise ValueError(f"--frames {num_frames} must exceed the {len(video)} frames of --video {args.video} "
                             "(it counts the whole extended video)")
        given = 1 if ratio and ratio > 1 else context  # the last pixel frame alone through a VAE that packs frames
        if len(video) < given:
            raise ValueError(f"--video {args.video} has {len(video)} frames; extending it takes its last {given} as "
                             "context (--context-frames)")
        added = num_frames - len(video)
        if ratio and added % ratio:
            below = len(video) + added // ratio * ratio
            raise ValueError(f"--frames {num_frames} adds {added} frames to the {len(video)} of --video; this model's "
                             f"VAE adds a multiple of {ratio} (e.g. --frames {max(below, len(video) + ratio)} or "
                             f"{below + ratio})")
        for index, frame in enumerate(video):
            _check_frame_size(frame, f"frame {index} of --video {args.video}", model)
        if len({frame.size for frame in video}) > 1:
            raise ValueError(f"--video {args.video}: its frames differ in size")
        made_frames = given + added
    if len({image.size for image in conditioning.values()}) > 1:  # where the model's size is not known
        raise ValueError("the key frames differ in size")
    if args.task != "extend":
        _check_frame_count(num_frames, model, "--frames")
    if window and ratio and (made_frames - 1) // ratio + 1 > (latent_window := (window - 1) // ratio + 1) \
            and not context < latent_window:
        raise ValueError(f"--context-frames must be below the window's {latent_window} latent frames, got {context}")
    return dict(output=output, model=model.source, trust_remote_code=model.trust_remote_code, num_frames=num_frames,
                clip_frames=window, num_inference_steps=args.steps, seed=args.seed, fps=args.fps,
                context_frames=context, conditioning_frames=conditioning, video=video)


def check_causal_extend_arguments(args: argparse.Namespace, output: Path, model: VideoModel) -> dict[str, Any]:
    """``video extend`` with a ``CausalVideoPipeline``: the given video is the clean context and the model continues
    it chunk by chunk; returns the keyword arguments of ``pipelines.video.causal_demo.make_causal_video_file``."""
    if not model.causal:
        raise ValueError(f"--chunk-frames is for a CausalVideoPipeline; --model {args.model} is a "
                         "FrameAwareVideoPipeline (it rolls a window: --window, --context-frames)")
    if args.task != "extend":
        raise ValueError(f"--model {args.model} is a CausalVideoPipeline: it extends a video (diffusers-ext video "
                         f"extend), not {args.task}")
    if args.window:
        raise ValueError("--window is for a FrameAwareVideoPipeline; a CausalVideoPipeline adds --chunk-frames "
                         "frames at a time")
    video, ratio = read_video(args.video, "--video"), model.temporal_compression or 1
    chunk = getattr(args, "chunk_frames", None) or max(CAUSAL_CHUNK_FRAMES, ratio)  # one latent frame at least
    num_frames = args.frames or len(video) + chunk
    if num_frames <= len(video):
        raise ValueError(f"--frames {num_frames} must exceed the {len(video)} frames of --video {args.video} "
                         "(it counts the whole extended video)")
    if chunk % ratio:
        raise ValueError(f"--chunk-frames {chunk}: this model's VAE packs {ratio} frames into a latent frame; give a "
                         f"multiple of {ratio}")
    if (len(video) - 1) % ratio:
        raise ValueError(f"--video {args.video} has {len(video)} frames; this model's VAE encodes 1 + a multiple of "
                         f"{ratio}")
    _check_frame_count(num_frames, model, "--frames")
    for index, frame in enumerate(video):
        _check_frame_size(frame, f"frame {index} of --video {args.video}", model)
    if len({frame.size for frame in video}) > 1:
        raise ValueError(f"--video {args.video}: its frames differ in size")
    return dict(output=output, model=model.source, trust_remote_code=model.trust_remote_code, num_frames=num_frames,
                chunk_frames=chunk, max_cache_frames=args.context_frames or model.context_frames,
                num_inference_steps=args.steps,
                seed=args.seed, fps=args.fps, video=video)


def _video(args: argparse.Namespace) -> None:
    request = check_video_arguments(args)
    if "chunk_frames" in request:
        from .pipelines.video.causal_demo import make_causal_video_file as make_video_file
    else:
        from .pipelines.video.demo import make_video_file

    frames, seconds = make_video_file(**request)
    height, width = frames.shape[1:3]
    print(f"wrote {args.output}: {len(frames)} frames of {_frame_size_text(height, width)} in {seconds:.1f} s")


# ``diffusers-ext 3d reconstruct``: the volume file, the output and the operator are checked here, before torch is
# imported; the work is in pipelines/three_d/volume_demo.py.
RECONSTRUCT_LIMITED_ANGLE_VIEWS = 90  # one view per degree over the 90-degree wedge, as in DiffusionMBIR


def _volume_model_multiple(model: str | None) -> int | None:
    """What the slice sides of a ``DiffusionMBIRPipeline`` folder's UNet must be multiples of, read from its JSON
    files (the shipped prior's when ``model`` is None); None when it cannot be told before loading (a Hub id)."""
    from .shipped import shipped_model_path

    folder = shipped_model_path("tiny-slice-prior") if model is None else Path(model)
    config_path = folder / "unet" / "config.json"
    if not config_path.is_file():
        return None
    config = json.loads(config_path.read_text(encoding="utf-8"))
    return 2 ** (len(config.get("block_out_channels", [0])) - 1)


def check_reconstruct_arguments(args: argparse.Namespace) -> dict[str, Any]:
    """Everything about ``3d reconstruct``'s files and operator that can be known before torch is imported; returns
    the keyword arguments of ``pipelines.three_d.volume_demo.reconstruct_volume_file``."""
    import numpy as np

    source, target = Path(args.input), Path(args.output)
    if source.suffix != ".npy" or not source.is_file():
        raise ValueError(f"no volume at {source}: the input is a .npy file holding a (D, H, W) array in [0, 1]")
    try:
        volume = np.load(source, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as error:
        raise ValueError(f"cannot read {source} as a numpy array: {error}") from None
    if volume.ndim != 3 or not np.issubdtype(volume.dtype, np.number) or np.iscomplexobj(volume):
        raise ValueError(f"{source} holds a {volume.dtype} array of shape {volume.shape}; a volume is a real (D, H, W) "
                         "array")
    if not np.isfinite(volume).all():
        raise ValueError(f"{source} has NaN or infinite values")
    if target.suffix != ".npy":
        raise ValueError(f"cannot write the reconstruction as {target.name!r}: the output is a .npy file")
    check_writable(target)
    depth, height, width = volume.shape
    if args.sr is not None and (args.views is not None or args.limited_angle):
        raise ValueError("--sr (through-plane super-resolution) measures slices, not projections: leave out --views "
                         "and --limited-angle")
    if args.sr is not None:
        if args.sr < 2:
            raise ValueError(f"--sr must be a factor of at least 2, got {args.sr}")
        if depth % args.sr:
            raise ValueError(f"--sr {args.sr} keeps every {args.sr}th slice of {source.name}: its depth {depth} must "
                             f"be a multiple of {args.sr}")
        slice_axis, slice_shape = 1, (depth, width)  # the prior sees (D, W) slices, every sr-th row measured
    else:
        if height != width:
            raise ValueError(f"parallel-beam CT takes square slices; {source.name} has slices of {height}x{width}")
        slice_axis, slice_shape = 0, (height, width)
    if volume.shape[slice_axis] < 2:
        raise ValueError(f"the TV across slices needs at least two slices along axis {slice_axis}; {source.name} "
                         f"has shape {volume.shape}")
    multiple = _volume_model_multiple(args.model)
    if multiple is not None and any(side % multiple for side in slice_shape):
        raise ValueError(f"the prior's UNet takes slices whose sides are multiples of {multiple}; {source.name} "
                         f"({depth}x{height}x{width}) gives slices of {slice_shape[0]}x{slice_shape[1]} along axis "
                         f"{slice_axis}")
    for name in ("lambda_tv", "rho"):
        value = getattr(args, name)
        if value is not None and not (value >= 0 if name == "lambda_tv" else value > 0):
            raise ValueError(f"--{name.replace('_', '-')} must be {'>= 0' if name == 'lambda_tv' else '> 0'}, "
                             f"got {value}")
    views = args.views or (RECONSTRUCT_LIMITED_ANGLE_VIEWS if args.limited_angle else 8)
    return dict(input_path=source, output_path=target, views=views, limited_angle=args.limited_angle, sr=args.sr,
                num_inference_steps=args.steps, seed=args.seed, model=args.model,
                trust_remote_code=args.trust_remote_code, lambda_tv=args.lambda_tv, rho=args.rho)


def _reconstruct(args: argparse.Namespace) -> None:
    request = check_reconstruct_arguments(args)
    from .pipelines.three_d.volume_demo import reconstruct_volume_file

    result = reconstruct_volume_file(**request)
    ours, baseline = result["DiffusionMBIR"], result["baseline"]
    print(f"wrote {args.output}: {result['task']}, DiffusionMBIR {ours['psnr']:.2f} dB / SSIM {ours['ssim']:.3f} "
          f"against the input (classical baseline {baseline['psnr']:.2f} dB / {baseline['ssim']:.3f}) in "
          f"{result['seconds']:.1f} s")


# ``diffusers-ext 3d distill``: the pipeline folder's JSON files, the sizes and the output are checked here, before
# torch is imported; whether the scheduler is VP is checked on the loaded pipeline (check_vp_pipeline).
DISTILL_MESH_FORMATS = ("glb", "ply", "obj")


def _json_file(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ValueError(f"cannot read {path}: {error}") from None


def check_distill_arguments(args: argparse.Namespace) -> dict[str, Any]:
    """Everything about ``3d distill``'s pipeline folder, sizes and output that can be known before torch is
    imported; returns the keyword arguments of ``pipelines.three_d.score_distillation.distill_pretrained``."""
    if not args.prompt.strip():
        raise ValueError("the prompt is empty")
    folder = Path(args.pipeline)
    if not (folder / "model_index.json").is_file():
        raise ValueError(f"no pipeline at {folder}: --pipeline is a folder saved with save_pretrained "
                         "(model_index.json)")
    index = _json_file(folder / "model_index.json")
    missing = [name for name in ("vae", "unet", "text_encoder", "tokenizer", "scheduler")
               if not isinstance(index.get(name), list) or None in index[name]]
    if missing:
        raise ValueError(f"3d distill needs a text-to-image pipeline with a VAE and a UNet (Stable Diffusion 1.x / "
                         f"2.x, SDXL); {folder} ({index.get('_class_name')}) has no {', '.join(missing)}")
    vae, unet = _json_file(folder / "vae" / "config.json"), _json_file(folder / "unet" / "config.json")
    vae_scale = 2 ** (len(vae.get("block_out_channels", [0])) - 1)
    # The images the pipeline was trained on (SD 1.5: 64 x 8 = 512): smaller renders are upsampled to them, as
    # DreamFusion and threestudio feed Stable Diffusion.
    native_size = unet["sample_size"] * vae_scale if isinstance(unet.get("sample_size"), int) else None
    image_size = args.prior_size or native_size or args.size
    multiple = vae_scale * 2 ** (len(unet.get("block_out_channels", [0])) - 1)
    if image_size % multiple:
        raise ValueError(f"{folder}'s VAE and UNet take images whose side is a multiple of {multiple}; "
                         f"{'--prior-size' if args.prior_size else 'the prior size'} is {image_size}")
    if args.resolution < 2:
        raise ValueError(f"--resolution must be at least 2 voxels per axis, got {args.resolution}")
    if args.lr <= 0:
        raise ValueError(f"--lr must be positive, got {args.lr}")
    output = Path(args.output)
    if output.exists() and not output.is_dir():
        raise ValueError(f"--output {output} is a file; it must be a folder (created if missing)")
    check_writable(output / f"mesh.{args.mesh_format}")
    return dict(prompt=args.prompt, pipeline_path=folder, output_dir=output, method=args.method,
                guidance_scale=args.guidance_scale, image_size=image_size, seed=args.seed,
                num_iterations=args.iterations, views_per_iteration=args.views, height=args.size, width=args.size,
                resolution=args.resolution, learning_rate=args.lr, mesh_format=args.mesh_format,
                checkpoint_every=args.checkpoint_every,
                turntable_kwargs={"num_frames": args.turntable_frames, "size": args.turntable_size})


def _distill(args: argparse.Namespace) -> None:
    request = check_distill_arguments(args)
    from .pipelines.three_d.score_distillation import distill_pretrained

    start = time.perf_counter()
    output = distill_pretrained(**request)
    print(f"wrote {output.mesh_path} and {output.turntable_path} ({args.method.upper()}, {args.iterations} "
          f"iterations, {time.perf_counter() - start:.1f} s)")


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def demo_part(text: str) -> str:
    if text not in DEMO_PARTS:
        raise argparse.ArgumentTypeError(f"{text!r} is not a part of the demo; choose from {', '.join(DEMO_PARTS)}")
    return text


SPEED_HOOK_SECTIONS = ("sd15", "sdxl", "sd3", "flux", "stream", "oracle", "trained", "calls")
SPEED_HOOK_METHODS = ("faster-diffusion", "feature-inheritance", "t-stitch", "ras", "diffusers PAB",
                      "diffusers TaylorSeer", "diffusers FirstBlockCache")


def comma_separated(choices: tuple[str, ...]) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        names = [name.strip() for name in text.split(",") if name.strip()]
        if not names:
            raise argparse.ArgumentTypeError(f"name at least one of {', '.join(choices)}")
        unknown = [name for name in names if name not in choices]
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown {', '.join(map(repr, unknown))}; choose from "
                                             f"{', '.join(choices)}")
        return names

    return parse


def add_speed_hooks_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options of ``diffusers-ext bench speed-hooks`` (``diffusers_ext.hooks.benchmark``), kept here so that they
    are checked before torch is imported."""
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--latent-size", type=positive_int, default=32, help="latent side (64 is SD 1.5's 512 px)")
    parser.add_argument("--steps", type=positive_int, default=10, help="denoising steps of the full-size runs")
    parser.add_argument("--repeats", type=positive_int, default=1, help="interleaved repeats of every timed run")
    parser.add_argument("--frames", type=positive_int, default=12,
                        help="frames timed through the img2img stream")
    parser.add_argument("--sections", type=comma_separated(SPEED_HOOK_SECTIONS),
                        default=["sd15", "stream", "oracle", "trained"],
                        help=f"comma-separated, from: {', '.join(SPEED_HOOK_SECTIONS)} "
                             "(default: sd15,stream,oracle,trained, about 7 minutes on 2 cores)")
    parser.add_argument("--sd3", action="store_true", help="add the SD3-medium-shaped transformer section")
    parser.add_argument("--sdxl", action="store_true", help="add the SDXL UNet section")
    parser.add_argument("--flux", action="store_true", help="add the Flux-shaped transformer section")
    parser.add_argument("--flux-blocks", type=positive_int, default=2,
                        help="double-stream blocks of the Flux-shaped model (and twice as many single-stream ones)")
    parser.add_argument("--methods", type=comma_separated(SPEED_HOOK_METHODS), default=[],
                        help="which methods the sd15 / sdxl / sd3 / flux sections run (quote names with spaces), "
                             f"comma-separated, from: {', '.join(SPEED_HOOK_METHODS)} (default: all)")
    parser.add_argument("--call-latent-size", type=positive_int, default=64, help="latent side of the calls section")
    parser.add_argument("--call-repeats", type=positive_int, default=3,
                        help="timed pairs of calls in the calls section")
    return parser


def _speed_hooks(args: argparse.Namespace) -> None:
    from .hooks.benchmark import run

    run(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffusers-ext", description=__doc__.split("\n\n")[0])
    # A ValueError from a command is the user's (a file, a scheduler name) and prints as one line; the benchmark's
    # options are all checked by argparse, so one from inside its long run is a bug and keeps its traceback.
    parser.set_defaults(user_errors=ValueError)
    commands = parser.add_subparsers(dest="command", required=True)

    kinds = sorted({c.kind for c in COMPONENTS})
    list_parser = commands.add_parser("list", help="list the package's components",
                                      description="List diffusers-ext's components with their papers.")
    list_parser.add_argument("--kind", choices=kinds, help="only components of this kind")
    list_parser.add_argument("--markdown", action="store_true", help="print the README's component tables")
    list_parser.set_defaults(run=_list)

    demo = commands.add_parser(
        "demo", help="run the offline demo and write its outputs",
        description="The offline demo, in parts: 'samplers' (diffusers' and diffusers-ext's samplers against the exact "
                    "Gaussian-mixture oracle: error versus NFE, 2-D scatter), 'steering' (steering hooks toward exact "
                    "tilted and posterior laws), 'text' (the shipped masked-diffusion language model generates and "
                    "infills), 'restoration' (the shipped ResShift model super-resolves held-out photos), 'video' "
                    "(the shipped FVDM model generates, animates a first frame, interpolates and makes a long video, "
                    "as GIFs next to held-out clips; the shipped causal model extends held-out clips chunk by chunk), '3d' (SDS and SDI distil a shape from an exact prior into "
                    "meshes and turntables; joint versus per-view multi-view sampling as view grids), '3d_inverse' "
                    "(the shipped slice prior reconstructs volumes with DiffusionMBIR). All parts by default, in about "
                    "80 seconds on 2 CPU cores; --full runs the sampler part at full size.")
    demo.add_argument("parts", nargs="*", type=demo_part, metavar="PART",
                      help=f"which parts to run ({', '.join(DEMO_PARTS)}; default: all)")
    demo.add_argument("--output", default="demo_output", help="folder for the plots and tables (default: %(default)s)")
    demo.add_argument("--full", action="store_true", help="the sampler part with 2048 samples and NFE up to 50")
    demo.add_argument("--num-samples", type=positive_int, help="samples per sampler (default: 512, 2048 with --full)")
    demo.set_defaults(run=_demo)

    restore = commands.add_parser(
        "restore", help="restore an image (by default: 4x super-resolution with the shipped tiny ResShift model)",
        description="Restore an image file with a diffusers-ext restoration pipeline.")
    restore.add_argument("input", help="the degraded (or low-resolution) image file")
    restore.add_argument("output", help="where to write the restored image (.png, .jpg, ...)")
    restore.add_argument("--model", help="a restoration pipeline folder or Hub id (default: the shipped model)")
    restore.add_argument("--steps", type=positive_int,
                         help="sampling steps (default: the model's best, 4 for the shipped one)")
    restore.add_argument("--scale", type=positive_int,
                         help="upscaling factor (default: the model's, 4 for the shipped one)")
    restore.add_argument("--seed", type=int, default=0)
    restore.add_argument("--trust-remote-code", action="store_true",
                         help="allow --model's loader files (needed for folders saved with diffusers-ext's "
                              "save_for_hub; they import classes from the installed diffusers_ext)")
    restore.set_defaults(run=_restore)

    video = commands.add_parser(
        "video", help="make a video (by default with the shipped tiny FVDM model of bouncing shapes)",
        description="Generate a video, animate a first frame (i2v), interpolate between key frames or extend a video "
                    "with a FrameAwareVideoPipeline (FVDM: one noise level per frame). Writes a .gif, or an .mp4 "
                    "with imageio-ffmpeg installed.")
    tasks = video.add_subparsers(dest="task", required=True)
    task_help = {"generate": "a new video", "i2v": "a video that starts at --image",
                 "interpolate": "the frames between key frames (--first and --last, or --key-frames)",
                 "extend": "--video continued to --frames frames in all"}
    for task in VIDEO_TASKS:
        task_parser = tasks.add_parser(task, help=task_help[task],
                                       description=f"diffusers-ext video {task}: {task_help[task]}.")
        task_parser.add_argument("--output", required=True, help="the video file to write (.gif or .mp4)")
        if task == "i2v":
            task_parser.add_argument("--image", required=True, help="the first frame (an image of the model's size)")
        elif task == "interpolate":
            task_parser.add_argument("--first", help="the first frame (an image of the model's size)")
            task_parser.add_argument("--last", help="the last frame")
            task_parser.add_argument("--key-frames", nargs="+", metavar="INDEX=PATH",
                                     help="key frames at any indices instead of --first/--last, e.g. 0=a.png "
                                          "4=b.png 7=c.png")
        elif task == "extend":
            task_parser.add_argument("--video", required=True,
                                     help="the video to continue (.gif or .mp4 of the model's frame size); its last "
                                          "--context-frames frames are the model's context")
        frames_help = ("frames of the whole video, the given ones included (default: the given video's and one "
                       "window more)" if task == "extend" else
                       "frames of the video (default: the model's window, 8 for the shipped model; more roll the "
                       "window)" if task != "interpolate" else
                       "frames of the video, the key frames included (default and most: the window)")
        task_parser.add_argument("--frames", type=positive_int, help=frames_help)
        if task == "extend":
            task_parser.add_argument("--chunk-frames", type=positive_int,
                                     help=f"with a CausalVideoPipeline --model: frames added per chunk (default: "
                                          f"{CAUSAL_CHUNK_FRAMES}, or the VAE's temporal compression if more); "
                                          "--context-frames then bounds the latent frames of context it keeps "
                                          "(default: the most its training report says it saw, 6 for "
                                          "tiny-causal-shapes; otherwise all)")
        task_parser.add_argument("--window", type=positive_int,
                                 help="frames per model call; longer videos roll the window (default: the clips the "
                                      "model was trained on where its training report says, 8 for the shipped one; "
                                      "otherwise the whole video in one call)")
        task_parser.add_argument("--model", default=SHIPPED_VIDEO_MODEL,
                                 help="the shipped model's name, or a FrameAwareVideoPipeline folder or Hub id "
                                      "(default: %(default)s)")
        task_parser.add_argument("--trust-remote-code", action="store_true",
                                 help="allow --model's loader files (needed for folders saved with diffusers-ext's "
                                      "save_for_hub; they import classes from the installed diffusers_ext)")
        task_parser.add_argument("--steps", type=positive_int, default=VIDEO_STEPS,
                                 help="sampling steps (default: %(default)s)")
        task_parser.add_argument("--context-frames", type=positive_int,
                                 help="latent frames each window past the first takes from the one before (default: "
                                      "the model's, 4 for the shipped one)")
        task_parser.add_argument("--seed", type=int, default=0)
        task_parser.add_argument("--fps", type=positive_int, default=VIDEO_FPS,
                                 help="frames per second of the file (default: %(default)s)")
        task_parser.set_defaults(run=_video)

    three_d = commands.add_parser("3d", help="3D: score distillation to a mesh, volumes from projections",
                                  description="3D tasks with diffusion priors.")
    three_d_tasks = three_d.add_subparsers(dest="task", required=True)
    reconstruct = three_d_tasks.add_parser(
        "reconstruct", help="a volume from its simulated measurement, with DiffusionMBIR and the shipped slice prior",
        description="Measure a volume (.npy, (D, H, W) in [0, 1]) by sparse-view or limited-angle parallel-beam CT or "
                    "through-plane downsampling, reconstruct it with DiffusionMBIRPipeline (a 2D slice prior with "
                    "ADMM-TV across slices) and write the reconstruction (.npy); prints PSNR / SSIM against the input "
                    "and the classical baseline's.")
    reconstruct.add_argument("input", help="the volume (.npy, (D, H, W), values in [0, 1])")
    reconstruct.add_argument("output", help="where to write the reconstruction (.npy, float32)")
    reconstruct.add_argument("--views", type=positive_int,
                             help="CT views (default: 8 over 180 degrees; 90 with --limited-angle)")
    reconstruct.add_argument("--limited-angle", action="store_true", help="the views span a 90-degree wedge")
    reconstruct.add_argument("--sr", type=positive_int, metavar="K",
                             help="through-plane super-resolution: only every K-th slice is measured")
    reconstruct.add_argument("--steps", type=positive_int, default=50, help="diffusion steps (default: %(default)s)")
    reconstruct.add_argument("--seed", type=int, default=0)
    reconstruct.add_argument("--lambda-tv", type=float, help="the TV weight across slices (default: the task's)")
    reconstruct.add_argument("--rho", type=float, help="the ADMM penalty (default: the task's)")
    reconstruct.add_argument("--model", help="a DiffusionMBIRPipeline folder or Hub id (default: the shipped prior)")
    reconstruct.add_argument("--trust-remote-code", action="store_true",
                             help="allow --model's loader files (folders saved with diffusers-ext's save_for_hub)")
    reconstruct.set_defaults(run=_reconstruct)
    distill = three_d_tasks.add_parser(
        "distill", help="text to a textured mesh by score distillation (SDS / SDI) from a text-to-image pipeline",
        description="Optimise a voxel grid so that its renders from random cameras score well under a VP "
                    "text-to-image pipeline (Stable Diffusion 1.x / 2.x, SDXL) by SDS (DreamFusion) or SDI (score "
                    "distillation via DDIM inversion); writes mesh.<format> and turntable.gif to --output.")
    distill.add_argument("prompt", help="what to make (DreamFusion's view suffixes are appended per camera)")
    distill.add_argument("--pipeline", required=True, help="a text-to-image pipeline folder (save_pretrained)")
    distill.add_argument("--output", required=True, help="the folder to write mesh and turntable to")
    distill.add_argument("--method", choices=("sds", "sdi"), default="sds")
    distill.add_argument("--iterations", type=positive_int, default=500, help="Adam steps (default: %(default)s)")
    distill.add_argument("--views", type=positive_int, default=4, help="cameras per step (default: %(default)s)")
    distill.add_argument("--size", type=positive_int, default=64, help="render side in pixels (default: %(default)s)")
    distill.add_argument("--prior-size", type=positive_int,
                         help="resize renders to this side before the VAE (default: the pipeline's own image size, "
                              "its UNet's sample_size times the VAE's scale: 512 for Stable Diffusion 1.5)")
    distill.add_argument("--resolution", type=positive_int, default=32,
                         help="voxel grid vertices per axis (default: %(default)s)")
    distill.add_argument("--guidance-scale", type=float,
                         help="classifier-free guidance (default: 100 for SDS, 7.5 for SDI, as the papers)")
    distill.add_argument("--lr", type=float, default=0.05, help="Adam learning rate (default: %(default)s)")
    distill.add_argument("--mesh-format", choices=DISTILL_MESH_FORMATS, default="glb")
    distill.add_argument("--checkpoint-every", type=positive_int, help="save the voxel grid every N steps")
    distill.add_argument("--turntable-frames", type=positive_int, default=24, help="(default: %(default)s)")
    distill.add_argument("--turntable-size", type=positive_int, default=96, help="side in pixels (default: "
                                                                                 "%(default)s)")
    distill.add_argument("--seed", type=int, default=0)
    distill.set_defaults(run=_distill)

    bench = commands.add_parser("bench", help="benchmarks",
                                description="Benchmarks: samplers on the exact oracles, speed hooks.")
    bench_kinds = bench.add_subparsers(dest="benchmark", required=True)
    accuracy = bench_kinds.add_parser(
        "sampler-accuracy", help="error versus NFE of samplers on the exact Gaussian-mixture oracle",
        description="Sliced W2 to the exact law, distance to the exact ODE solution and mixture-weight error versus "
                    "counted NFE, for any schedulers (VP ones built from Stable Diffusion 1.x's config, flow ones from "
                    "SD3's), with plots.")
    accuracy.add_argument("--scheduler", action="append",
                          help="repeatable: a built-in name (DDIM, DEIS, ...), a scheduler class of diffusers or "
                               "diffusers-ext (ERSDESolverScheduler), or module:ClassName; default: diffusers' built-ins")
    accuracy.add_argument("--output", default="benchmarks/results")
    accuracy.add_argument("--num-samples", type=positive_int, default=4096)
    accuracy.add_argument("--dims", type=positive_int, nargs="+", default=[2, 64])
    accuracy.add_argument("--nfe", type=positive_int, nargs="+", default=[5, 10, 20, 50])
    accuracy.set_defaults(run=_bench)
    speed_hooks = bench_kinds.add_parser(
        "speed-hooks", help="speed hooks against the stock pipelines and diffusers' caches: wall time, FLOPs, fidelity",
        description="Speed hooks against the stock pipelines and diffusers' own caches in one run: wall-time and "
                    "CPU-time ratios, FLOPs, fidelity to the stock output; writes speed_hooks.csv and speed_hooks.png.")
    add_speed_hooks_arguments(speed_hooks).set_defaults(run=_speed_hooks, user_errors=())

    # Listed here for --help; main() hands its arguments to training/cli.py.
    commands.add_parser("train", add_help=False,
                        help="train a registered method on the shared Trainer (diffusers-ext train --help)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        if argv[:1] == ["train"]:
            from .training.cli import main as train

            return train(argv[1:])
        parser = build_parser()
        args = parser.parse_args(argv)
        try:
            args.run(args)
        except args.user_errors as error:  # the package's clear errors about what the user asked for
            print(f"{parser.prog} {args.command}: error: {' '.join(str(error).split())}", file=sys.stderr)
            return 2
    except BrokenPipeError:  # the reader went away (``diffusers-ext list | head``): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
