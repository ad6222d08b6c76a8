"""``TrainingConfig``, what a training run does, and the checkpoints a run leaves: kept apart from the trainer so that
``diffusers-ext train`` parses, checks and explains a run (``--help``) without importing torch."""

from __future__ import annotations

import json
import os
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

CHECKPOINT_PREFIX = "checkpoint-"
# What each checkpoint records, readable without torch: the method's name, the step and the run's config.
CHECKPOINT_RECORD = "trainer_state.json"
MIXED_PRECISION_CHOICES = ("no", "fp16", "bf16")
# diffusers' text-to-image LoRA recipe: the attention projections of every transformer block.
DIFFUSERS_LORA_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]
# BERT-style attention projections, the targets for transformers models (the masked-diffusion LM's).
TRANSFORMERS_LORA_TARGETS = ["query", "key", "value"]
# Methods' own targets, here so that ``diffusers-ext train <method> --help`` shows them without importing the method.
# SPM: every Linear / Conv2d inside a Transformer2DModel (the official SPMNetwork's targets), as PEFT name suffixes.
SPM_TARGET_MODULES = ["proj_in", "proj_out", "to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"]
# LCM-LoRA's reference script: attention, feed-forward, ResNet convolutions, resamplers and the time-embedding
# projections.
LCM_LORA_TARGET_MODULES = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                           "conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv",
                           "time_emb_proj"]
# The settings a resumed run may change: how long it runs, where it writes, what it logs, and a memory trade that
# computes the same. Every other field shapes the checkpoint's state (adapter, optimizer, EMA, data order, scaler).
CHANGEABLE_ON_RESUME = ("output_dir", "resume_from", "max_steps", "checkpoint_every", "validation_every", "log_with",
                        "project_name", "gradient_checkpointing")
_TRUE_WORDS, _FALSE_WORDS = ("true", "yes", "on", "1"), ("false", "no", "off", "0")
_NONE_WORDS = ("none", "null", "~", "")


@dataclass
class TrainingConfig:
    """What a run does; every method shares these fields. Build it in Python, from a YAML file of these fields
    (``from_yaml``), or from ``diffusers-ext train``'s flags. Strings are parsed into the field's type (``"1e-4"``,
    ``"true"``, ``"none"``, ``"to_q,to_v"``), so YAML's unquoted ``1e-4`` (a string to YAML 1.1) works. Each field's
    ``metadata`` holds its ``help`` and ``metavar`` (``diffusers-ext train <method> --help`` prints them;
    ``transformers.HfArgumentParser`` reads them too)."""

    output_dir: str = field(default="training_output", metadata={
        "help": "where the run writes: config.yaml, checkpoint-<step>/, final/, validation/step-<step>/, logs/",
        "metavar": "PATH"})
    max_steps: int = field(default=1000, metadata={"help": "optimizer steps", "metavar": "N"})
    batch_size: int = field(default=16, metadata={"help": "samples per process and accumulation micro-step",
                                                  "metavar": "N"})
    learning_rate: float = field(default=1e-3, metadata={"help": "AdamW's learning rate", "metavar": "LR"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW's weight decay", "metavar": "X"})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "micro-batches per optimizer step",
                                                                  "metavar": "N"})
    mixed_precision: str = field(default="no", metadata={
        "help": "no, fp16 or bf16 (accelerate's); under fp16 the trained weights stay in float32 (diffusers' "
                "cast_training_params)", "metavar": "{no,fp16,bf16}"})
    checkpoint_every: int = field(default=500, metadata={
        "help": "save the full state (weights, optimizer, EMA, random state, step) every this many steps and at the "
                "last step, for resume_from; 0: never", "metavar": "N"})
    resume_from: str | None = field(default=None, metadata={
        "help": "continue a run from a checkpoint folder, or 'latest' (the newest in output_dir); the checkpoint "
                "supplies the run's settings", "metavar": "latest|PATH"})
    lora_rank: int | None = field(default=None, metadata={
        "help": "train a PEFT LoRA adapter of this rank instead of every weight; none: full fine-tuning",
        "metavar": "R"})
    lora_alpha: int | None = field(default=None, metadata={
        "help": "the adapter's scale numerator (its output is scaled by lora_alpha / lora_rank); none: lora_rank",
        "metavar": "A"})
    lora_target_modules: list[str] | None = field(default=None, metadata={
        "help": "module names LoRA wraps (PEFT's target_modules); none: to_k, to_q, to_v, to_out.0 on diffusers "
                "models, query, key, value on others", "metavar": "NAME"})
    seed: int = field(default=0, metadata={"help": "seeds data order, noise and the adapter's initialisation",
                                           "metavar": "N"})
    gradient_checkpointing: bool = field(default=False, metadata={
        "help": "recompute activations in the backward pass (less memory, the same result)"})
    max_grad_norm: float | None = field(default=None, metadata={
        "help": "clip the gradient's global norm to this before each step; none: never", "metavar": "X"})
    ema_decay: float | None = field(default=None, metadata={
        "help": "keep an exponential moving average of the trained weights (diffusers' EMAModel, warm-up "
                "min(decay, k / (k + 9))), checkpointed, validated and saved instead of the raw weights; none: no EMA",
        "metavar": "X"})
    validation_every: int = field(default=0, metadata={
        "help": "run the method's validation every this many steps into validation/step-<step>/; 0: never",
        "metavar": "N"})
    log_with: str | None = field(default=None, metadata={
        "help": "an accelerate tracker (tensorboard, wandb, ...) for the loss and validation, logged to logs/; none: "
                "no tracker", "metavar": "TRACKER"})
    project_name: str = field(default="diffusers-ext", metadata={"help": "the tracker's project (run) name",
                                                                 "metavar": "NAME"})

    def __post_init__(self):
        for name, annotation in typing.get_type_hints(type(self)).items():
            setattr(self, name, _coerce(name, getattr(self, name), annotation))
        for name in ("max_steps", "batch_size", "gradient_accumulation_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        for name in ("checkpoint_every", "validation_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0 (0: never), got {getattr(self, name)}")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be positive, got {self.learning_rate!r}")
        if self.mixed_precision not in MIXED_PRECISION_CHOICES:
            raise ValueError(f"mixed_precision must be one of {MIXED_PRECISION_CHOICES}, got {self.mixed_precision!r}")
        for name in ("lora_rank", "lora_alpha"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer (or None), got {getattr(self, name)!r}")
        if self.lora_rank is None and (self.lora_alpha is not None or self.lora_target_modules is not None):
            raise ValueError("lora_alpha and lora_target_modules need lora_rank (None: full fine-tuning, no adapter)")
        if self.lora_target_modules is not None and not self.lora_target_modules:
            raise ValueError("lora_target_modules must name at least one module (or be None for the default)")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be positive (or None: no clipping), got {self.max_grad_norm!r}")
        if self.ema_decay is not None and not 0 < self.ema_decay < 1:
            raise ValueError(f"ema_decay must lie in (0, 1) (or be None: no EMA), got {self.ema_decay!r}")
        if not self.project_name:
            raise ValueError("project_name must not be empty")
        if self.log_with is not None:
            _check_tracker(self.log_with)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> TrainingConfig:
        """A config from field values (strings are parsed); unknown names are a ``ValueError`` naming them."""
        cls._check_names(values, "the values")
        return cls(**values)

    @classmethod
    def from_yaml(cls, path: str | os.PathLike, overrides: Mapping[str, Any] | None = None) -> TrainingConfig:
        """The fields in the YAML file at ``path``, then ``overrides`` on top (both checked and parsed the same
        way); fields in neither keep their defaults."""
        overrides = overrides or {}
        cls._check_names(overrides, "the overrides")
        return cls(**{**read_config_file(path), **overrides})

    @classmethod
    def _check_names(cls, values: Mapping[str, Any], source: str) -> None:
        unknown = sorted(set(values) - set(cls.field_names()))
        if unknown:
            raise ValueError(f"unknown TrainingConfig field(s) in {source}: {unknown}; valid fields: "
                             f"{cls.field_names()}")

    def to_yaml(self, path: str | os.PathLike, comment: str | None = None) -> Path:
        """The config as a YAML file of its fields (``from_yaml`` reads it back), after a ``# comment`` line if
        given."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        header = f"# {comment}\n" if comment else ""
        path.write_text(header + yaml.safe_dump(asdict(self), sort_keys=False), encoding="utf-8")
        return path


def read_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """The ``TrainingConfig`` fields in the YAML file at ``path``, each parsed into its field's type; a
    ``ValueError`` for a missing or unreadable file, a non-mapping or an unknown field."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"no such config file: {path}")
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as error:
        raise ValueError(f"{path} is not valid YAML: {' '.join(str(error).split())}") from None
    if not isinstance(values, dict):
        raise ValueError(f"{path} must hold a mapping of TrainingConfig fields, got a {type(values).__name__}")
    TrainingConfig._check_names(values, str(path))
    return {name: coerce_field(name, value) for name, value in values.items()}


def _describe(annotation: Any) -> str:
    if _optional_inner(annotation) is not None:
        return f"{_describe(_optional_inner(annotation))} or None"
    if typing.get_origin(annotation) is list:
        return "a list of strings"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}[annotation]


def _optional_inner(annotation: Any) -> Any | None:
    """``X`` for ``X | None``, else ``None``."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and type(None) in typing.get_args(annotation):
        (inner,) = [a for a in typing.get_args(annotation) if a is not type(None)]
        return inner
    return None


def _coerce(name: str, value: Any, field_type: Any) -> Any:
    """``value`` as a TrainingConfig field of type ``field_type``: checked, and parsed when it is a string."""
    annotation = field_type
    inner = _optional_inner(annotation)
    if inner is not None:
        if value is None or (isinstance(value, str) and value.strip().lower() in _NONE_WORDS):
            return None
        annotation = inner
    text = value.strip() if isinstance(value, str) else None
    try:
        if typing.get_origin(annotation) is list:
            items = [item.strip() for item in text.split(",") if item.strip()] if text is not None else value
            if isinstance(items, list | tuple) and all(isinstance(item, str) for item in items):
                return list(items)
        elif annotation is bool:
            if isinstance(value, bool):
                return value
            if text is not None and text.lower() in _TRUE_WORDS + _FALSE_WORDS:
                return text.lower() in _TRUE_WORDS
        elif annotation is int:
            if isinstance(value, int) and not isinstance(value, bool):
                return value
            if text is not None:
                return int(text)
        elif annotation is float:
            if isinstance(value, int | float) and not isinstance(value, bool):
                return float(value)
            if text is not None:
                return float(text)
        elif annotation is str and isinstance(value, str | os.PathLike):
            return os.fspath(value)
    except ValueError:
        pass
    raise ValueError(f"{name} must be {_describe(field_type)}, got {value!r}")


def coerce_field(name: str, value: Any) -> Any:
    """``value`` parsed and checked as ``TrainingConfig.<name>`` (a ``ValueError`` if it is not one)."""
    return _coerce(name, value, typing.get_type_hints(TrainingConfig)[name])


def _check_tracker(name: str) -> None:
    # accelerate imports torch: only a run that asks for a tracker pays for it.
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS, get_available_trackers
    from accelerate.utils import LoggerType

    if name not in LOGGER_TYPE_TO_CLASS:
        raise ValueError(f"log_with={name!r} is not an accelerate tracker; known: {sorted(LOGGER_TYPE_TO_CLASS)}")
    # accelerate silently drops a built-in tracker whose package is missing; a run asked to log must not.
    if name in {t.value for t in LoggerType} and LoggerType(name) not in get_available_trackers():
        raise ValueError(f"log_with={name!r} needs its package, which is not installed (pip install {name})")


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    steps = {int(p.name[len(CHECKPOINT_PREFIX):]): p for p in Path(output_dir).glob(f"{CHECKPOINT_PREFIX}*")
             if re.fullmatch(r"\d+", p.name[len(CHECKPOINT_PREFIX):])}
    return steps[max(steps)] if steps else None


def checkpoint_folder(resume_from: str, output_dir: str | Path) -> Path:
    """The checkpoint ``resume_from`` names: a folder, or ``"latest"``, the newest in ``output_dir``; a
    ``ValueError`` when there is none."""
    if resume_from == "latest":
        folder = latest_checkpoint(output_dir)
        if folder is None:
            raise ValueError(f"no checkpoint to resume in {output_dir} (resume_from='latest'): a run checkpoints "
                             "every checkpoint_every steps and at its last step, unless checkpoint_every is 0")
        return folder
    if not Path(resume_from).is_dir():
        raise ValueError(f"no checkpoint to resume at {resume_from!r} (not a folder)")
    return Path(resume_from)


@dataclass
class CheckpointRecord:
    """What ``CHECKPOINT_RECORD`` in a checkpoint folder holds: the method's name, the step and the run's config."""

    method: str
    step: int
    config: TrainingConfig

    def write(self, folder: str | os.PathLike) -> None:
        text = json.dumps({"method": self.method, "step": self.step, "config": asdict(self.config)}, indent=2)
        (Path(folder) / CHECKPOINT_RECORD).write_text(text + "\n", encoding="utf-8")

    @classmethod
    def read(cls, folder: str | os.PathLike) -> CheckpointRecord | None:
        """The folder's record; ``None`` for a checkpoint written without one."""
        path = Path(folder) / CHECKPOINT_RECORD
        if not path.is_file():
            return None
        record = json.loads(path.read_text(encoding="utf-8"))
        return cls(record["method"], record["step"], TrainingConfig.from_dict(record["config"]))


def resume_contradictions(saved: TrainingConfig, values: Mapping[str, Any]) -> list[str]:
    """``values`` (fields of the run that resumes ``saved``'s checkpoint) that differ from ``saved`` where a resumed
    run must keep them (every field not in ``CHANGEABLE_ON_RESUME``), as ``"name = value (the checkpoint's: ...)"``."""
    return [f"{name} = {shown_value(value)} (the checkpoint's: {name} {shown_value(getattr(saved, name))})"
            for name, value in values.items()
            if name not in CHANGEABLE_ON_RESUME and coerce_field(name, value) != getattr(saved, name)]


def shown_value(value: Any, list_separator: str = ",") -> str:
    """A field's value as a flag takes it."""
    if isinstance(value, list):
        return list_separator.join(value)
    if isinstance(value, bool):
        return str(value).lower()
    return "none" if value is None else str(value)
