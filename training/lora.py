"""Save a LoRA adapter trained on a diffusers model the way diffusers' own training scripts do, so that stock
diffusers loads it with ``pipe.load_lora_weights(folder_or_repo)``: ``pytorch_lora_weights.safetensors`` in
diffusers' key format, with the adapter's PEFT config as metadata (without it the loader assumes
``lora_alpha == rank`` and a model trained with another alpha comes back scaled wrongly), and a model card. Also the
pieces the LoRA methods share: the model with its adapter turned off (``adapters_disabled``, the frozen base model),
a trained UNet swapped into a pipeline for validation (``unet_swapped``), and seeded sampling (``sample_images``).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import yaml
from accelerate.utils import extract_model_from_parallel
from diffusers import DiffusionPipeline, StableDiffusionPipeline
from huggingface_hub import ModelCard
from peft.utils import get_peft_model_state_dict

from ..hub import render_model_card, upload_to_hub
from .config import TrainingConfig

LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
CARD_TEMPLATE = "trainer"
# The pipeline arguments sample_images sets itself.
RESERVED_SAMPLING_ARGUMENTS = ("prompt_embeds", "generator", "num_images_per_prompt", "output_type", "return_dict")
DEFAULT_BASE_MODEL_USE = "the frozen base model is this model with its LoRA adapter turned off"


def lora_base_model(model: torch.nn.Module, use: str = DEFAULT_BASE_MODEL_USE) -> torch.nn.Module:
    """The diffusers model inside the trainer's (possibly distributed) wrapper, checked to carry a diffusers LoRA
    adapter, whose disabling gives the frozen base model; ``use`` says what needs it, for the error."""
    unwrapped = extract_model_from_parallel(model)
    if not (callable(getattr(unwrapped, "disable_adapters", None)) and getattr(unwrapped, "peft_config", None)):
        raise ValueError(f"{use}, but this {type(unwrapped).__name__} has no diffusers LoRA adapter; train it with "
                         "TrainingConfig(lora_rank=...)")
    return unwrapped


@contextmanager
def adapters_disabled(model: torch.nn.Module, use: str = DEFAULT_BASE_MODEL_USE) -> Iterator[torch.nn.Module]:
    """The frozen base model for the block: ``model`` unwrapped (``lora_base_model``) with diffusers'
    ``disable_adapters``, and ``enable_adapters`` afterwards, even if the block raises."""
    unwrapped = lora_base_model(model, use)
    unwrapped.disable_adapters()
    try:
        yield unwrapped
    finally:
        unwrapped.enable_adapters()


@contextmanager
def unet_swapped(pipeline: Any, unet: torch.nn.Module) -> Iterator[Any]:
    """``pipeline`` with ``unet`` (unwrapped from the trainer's wrapper) in place of its own for the block, and its
    own put back afterwards: how validation samples the model being trained with a stock pipeline's other parts."""
    stock_unet = pipeline.unet
    pipeline.unet = extract_model_from_parallel(unet)
    try:
        yield pipeline
    finally:
        pipeline.unet = stock_unet


def sample_images(pipeline: Any, prompt_embeds: torch.Tensor, seeds: Sequence[int], *, output_type: str = "pt",
                  **pipeline_kwargs: Any) -> Any:
    """One image per seed (``torch.Generator().manual_seed(seed)`` each) from one prompt's embeddings (1, L, E),
    in one pipeline call: ``(N, 3, H, W)`` in [0, 1] for ``output_type="pt"``, a list of PIL images for ``"pil"``.
    ``pipeline_kwargs``: ``num_inference_steps``, ``guidance_scale``, ``negative_prompt_embeds``, ``height``, ..."""
    if not seeds:
        raise ValueError("sample_images needs at least one seed")
    if prompt_embeds.dim() != 3 or prompt_embeds.shape[0] != 1:
        raise ValueError(f"prompt_embeds must be one prompt's embeddings, (1, L, E), got {tuple(prompt_embeds.shape)}")
    reserved = sorted(set(pipeline_kwargs) & set(RESERVED_SAMPLING_ARGUMENTS))
    if reserved:
        raise ValueError(f"sample_images sets {reserved} itself; do not pass them")
    generators = [torch.Generator().manual_seed(int(seed)) for seed in seeds]
    return pipeline(prompt_embeds=prompt_embeds, num_images_per_prompt=len(generators), generator=generators,
                    output_type=output_type, **pipeline_kwargs).images


def _adapter_config(model: torch.nn.Module, adapter_name: str) -> Any:
    configs = getattr(model, "peft_config", None) or {}
    if adapter_name not in configs:
        raise ValueError(f"{type(model).__name__} has no LoRA adapter named {adapter_name!r} (adapters: "
                         f"{sorted(configs)}); train it with TrainingConfig(lora_rank=...)")
    return configs[adapter_name]


def lora_model_card(*, pipeline_class: type[DiffusionPipeline], method_name: str, config: TrainingConfig,
                    base_model: str | None = None, repo_id: str | None = None,
                    template: str = CARD_TEMPLATE) -> ModelCard:
    """The card: what trained the adapter (method, base model, the whole ``TrainingConfig``) and how to load it
    (``hub_cards/<template>.md``: ``trainer``, or a method's own when it loads another way, as SPM's does)."""
    # Local paths mean nothing on the Hub.
    shared_fields = {k: v for k, v in asdict(config).items() if k not in ("output_dir", "resume_from")}
    training_config = yaml.safe_dump(shared_fields, sort_keys=False).strip()
    description = (
        f"A LoRA adapter (rank {config.lora_rank}, alpha {config.lora_alpha or config.lora_rank}) for the "
        f"denoiser of a `{pipeline_class.__name__}`, trained with the `{method_name}` method of diffusers-ext's "
        f"shared trainer for {config.max_steps} steps.\n\n"
        f"Base model: {f'[{base_model}](https://huggingface.co/{base_model})' if base_model else 'not recorded'}.\n\n"
        f"## Training configuration\n\n```yaml\n{training_config}\n```"
    )
    return render_model_card(template, class_name=pipeline_class.__name__, repo_id=repo_id,
                             base_model=base_model, tags=["lora", method_name], title=repo_id or f"{method_name} LoRA",
                             description=description)


def save_lora_weights(model: torch.nn.Module, folder: str | os.PathLike, *,
                      pipeline_class: type[DiffusionPipeline] = StableDiffusionPipeline, method_name: str,
                      config: TrainingConfig, base_model: str | None = None, repo_id: str | None = None,
                      card: bool = True, card_template: str = CARD_TEMPLATE, adapter_name: str = "default") -> Path:
    """Write the adapter of ``model`` (a diffusers denoiser trained with ``lora_rank`` set) into ``folder``.

    Args:
        model: the denoiser (``TrainingResult.model``; load ``ema_weights`` into it first to save the EMA).
        pipeline_class: the pipeline that loads it; its LoRA loader decides the key prefix (``unet.`` for
            Stable Diffusion, ``transformer.`` for SD3 / Flux).
        method_name, config: what trained it, for the card.
        base_model: the Hub id of the base model, for the card's metadata and loading snippet.
        repo_id: the Hub id it will have, for the card's loading snippet.
        card: write ``README.md`` too, from ``hub_cards/<card_template>.md``.

    Returns:
        The folder; ``pipeline_class.from_pretrained(base_model).load_lora_weights(folder)`` loads it.

    The ``Trainer`` adds its adapter to the model it is given, under PEFT's name ``"default"``: a pipeline whose
    denoiser was trained (``Trainer(method, pipe.unet, ...)``) samples with the adapter already. Loading the file
    into that pipeline again (diffusers 0.42) adds a copy under a new name (``"default_1"``; PEFT warns of "multiple
    adapters") and makes the copy the only active adapter, so nothing is applied twice, but the weights are held
    twice. To replace the trained adapter there with the saved one, ``pipe.delete_adapters("default")`` first, then
    ``pipe.load_lora_weights(folder, adapter_name="default")``.
    """
    adapter = _adapter_config(model, adapter_name)
    denoiser = pipeline_class._lora_loadable_modules[0]
    # PEFT's own key names: diffusers' loader reads them for every layer type, while its old-format conversion
    # renames only attention layers and the loader then drops those from a mixed file.
    layers = get_peft_model_state_dict(model, adapter_name=adapter_name)
    folder = Path(folder)
    pipeline_class.save_lora_weights(folder, safe_serialization=True, weight_name=LORA_WEIGHTS_NAME,
                                     **{f"{denoiser}_lora_layers": layers,
                                        f"{denoiser}_lora_adapter_metadata": adapter.to_dict()})
    if card:
        lora_model_card(pipeline_class=pipeline_class, method_name=method_name, config=config,
                        base_model=base_model, repo_id=repo_id, template=card_template).save(folder / "README.md")
    return folder


def push_lora_weights_to_hub(model: torch.nn.Module, repo_id: str, *, token: str | None = None,
                             private: bool | None = None, commit_message: str = "Upload LoRA with diffusers-ext",
                             **save_options: Any):
    """``save_lora_weights`` into a temporary folder, then ``hub.upload_to_hub``. Returns huggingface_hub's
    ``CommitInfo``."""
    return upload_to_hub(lambda folder: save_lora_weights(model, folder, repo_id=repo_id, **save_options), repo_id,
                         token=token, private=private, commit_message=commit_message)
