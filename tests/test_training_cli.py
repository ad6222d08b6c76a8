"""``diffusers-ext train``: each method's own help, printed without importing torch; user errors as one line with
exit code 2 before anything heavy loads; each method's own defaults (the settings it needs); a resume that reads the
run's checkpoint instead of needing every flag again, and leaves the run's files alone when it refuses; and what
``train spm`` writes loading with the documented ``load_spm``. Runs are 2-3 steps of tiny models."""

from __future__ import annotations

import hashlib
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from diffusers import DDPMScheduler, StableDiffusionPipeline
from safetensors.torch import load_file
from tiny_pipelines import TEXT_DIM, sd_pipeline

from diffusers_ext.training import latest_checkpoint, load_spm
from diffusers_ext.training.cli import TRAINING_METHODS, TrainingMethodEntry, parse_arguments
from diffusers_ext.training.cli import main as train_main
from diffusers_ext.training.lcm_lora import LCM_LORA_TARGET_MODULES
from diffusers_ext.training.spm import SPM_TARGET_MODULES

HEAVY_MODULES = ("torch", "diffusers", "transformers", "accelerate")
# Runs the top-level command in a fresh interpreter and prints, last, which heavy modules it imported.
COMMAND = f"""import sys
from diffusers_ext.cli import main
code = 1
try:
    code = main(sys.argv[1:])
except SystemExit as exit:
    code = exit.code
finally:
    sys.stdout.flush()
    print("imported:", sorted(m for m in {HEAVY_MODULES!r} if m in sys.modules))
sys.exit(code)
"""


def run_command(*arguments: str) -> tuple[int, str, str, list[str]]:
    """``diffusers-ext <arguments>``: exit code, stdout (without the probe's line), stderr, heavy modules imported."""
    done = subprocess.run([sys.executable, "-c", COMMAND, *arguments], capture_output=True, text=True, timeout=300)
    output, probe = done.stdout.rsplit("imported: ", 1)
    return done.returncode, output, done.stderr, eval(probe)  # the probe prints a list of names


def flag_help(help_text: str, flag: str) -> str:
    """The help paragraph of ``flag``, on one line."""
    match = re.search(rf"^  {re.escape(flag)}\b(.*?)(?=^  -|\Z)", help_text, re.M | re.S)
    assert match, f"{flag} is not in the help"
    return " ".join(match.group(1).split())


def test_each_method_has_its_own_help_printed_without_heavy_imports_or_warnings():
    code, overview, errors, imported = run_command("train", "--help")
    assert (code, errors, imported) == (0, "", [])
    for name in TRAINING_METHODS:
        assert re.search(rf"^\s+{re.escape(name)}\s+\S", overview, re.M), f"{name} has no summary line"

    code, spm, errors, imported = run_command("train", "spm", "--help")
    assert (code, errors, imported) == (0, "", [])
    code, lcm, errors, imported = run_command("train", "lcm-lora", "--help")
    assert (code, errors, imported) == (0, "", [])
    # Each states its own defaults and what it writes.
    assert "default: 1" in flag_help(spm, "--lora-rank") and "default: 8" in flag_help(lcm, "--lora-rank")
    assert ", ".join(SPM_TARGET_MODULES) in flag_help(spm, "--lora-target-modules")
    assert "load_spm" in spm and "spm.json" in spm and "load_spm" not in lcm
    assert "LCMScheduler" in lcm and "base_unet" in lcm
    assert "default: 500" in flag_help(spm, "--checkpoint-every")


@pytest.mark.parametrize("arguments, message", [
    (["no-such-method"], "invalid choice: 'no-such-method'"),
    (["restoration", "--max-steps", "ten"], "max_steps must be an integer, got 'ten'"),
    (["restoration", "--max-steps", "0"], "max_steps must be a positive integer, got 0"),
    (["restoration", "--config", "{tmp}/missing.yaml"], "no such config file: {tmp}/missing.yaml"),
    (["restoration", "--config", "{tmp}/typo.yaml"],
     "unknown TrainingConfig field(s) in {tmp}/typo.yaml: ['learning_rat']"),
    (["restoration", "--no-such-flag", "1"], "unrecognized arguments: --no-such-flag"),
    (["lcm-lora", "--lora-rank", "none"], "lcm-lora trains a LoRA adapter: lora_rank must be set"),
    (["spm", "--lora-rank", "4"], "spm needs lora_rank = 1, got 4"),
    (["restoration", "--validation-every", "10"], "restoration needs validation_every = 0, got 10"),
    (["restoration", "--output-dir", "{tmp}/run", "--resume", "latest"], "no checkpoint to resume in {tmp}/run"),
])
def test_user_errors_are_one_line_with_exit_code_2_before_anything_heavy_loads(arguments, message, tmp_path):
    (tmp_path / "typo.yaml").write_text("max_steps: 3\nlearning_rat: 0.1\n")
    code, output, errors, imported = run_command("train", *(a.format(tmp=tmp_path) for a in arguments))
    assert code == 2 and output == "" and imported == []
    assert errors.count("\n") == 1 and message.format(tmp=tmp_path) in errors, errors


def test_a_method_defaults_to_the_settings_it_needs_and_the_config_file_and_flags_override_them(tmp_path):
    _, config = parse_arguments(["lcm-lora", "--output-dir", str(tmp_path / "a")])
    assert (config.lora_rank, config.lora_target_modules) == (8, LCM_LORA_TARGET_MODULES)
    (tmp_path / "run.yaml").write_text("lora_rank: 4\nlearning_rate: 1e-4\n")  # YAML 1.1 reads 1e-4 as a string
    _, config = parse_arguments(["lcm-lora", "--config", str(tmp_path / "run.yaml"), "--output-dir",
                                 str(tmp_path / "a")])
    assert (config.lora_rank, config.learning_rate, config.lora_target_modules) == (4, 1e-4, LCM_LORA_TARGET_MODULES)
    _, config = parse_arguments(["lcm-lora", "--config", str(tmp_path / "run.yaml"), "--lora-rank", "2",
                                 "--output-dir", str(tmp_path / "a")])
    assert config.lora_rank == 2
    _, config = parse_arguments(["spm", "--output-dir", str(tmp_path / "a")])
    assert (config.lora_rank, config.lora_target_modules) == (1, SPM_TARGET_MODULES)


class ToyEpsilon:
    """Epsilon-prediction MSE on random latents: the cheapest LoRA run of a UNet2DConditionModel."""

    name = "toy-epsilon"

    def __init__(self):
        self.scheduler = DDPMScheduler()

    def loss(self, model, batch, generator):
        latents, embeds = batch["latents"], batch["embeds"]
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = torch.randint(0, 1000, (latents.shape[0],), generator=generator)
        prediction = model(self.scheduler.add_noise(latents, noise, timesteps), timesteps,
                           encoder_hidden_states=embeds).sample
        return torch.nn.functional.mse_loss(prediction, noise)


def toy_run(config, args):
    generator = torch.Generator().manual_seed(config.seed)
    data = [{"latents": torch.randn(4, 8, 8, generator=generator),
             "embeds": torch.randn(4, TEXT_DIM, generator=generator)} for _ in range(8)]
    return ToyEpsilon(), sd_pipeline().unet.train(), data


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_resume_continues_a_run_from_its_checkpoint_without_its_flags_and_refusals_write_nothing(
        tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(TRAINING_METHODS, "toy", TrainingMethodEntry(build=toy_run, summary="a toy LoRA run"))
    settings = ["--batch-size", "4", "--lora-rank", "2", "--lora-alpha", "4", "--learning-rate", "0.01"]
    run = tmp_path / "run"
    assert train_main(["toy", "--output-dir", str(run), "--max-steps", "2", *settings]) == 0
    assert latest_checkpoint(run).name == "checkpoint-2"  # without --checkpoint-every: at the end too
    record = snapshot(run)
    capsys.readouterr()  # the run's progress bars

    def refused(*arguments: str) -> str:
        with pytest.raises(SystemExit) as exit_info:
            train_main(["toy", "--output-dir", str(run), *arguments])
        errors = capsys.readouterr().err
        assert exit_info.value.code == 2 and errors.count("\n") == 1, errors
        assert snapshot(run) == record  # config.yaml, checkpoints and weights as they were
        return errors

    errors = refused("--resume", "latest", "--max-steps", "3", "--lora-rank", "4", "--learning-rate", "0.1")
    assert "lora_rank = 4" in errors and "lora_rank 2" in errors and "learning_rate = 0.1" in errors
    assert "is at step 2 and max_steps is 2" in refused("--resume", "latest")
    assert "already holds a run" in refused("--max-steps", "3", *settings)  # a fresh run would overwrite it

    # The checkpoint's settings (rank, alpha, learning rate, batch size) are the run's; repeating one is fine.
    assert train_main(["toy", "--output-dir", str(run), "--resume", "latest", "--max-steps", "3",
                       "--lora-rank", "2"]) == 0
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert (saved["lora_rank"], saved["lora_alpha"], saved["max_steps"], saved["resume_from"]) == (2, 4, 3, None)
    assert train_main(["toy", "--output-dir", str(tmp_path / "uninterrupted"), "--max-steps", "3", *settings]) == 0
    uninterrupted = load_file(tmp_path / "uninterrupted" / "final" / "pytorch_lora_weights.safetensors")
    resumed = load_file(run / "final" / "pytorch_lora_weights.safetensors")
    for name, weight in uninterrupted.items():
        torch.testing.assert_close(resumed[name], weight, rtol=1e-6, atol=1e-7, msg=name)


def test_what_train_spm_writes_loads_with_load_spm(tmp_path):
    assert train_main(["spm", "--output-dir", str(tmp_path), "--max-steps", "2", "--batch-size", "1"]) == 0
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "base_pipeline")
    pipe.set_progress_bar_config(disable=True)
    sampling = dict(num_inference_steps=2, output_type="latent")
    before = pipe("a cat", generator=torch.Generator().manual_seed(0), **sampling).images
    transport = load_spm(pipe, [tmp_path / "final"])
    assert list(pipe.unet.peft_config) == ["spm_0"] and transport.scales("a cat") == [pytest.approx(1.0)]
    after = transport("a cat", generator=torch.Generator().manual_seed(0), **sampling).images
    assert not torch.equal(after, before)  # the membrane acts
