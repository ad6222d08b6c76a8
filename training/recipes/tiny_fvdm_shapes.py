"""Train the tiny FVDM video model that ships with the package, and measure it against a scalar-timestep baseline.

    python -m diffusers_ext.training.recipes.tiny_fvdm_shapes [--output diffusers_ext/assets/tiny-fvdm-shapes]
        [--budget full|smoke] [--checkpoints training_output/tiny-fvdm-shapes]

FVDM ("Redefining Temporal Modeling in Video Diffusion: The Vectorized Timestep Approach", Liu et al., arXiv
2410.03160) trains one video model with a timestep per frame (PTSS: the authors' p = 0.2 of batches vectorized) and
then does standard generation, image-to-video, interpolation and long video by the per-frame timestep plan alone.
Here a tiny pixel-space Wan transformer learns ``BouncingShapes`` clips (8 frames of 16 x 16 RGB, one or two shapes
bouncing at random velocities, drawn on the fly) with flow matching through the shared ``Trainer``; the same
transformer is trained from the same initialisation, data order and budget with ``p = 0`` (every frame of a clip
at one timestep: a conventional video diffusion model, the paper's comparison).

Both are then sampled on clips held out from training (another seed of ``BouncingShapes``) and scored with
``diffusers_ext.testing.video_metrics.VideoMetrics`` against a third seed of real clips, task by task:

- standard generation: ``FrameAwareVideoPipeline`` with the standard plan, for both models;
- image-to-video from a held-out first frame, and interpolation between a held-out clip's first and last frames:
  FVDM keeps the given frames clean in the plan (as the authors' ``sample_video_i2v.py`` /
  ``sample_video_interpolation.py`` place them, clean, into the starting latents). The authors' code runs no
  scalar-timestep model on these tasks; the scalar model here is conditioned the way a conventional video diffusion
  model is without retraining, by replacement (VDM, Ho et al., arXiv 2204.03458, section 3.1; SDEdit-style
  inpainting): all frames walk the schedule together and after every step the given frames are overwritten by the
  forward process of the truth at the new level (one noise draw per frame, the one they started from). The scalar
  model under FVDM's own plan (given frames clean, the rest noisy) is reported too;
- long video, four windows long (32 frames): a rolling window of 8 frames, each later window taking the previous
  one's last 4 frames as context (the pipeline's ``window_frames`` / ``context_frames`` for FVDM, replacement of the
  context frames for the scalar model);
- frames sampled independently: each task's FVDM output with frame ``f`` of every clip taken from another clip's
  output (``independent_frames``; given frames put back), which keeps every frame's quality and breaks the temporal
  link.

The figures go into the model card and ``training_report.json``, sample frames into ``samples.png``; the folder is
the FVDM model as a ``FrameAwareVideoPipeline`` saved with ``save_for_hub``:
``DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)``. ``--budget smoke`` runs every stage in
seconds (a test of the recipe, not a model).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, WanTransformer3DModel
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image
from tqdm.auto import tqdm

from ...hub import save_for_hub
from ...pipelines.video import FrameAwareVideoPipeline, FrameTimestepPlan
from ...schedulers import FrameAwareFlowMatchScheduler
from ...testing.video_metrics import VideoMetrics, foreground_mask, independent_frames
from ..fvdm import PAPER_VECTORIZED_PROBABILITY, BouncingShapes, FVDMObjective
from ..trainer import Trainer, TrainingConfig

NUM_FRAMES, FRAME_SIZE, CHANNELS = 8, 16, 3
TRAIN_SEED, HELD_OUT_SEED, REFERENCE_SEED = 0, 1, 2
TEXT_DIM = 16  # the unconditional model's one zero text token
LONG_VIDEO_WINDOWS, CONTEXT_FRAMES = 4, 4
INTERPOLATION_KEY_FRAMES = (0, NUM_FRAMES - 1)


@dataclass(frozen=True)
class Budget:
    """How much a run trains (per model) and evaluates."""

    steps: int
    batch_size: int
    eval_clips: int
    reference_clips: int
    inference_steps: int


BUDGETS = {
    "full": Budget(steps=4000, batch_size=16, eval_clips=128, reference_clips=512, inference_steps=20),
    "smoke": Budget(steps=2, batch_size=2, eval_clips=3, reference_clips=4, inference_steps=2),
}


def tiny_video_transformer(seed: int = 0) -> WanTransformer3DModel:
    """A pixel-space ``WanTransformer3DModel`` for ``NUM_FRAMES`` x ``FRAME_SIZE`` px RGB clips: 4 x 4 patches (16
    tokens a frame; 2 x 2 patches cost about twice as much per step for a model a tenth the size), four blocks of four
    16-wide heads. The same for the same ``seed``."""
    torch.manual_seed(seed)
    return WanTransformer3DModel(patch_size=(1, 4, 4), num_attention_heads=4, attention_head_dim=16,
                                 in_channels=CHANNELS, out_channels=CHANNELS, text_dim=TEXT_DIM, freq_dim=32,
                                 ffn_dim=256, num_layers=4, rope_max_seq_len=32)


def bouncing_clips(count: int, seed: int, num_frames: int = NUM_FRAMES) -> torch.Tensor:
    clips = BouncingShapes(count, num_frames=num_frames, size=FRAME_SIZE, channels=CHANNELS, seed=seed)
    return torch.stack([clips[i] for i in range(count)])


def train(vectorized_probability: float, budget: Budget, output_dir: str) -> tuple[WanTransformer3DModel, dict]:
    """The transformer trained with FVDM's loss at ``vectorized_probability`` (its EMA weights) and a summary of the
    run. Both models of the recipe share the initialisation, the data order and the seed of the noise and timestep
    draws."""
    objective = FVDMObjective(FlowMatchEulerDiscreteScheduler(), vectorized_probability=vectorized_probability,
                              prompt_embeds=torch.zeros(1, 1, TEXT_DIM))
    # Enough clips that a full run never repeats one; each is drawn when the loader asks for it.
    dataset = BouncingShapes(budget.steps * budget.batch_size, num_frames=NUM_FRAMES, size=FRAME_SIZE,
                             channels=CHANNELS, seed=TRAIN_SEED)
    config = TrainingConfig(output_dir=output_dir, max_steps=budget.steps, batch_size=budget.batch_size,
                            learning_rate=2e-3, ema_decay=0.999, checkpoint_every=0, seed=TRAIN_SEED)
    start = time.perf_counter()
    result = Trainer(objective, tiny_video_transformer(TRAIN_SEED).train(), dataset, config).train()
    model = result.model.eval()
    model.load_state_dict(result.ema_weights, strict=False)
    losses = np.asarray(result.losses)
    tail = losses[-max(1, len(losses) // 10):]
    return model, {"vectorized_probability": vectorized_probability, "steps": result.step,
                   "seconds": round(time.perf_counter() - start, 1), "final_loss": round(float(tail.mean()), 4)}


def video_pipeline(transformer: WanTransformer3DModel) -> FrameAwareVideoPipeline:
    pipe = FrameAwareVideoPipeline(transformer=transformer, scheduler=FrameAwareFlowMatchScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def as_clips(frames: torch.Tensor) -> torch.Tensor:
    """The pipeline's ``"pt"`` frames ``(B, F, C, H, W)`` in [0, 1] as clips ``(B, C, F, H, W)`` in [-1, 1]."""
    return frames.permute(0, 2, 1, 3, 4) * 2 - 1


def noise_grid(pipe: FrameAwareVideoPipeline, num_inference_steps: int) -> torch.Tensor:
    pipe.scheduler.set_timesteps(num_inference_steps)
    return pipe.scheduler.noise_levels


def sample_with_clean_frames(pipe: FrameAwareVideoPipeline, given: torch.Tensor, frames: list[int],
                             num_inference_steps: int, generator: torch.Generator) -> torch.Tensor:
    """FVDM's conditioning, one clip per given clip: the ``frames`` of ``given`` ``(B, C, F, H, W)`` placed clean
    into the starting noise and kept clean by the plan, the others generated."""
    latents = randn_tensor(given.shape, generator=generator)
    latents[:, :, frames] = given[:, :, frames]
    grid = noise_grid(pipe, num_inference_steps)
    plan = (FrameTimestepPlan.interpolation(grid, given.shape[2], frames) if len(frames) > 1
            else FrameTimestepPlan.image_to_video(grid, given.shape[2], frames))
    return as_clips(pipe(num_frames=given.shape[2], height=FRAME_SIZE, width=FRAME_SIZE, plan=plan,
                         latents=latents, prompt_embeds=torch.zeros(given.shape[0], 1, TEXT_DIM), output_type="pt",
                         generator=generator).frames)


def replacement_callback(given: torch.Tensor, frames: list[int], noise: torch.Tensor,
                         plan: FrameTimestepPlan) -> Callable:
    """``callback_on_step_end`` for replacement conditioning: after step ``k`` the ``frames`` of the latents become
    the forward process of ``given`` at the plan's level ``k + 1`` with the noise they started from."""

    def replace(pipe, step, timesteps, tensors):
        latents = tensors["latents"]
        noised = pipe.scheduler.add_noise(given, noise, plan.levels[step + 1])
        latents[:, :, frames] = noised[:, :, frames]
        return {"latents": latents}

    return replace


def sample_with_replacement(pipe: FrameAwareVideoPipeline, given: torch.Tensor, frames: list[int],
                            num_inference_steps: int, generator: torch.Generator) -> torch.Tensor:
    """A conventional model's zero-shot conditioning: every frame walks the standard plan, the ``frames`` of ``given``
    replaced after every step (``replacement_callback``)."""
    noise = randn_tensor(given.shape, generator=generator)
    plan = FrameTimestepPlan.standard(noise_grid(pipe, num_inference_steps), given.shape[2])
    return as_clips(pipe(num_frames=given.shape[2], height=FRAME_SIZE, width=FRAME_SIZE, plan=plan,
                         latents=noise.clone(), prompt_embeds=torch.zeros(given.shape[0], 1, TEXT_DIM),
                         output_type="pt", callback_on_step_end=replacement_callback(given, frames, noise, plan),
                         generator=generator).frames)


def sample_standard(pipe: FrameAwareVideoPipeline, count: int, num_inference_steps: int,
                    generator: torch.Generator, num_frames: int = NUM_FRAMES) -> torch.Tensor:
    """Unconditional clips; more frames than the window roll it with ``CONTEXT_FRAMES`` clean context frames."""
    return as_clips(pipe(num_frames=num_frames, height=FRAME_SIZE, width=FRAME_SIZE,
                         num_inference_steps=num_inference_steps, window_frames=NUM_FRAMES,
                         context_frames=CONTEXT_FRAMES, prompt_embeds=torch.zeros(count, 1, TEXT_DIM),
                         output_type="pt", generator=generator).frames)


def long_video_with_replacement(pipe: FrameAwareVideoPipeline, count: int, num_frames: int,
                                num_inference_steps: int, generator: torch.Generator) -> torch.Tensor:
    """The rolling window of ``sample_standard`` for a conventional model: each later window takes the previous
    one's last ``CONTEXT_FRAMES`` frames by replacement."""
    video = sample_standard(pipe, count, num_inference_steps, generator)
    context = list(range(CONTEXT_FRAMES))
    while video.shape[2] < num_frames:
        given = torch.zeros(count, CHANNELS, NUM_FRAMES, FRAME_SIZE, FRAME_SIZE)
        given[:, :, context] = video[:, :, -CONTEXT_FRAMES:]
        window = sample_with_replacement(pipe, given, context, num_inference_steps, generator)
        video = torch.cat([video, window[:, :, CONTEXT_FRAMES:]], dim=2)
    return video[:, :, :num_frames]


def with_frames_independent(clips: torch.Tensor, given: torch.Tensor | None, frames: list[int],
                            generator: torch.Generator) -> torch.Tensor:
    """``independent_frames`` of ``clips`` with the given ``frames`` put back."""
    shuffled = independent_frames(clips, generator)
    if frames:
        shuffled[:, :, frames] = given[:, :, frames]
    return shuffled


def held_out_mse(clips: torch.Tensor, truth: torch.Tensor, given_frames: list[int]) -> torch.Tensor:
    """``(B,)``: each clip's mean squared error to its held-out clip over the frames that were not given."""
    generated = [f for f in range(truth.shape[2]) if f not in given_frames]
    return (clips[:, :, generated] - truth[:, :, generated]).square().mean(dim=(1, 2, 3, 4))


Table = dict[str, dict[str, dict[str, float]]]


def evaluate(fvdm: FrameAwareVideoPipeline, scalar: FrameAwareVideoPipeline,
             budget: Budget) -> tuple[Table, Table, dict[str, torch.Tensor]]:
    """Every task's figures by sampler (``VideoMetrics`` against real clips of a seed of their own, with the
    held-out clips themselves as the floor, and the held-out error where frames were given), their standard errors
    (bootstrap over the clips; the mean's for the held-out error), and one clip of every task and sampler: the
    held-out clip with the most foreground among the first eight, so that the sheet shows something."""
    count, steps = budget.eval_clips, budget.inference_steps
    long_frames = LONG_VIDEO_WINDOWS * NUM_FRAMES
    held_out = bouncing_clips(count, HELD_OUT_SEED, long_frames)
    example = int(foreground_mask(held_out[:8]).double().mean(dim=(1, 2, 3)).argmax())
    metrics = {frames: VideoMetrics(bouncing_clips(budget.reference_clips, REFERENCE_SEED, frames))
               for frames in (NUM_FRAMES, long_frames)}
    window = held_out[:, :, :NUM_FRAMES]
    runs = {
        "standard": ([], {
            "FVDM": lambda g: sample_standard(fvdm, count, steps, g),
            "scalar timestep": lambda g: sample_standard(scalar, count, steps, g)}),
        "image-to-video": ([0], {
            "FVDM": lambda g: sample_with_clean_frames(fvdm, window, [0], steps, g),
            "scalar timestep, replacement": lambda g: sample_with_replacement(scalar, window, [0], steps, g),
            "scalar timestep, FVDM plan": lambda g: sample_with_clean_frames(scalar, window, [0], steps, g)}),
        "interpolation": (list(INTERPOLATION_KEY_FRAMES), {
            "FVDM": lambda g: sample_with_clean_frames(fvdm, window, list(INTERPOLATION_KEY_FRAMES), steps, g),
            "scalar timestep, replacement": lambda g: sample_with_replacement(
                scalar, window, list(INTERPOLATION_KEY_FRAMES), steps, g),
            "scalar timestep, FVDM plan": lambda g: sample_with_clean_frames(
                scalar, window, list(INTERPOLATION_KEY_FRAMES), steps, g)}),
        "long video": ([], {
            "FVDM": lambda g: sample_standard(fvdm, count, steps, g, long_frames),
            "scalar timestep, replacement": lambda g: long_video_with_replacement(scalar, count, long_frames, steps,
                                                                                  g),
            "scalar timestep, FVDM plan": lambda g: sample_standard(scalar, count, steps, g, long_frames)}),
    }
    report, errors, samples = {}, {}, {}
    progress = tqdm(total=sum(len(samplers) for _, samplers in runs.values()), desc="sampling held-out tasks")
    for task_index, (task, (given_frames, samplers)) in enumerate(runs.items()):
        truth = held_out if task == "long video" else window
        clips = {}
        for name, sample in samplers.items():
            # The same seed for every sampler of a task: the models start from the same noise where they can.
            clips[name] = sample(torch.Generator().manual_seed(task_index))
            progress.update()
        clips["frames sampled independently"] = with_frames_independent(
            clips["FVDM"], truth, given_frames, torch.Generator().manual_seed(task_index))
        clips["real clips (floor)"] = truth
        report[task], errors[task] = {}, {}
        for name, generated in clips.items():
            figures = metrics[truth.shape[2]](generated)
            spreads = metrics[truth.shape[2]].standard_errors(generated)
            if given_frames:
                per_clip = held_out_mse(generated, truth, given_frames)
                figures["held_out_mse"] = float(per_clip.mean())
                spreads["held_out_mse"] = float(per_clip.std() / len(per_clip) ** 0.5) if len(per_clip) > 1 else 0.0
            report[task][name] = {key: round(value, 4) for key, value in figures.items()}
            errors[task][name] = {key: round(value, 4) for key, value in spreads.items()}
            samples[f"{task}: {name}"] = generated[example]
    progress.close()
    return report, errors, samples


COLUMNS = (("clean_fraction", "clean pixels ↑"), ("frame_fd", "frame FD ↓"), ("area_change", "area change ↓"),
           ("colour_change", "colour change ↓"), ("centroid_speed", "centroid speed (px)"),
           ("centroid_acceleration", "centroid accel. (px) ↓"), ("clip_fd", "clip FD ↓"),
           ("held_out_mse", "held-out MSE ↓"))


def markdown_table(report: Table, errors: Table) -> str:
    """The figures as ``value ± standard error``, a row per task and sampler."""
    lines = ["| task | sampler | " + " | ".join(title for _, title in COLUMNS) + " |",
             "| --- | --- |" + " --- |" * len(COLUMNS)]
    for task, rows in report.items():
        for name, figures in rows.items():
            cells = [f"{figures[key]:.3g} ± {errors[task][name][key]:.2g}" if key in figures else "–"
                     for key, _ in COLUMNS]
            lines.append(f"| {task} | {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def sample_sheet(samples: dict[str, torch.Tensor], scale: int = 4) -> Image.Image:
    """One row of frames per task and sampler, clips ``(C, F, H, W)`` in [-1, 1]; a 1 px gap between frames."""
    width = max(clip.shape[1] for clip in samples.values()) * (FRAME_SIZE + 1)
    sheet = np.zeros((len(samples) * (FRAME_SIZE + 1), width, CHANNELS), dtype=np.uint8)
    for row, clip in enumerate(samples.values()):
        pixels = ((clip.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0).numpy()
        for f, frame in enumerate(pixels):
            top, left = row * (FRAME_SIZE + 1), f * (FRAME_SIZE + 1)
            sheet[top:top + FRAME_SIZE, left:left + FRAME_SIZE] = frame
    image = Image.fromarray(sheet)
    return image.resize((image.width * scale, image.height * scale), Image.NEAREST)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="diffusers_ext/assets/tiny-fvdm-shapes")
    parser.add_argument("--budget", choices=sorted(BUDGETS), default="full")
    parser.add_argument("--checkpoints", default="training_output/tiny-fvdm-shapes")
    args = parser.parse_args(argv)
    budget = BUDGETS[args.budget]

    fvdm_model, fvdm_run = train(PAPER_VECTORIZED_PROBABILITY, budget, str(Path(args.checkpoints, "fvdm")))
    scalar_model, scalar_run = train(0.0, budget, str(Path(args.checkpoints, "scalar-timestep")))
    fvdm, scalar = video_pipeline(fvdm_model), video_pipeline(scalar_model)
    start = time.perf_counter()
    figures, errors, samples = evaluate(fvdm, scalar, budget)
    report = {
        "budget": {"name": args.budget, **asdict(budget)},
        "clip": {"num_frames": NUM_FRAMES, "size": FRAME_SIZE, "channels": CHANNELS,
                 "long_video_frames": LONG_VIDEO_WINDOWS * NUM_FRAMES, "context_frames": CONTEXT_FRAMES},
        "seeds": {"train": TRAIN_SEED, "held_out": HELD_OUT_SEED, "reference": REFERENCE_SEED},
        "parameters": sum(p.numel() for p in fvdm_model.parameters()),
        "runs": {"fvdm": fvdm_run, "scalar_timestep": scalar_run},
        "evaluation_seconds": round(time.perf_counter() - start, 1),
        "held_out": figures,
        "standard_errors": errors,
    }
    table = markdown_table(figures, errors)
    description = (
        f"A tiny pixel-space video model (`WanTransformer3DModel`, {report['parameters'] / 1e6:.2f} M parameters) "
        f"trained with FVDM's vectorized timesteps (PTSS, p = {PAPER_VECTORIZED_PROBABILITY}) for "
        f"{fvdm_run['steps']} steps on synthetic clips of one or two shapes bouncing at random velocities "
        f"({NUM_FRAMES} frames of {FRAME_SIZE} x {FRAME_SIZE} RGB). One model, four tasks chosen by the per-frame "
        "timestep plan: standard generation, image-to-video, interpolation and long video. A demonstration model.\n\n"
        f"Held-out clips ({budget.eval_clips} a task, {budget.inference_steps} Euler steps), against the same "
        "transformer trained for the same steps with one timestep per clip (p = 0), conditioned by replacement "
        "(and, for reference, under FVDM's plan), and against FVDM's frames shuffled across clips (no temporal "
        "link). Real clips of another seed are the reference; the held-out clips themselves give the floor. "
        "Metrics (`diffusers_ext.testing.video_metrics`), each ± its bootstrap standard error over the clips: "
        "clean pixels = share of background / shape-coloured pixels; frame / clip FD = Fréchet distance of per-frame "
        "/ per-clip features; area and colour change = frame-to-frame change of the foreground (object "
        "persistence); centroid acceleration = motion smoothness, and centroid speed = how much a clip moves (a "
        "still clip has little acceleration and change too: compare its speed with the real clips'); held-out MSE = "
        "error to the held-out clip on the frames not given.\n\n"
        f"{table}\n\nTraining took {fvdm_run['seconds'] / 60:.0f} (FVDM) and {scalar_run['seconds'] / 60:.0f} "
        f"(scalar timestep) minutes, the evaluation {report['evaluation_seconds'] / 60:.0f}, on CPU. Sample frames, "
        "one row per task and sampler: `samples.png`. Reproduce with "
        "`python -m diffusers_ext.training.recipes.tiny_fvdm_shapes`."
    )
    # No pipeline_tag: the Hub has none for unconditional video.
    save_for_hub(fvdm, args.output, card_template="pipeline", repo_id="diffusers-ext/tiny-fvdm-shapes",
                 title="tiny-fvdm-shapes", description=description, license="apache-2.0", tags=["video"])
    Path(args.output, "training_report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    sample_sheet(samples).save(Path(args.output, "samples.png"))
    print(table)
    return report


if __name__ == "__main__":
    main()
