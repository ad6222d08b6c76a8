"""The one training loop every diffusers-ext method plugs into: a method is a loss, the loop is this.

Built on accelerate (devices, mixed precision, gradient accumulation, multi-process, checkpoint state) and PEFT
(LoRA adapters, when ``TrainingConfig.lora_rank`` is set).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, set_seed
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

CHECKPOINT_PREFIX = "checkpoint-"


@dataclass
class TrainingConfig:
    """What a run does; every method shares these fields.

    Attributes:
        output_dir: checkpoints go to ``output_dir/checkpoint-<step>``.
        max_steps: optimizer steps.
        batch_size: per process, per accumulation micro-step.
        learning_rate, weight_decay: AdamW's.
        gradient_accumulation_steps: micro-batches per optimizer step.
        mixed_precision: ``"no"``, ``"fp16"`` or ``"bf16"`` (accelerate's).
        checkpoint_every: save the full state (model, optimizer, RNG, step) every this many steps; 0 never.
        resume_from: a checkpoint folder, or ``"latest"`` (the newest in ``output_dir``), or ``None``.
        lora_rank: train a PEFT LoRA adapter of this rank instead of every weight; ``None`` for full fine-tuning.
        lora_target_modules: module names LoRA wraps (PEFT's ``target_modules``).
        seed: seeds data order, noise and initialisation of adapters.
    """

    output_dir: str = "training_output"
    max_steps: int = 1000
    batch_size: int = 16
    learning_rate: float = 1e-3
    weight_decay: float = 0.0
    gradient_accumulation_steps: int = 1
    mixed_precision: str = "no"
    checkpoint_every: int = 0
    resume_from: str | None = None
    lora_rank: int | None = None
    lora_target_modules: list[str] = field(default_factory=lambda: ["query", "key", "value"])
    seed: int = 0

    def __post_init__(self):
        for name in ("max_steps", "batch_size", "gradient_accumulation_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be positive, got {self.learning_rate!r}")
        if self.checkpoint_every < 0:
            raise ValueError(f"checkpoint_every must be >= 0, got {self.checkpoint_every}")
        if self.lora_rank is not None and (isinstance(self.lora_rank, bool) or not isinstance(self.lora_rank, int)
                                           or self.lora_rank < 1):
            raise ValueError(f"lora_rank must be a positive integer (or None for full fine-tuning), got "
                             f"{self.lora_rank!r}")


class TrainingMethod(Protocol):
    """A method: a name (stored in checkpoints, so a run cannot resume another method's) and a loss."""

    name: str

    def loss(self, model: torch.nn.Module, batch: Any, generator: torch.Generator) -> torch.Tensor: ...


@dataclass
class TrainingResult:
    model: torch.nn.Module
    losses: list[float]
    step: int


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    folders = [p for p in Path(output_dir).glob(f"{CHECKPOINT_PREFIX}*") if re.fullmatch(r"\d+", p.name[len(CHECKPOINT_PREFIX):])]
    return max(folders, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]), default=None)


class Trainer:
    """``Trainer(method, model, dataset, config).train()``: AdamW on the model's trainable weights (or a LoRA
    adapter), ``method.loss`` on shuffled batches, checkpoints with accelerate's ``save_state`` and an exact resume
    (data order, RNG and optimizer state continue where they stopped). Checkpoints are this run's own files: resume
    only from folders you wrote (accelerate reads optimizer and RNG state with ``torch.load``)."""

    def __init__(self, method: TrainingMethod, model: torch.nn.Module, dataset: Dataset, config: TrainingConfig,
                 collate_fn: Callable | None = None):
        if len(dataset) == 0:
            raise ValueError("the training data set is empty")
        self.method, self.config = method, config
        self.accelerator = Accelerator(gradient_accumulation_steps=config.gradient_accumulation_steps,
                                       mixed_precision=config.mixed_precision,
                                       dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True))
        set_seed(config.seed)
        if config.lora_rank is not None:
            from peft import LoraConfig, get_peft_model

            model = get_peft_model(model, LoraConfig(r=config.lora_rank, lora_alpha=config.lora_rank,
                                                     target_modules=config.lora_target_modules))
        # An explicit generator keeps the loader's own draws off the global RNG, which dropout uses: a resumed run
        # creates its loader iterator at a different moment than the uninterrupted one.
        loader = DataLoader(dataset, batch_size=config.batch_size, shuffle=True,
                            drop_last=len(dataset) >= config.batch_size, collate_fn=collate_fn,
                            generator=torch.Generator().manual_seed(config.seed))
        parameters = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(parameters, lr=config.learning_rate, weight_decay=config.weight_decay)
        self.model, self.optimizer, self.loader = self.accelerator.prepare(model, optimizer, loader)
        self.generator = torch.Generator().manual_seed(config.seed + 1)
        self.step = 0
        self.accelerator.register_for_checkpointing(self)

    # accelerate saves and restores these with every checkpoint
    def state_dict(self) -> dict:
        return {"step": self.step, "method": self.method.name, "generator": self.generator.get_state(),
                "config": asdict(self.config)}

    def load_state_dict(self, state: dict) -> None:
        if state["method"] != self.method.name:
            raise ValueError(f"the checkpoint was written by method {state['method']!r}, not {self.method.name!r}")
        self.step = state["step"]
        self.generator.set_state(state["generator"])

    def _resume(self) -> None:
        target = self.config.resume_from
        if target is None:
            return
        folder = latest_checkpoint(self.config.output_dir) if target == "latest" else Path(target)
        if folder is None or not folder.is_dir():
            raise ValueError(f"no checkpoint to resume from at {target!r} (output_dir={self.config.output_dir!r})")
        self.accelerator.load_state(str(folder))

    def save_checkpoint(self) -> Path:
        folder = Path(self.config.output_dir) / f"{CHECKPOINT_PREFIX}{self.step}"
        self.accelerator.save_state(str(folder))
        return folder

    def train(self) -> TrainingResult:
        self._resume()
        config, losses = self.config, []
        micro_steps_per_epoch = len(self.loader)
        progress = tqdm(total=config.max_steps, initial=self.step, desc=f"training {self.method.name}",
                        disable=not self.accelerator.is_local_main_process)
        while self.step < config.max_steps:
            # Data order is a function of the epoch, so a resumed run skips exactly the batches it already saw.
            micro_step = self.step * config.gradient_accumulation_steps
            epoch, done = divmod(micro_step, micro_steps_per_epoch)
            self.loader.set_epoch(epoch)
            loader = self.accelerator.skip_first_batches(self.loader, done) if done else self.loader
            for batch in loader:
                with self.accelerator.accumulate(self.model):
                    loss = self.method.loss(self.model, batch, self.generator)
                    if not torch.isfinite(loss):
                        raise ValueError(f"the {self.method.name} loss is not finite at step {self.step}: {loss.item()}")
                    self.accelerator.backward(loss)
                    self.optimizer.step()
                    self.optimizer.zero_grad()
                if not self.accelerator.sync_gradients:
                    continue
                self.step += 1
                losses.append(float(loss.detach()))
                progress.update()
                progress.set_postfix(loss=f"{losses[-1]:.4f}")
                if config.checkpoint_every and self.step % config.checkpoint_every == 0:
                    self.save_checkpoint()
                if self.step >= config.max_steps:
                    break
        progress.close()
        return TrainingResult(model=self.accelerator.unwrap_model(self.model), losses=losses, step=self.step)

