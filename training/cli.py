"""``diffusers-ext train <method> [--config run.yaml] [--<field> value ...] [--resume latest|PATH]``: a registered
method on the shared ``Trainer``. The run's ``TrainingConfig`` is the YAML file's fields with the flags on top (every
field is a flag, ``--max_steps`` or ``--max-steps``); ``--resume`` is ``--resume_from``.

A method registers itself with one entry in ``TRAINING_METHODS``: its name -> a function of the run's
``TrainingConfig`` and the parsed arguments that returns ``(method, model, dataset)``.

The run writes ``output_dir/config.yaml`` (the effective config: ``--config`` it to repeat the run), checkpoints, and
the trained weights in ``output_dir/final`` (their EMA when ``ema_decay`` is set, as diffusers' examples ship).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import typing
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.data import Dataset

from .trainer import Trainer, TrainingConfig, TrainingMethod, TrainingResult, coerce_field, process_state

MethodFactory = Callable[[TrainingConfig, argparse.Namespace], tuple[TrainingMethod, torch.nn.Module, Dataset]]
FINAL_FOLDER = "final"
TEXT_SEQUENCE_LENGTH = 32
PATCH_SIZE = 32


def masked_diffusion_lm(config: TrainingConfig, args: argparse.Namespace):
    """MDLM / RADD on Python's documentation: a 400-token BPE tokenizer (saved to ``output_dir/tokenizer``) and a
    2-layer BERT, on 32-token chunks."""
    from transformers import BertConfig, BertForMaskedLM

    from ..schedulers import MaskedDiffusionScheduler
    from .masked_diffusion_lm import MaskedDiffusionLMObjective
    from .text_data import pydoc_paragraphs, token_chunks, train_tokenizer

    paragraphs = pydoc_paragraphs()
    tokenizer = train_tokenizer(paragraphs[:400], vocab_size=400)
    if process_state().is_main_process:  # the model is useless without the tokenizer this run trained
        tokenizer.save_pretrained(Path(config.output_dir) / "tokenizer")
    torch.manual_seed(config.seed)
    model = BertForMaskedLM(BertConfig(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2,
                                       num_attention_heads=2, intermediate_size=128,
                                       max_position_embeddings=TEXT_SEQUENCE_LENGTH))
    method = MaskedDiffusionLMObjective(MaskedDiffusionScheduler(mask_token_id=tokenizer.mask_token_id))
    return method, model.train(), token_chunks(tokenizer, paragraphs, TEXT_SEQUENCE_LENGTH)


def restoration(config: TrainingConfig, args: argparse.Namespace):
    """ResShift denoising (Gaussian noise, std 0.1) on 512 patches of 32 px from scikit-image's training photos, with
    a small ``UNet2DModel`` (one attention level, so that LoRA has attention projections to wrap)."""
    from diffusers import UNet2DModel

    from ..schedulers import ResShiftScheduler
    from .paired_restoration import PairedRestorationObjective
    from .restoration_data import DegradedPatchDataset, make_degradation, random_patches, scikit_image_photos

    patches = random_patches(scikit_image_photos("train"), PATCH_SIZE, count=512, seed=config.seed)
    dataset = DegradedPatchDataset(patches, make_degradation("gaussian_noise", std=0.1, clip=True), seed=config.seed)
    torch.manual_seed(config.seed)
    unet = UNet2DModel(sample_size=PATCH_SIZE, in_channels=6, out_channels=3, block_out_channels=(16, 32),
                       layers_per_block=1, norm_num_groups=8, attention_head_dim=8,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"))
    method = PairedRestorationObjective(ResShiftScheduler(num_train_timesteps=4, kappa=0.5))
    return method, unet.train(), dataset


def toy_run_of(module: str) -> MethodFactory:
    """The ``toy_run(config, args)`` of ``training.<module>``, imported only when its method is chosen."""

    def toy_run(config: TrainingConfig, args: argparse.Namespace):
        return importlib.import_module(f".{module}", __package__).toy_run(config, args)

    return toy_run


TRAINING_METHODS: dict[str, MethodFactory] = {
    "ddpo": toy_run_of("ddpo"),
    "domainstudio": toy_run_of("domainstudio"),
    "lcm-lora": toy_run_of("lcm_lora"),
    "masked-diffusion-lm": masked_diffusion_lm,
    "restoration": restoration,
    "rlcm": toy_run_of("rlcm"),
    "smooth-lora": toy_run_of("smooth_lora"),
    "spm": toy_run_of("spm"),
}


def _flag_type(name: str) -> Callable[[str], object]:
    def parse(text: str) -> object:
        try:
            return coerce_field(name, text)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffusers-ext train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("method", help=f"the training method: {', '.join(TRAINING_METHODS)}")
    parser.add_argument("--config", help="a YAML file of TrainingConfig fields (flags override it)")
    hints = typing.get_type_hints(TrainingConfig)
    for f in dataclasses.fields(TrainingConfig):
        names = [f"--{f.name}"] + ([f"--{f.name.replace('_', '-')}"] if "_" in f.name else [])
        if f.name == "resume_from":
            names.append("--resume")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        options = dict(dest=f.name, default=argparse.SUPPRESS, help=f"(default: {default})")
        if any(typing.get_origin(t) is list for t in (hints[f.name], *typing.get_args(hints[f.name]))):
            parser.add_argument(*names, nargs="+", metavar="NAME", **options)
        elif hints[f.name] is bool:
            parser.add_argument(*names, nargs="?", const=True, type=_flag_type(f.name), metavar="BOOL", **options)
        else:
            value_type = next(t for t in (int, float, str) if t in (hints[f.name], *typing.get_args(hints[f.name])))
            metavar = "latest|PATH" if f.name == "resume_from" else value_type.__name__.upper()
            parser.add_argument(*names, type=_flag_type(f.name), metavar=metavar, **options)
    return parser


def parse_arguments(argv: list[str] | None = None) -> tuple[argparse.Namespace, TrainingConfig]:
    """The parsed arguments and the run's config: defaults, then ``--config``'s fields, then the flags. An unknown
    method or a bad config is a ``ValueError``."""
    args = build_parser().parse_args(argv)
    if args.method not in TRAINING_METHODS:
        raise ValueError(f"unknown training method {args.method!r}; registered methods: {', '.join(TRAINING_METHODS)}")
    overrides = {name: getattr(args, name) for name in TrainingConfig.field_names() if hasattr(args, name)}
    if args.config is None:
        return args, TrainingConfig.from_dict(overrides)
    return args, TrainingConfig.from_yaml(args.config, overrides)


def save_trained_model(result: TrainingResult, method_name: str, config: TrainingConfig, folder: Path) -> Path:
    """The trained weights (their EMA if the run kept one) in the format that loads them: a diffusers adapter on a
    ``UNet2DConditionModel`` as Stable Diffusion's ``pytorch_lora_weights.safetensors`` with a card
    (``pipe.load_lora_weights(folder)``), on another diffusers model in that model's LoRA format
    (``model.load_lora_adapter(folder, prefix=None, use_safetensors=True)``), anything else (for a PEFT model: the
    adapter) with ``save_pretrained``."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders import PeftAdapterMixin

    from .lora import save_lora_weights

    model = result.model
    if result.ema_weights is not None:
        model.load_state_dict(result.ema_weights, strict=False)
    has_diffusers_adapter = isinstance(model, PeftAdapterMixin) and bool(getattr(model, "peft_config", None))
    if has_diffusers_adapter and isinstance(model, UNet2DConditionModel):
        return save_lora_weights(model, folder, method_name=method_name, config=config)
    if has_diffusers_adapter:
        model.save_lora_adapter(folder)
    else:
        model.save_pretrained(folder)
    return folder


def main(argv: list[str] | None = None) -> int:
    try:
        args, config = parse_arguments(argv)
    except ValueError as error:
        build_parser().error(str(error))
    method, model, dataset = TRAINING_METHODS[args.method](config, args)
    trainer = Trainer(method, model, dataset, config)
    if trainer.accelerator.is_main_process:
        config.to_yaml(Path(config.output_dir) / "config.yaml")
    result = trainer.train()
    if trainer.accelerator.is_main_process:
        folder = save_trained_model(result, method.name, config, Path(config.output_dir) / FINAL_FOLDER)
        last_loss = f", last loss {result.losses[-1]:.4f}" if result.losses else ""
        print(f"trained {method.name} to step {result.step}{last_loss}; weights in {folder}")
    return 0
