"""``diffusers-ext train <method> [--config run.yaml] [--<field> value ...] [--resume latest|PATH]``: a registered
method on the shared ``Trainer``.

A run's ``TrainingConfig`` is ``TrainingConfig``'s defaults, then the method's own (``TrainingMethodEntry.defaults``),
then the ``--config`` file's fields, then the flags (every field is a flag: ``--max-steps`` or ``--max_steps``).
``--resume`` takes the run's settings from its checkpoint instead, and refuses flags that contradict them.

Everything the command can check is checked before torch is imported (but for ``--log-with``, checked against
accelerate's trackers) and before anything is written: ``--help`` and user errors (one line, exit code 2) cost a
fraction of a second. ``transformers.HfArgumentParser`` would also map
``TrainingConfig`` to flags (the fields carry its ``help`` / ``metavar`` metadata), but importing it costs about a
second, it gives every flag a default (so flags the user gave could not be told from defaults, which layering over a
config file and a checkpoint needs), and it cannot take ``none`` for an optional field; the few lines below do.

The run writes ``output_dir/config.yaml`` (its settings: ``--config`` it to repeat the run), checkpoints, and the
trained weights in ``output_dir/final`` (their EMA when ``ema_decay`` is set, as diffusers' examples ship).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import shutil
import textwrap
import typing
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from .config import (
    CHANGEABLE_ON_RESUME,
    CHECKPOINT_PREFIX,
    CHECKPOINT_RECORD,
    LCM_LORA_TARGET_MODULES,
    SPM_TARGET_MODULES,
    CheckpointRecord,
    TrainingConfig,
    checkpoint_folder,
    coerce_field,
    read_config_file,
    resume_contradictions,
    shown_value,
)

PROG = "diffusers-ext train"
FINAL_FOLDER = "final"
RUN_CONFIG_NAME = "config.yaml"
RUN_CONFIG_COMMENT = PROG + " {method}: this run's settings (--config this file to repeat the run)"
MAX_HELP_WIDTH = 100


def toy_function(module: str, name: str = "toy_run") -> Callable[..., Any]:
    """``training.<module>.<name>``, imported when called: the registry must not import torch."""

    def call(*args: Any, **kwargs: Any) -> Any:
        return getattr(importlib.import_module(f".{module}", __package__), name)(*args, **kwargs)

    return call


@dataclasses.dataclass(frozen=True)
class TrainingMethodEntry:
    """A method of ``diffusers-ext train``: how its run is built and saved, and what ``--help`` says of it.

    Attributes:
        build: ``build(config, args) -> (method, model, dataset)``, the run's parts (it imports torch itself).
        summary: its line in ``diffusers-ext train --help``.
        description: what the run trains, on what, with which fixed settings (``summary`` when empty).
        writes: the folders of ``output_dir`` the run writes besides ``config.yaml`` and checkpoints, and how each
            loads.
        defaults: the method's own defaults for ``TrainingConfig`` fields (a config file and flags override them).
        fixed: field values the method cannot run without; another value is an error.
        needs_adapter: the method trains a LoRA adapter, so ``lora_rank`` must not be none.
        save: ``save(model, folder, method_name=..., config=..., dataset=...) -> folder``, what writes ``final``;
            ``None``: ``save_trained_model``.
    """

    build: Callable[..., Any]
    summary: str
    description: str = ""
    writes: Mapping[str, str] = dataclasses.field(default_factory=dict)
    defaults: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    fixed: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    needs_adapter: bool = False
    save: Callable[..., Any] | None = None


# The toy runs that build their method without validation inputs: their validate() would raise at the first
# validation step, after that many steps of training.
WITHOUT_VALIDATION = {"validation_every": 0}
DENOISER_WRITES = ("with lora_rank: the adapter, pytorch_lora_weights.safetensors (pipe.load_lora_weights(folder)); "
                   "without: the whole UNet (UNet2DConditionModel.from_pretrained(folder))")

TRAINING_METHODS: dict[str, TrainingMethodEntry] = {
    "causal-video": TrainingMethodEntry(
        build=toy_function("causal_video"),
        summary="Causal video (Ca2-VDM / ViD-GPT): teacher forcing of a frame-causal video model (toy: shapes)",
        description="Ca2-VDM (arXiv 2411.16375) and ViD-GPT (arXiv 2406.10981) make a video model's temporal "
                    "attention causal and extend a video chunk by chunk, the clean frames so far as context at "
                    "timestep 0 (their keys and values cached across denoising steps). Training is teacher forcing: "
                    "clean context frames, then a chunk noised at one timestep, the loss on the chunk only. The toy "
                    "run: a random two-block Wan transformer (training.fvdm.toy_backbone(seed)) made frame-causal, "
                    "chunks of 2 frames after 0, 2, 4 or 6 context frames of 8-frame 16 x 16 RGB bouncing-shapes "
                    "clips, flow matching, unconditional.",
        writes={"final/": "without lora_rank: the WanTransformer3DModel (from_pretrained(folder)); with it: the "
                          "adapter (toy_backbone(seed).load_lora_adapter(folder, prefix=None)); sample with "
                          "CausalVideoPipeline(model, FrameAwareFlowMatchScheduler()), which makes it causal for each "
                          "call: chunk_frames=2, height=width=16 (diffusers-ext video extend once saved with "
                          "save_for_hub)"},
        fixed=WITHOUT_VALIDATION),
    "crepa": TrainingMethodEntry(
        build=toy_function("crepa"),
        summary="CREPA: LoRA fine-tuning, hidden states aligned to frozen features of each frame and its neighbours",
        description="CREPA (arXiv 2506.09229) adds to a video model's diffusion loss the alignment (cosine, through a "
                    "trained projection head) of one block's hidden states with a frozen image encoder's features of "
                    "the same frame and of its neighbours, weighted exp(-|k - f| / tau). The toy run: lambda 0.5, "
                    "tau 1, neighbours at distance 1, block len(blocks) // 4, a fixed random conv net as the encoder "
                    "(training.crepa.RandomConvFrameEncoder), over the fvdm toy run's loss (the random two-block Wan "
                    "transformer training.fvdm.toy_backbone(seed), 1024 bouncing-shapes clips of 8 frames of 16 x 16 "
                    "RGB pixels, flow matching, unconditional). The projection head is used in training only.",
        writes={"final/": "with lora_rank (default 8): the adapter (toy_backbone(seed).load_lora_adapter(folder, "
                          "prefix=None)); without: the WanTransformer3DModel (from_pretrained(folder)); sample as the "
                          "fvdm run's"},
        defaults={"lora_rank": 8},
        fixed=WITHOUT_VALIDATION),
    "ddpo": TrainingMethodEntry(
        build=toy_function("ddpo"),
        summary="DDPO: PPO over DDIM sampling steps for any reward (toy: JPEG compressibility)",
        description="DDPO (arXiv 2305.13301) treats each DDIM step (eta > 0) as an action and a reward on the final "
                    "image as the return, and fine-tunes the UNet with PPO. The toy run: a random tiny Stable "
                    "Diffusion pipeline, the prompts 'a cat', 'a dog', 'a bird', 'a fish', 4 images per prompt a "
                    "round, 10 DDIM steps at guidance 3, JPEG compressibility as the reward.",
        writes={"base_pipeline/": "the random pipeline it trains (StableDiffusionPipeline.from_pretrained)",
                "final/": f"{DENOISER_WRITES}; sample it with DDIM at eta=1"}),
    "domainstudio": TrainingMethodEntry(
        build=toy_function("domainstudio"),
        summary="DomainStudio: few-shot domain adaptation keeping relative distances and high frequencies",
        description="DomainStudio (arXiv 2306.14153) fine-tunes on a few images of a domain with a DreamBooth prior, "
                    "keeping the adapted samples' relative distances and high-frequency details so that the model "
                    "does not collapse onto the shots. The toy run: the official loss weights on a random tiny UNet "
                    "(training.smooth_lora.toy_unet(seed)), 4 shots and 8 source latents with random prompt "
                    "embeddings. Without lora_rank (the paper's setting) the source model is a frozen copy of the "
                    "initial UNet, with it the UNet with its adapter turned off.",
        writes={"final/": f"{DENOISER_WRITES}, for training.smooth_lora.toy_unet(seed)"},
        fixed=WITHOUT_VALIDATION),
    "fvdm": TrainingMethodEntry(
        build=toy_function("fvdm"),
        summary="FVDM: a video denoiser with one timestep per frame (toy: bouncing shapes)",
        description="FVDM (arXiv 2410.03160) conditions a video model on a vectorized timestep, one per frame, so that "
                    "one model samples videos, image-to-video, interpolation and long videos. Training uses PTSS: with "
                    "probability 0.2 (the authors' p) a batch's frames draw their timesteps independently, otherwise "
                    "each clip draws one for all its frames. The toy run: a random two-block Wan transformer "
                    "(training.fvdm.toy_backbone(seed)) on 1024 synthetic clips of 8 frames of 16 x 16 RGB pixels "
                    "(training.fvdm.BouncingShapes), flow matching, unconditional.",
        writes={"final/": "without lora_rank: the WanTransformer3DModel (from_pretrained(folder)); with it: the "
                          "adapter (toy_backbone(seed).load_lora_adapter(folder, prefix=None)); sample with "
                          "FlowMatchEulerDiscreteScheduler()'s flow path and a zero text embedding of shape (1, 1, 16)"},
        fixed=WITHOUT_VALIDATION),
    "lcm-lora": TrainingMethodEntry(
        build=toy_function("lcm_lora"),
        summary="LCM-LoRA: few-step sampling distilled into a LoRA adapter (sampled with LCMScheduler)",
        description="LCM-LoRA (arXiv 2311.05556) distils latent consistency into a LoRA adapter: the UNet with the "
                    "adapter off is the teacher. The toy run: a random tiny Stable Diffusion UNet distilled on 256 "
                    "of its own 50-step samples at guidance 2, which take about a minute to draw on a CPU before "
                    "the first step. It trains an adapter: rank 8 on the reference script's targets by default.",
        writes={"base_unet/": "the random teacher UNet (UNet2DConditionModel.from_pretrained)",
                "final/": "the adapter, pytorch_lora_weights.safetensors: load it into a pipeline with base_unet as "
                          "its UNet and sample with LCMScheduler at guidance_scale=1 in 1-8 steps "
                          "(diffusers_ext.training.lcm_lora_pipeline)"},
        defaults={"lora_rank": 8, "lora_target_modules": LCM_LORA_TARGET_MODULES},
        fixed=WITHOUT_VALIDATION,
        needs_adapter=True),
    "masked-diffusion-lm": TrainingMethodEntry(
        build=toy_function("masked_diffusion_lm"),
        summary="MDLM / RADD: a masked-diffusion language model (toy: Python's documentation)",
        description="The masked-diffusion language-model objective (MDLM, arXiv 2406.07524; RADD's "
                    "time-independent parameterisation, arXiv 2406.03736). The toy run: a 400-token BPE tokenizer "
                    "trained on Python's documentation and a 2-layer BERT on 32-token chunks of it.",
        writes={"tokenizer/": "the tokenizer the run trained (PreTrainedTokenizerFast.from_pretrained)",
                "final/": "without lora_rank: the model (BertForMaskedLM.from_pretrained(folder)); with it: the PEFT "
                          "adapter (PeftModel.from_pretrained); for MaskedDiffusionLMPipeline"},
        fixed=WITHOUT_VALIDATION),
    "multiview": TrainingMethodEntry(
        build=toy_function("multiview"),
        summary="MVDream: a 2D UNet made multi-view (toy: 4 views of random coloured shapes)",
        description="MVDream (arXiv 2308.16512) makes a 2D text-to-image UNet multi-view: self-attention across "
                    "the views of one object and a camera embedding added to the timestep embedding, fine-tuned on "
                    "rendered views with 2D batches mixed in (probability 0.3). The toy run: a random tiny "
                    "pixel-space UNet (training.multiview.toy_unet(seed)) made multi-view for 4 views, a LoRA "
                    "adapter on its attention (rank 8 by default; lora_rank none: the whole UNet) and the camera "
                    "MLP trained, on 1024 random shapes rendered from orbits at 16 x 16 pixels "
                    "(training.multiview.RenderedShapeViews), DDPM epsilon, unconditional.",
        writes={"final/": "with lora_rank: the UNet's adapter, pytorch_lora_weights.safetensors "
                          "(MultiViewDiffusionPipeline's load_lora_weights); without: the UNet in unet/; and the "
                          "camera MLP in camera_embedding/ (CameraEmbedding.from_pretrained)"},
        defaults={"lora_rank": 8},
        fixed=WITHOUT_VALIDATION,
        save=toy_function("multiview", "save_multiview_weights")),
    "restoration": TrainingMethodEntry(
        build=toy_function("paired_restoration"),
        summary="ResShift image restoration on paired data (toy: denoising photo patches)",
        description="The paired-restoration objective (one loss for ResShift, RDDM, the mean-reverting SDE and the "
                    "diffusion bridge). The toy run: ResShift (4 steps, kappa 0.5) learning to remove Gaussian "
                    "noise (std 0.1) from 512 patches of 32 px of scikit-image's training photos, with a small "
                    "UNet2DModel.",
        writes={"final/": "without lora_rank: the UNet2DModel (from_pretrained(folder)); with it: the PEFT adapter "
                          "(PeftModel.from_pretrained); sample with ResShiftPipeline and "
                          "ResShiftScheduler(num_train_timesteps=4, kappa=0.5)"},
        fixed=WITHOUT_VALIDATION),
    "rlcm": TrainingMethodEntry(
        build=toy_function("rlcm"),
        summary="RLCM: PPO over a latent consistency model's multistep sampler (toy: JPEG compressibility)",
        description="RLCM (arXiv 2404.03673) fine-tunes a latent consistency model with PPO over its multistep "
                    "sampler. The toy run: the random tiny pipeline of ddpo sampled by LCMScheduler in 4 steps, "
                    "the same four prompts, JPEG compressibility as the reward.",
        writes={"base_pipeline/": "the random pipeline it trains (StableDiffusionPipeline.from_pretrained)",
                "final/": f"{DENOISER_WRITES}; sample it with LCMScheduler"}),
    "smooth-lora": TrainingMethodEntry(
        build=toy_function("smooth_lora"),
        summary="Smooth Diffusion: a LoRA with the step-wise variation regularisation (smoother latent space)",
        description="Smooth Diffusion (arXiv 2312.04410): the denoising loss plus a penalty that makes the output's "
                    "variation proportional to the input noise's. The toy run: lambda 1, beta 0.01 on a random "
                    "tiny UNet (training.smooth_lora.toy_unet(seed)) over 512 latents of 2 prompts x 2 prototypes. "
                    "A LoRA of the official rank 8 by default; --lora-rank none trains the whole UNet.",
        writes={"final/": f"{DENOISER_WRITES}, for training.smooth_lora.toy_unet(seed)"},
        defaults={"lora_rank": 8},
        fixed=WITHOUT_VALIDATION),
    "spm": TrainingMethodEntry(
        build=toy_function("spm"),
        save=toy_function("spm", "save_toy_run"),
        summary="SPM: a rank-1 LoRA 'membrane' that erases a concept (toy: 'a cat')",
        description="SPM (arXiv 2312.16145) trains a one-dimensional adapter, a membrane, that erases a concept while "
                    "latent anchoring keeps other prompts as they were; at inference each membrane is scaled by the "
                    "prompt's similarity to its concept (facilitated transport). The toy run erases 'a cat' "
                    "(surrogate '') from a random tiny Stable Diffusion pipeline with anchor weight 1 and 10 DDIM "
                    "steps for x_t. A membrane is rank 1, on SPM's targets by default.",
        writes={"base_pipeline/": "the random pipeline it erases from (StableDiffusionPipeline.from_pretrained)",
                "final/": "the membrane, pytorch_lora_weights.safetensors and spm.json (the concept): "
                          "transport = diffusers_ext.training.load_spm(pipe, [\"<output_dir>/final\"]), then "
                          "transport(prompt, ...) generates; any UNet of that architecture takes it"},
        defaults={"lora_target_modules": SPM_TARGET_MODULES},
        fixed={"lora_rank": 1, **WITHOUT_VALIDATION}),
}

COMMON_WRITES = {
    RUN_CONFIG_NAME: "this run's settings (--config it to repeat the run)",
    f"{CHECKPOINT_PREFIX}<step>/": "the full state every checkpoint_every steps and at the last one, for --resume",
    "validation/, logs/": "validation outputs and tracker logs, with validation_every and log_with",
}


class _OneLineErrorParser(argparse.ArgumentParser):
    """argparse, with a user error as one line: its usage block, which here would list every flag, is left out."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions as they are written (``_paragraphs`` wraps them, and the table of outputs), option help wrapped
    without breaking words such as ``diffusers-ext`` or ``to_out.0``."""

    def _split_lines(self, text: str, width: int) -> list[str]:
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False, break_long_words=False)


def _help_width() -> int:
    """argparse's width (the terminal's, less 2), at most ``MAX_HELP_WIDTH``."""
    return min(MAX_HELP_WIDTH, shutil.get_terminal_size().columns - 2)


def _formatter(prog: str) -> argparse.HelpFormatter:
    return _HelpFormatter(prog, width=_help_width(), max_help_position=34)


def _paragraphs(*texts: str) -> str:
    return "\n\n".join(textwrap.fill(text, _help_width(), break_on_hyphens=False) for text in texts)


def _writes_help(entry: TrainingMethodEntry) -> str:
    rows = {**entry.writes, **COMMON_WRITES}
    width = max(map(len, rows)) + 2
    return "\n".join(textwrap.fill(what, _help_width(), initial_indent=f"  {path:<{width}}",
                                   subsequent_indent=" " * (width + 2), break_on_hyphens=False)
                     for path, what in rows.items())


def _default_help(method: str, entry: TrainingMethodEntry, name: str, default: Any) -> str:
    if name in entry.fixed:
        return f"default: {shown_value(entry.fixed[name], ', ')}, which {method} needs"
    if name in entry.defaults:
        return f"{method}'s default: {shown_value(entry.defaults[name], ', ')}"
    return f"default: {shown_value(default, ', ')}"


def _flag_type(name: str) -> Callable[[str], object]:
    def parse(text: str) -> object:
        try:
            return coerce_field(name, text)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    return parse


def _add_method_parser(methods: Any, method: str, entry: TrainingMethodEntry) -> None:
    description = (f"{_paragraphs(entry.description or entry.summary)}\n\n"
                   f"writes into output_dir:\n{_writes_help(entry)}\n\n"
                   + _paragraphs("Settings: TrainingConfig's fields with this method's defaults; a --config file "
                                 "overrides the defaults, flags override the file. With --resume the checkpoint "
                                 "supplies them, and only these may differ: "
                                 f"{', '.join(n for n in CHANGEABLE_ON_RESUME if n != 'resume_from')}."))
    parser = methods.add_parser(method, help=entry.summary, prog=f"{PROG} {method}", description=description,
                                usage=f"{PROG} {method} [--config FILE] [--resume latest|PATH] [--FIELD VALUE ...]",
                                formatter_class=_formatter)
    parser.add_argument("--config", metavar="FILE", help="a YAML file of the settings below")
    settings = parser.add_argument_group("settings")
    hints = typing.get_type_hints(TrainingConfig)
    for field in dataclasses.fields(TrainingConfig):
        names = [f"--{field.name.replace('_', '-')}"]
        hidden = [f"--{field.name}"] if "_" in field.name else []
        if field.name == "resume_from":
            names, hidden = ["--resume"], ["--resume-from", *hidden]
        options: dict[str, Any] = dict(dest=field.name, default=argparse.SUPPRESS,
                                       metavar=field.metadata.get("metavar"))
        field_type = hints[field.name]
        if any(typing.get_origin(t) is list for t in (field_type, *typing.get_args(field_type))):
            options.update(nargs="+")  # joined with commas and parsed with the rest (values_given)
        elif field_type is bool:
            options.update(nargs="?", const=True, type=_flag_type(field.name), metavar="BOOL")
        else:
            options.update(type=_flag_type(field.name))
        default_help = _default_help(method, entry, field.name, field.default)
        settings.add_argument(*names, help=f"{field.metadata['help']} ({default_help})", **options)
        if hidden:
            settings.add_argument(*hidden, help=argparse.SUPPRESS, **options)


def build_parser() -> argparse.ArgumentParser:
    overview = _paragraphs(
        "Train a registered method on diffusers-ext's shared Trainer (accelerate: mixed precision, gradient "
        "accumulation, multi-process with accelerate launch, checkpoints with an exact resume; PEFT LoRA adapters). "
        "Each method's toy run trains a tiny model offline, in minutes on a CPU.",
        f"{PROG} METHOD --help shows the method's settings, defaults and what it writes.")
    parser = _OneLineErrorParser(prog=PROG, description=overview, formatter_class=_formatter,
                                 usage=f"{PROG} METHOD [--config FILE] [--resume latest|PATH] [--FIELD VALUE ...]")
    methods = parser.add_subparsers(dest="method", required=True, metavar="METHOD", title="methods")
    for method, entry in TRAINING_METHODS.items():
        _add_method_parser(methods, method, entry)
    return parser


def values_given(args: argparse.Namespace) -> dict[str, Any]:
    """The ``TrainingConfig`` fields given as flags, parsed (a list flag's words joined with commas first, so that
    ``--lora-target-modules to_q to_v``, ``to_q,to_v`` and ``none`` all work)."""
    values = {name: getattr(args, name) for name in TrainingConfig.field_names() if hasattr(args, name)}
    return {name: coerce_field(name, ",".join(value) if isinstance(value, list) else value)
            for name, value in values.items()}


def method_config(method: str, **values: Any) -> TrainingConfig:
    """The config of a fresh run of ``method``: ``TrainingConfig``'s defaults, then the method's, then ``values``; a
    ``ValueError`` when a value contradicts what the method needs."""
    entry = TRAINING_METHODS[method]
    for name, needed in entry.fixed.items():
        if name in values and coerce_field(name, values[name]) != needed:
            raise ValueError(f"{method} needs {name} = {shown_value(needed)}, got "
                             f"{shown_value(coerce_field(name, values[name]))}")
    merged = {**entry.defaults, **entry.fixed, **values}
    if entry.needs_adapter and coerce_field("lora_rank", merged.get("lora_rank")) is None:
        raise ValueError(f"{method} trains a LoRA adapter: lora_rank must be set (its default is "
                         f"{entry.defaults.get('lora_rank')})")
    return TrainingConfig.from_dict(merged)


def _check_new_output_dir(output_dir: Path) -> None:
    """A fresh run must not write over another run's record, checkpoints or weights."""
    found = sorted(p.name for p in [output_dir / RUN_CONFIG_NAME, output_dir / FINAL_FOLDER,
                                    *output_dir.glob(f"{CHECKPOINT_PREFIX}*")] if p.exists())
    if found:
        raise ValueError(f"{output_dir} already holds a run ({', '.join(found)}): continue it with --resume latest, "
                         "or start this one in another --output-dir")


def _recorded_method(run_folder: Path) -> str | None:
    """The method named in the first line of the run's ``config.yaml``, if the command wrote one there."""
    path = run_folder / RUN_CONFIG_NAME
    if not path.is_file():
        return None
    first_line, prefix = path.read_text(encoding="utf-8").partition("\n")[0], f"# {PROG} "
    return first_line[len(prefix):].partition(":")[0] if first_line.startswith(prefix) else None


def resumed_config(method: str, given: Mapping[str, Any]) -> TrainingConfig:
    """The config of a run that continues from ``given["resume_from"]``: the checkpoint's record of its run, with
    the settings a resumed run may change (``CHANGEABLE_ON_RESUME``) taken from ``given``; a ``ValueError`` for no
    checkpoint, another method's, a given value that contradicts the record, or a run already at ``max_steps``."""
    output_dir = given.get("output_dir", TrainingConfig.output_dir)
    folder = checkpoint_folder(given["resume_from"], output_dir)
    record = CheckpointRecord.read(folder)
    if record is None:
        raise ValueError(f"{folder} holds no record of its run ({CHECKPOINT_RECORD}): it was not written by "
                         "diffusers-ext's Trainer")
    recorded_method = _recorded_method(folder.parent)
    if recorded_method is not None and recorded_method != method:
        raise ValueError(f"{folder} is a checkpoint of a {recorded_method} run, not {method}")
    contradictions = resume_contradictions(record.config, given)
    if contradictions:
        raise ValueError(f"{'; '.join(contradictions)}: a resumed run keeps its checkpoint's settings (leave these "
                         "out, or start a new run in another --output-dir)")
    changed = {name: value for name, value in given.items() if name in CHANGEABLE_ON_RESUME}
    config = TrainingConfig.from_dict({**dataclasses.asdict(record.config), **changed,
                                       "output_dir": str(given.get("output_dir", folder.parent)),
                                       "resume_from": str(folder)})
    if record.step >= config.max_steps:
        raise ValueError(f"{folder} is at step {record.step} and max_steps is {config.max_steps}: pass a larger "
                         "--max-steps to train on")
    return config


def run_config(args: argparse.Namespace) -> TrainingConfig:
    """The run's config from its parsed arguments (see the module docstring), read and checked without importing
    torch; a ``ValueError`` for a bad config file or value, or a run that cannot start or resume."""
    given = {**(read_config_file(args.config) if args.config is not None else {}), **values_given(args)}
    if given.get("resume_from") is not None:
        return resumed_config(args.method, given)
    config = method_config(args.method, **given)
    _check_new_output_dir(Path(config.output_dir))
    return config


def parse_arguments(argv: list[str] | None = None) -> tuple[argparse.Namespace, TrainingConfig]:
    """The parsed arguments and ``run_config``: a bad flag exits (argparse), the rest is a ``ValueError``."""
    args = build_parser().parse_args(argv)
    return args, run_config(args)


def trained_model(result: Any, method: Any = None) -> Any:
    """The trained model with its EMA weights loaded, if the run kept an EMA (and the EMA of ``method``'s
    ``trainable_modules()``, such as a camera MLP or a projection head, loaded into them)."""
    if result.ema_weights is not None:
        result.model.load_state_dict(result.ema_weights, strict=False)
    if result.method_ema_weights:
        modules = method.trainable_modules()
        for name, weights in result.method_ema_weights.items():
            # strict=False: only trained parameters have an EMA; a name the module lacks is still an error.
            unexpected = modules[name].load_state_dict(weights, strict=False).unexpected_keys
            if unexpected:
                raise ValueError(f"the EMA of {name} names parameters it does not have: {unexpected}")
    return result.model


def save_trained_model(model: Any, folder: str | Path, *, method_name: str, config: TrainingConfig,
                       dataset: Any = None) -> Path:
    """The trained weights in the format that loads them: a diffusers adapter on a ``UNet2DConditionModel`` as Stable
    Diffusion's ``pytorch_lora_weights.safetensors`` with a card (``pipe.load_lora_weights(folder)``), on another
    diffusers model in that model's LoRA format (``model.load_lora_adapter(folder, prefix=None,
    use_safetensors=True)``), anything else (for a PEFT model: the adapter) with ``save_pretrained``."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders import PeftAdapterMixin

    from .lora import save_lora_weights

    folder = Path(folder)
    has_diffusers_adapter = isinstance(model, PeftAdapterMixin) and bool(getattr(model, "peft_config", None))
    if has_diffusers_adapter and isinstance(model, UNet2DConditionModel):
        return save_lora_weights(model, folder, method_name=method_name, config=config)
    if has_diffusers_adapter:
        model.save_lora_adapter(folder)
    else:
        model.save_pretrained(folder)
    return folder


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = run_config(args)
    except ValueError as error:
        parser.exit(2, f"{PROG} {args.method}: error: {error}\n")
    from .trainer import Trainer

    entry = TRAINING_METHODS[args.method]
    method, model, dataset = entry.build(config, args)
    trainer = Trainer(method, model, dataset, config)
    if trainer.accelerator.is_main_process:  # the run starts: its record may be written
        settings = dataclasses.replace(config, resume_from=None)
        settings.to_yaml(Path(config.output_dir) / RUN_CONFIG_NAME,
                         comment=RUN_CONFIG_COMMENT.format(method=args.method))
    result = trainer.train()
    if trainer.accelerator.is_main_process:
        save = entry.save or save_trained_model
        folder = save(trained_model(result, method), Path(config.output_dir) / FINAL_FOLDER, method_name=method.name,
                      config=config, dataset=dataset)
        last_loss = f", last loss {result.losses[-1]:.4f}" if result.losses else ""
        print(f"trained {method.name} to step {result.step}{last_loss}; weights in {folder}")
    return 0
