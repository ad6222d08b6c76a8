"""The one training loop every diffusers-ext method plugs into: a method is a loss, the loop is this.

Built on accelerate (devices, mixed precision, gradient accumulation, gradient clipping, multi-process, checkpoint
state, experiment trackers) and PEFT (LoRA adapters, when ``TrainingConfig.lora_rank`` is set: diffusers'
``add_adapter`` on diffusers models, ``get_peft_model`` on others), with diffusers' ``EMAModel`` for an exponential
moving average of the trained weights.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import (
    DataLoaderConfiguration,
    GradientAccumulationPlugin,
    ProjectConfiguration,
    gather_object,
    parse_flag_from_env,
    send_to_device,
    set_seed,
)
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from .config import (
    CHECKPOINT_PREFIX,
    DIFFUSERS_LORA_TARGETS,
    TRANSFORMERS_LORA_TARGETS,
    CheckpointRecord,
    TrainingConfig,
    checkpoint_folder,
    resume_contradictions,
)

VALIDATION_FOLDER = "validation"


class TrainingMethod(Protocol):
    """A method: a name (stored in checkpoints, so a run cannot resume another method's) and a loss. It may also have

    - ``validate(model, step, folder) -> dict[str, float] | list[PIL.Image.Image]``, called every
      ``TrainingConfig.validation_every`` steps: numbers are logged, images saved into ``folder`` and logged;
    - ``collect(model, batch, generator) -> list[batch]``, a sampling phase (reinforcement learning): each batch of
      the data set (prompts, say) is handed to it, with the model unwrapped, in eval mode and without gradients, and
      the training batches it returns (transitions of sampled trajectories, say) are what the next micro-steps'
      losses take; a checkpoint keeps the ones not yet taken;
    - ``state_dict()`` / ``load_state_dict(state)`` for running state that checkpoints must keep;
    - ``last_terms``, a dict of numbers (the loss's terms, the last round's reward) logged with the loss;
    - ``trainable_modules() -> dict[str, torch.nn.Module]``, modules the loss uses besides the model (CREPA's
      projection head): the same optimizer trains them, checkpoints keep them, and
      ``TrainingResult.method_ema_weights`` holds their EMA."""

    name: str

    def loss(self, model: torch.nn.Module, batch: Any, generator: torch.Generator) -> torch.Tensor: ...


@dataclass
class TrainingResult:
    """``model`` is the trained model (unwrapped: a PEFT model or a diffusers model with an adapter under LoRA);
    ``ema_weights`` maps the names of its trained parameters to their EMA (``None`` without ``ema_decay``); load them
    with ``model.load_state_dict(result.ema_weights, strict=False)``; ``method_ema_weights`` does the same for each of
    the method's ``trainable_modules()``, by name."""

    model: torch.nn.Module
    losses: list[float]
    step: int
    ema_weights: dict[str, torch.Tensor] | None = None
    method_ema_weights: dict[str, dict[str, torch.Tensor]] | None = None


def process_state() -> PartialState:
    """accelerate's process state as the ``Trainer``'s ``Accelerator`` sees it. ``PartialState()`` alone ignores
    ``ACCELERATE_USE_CPU``, so asking it before the Trainer exists would pin an ``accelerate launch`` on CPUs to one
    process per worker."""
    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))


def enable_gradient_checkpointing(model: torch.nn.Module) -> None:
    """diffusers' ``enable_gradient_checkpointing`` or transformers' ``gradient_checkpointing_enable``; a
    ``ValueError`` for a model that has neither."""
    if getattr(model, "_supports_gradient_checkpointing", False):  # diffusers ModelMixin
        model.enable_gradient_checkpointing()
    elif getattr(model, "supports_gradient_checkpointing", False):  # transformers PreTrainedModel
        # Non-reentrant checkpointing propagates gradients to adapters even when the inputs need none.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        raise ValueError(f"gradient_checkpointing=True, but {type(model).__name__} does not support gradient "
                         "checkpointing (it needs a diffusers ModelMixin or transformers PreTrainedModel that does)")


def add_lora_adapter(model: torch.nn.Module, config: TrainingConfig) -> torch.nn.Module:
    """The model with a LoRA adapter, only the adapter trainable: diffusers models that take adapters
    (``PeftAdapterMixin``: UNet2DConditionModel, the DiT transformers, ...) get diffusers' ``add_adapter`` with
    Gaussian init, as diffusers' LoRA scripts do, so that ``save_lora_weights`` / ``load_lora_weights`` round-trip;
    other models are wrapped by PEFT's ``get_peft_model``."""
    from diffusers import ModelMixin
    from diffusers.loaders import PeftAdapterMixin
    from peft import LoraConfig, get_peft_model

    alpha = config.lora_alpha or config.lora_rank
    default_targets = DIFFUSERS_LORA_TARGETS if isinstance(model, ModelMixin) else TRANSFORMERS_LORA_TARGETS
    targets = config.lora_target_modules or default_targets
    if isinstance(model, PeftAdapterMixin):
        model.requires_grad_(False)
        model.add_adapter(LoraConfig(r=config.lora_rank, lora_alpha=alpha, init_lora_weights="gaussian",
                                     target_modules=targets))
        return model
    return get_peft_model(model, LoraConfig(r=config.lora_rank, lora_alpha=alpha, target_modules=targets))


def _tracker_values(config: TrainingConfig) -> dict[str, Any]:
    """The config as trackers take it: TensorBoard's hyperparameters are scalars and strings only."""
    return {k: ", ".join(v) if isinstance(v, list) else v for k, v in asdict(config).items()}


class Trainer:
    """``Trainer(method, model, dataset, config).train()``: AdamW on the model's trainable weights (or a LoRA
    adapter), ``method.loss`` on shuffled batches, checkpoints with accelerate's ``save_state`` and an exact resume
    (data order, RNG, optimizer and EMA state continue where they stopped). Checkpoints are this run's own files:
    resume only from folders you wrote (accelerate reads optimizer and RNG state with ``torch.load``).

    Every input is checked before anything is written, so a bad one leaves ``output_dir`` as it was."""

    def __init__(self, method: TrainingMethod, model: torch.nn.Module, dataset: Dataset, config: TrainingConfig,
                 collate_fn: Callable | None = None):
        if len(dataset) == 0:
            raise ValueError("the training data set is empty")
        if config.validation_every and not callable(getattr(method, "validate", None)):
            raise ValueError(f"validation_every={config.validation_every}, but the {method.name} method has no "
                             "validate(model, step, folder)")
        self.method, self.config = method, config
        project = ProjectConfiguration(project_dir=config.output_dir,
                                       logging_dir=str(Path(config.output_dir) / "logs"))
        self.collects = callable(getattr(method, "collect", None))
        # A sampling phase turns one loader batch into several micro-batches, so the loader's end must not force the
        # accumulated gradient through early.
        accumulation = GradientAccumulationPlugin(num_steps=config.gradient_accumulation_steps,
                                                  sync_with_dataloader=not self.collects)
        self.accelerator = Accelerator(gradient_accumulation_plugin=accumulation,
                                       mixed_precision=config.mixed_precision, log_with=config.log_with,
                                       project_config=project,
                                       dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True))
        set_seed(config.seed)
        if config.gradient_checkpointing:
            enable_gradient_checkpointing(model)
        if config.lora_rank is not None:
            model = add_lora_adapter(model, config)
        if config.mixed_precision == "fp16":
            from diffusers.training_utils import cast_training_params

            # The gradient scaler refuses float16 gradients, and float16 weights lose small updates.
            cast_training_params(model, dtype=torch.float32)
        # An explicit generator keeps the loader's own draws off the global RNG, which dropout uses: a resumed run
        # creates its loader iterator at a different moment than the uninterrupted one.
        loader = DataLoader(dataset, batch_size=config.batch_size, shuffle=True,
                            drop_last=len(dataset) >= config.batch_size, collate_fn=collate_fn,
                            generator=torch.Generator().manual_seed(config.seed))
        named_trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not named_trainable:
            raise ValueError(f"{type(model).__name__} has no trainable parameters")
        self.method_modules = dict(method.trainable_modules()) if callable(
            getattr(method, "trainable_modules", None)) else {}
        self.num_model_trainable = len(named_trainable)
        for name, module in self.method_modules.items():
            module.to(self.accelerator.device)
            named_trainable += [((name, n), p) for n, p in module.named_parameters() if p.requires_grad]
        # Not wrapped by accelerate (the loss calls them directly), so their gradients are averaged by hand.
        self.method_parameters = [p for module in self.method_modules.values() for p in module.parameters()
                                  if p.requires_grad]
        optimizer = torch.optim.AdamW([p for _, p in named_trainable], lr=config.learning_rate,
                                      weight_decay=config.weight_decay)
        self.model, self.optimizer, self.loader = self.accelerator.prepare(model, optimizer, loader)
        # prepare() moves parameters in place, so these are the ones the optimizer updates.
        self.trainable_names = [n for n, _ in named_trainable]
        self.trainable = [p for _, p in named_trainable]
        # Each process draws its own noise and timesteps: the same draws on every process would add no information.
        self.generator = torch.Generator().manual_seed(config.seed + 1 + self.accelerator.process_index)
        self.step = 0
        self.batches_drawn = 0  # from the loader, over all epochs: where a resumed run continues the data
        self.pending_batches: list[Any] = []  # the sampling phase's training batches not yet taken
        self.accelerator.register_for_checkpointing(self)
        self.ema = None
        if config.ema_decay is not None:
            from diffusers.training_utils import EMAModel

            self.ema = EMAModel(self.trainable, decay=config.ema_decay)
            self.accelerator.register_for_checkpointing(self.ema)

    # accelerate saves and restores these with every checkpoint
    def state_dict(self) -> dict:
        # accelerate writes this from the main process only, so every process's own part travels in it.
        own = {"generator": self.generator.get_state(), "pending_batches": send_to_device(self.pending_batches, "cpu")}
        state = {"step": self.step, "method": self.method.name, "config": asdict(self.config),
                 "batches_drawn": self.batches_drawn, "processes": gather_object([own])}
        if callable(getattr(self.method, "state_dict", None)):  # a method with running statistics (Smooth-LoRA)
            state["method_state"] = self.method.state_dict()
        if self.method_modules:
            state["method_modules"] = {name: module.state_dict() for name, module in self.method_modules.items()}
        return state

    def load_state_dict(self, state: dict) -> None:
        if state["method"] != self.method.name:
            raise ValueError(f"the checkpoint was written by method {state['method']!r}, not {self.method.name!r}")
        if len(state["processes"]) != self.accelerator.num_processes:
            raise ValueError(f"the checkpoint was written by {len(state['processes'])} process(es); resume it with as "
                             f"many, not {self.accelerator.num_processes}")
        self.step, self.batches_drawn = state["step"], state["batches_drawn"]
        own = state["processes"][self.accelerator.process_index]
        self.generator.set_state(own["generator"])
        self.pending_batches = send_to_device(own["pending_batches"], self.accelerator.device)
        if "method_state" in state:
            self.method.load_state_dict(state["method_state"])
        for name, module_state in state.get("method_modules", {}).items():
            self.method_modules[name].load_state_dict(module_state)

    def _resume(self) -> None:
        if self.config.resume_from is None:
            return
        folder = checkpoint_folder(self.config.resume_from, self.config.output_dir)
        # accelerate names registered objects' files by registration order: the trainer's 0, the EMA's 1.
        holds_ema = (folder / "custom_checkpoint_1.pkl").is_file()
        if holds_ema != (self.ema is not None):
            written = "with" if holds_ema else "without"
            raise ValueError(f"the checkpoint {folder} was written {written} an EMA; resume it with ema_decay "
                             f"{'set' if holds_ema else 'None'}")
        record = CheckpointRecord.read(folder)
        if record is not None:  # checked here, before accelerate meets mismatched state
            if record.method != self.method.name:
                raise ValueError(f"the checkpoint {folder} was written by method {record.method!r}, not "
                                 f"{self.method.name!r}")
            contradictions = resume_contradictions(record.config, asdict(self.config))
            if contradictions:
                raise ValueError(f"cannot resume {folder} with other settings than its run's: "
                                 f"{'; '.join(contradictions)}")
        self.accelerator.load_state(str(folder))
        if self.ema is not None:
            self.ema.to(self.accelerator.device)  # accelerate loads custom state onto the CPU

    def save_checkpoint(self) -> Path:
        """The full state in ``output_dir/checkpoint-<step>``, with a ``CheckpointRecord`` of the run."""
        folder = Path(self.config.output_dir) / f"{CHECKPOINT_PREFIX}{self.step}"
        self.accelerator.save_state(str(folder))
        if self.accelerator.is_main_process:
            CheckpointRecord(self.method.name, self.step, self.config).write(folder)
        return folder

    def train(self) -> TrainingResult:
        self._resume()
        config, losses = self.config, []
        if config.log_with is not None:
            self.accelerator.init_trackers(config.project_name, config=_tracker_values(config))
        try:
            self._run(losses)
        finally:
            if config.log_with is not None:
                self.accelerator.end_training()
        ema_weights = method_ema_weights = None
        if self.ema is not None:
            averages = [p.detach().clone() for p in self.ema.shadow_params]
            split = self.num_model_trainable
            ema_weights = dict(zip(self.trainable_names[:split], averages[:split], strict=True))
            method_ema_weights = {name: {} for name in self.method_modules}
            for (name, parameter_name), average in zip(self.trainable_names[split:], averages[split:], strict=True):
                method_ema_weights[name][parameter_name] = average
        return TrainingResult(model=self.accelerator.unwrap_model(self.model), losses=losses, step=self.step,
                              ema_weights=ema_weights, method_ema_weights=method_ema_weights)

    def _run(self, losses: list[float]) -> None:
        config = self.config
        progress = tqdm(total=config.max_steps, initial=self.step, desc=f"training {self.method.name}",
                        disable=not self.accelerator.is_local_main_process)
        batches = self._micro_batches()
        while self.step < config.max_steps:
            batch = next(batches)
            with self.accelerator.accumulate(self.model):
                loss = self.method.loss(self.model, batch, self.generator)
                if not torch.isfinite(loss):
                    raise ValueError(f"the {self.method.name} loss is not finite at step {self.step}: {loss.item()}")
                self.accelerator.backward(loss)
                if self.accelerator.num_processes > 1 and self.accelerator.sync_gradients:
                    for parameter in self.method_parameters:
                        if parameter.grad is not None:
                            parameter.grad = self.accelerator.reduce(parameter.grad, reduction="mean")
                if config.max_grad_norm is not None and self.accelerator.sync_gradients:
                    self.accelerator.clip_grad_norm_(self.trainable, config.max_grad_norm)
                self.optimizer.step()
                self.optimizer.zero_grad()
            if not self.accelerator.sync_gradients:
                continue
            if self.ema is not None:
                self.ema.step(self.trainable)
            self.step += 1
            losses.append(float(loss.detach()))
            progress.update()
            progress.set_postfix(loss=f"{losses[-1]:.4f}")
            if config.log_with is not None:
                self.accelerator.log({"loss": losses[-1], **getattr(self.method, "last_terms", {})}, step=self.step)
            # Validation comes before the checkpoint so that the checkpoint's RNG state is the one that follows.
            if config.validation_every and self.step % config.validation_every == 0:
                self.validate()
            # The last step too: a run that ends is one that may be continued with a larger max_steps.
            if config.checkpoint_every and (self.step % config.checkpoint_every == 0 or self.step == config.max_steps):
                self.save_checkpoint()
        batches.close()
        progress.close()

    def _micro_batches(self) -> Iterator[Any]:
        """The training batches, endlessly: the loader's (or, for a method with a sampling phase, what ``collect``
        makes of each), continuing after the last one a checkpoint records."""
        while True:
            while self.pending_batches:
                yield self.pending_batches.pop(0)
            # Data order is a function of the epoch, so a resumed run skips exactly the batches it already drew.
            epoch, done = divmod(self.batches_drawn, len(self.loader))
            self.loader.set_epoch(epoch)
            loader = self.accelerator.skip_first_batches(self.loader, done) if done else self.loader
            for batch in loader:
                self.batches_drawn += 1
                self.pending_batches = self._collect(batch) if self.collects else [batch]
                while self.pending_batches:
                    yield self.pending_batches.pop(0)

    def _collect(self, batch: Any) -> list[Any]:
        model = self.accelerator.unwrap_model(self.model)
        was_training = model.training
        model.eval()
        try:
            # Under the loss's autocast, so that the collected log-probabilities are the ones the first update sees.
            with torch.no_grad(), self.accelerator.autocast():
                collected = list(self.method.collect(model, batch, self.generator))
        finally:
            model.train(was_training)
        if not collected:
            raise ValueError(f"the {self.method.name} sampling phase (collect) returned no training batches")
        return collected

    def validate(self) -> None:
        """``method.validate`` on the main process, in eval mode, on the EMA weights when there is an EMA (as
        diffusers' examples do), in ``output_dir/validation/step-<step>``; its images are saved there as
        ``image-<i>.png``, its numbers in ``metrics.json``, and both logged. torch's random state, the weights and
        the train / eval mode are as before afterwards."""
        if self.accelerator.is_main_process:
            folder = Path(self.config.output_dir) / VALIDATION_FOLDER / f"step-{self.step}"
            folder.mkdir(parents=True, exist_ok=True)
            model = self.accelerator.unwrap_model(self.model)
            was_training = model.training
            model.eval()
            if self.ema is not None:
                self.ema.store(self.trainable)
                self.ema.copy_to(self.trainable)
            device = self.accelerator.device
            try:
                # Validation's random draws must not change training's: with torch's random state put back, a run
                # is the same with or without validation.
                with torch.random.fork_rng(devices=[] if device.type == "cpu" else [device], device_type=device.type):
                    outcome = self.method.validate(model, self.step, folder)
            finally:
                if self.ema is not None:
                    self.ema.restore(self.trainable)
                model.train(was_training)
            self._record_validation(outcome, folder)
        self.accelerator.wait_for_everyone()

    def _record_validation(self, outcome: Any, folder: Path) -> None:
        from PIL import Image

        if isinstance(outcome, Mapping):
            metrics = {f"validation/{k}": float(v) for k, v in outcome.items()}
            (folder / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
            if self.config.log_with is not None:
                self.accelerator.log(metrics, step=self.step)
        elif isinstance(outcome, list | tuple) and all(isinstance(image, Image.Image) for image in outcome):
            for index, image in enumerate(outcome):
                image.save(folder / f"image-{index}.png")
            for tracker in self.accelerator.trackers:
                if tracker.name == "tensorboard":  # one image per tag: images of different sizes cannot be stacked
                    for index, image in enumerate(outcome):
                        tracker.log_images({f"validation/{index}": np.asarray(image.convert("RGB"))[None]},
                                           step=self.step, dataformats="NHWC")
                elif hasattr(tracker, "log_images"):
                    tracker.log_images({"validation": list(outcome)}, step=self.step)
        else:
            raise ValueError(f"{self.method.name}.validate must return a dict of numbers or a list of PIL images, got "
                             f"{type(outcome).__name__}")
