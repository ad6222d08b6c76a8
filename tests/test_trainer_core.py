"""The trainer core's features on a tiny ``UNet2DConditionModel`` with a toy epsilon-prediction loss: LoRA the
diffusers way (only the adapter trains, and a stock pipeline's ``load_lora_weights`` reproduces the trained UNet
exactly, alpha != rank included), EMA (diffusers' recursion, checkpointed, used by validation), gradient accumulation
and clipping, validation outputs and tracker logs, YAML configs and the ``train`` command, an exact resume after a
crash, and clear errors that leave checkpoints alone."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
import yaml
from accelerate.state import AcceleratorState
from accelerate.tracking import GeneralTracker, register_tracker_class
from accelerate.utils import is_tensorboard_available
from diffusers import DDIMScheduler, DDPMScheduler
from PIL import Image
from tiny_pipelines import TEXT_DIM, stable_diffusion_inputs, tiny_stable_diffusion

from diffusers_ext.cli import main as diffusers_ext_main
from diffusers_ext.training import Trainer, TrainingConfig, latest_checkpoint
from diffusers_ext.training.cli import (
    TRAINING_METHODS,
    TrainingMethodEntry,
    parse_arguments,
    save_trained_model,
    trained_model,
)
from diffusers_ext.training.cli import main as train_main
from diffusers_ext.training.config import CHECKPOINT_RECORD
from diffusers_ext.training.lora import save_lora_weights

UNET_TARGETS = ("to_k", "to_q", "to_v", "to_out.0")


def tiny_pipeline():
    return tiny_stable_diffusion(DDIMScheduler(clip_sample=False, steps_offset=1))


def tiny_unet():
    return tiny_pipeline().unet.train()


def latent_data(count: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Latents with prompt embeddings, and a fixed noise and timestep per item for the deterministic loss."""
    generator = torch.Generator().manual_seed(seed)
    return [{"latents": torch.randn(4, 8, 8, generator=generator),
             "embeds": torch.randn(4, TEXT_DIM, generator=generator),
             "noise": torch.randn(4, 8, 8, generator=generator),
             "timestep": torch.randint(0, 1000, (), generator=generator)} for _ in range(count)]


class EpsilonMSE:
    """Plain epsilon-prediction MSE (DDPM's ``add_noise``); noise and timesteps drawn from the trainer's generator,
    or, with ``fixed_noise``, taken from the batch (a deterministic loss)."""

    name = "toy-epsilon"

    def __init__(self, fixed_noise: bool = False):
        self.scheduler, self.fixed_noise = DDPMScheduler(), fixed_noise

    def loss(self, model, batch, generator):
        latents = batch["latents"]
        if self.fixed_noise:
            noise, timesteps = batch["noise"], batch["timestep"]
        else:
            noise = torch.randn(latents.shape, generator=generator)
            timesteps = torch.randint(0, 1000, (latents.shape[0],), generator=generator)
        noisy = self.scheduler.add_noise(latents, noise, timesteps)
        prediction = model(noisy, timesteps, encoder_hidden_states=batch["embeds"]).sample
        return torch.nn.functional.mse_loss(prediction, noise)


def trainable_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def unet_output(unet) -> torch.Tensor:
    generator = torch.Generator().manual_seed(7)
    sample, embeds = torch.randn(2, 4, 8, 8, generator=generator), torch.randn(2, 4, TEXT_DIM, generator=generator)
    with torch.no_grad():
        return unet(sample, torch.tensor([10, 700]), encoder_hidden_states=embeds).sample


@pytest.mark.parametrize("lora_alpha", [None, 8], ids=["alpha=rank", "alpha=8,rank=2"])
def test_lora_trains_only_the_adapter_and_a_stock_pipeline_reloads_it_exactly(lora_alpha, tmp_path):
    config = TrainingConfig(output_dir=str(tmp_path), max_steps=4, batch_size=4, learning_rate=1e-2, lora_rank=2,
                            lora_alpha=lora_alpha, gradient_checkpointing=True)
    unet = tiny_unet()
    base = {n: p.detach().clone() for n, p in unet.named_parameters()}
    trainer = Trainer(EpsilonMSE(), unet, latent_data(8), config)
    trainable = set(trainable_state(trainer.model))
    assert trainable and all("lora_" in n and any(f".{t}.lora_" in n for t in UNET_TARGETS) for n in trainable)
    assert unet.is_gradient_checkpointing
    trained = trainer.train().model.eval()
    after = {n: p.detach() for n, p in trained.named_parameters()}
    for name, value in base.items():  # PEFT moves each wrapped weight under .base_layer
        actual = after.get(name, after.get(name.replace(".weight", ".base_layer.weight").replace(
            ".bias", ".base_layer.bias")))
        assert torch.equal(actual, value), name
    assert any(not torch.equal(v, torch.zeros_like(v)) for n, v in after.items() if "lora_B" in n)

    save_lora_weights(trained, tmp_path / "lora", method_name="toy-epsilon", config=config)
    card = (tmp_path / "lora" / "README.md").read_text()
    assert "toy-epsilon" in card and "load_lora_weights" in card and "lora_rank: 2" in card
    assert f"lora_alpha: {lora_alpha}".replace("None", "null") in card
    stock = tiny_pipeline()
    untrained_output = unet_output(stock.unet)
    stock.load_lora_weights(tmp_path / "lora")
    assert torch.equal(unet_output(stock.unet), unet_output(trained))
    assert (unet_output(trained) - untrained_output).abs().max() > 1e-3  # the adapter does change the output
    with_trained_unet = tiny_pipeline()
    with_trained_unet.unet = trained
    np.testing.assert_array_equal(stock(**stable_diffusion_inputs()).images,
                                  with_trained_unet(**stable_diffusion_inputs()).images)


@pytest.fixture
def fresh_accelerate_state():
    """accelerate keeps one process-wide state whose mixed precision cannot change once set."""
    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def test_fp16_keeps_the_adapter_in_float32_and_the_frozen_weights_as_given(tmp_path, fresh_accelerate_state):
    unet = tiny_unet().to(torch.float16)
    config = TrainingConfig(output_dir=str(tmp_path), max_steps=1, batch_size=4, lora_rank=2, mixed_precision="fp16")
    model = Trainer(EpsilonMSE(), unet, latent_data(4), config).model
    dtypes = {p.requires_grad: p.dtype for p in model.parameters()}
    assert dtypes == {True: torch.float32, False: torch.float16}


class RecordingWeights(EpsilonMSE):
    """Records the trainable weights each loss call sees (call k sees the weights after step k - 1) and those
    validation sees."""

    def __init__(self):
        super().__init__()
        self.seen_by_loss, self.seen_by_validation = [], {}

    def loss(self, model, batch, generator):
        self.seen_by_loss.append(trainable_state(model))
        return super().loss(model, batch, generator)

    def validate(self, model, step, folder):
        self.seen_by_validation[step] = trainable_state(model)
        return {"score": 0.5}


def test_ema_follows_diffusers_recursion_and_validation_runs_on_it(tmp_path):
    decay = 0.2
    method = RecordingWeights()
    config = TrainingConfig(output_dir=str(tmp_path), max_steps=3, batch_size=4, learning_rate=1e-2, lora_rank=2,
                            ema_decay=decay, validation_every=3)
    result = Trainer(method, tiny_unet(), latent_data(8), config).train()
    raw = [*method.seen_by_loss[1:], trainable_state(result.model)]  # weights after steps 1, 2, 3
    # diffusers' EMAModel: the first update copies, update k >= 2 uses min(decay, k / (k + 9)).
    expected = raw[0]
    for k, weights in ((2, raw[1]), (3, raw[2])):
        d = min(decay, k / (k + 9))
        expected = {n: d * expected[n] + (1 - d) * weights[n] for n in weights}
    assert set(result.ema_weights) == set(expected)
    for name, value in expected.items():
        torch.testing.assert_close(result.ema_weights[name], value, rtol=1e-6, atol=1e-7, msg=name)
    assert max((result.ema_weights[n] - raw[2][n]).abs().max() for n in raw[2]) > 1e-4
    for name, value in method.seen_by_validation[3].items():
        torch.testing.assert_close(value, result.ema_weights[name], rtol=0, atol=0, msg=name)
    assert yaml.safe_load((tmp_path / "validation" / "step-3" / "metrics.json").read_text()) == {
        "validation/score": 0.5}


class HeadedEpsilonMSE(RecordingWeights):
    """A loss that also trains a module of its own (``trainable_modules``), like CREPA's projection head."""

    def __init__(self):
        super().__init__()
        self.head = torch.nn.Linear(4, 4)
        self.heads_seen = []

    def trainable_modules(self):
        return {"head": self.head}

    def loss(self, model, batch, generator):
        self.heads_seen.append({n: p.detach().clone() for n, p in self.head.named_parameters()})
        return super().loss(model, batch, generator) + self.head(batch["latents"].mean((-1, -2))).pow(2).mean()


def test_a_methods_own_modules_train_with_the_model_and_keep_their_own_ema(tmp_path):
    decay = 0.2
    method = HeadedEpsilonMSE()
    config = TrainingConfig(output_dir=str(tmp_path), max_steps=3, batch_size=4, learning_rate=1e-2, lora_rank=2,
                            ema_decay=decay)
    result = Trainer(method, tiny_unet(), latent_data(8), config).train()
    raw = [*method.heads_seen[1:], {n: p.detach().clone() for n, p in method.head.named_parameters()}]
    assert (raw[2]["weight"] - method.heads_seen[0]["weight"]).abs().max() > 1e-3  # the optimizer moved the head
    expected = raw[0]
    for k, weights in ((2, raw[1]), (3, raw[2])):
        d = min(decay, k / (k + 9))
        expected = {n: d * expected[n] + (1 - d) * weights[n] for n in weights}
    assert set(result.ema_weights) == set(trainable_state(result.model))  # the model's names only
    assert set(result.method_ema_weights) == {"head"}
    for name, value in expected.items():
        torch.testing.assert_close(result.method_ema_weights["head"][name], value, rtol=1e-6, atol=1e-7, msg=name)
    trained_model(result, method)
    for name, value in method.head.named_parameters():
        torch.testing.assert_close(value.detach(), expected[name], rtol=1e-6, atol=1e-7, msg=name)


def recorded_gradient_steps(trainer: Trainer) -> list[list[torch.Tensor]]:
    """The gradients the optimizer steps with, one list per step (accelerate calls the inner optimizer's step only
    on the micro-step that completes an accumulation)."""
    steps = []
    trainer.optimizer.optimizer.register_step_pre_hook(
        lambda optimizer, args, kwargs: steps.append([p.grad.clone() for p in trainer.trainable]))
    return steps


def test_gradient_accumulation_matches_one_batch_and_clipping_bounds_the_norm(tmp_path):
    data = latent_data(4)

    def run(batch_size, accumulation, max_grad_norm=None):
        config = TrainingConfig(output_dir=str(tmp_path), max_steps=2, batch_size=batch_size, learning_rate=1e-3,
                                gradient_accumulation_steps=accumulation, max_grad_norm=max_grad_norm)
        trainer = Trainer(EpsilonMSE(fixed_noise=True), tiny_unet(), data, config)
        gradients = recorded_gradient_steps(trainer)
        return trainer.train(), gradients

    one_batch, one_batch_gradients = run(4, 1)
    accumulated, accumulated_gradients = run(2, 2)
    assert len(one_batch_gradients) == len(accumulated_gradients) == 2
    for expected_step, actual_step in zip(one_batch_gradients, accumulated_gradients, strict=True):
        for expected, actual in zip(expected_step, actual_step, strict=True):
            torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-7)
    # Adam divides by the gradient's running size, so float noise in near-zero gradient entries moves weights by a
    # small fraction of one step (learning rate 1e-3): the gradients above are the exact check.
    for (name, expected), actual in zip(trainable_state(one_batch.model).items(),
                                        trainable_state(accumulated.model).values(), strict=True):
        torch.testing.assert_close(actual, expected, rtol=0, atol=5e-5, msg=name)

    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in one_batch_gradients[0]]))
    _, clipped_gradients = run(4, 1, max_grad_norm=float(norm) / 10)
    for unclipped, clipped in zip(one_batch_gradients[0], clipped_gradients[0], strict=True):
        torch.testing.assert_close(clipped, unclipped / 10, rtol=1e-4, atol=1e-8)


class RecordingTracker(GeneralTracker):
    """An accelerate tracker that keeps what it is given."""

    name = "diffusers-ext-test-recorder"
    requires_logging_directory = False
    records: list[tuple[str, object, int | None]] = []

    def __init__(self, run_name: str, **kwargs):
        super().__init__()
        self.run_name = run_name

    @property
    def tracker(self):
        return self.records

    def store_init_configuration(self, values):
        self.records.append(("config", values, None))

    def log(self, values, step=None, **kwargs):
        self.records.append(("log", values, step))

    def log_images(self, values, step=None, **kwargs):
        self.records.append(("images", values, step))


register_tracker_class(RecordingTracker)


class ImageValidation(EpsilonMSE):
    """Validation that draws from torch's global random state, and a loss that depends on it."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def loss(self, model, batch, generator):
        jitter = 1e-3 * torch.rand(())
        self.last_terms = {"jitter": float(jitter)}  # a method's terms are logged with the loss
        return super().loss(model, batch, generator) + jitter

    def validate(self, model, step, folder):
        self.calls.append((step, folder, model.training))
        torch.rand(100)
        prediction = unet_output(model)[:, :3]  # a picture of what the model predicts
        pixels = ((prediction - prediction.min()) / (prediction.max() - prediction.min()) * 255).to(torch.uint8)
        return [Image.fromarray(image.permute(1, 2, 0).numpy()) for image in pixels]


def test_validation_every_writes_images_at_the_right_steps_and_logs_them(tmp_path):
    method = ImageValidation()
    RecordingTracker.records.clear()
    config = TrainingConfig(output_dir=str(tmp_path), max_steps=5, batch_size=4, lora_rank=2, validation_every=2,
                            log_with=RecordingTracker.name, project_name="toy")
    result = Trainer(method, tiny_unet(), latent_data(8), config).train()
    folders = [tmp_path / "validation" / f"step-{step}" for step in (2, 4)]
    assert method.calls == [(2, folders[0], False), (4, folders[1], False)]
    assert result.model.training  # back to training mode after each validation
    assert sorted(p.name for p in (tmp_path / "validation").iterdir()) == ["step-2", "step-4"]
    for folder in folders:
        assert sorted(p.name for p in folder.iterdir()) == ["image-0.png", "image-1.png"]
        assert Image.open(folder / "image-0.png").size == (8, 8)
    records = RecordingTracker.records
    assert records[0][0] == "config" and records[0][1]["lora_rank"] == 2
    assert [(step, values["loss"]) for kind, values, step in records if kind == "log"] == list(
        zip(range(1, 6), result.losses, strict=True))
    assert all(0 <= values["jitter"] <= 1e-3 for kind, values, step in records if kind == "log")
    images = [(step, len(values["validation"])) for kind, values, step in records if kind == "images"]
    assert images == [(2, 2), (4, 2)]
    without_validation = Trainer(ImageValidation(), tiny_unet(), latent_data(8),
                                 TrainingConfig(output_dir=str(tmp_path / "plain"), max_steps=5, batch_size=4,
                                                lora_rank=2)).train()
    assert without_validation.losses == result.losses

    if is_tensorboard_available():  # offline: event files under output_dir/logs/<project_name>
        config = TrainingConfig(output_dir=str(tmp_path / "tb"), max_steps=2, batch_size=4, lora_rank=2,
                                validation_every=2, log_with="tensorboard", project_name="toy")
        Trainer(ImageValidation(), tiny_unet(), latent_data(8), config).train()
        assert list((tmp_path / "tb" / "logs" / "toy").glob("events.out.tfevents.*"))
    else:
        with pytest.raises(ValueError, match=r"log_with='tensorboard' needs its package.*pip install tensorboard"):
            TrainingConfig(log_with="tensorboard")


def test_a_lora_trained_in_a_pipeline_is_already_in_it_and_loading_its_file_there_adds_a_copy(tmp_path):
    """What ``save_lora_weights``' docstring says about reloading into the pipeline that trained the adapter
    (diffusers 0.42): the pipeline samples with it already; ``load_lora_weights`` adds a second adapter (PEFT warns)
    and activates only that copy; ``delete_adapters`` first replaces it instead."""
    pipe = tiny_pipeline()
    config = TrainingConfig(output_dir=str(tmp_path), max_steps=2, batch_size=4, learning_rate=1e-2, lora_rank=2)
    result = Trainer(EpsilonMSE(), pipe.unet.train(), latent_data(8), config).train()
    save_lora_weights(result.model, tmp_path / "lora", method_name="toy-epsilon", config=config)
    pipe.unet.eval()
    trained = unet_output(pipe.unet)
    assert list(pipe.unet.peft_config) == ["default"] and not torch.equal(trained, unet_output(tiny_unet().eval()))

    pipe.delete_adapters("default")
    pipe.load_lora_weights(tmp_path / "lora", adapter_name="default")
    assert list(pipe.unet.peft_config) == ["default"] and torch.equal(unet_output(pipe.unet), trained)
    with pytest.warns(UserWarning, match="multiple adapters"):
        pipe.load_lora_weights(tmp_path / "lora")
    assert list(pipe.unet.peft_config) == ["default", "default_1"] and pipe.get_active_adapters() == ["default_1"]
    assert torch.equal(unet_output(pipe.unet), trained)  # the copy alone is active: nothing is applied twice


def test_a_run_checkpoints_at_its_last_step_with_a_record_of_its_run(tmp_path):
    assert TrainingConfig().checkpoint_every == 500  # a run can be resumed unless it asks for no checkpoints
    config = TrainingConfig(output_dir=str(tmp_path), max_steps=3, batch_size=4, lora_rank=2, checkpoint_every=2)
    Trainer(EpsilonMSE(), tiny_unet(), latent_data(8), config).train()
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3"]
    record = json.loads((tmp_path / "checkpoint-3" / CHECKPOINT_RECORD).read_text())
    assert (record["method"], record["step"], TrainingConfig.from_dict(record["config"])) == ("toy-epsilon", 3, config)


def test_resuming_with_settings_that_shape_the_checkpoint_is_one_clear_error(tmp_path):
    run = dict(output_dir=str(tmp_path), batch_size=4, lora_rank=2, learning_rate=1e-2, checkpoint_every=1)
    Trainer(EpsilonMSE(), tiny_unet(), latent_data(8), TrainingConfig(**run, max_steps=1)).train()
    other_rank = TrainingConfig(**{**run, "lora_rank": 4}, max_steps=2, resume_from="latest")
    with pytest.raises(ValueError, match=r"cannot resume .*checkpoint-1 with other settings than its run's: "
                                         r"lora_rank = 4 \(the checkpoint's: lora_rank 2\)$"):
        Trainer(EpsilonMSE(), tiny_unet(), latent_data(8), other_rank).train()
    # How long it runs, where it writes and what it logs may change.
    longer = TrainingConfig(**{**run, "checkpoint_every": 5}, max_steps=2, resume_from="latest")
    assert Trainer(EpsilonMSE(), tiny_unet(), latent_data(8), longer).train().step == 2


def test_yaml_round_trip_and_command_line_override_precedence(tmp_path):
    config = TrainingConfig(output_dir=str(tmp_path), max_steps=7, learning_rate=3e-4, lora_rank=4, lora_alpha=8,
                            lora_target_modules=["to_q", "to_v"], gradient_checkpointing=True, ema_decay=0.999,
                            max_grad_norm=1.0, log_with=None)
    assert TrainingConfig.from_yaml(config.to_yaml(tmp_path / "run.yaml")) == config

    (tmp_path / "file.yaml").write_text("max_steps: 5\nlearning_rate: 1e-4\nlora_rank: 2\nlora_target_modules: "
                                        "[to_q, to_k]\nema_decay: 0.9\n")  # YAML 1.1 reads 1e-4 as a string
    args, from_command = parse_arguments(["restoration", "--config", str(tmp_path / "file.yaml"), "--max-steps", "3",
                                          "--ema_decay", "none", "--gradient_checkpointing", "--output-dir",
                                          str(tmp_path / "run")])
    assert args.method == "restoration"
    assert from_command == TrainingConfig(max_steps=3, learning_rate=1e-4, lora_rank=2,
                                          lora_target_modules=["to_q", "to_k"], ema_decay=None,
                                          gradient_checkpointing=True, output_dir=str(tmp_path / "run"))
    overridden = TrainingConfig.from_yaml(tmp_path / "file.yaml", {"max_steps": "11", "lora_target_modules": "to_v"})
    assert (overridden.max_steps, overridden.lora_target_modules, overridden.lora_rank) == (11, ["to_v"], 2)


def test_train_command_runs_registered_methods_end_to_end(tmp_path, monkeypatch, capsys):
    # A method registers with one entry; this one trains a UNet2DConditionModel LoRA, saved for load_lora_weights.
    built = {}

    def toy_epsilon(config, args):
        built["unet"] = tiny_unet()
        return EpsilonMSE(), built["unet"], latent_data(8)

    monkeypatch.setitem(TRAINING_METHODS, "toy-epsilon", TrainingMethodEntry(build=toy_epsilon, summary="a toy"))
    assert train_main(["toy-epsilon", "--output_dir", str(tmp_path / "toy"), "--max_steps", "2", "--batch_size", "4",
                       "--lora_rank", "2", "--lora_alpha", "4", "--ema_decay", "0.5"]) == 0
    stock = tiny_pipeline()
    stock.load_lora_weights(tmp_path / "toy" / "final")
    assert torch.equal(unet_output(stock.unet), unet_output(built["unet"].eval()))  # the EMA weights, saved
    assert TrainingConfig.from_yaml(tmp_path / "toy" / "config.yaml").lora_alpha == 4

    assert diffusers_ext_main(["train", "restoration", "--output_dir", str(tmp_path / "restoration"), "--max_steps",
                               "2", "--batch_size", "2", "--lora_rank", "2"]) == 0
    assert (tmp_path / "restoration" / "final" / "adapter_model.safetensors").is_file()
    assert train_main(["masked-diffusion-lm", "--output_dir", str(tmp_path / "mdlm"), "--max_steps", "1",
                       "--batch_size", "4"]) == 0
    assert (tmp_path / "mdlm" / "final" / "model.safetensors").is_file()
    assert (tmp_path / "mdlm" / "tokenizer" / "tokenizer.json").is_file()
    assert "trained masked-diffusion-lm to step 1" in capsys.readouterr().out

    with pytest.raises(SystemExit) as exit_info:
        train_main(["no-such-method"])
    assert exit_info.value.code == 2
    errors = capsys.readouterr().err.replace("'", "")  # Python 3.11 quotes the names, 3.12 does not
    assert ("invalid choice: no-such-method (choose from causal-video, crepa, ddpo, domainstudio, fvdm, lcm-lora, masked-diffusion-lm, "
            "multiview, restoration, rlcm, smooth-lora, spm, toy-epsilon)") in errors


def test_other_diffusers_models_save_their_adapter_in_their_own_lora_format(tmp_path):
    from diffusers import SD3Transformer2DModel

    from diffusers_ext.training.trainer import add_lora_adapter

    def tiny_transformer():
        torch.manual_seed(0)
        return SD3Transformer2DModel(sample_size=8, patch_size=1, in_channels=4, num_layers=1, attention_head_dim=8,
                                     num_attention_heads=2, joint_attention_dim=TEXT_DIM, caption_projection_dim=16,
                                     pooled_projection_dim=TEXT_DIM, out_channels=4)

    config = TrainingConfig(lora_rank=2, lora_alpha=6)
    model = add_lora_adapter(tiny_transformer(), config)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:  # as if trained: B starts at zero
                parameter.normal_(generator=torch.Generator().manual_seed(1))
    save_trained_model(model, tmp_path / "final", method_name="toy", config=config)
    reloaded = tiny_transformer()
    reloaded.load_lora_adapter(tmp_path / "final", prefix=None, use_safetensors=True)
    inputs = dict(hidden_states=torch.randn(1, 4, 8, 8), encoder_hidden_states=torch.randn(1, 4, TEXT_DIM),
                  pooled_projections=torch.randn(1, TEXT_DIM), timestep=torch.tensor([500]))
    with torch.no_grad():
        assert torch.equal(reloaded(**inputs).sample, model(**inputs).sample)
        assert not torch.equal(tiny_transformer()(**inputs).sample, model(**inputs).sample)


class Crash(Exception):
    pass


class CrashingEpsilonMSE(EpsilonMSE):
    def __init__(self, crash_at_call: int):
        super().__init__()
        self.calls, self.crash_at_call = 0, crash_at_call

    def loss(self, model, batch, generator):
        self.calls += 1
        if self.calls == self.crash_at_call:
            raise Crash
        return super().loss(model, batch, generator)


def test_a_crashed_run_resumes_to_the_uninterrupted_lora_and_ema_weights(tmp_path):
    # 3 micro-batches per epoch, and the loader's end closes an accumulation early: steps take micro-batches
    # (1, 2), (3), (4, 5), (6), (7, 8), so checkpoint 3 lies mid-epoch and the resumed steps straddle an epoch's end.
    data = latent_data(6)

    def trainer(output_dir, method, resume_from=None):
        config = TrainingConfig(output_dir=str(output_dir), max_steps=5, batch_size=2, gradient_accumulation_steps=2,
                                learning_rate=1e-2, lora_rank=2, lora_alpha=4, ema_decay=0.5, checkpoint_every=3,
                                resume_from=resume_from)
        return Trainer(method, tiny_unet(), data, config)

    counting = CrashingEpsilonMSE(crash_at_call=0)
    uninterrupted = trainer(tmp_path / "a", counting).train()
    assert counting.calls == 8
    with pytest.raises(Crash):
        trainer(tmp_path / "b", CrashingEpsilonMSE(crash_at_call=7)).train()  # killed during step 5
    assert latest_checkpoint(tmp_path / "b").name == "checkpoint-3"
    resumed = trainer(tmp_path / "b", EpsilonMSE(), resume_from="latest").train()
    assert resumed.step == 5 and resumed.losses == pytest.approx(uninterrupted.losses[3:], rel=1e-6)
    for (name, expected), actual in zip(trainable_state(uninterrupted.model).items(),
                                        trainable_state(resumed.model).values(), strict=True):
        torch.testing.assert_close(actual, expected, rtol=1e-6, atol=1e-7, msg=name)
    for name, expected in uninterrupted.ema_weights.items():
        torch.testing.assert_close(resumed.ema_weights[name], expected, rtol=1e-6, atol=1e-7, msg=name)
    assert any(not torch.equal(uninterrupted.ema_weights[n], v) for n, v in trainable_state(resumed.model).items())


class SplittingEpsilonMSE(CrashingEpsilonMSE):
    """A sampling phase that turns each loader batch into its single items."""

    def __init__(self, crash_at_call: int = 0):
        super().__init__(crash_at_call)
        self.rounds = 0

    def collect(self, model, batch, generator):
        assert not model.training and not torch.is_grad_enabled()
        self.rounds += 1
        return [{k: v[i:i + 1] for k, v in batch.items()} for i in range(len(batch["latents"]))]


def test_a_sampling_phase_feeds_the_micro_steps_and_resumes_mid_round(tmp_path):
    def trainer(output_dir, method, resume_from=None):
        config = TrainingConfig(output_dir=str(output_dir), max_steps=4, batch_size=4, gradient_accumulation_steps=3,
                                learning_rate=1e-2, lora_rank=2, checkpoint_every=1, resume_from=resume_from)
        return Trainer(method, tiny_unet(), latent_data(8), config)

    method = SplittingEpsilonMSE()
    uninterrupted = trainer(tmp_path / "a", method).train()
    # 4 steps of 3 micro-steps, each one item: 12 items from 3 loader batches of 4, no early sync at a round's end.
    assert (method.calls, method.rounds) == (12, 3) and uninterrupted.model.training
    with pytest.raises(Crash):
        trainer(tmp_path / "b", SplittingEpsilonMSE(crash_at_call=8)).train()  # during step 3, mid-round
    assert latest_checkpoint(tmp_path / "b").name == "checkpoint-2"
    resumed_method = SplittingEpsilonMSE()
    resumed = trainer(tmp_path / "b", resumed_method, resume_from="latest").train()
    assert resumed_method.rounds == 1  # the checkpoint's untaken items first, then one new round
    assert resumed.losses == pytest.approx(uninterrupted.losses[2:], rel=1e-6)
    for (name, expected), actual in zip(trainable_state(uninterrupted.model).items(),
                                        trainable_state(resumed.model).values(), strict=True):
        torch.testing.assert_close(actual, expected, rtol=1e-6, atol=1e-7, msg=name)


class NoGradientCheckpointing(torch.nn.Module):
    def forward(self, sample, timesteps, encoder_hidden_states):
        return sample


def test_bad_inputs_are_clear_errors_that_lose_no_checkpoint(tmp_path, capsys):
    output_dir = tmp_path / "run"
    Trainer(EpsilonMSE(), tiny_unet(), latent_data(4),
            TrainingConfig(output_dir=str(output_dir), max_steps=1, batch_size=4, checkpoint_every=1)).train()

    def snapshot() -> dict[str, str]:
        return {str(p.relative_to(output_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(output_dir.rglob("*")) if p.is_file()}

    before = snapshot()
    same_dir = dict(output_dir=str(output_dir), max_steps=3, batch_size=4, checkpoint_every=1)
    with pytest.raises(ValueError, match=r"lora_rank must be a positive integer"):
        TrainingConfig(**same_dir, lora_rank=0)
    (tmp_path / "typo.yaml").write_text("max_steps: 3\nlearning_rat: 0.1\n")
    with pytest.raises(ValueError, match=r"unknown TrainingConfig field\(s\) in .*typo.yaml: \['learning_rat'\]; "
                                         r"valid fields: \[.*'learning_rate'"):
        TrainingConfig.from_yaml(tmp_path / "typo.yaml")
    (tmp_path / "good.yaml").write_text(yaml.safe_dump(same_dir))
    with pytest.raises(ValueError, match=r"max_steps must be an integer, got 'ten'"):
        TrainingConfig.from_yaml(tmp_path / "good.yaml", {"max_steps": "ten"})
    with pytest.raises(SystemExit) as exit_info:
        train_main(["restoration", "--config", str(tmp_path / "good.yaml"), "--max_steps", "ten"])
    assert exit_info.value.code == 2 and "max_steps must be an integer, got 'ten'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="NoGradientCheckpointing does not support gradient checkpointing"):
        Trainer(EpsilonMSE(), NoGradientCheckpointing(), latent_data(4),
                TrainingConfig(**same_dir, gradient_checkpointing=True))
    with pytest.raises(ValueError, match="the training data set is empty"):
        Trainer(EpsilonMSE(), tiny_unet(), [], TrainingConfig(**same_dir, resume_from="latest"))
    with pytest.raises(ValueError, match="the toy-epsilon method has no validate"):
        Trainer(EpsilonMSE(), tiny_unet(), latent_data(4), TrainingConfig(**same_dir, validation_every=1))
    with pytest.raises(ValueError, match="written without an EMA; resume it with ema_decay None"):
        Trainer(EpsilonMSE(), tiny_unet(), latent_data(4),
                TrainingConfig(**same_dir, ema_decay=0.9, resume_from="latest")).train()
    with pytest.raises(ValueError, match=r"log_with='mlfow' is not an accelerate tracker; known: \[.*'mlflow'"):
        TrainingConfig(**same_dir, log_with="mlfow")
    assert snapshot() == before and latest_checkpoint(output_dir).name == "checkpoint-1"


def test_gradient_checkpointing_on_a_transformers_model(tmp_path):
    from transformers import BertConfig, BertForMaskedLM

    model = BertForMaskedLM(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                       intermediate_size=32, max_position_embeddings=8))
    config = TrainingConfig(output_dir=str(tmp_path), gradient_checkpointing=True, lora_rank=2)
    Trainer(EpsilonMSE(), model, latent_data(4), config)
    assert model.is_gradient_checkpointing
