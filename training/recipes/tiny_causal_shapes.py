"""Fine-tune the shipped tiny FVDM video model into the frame-causal one that ships with the package, and measure it
on held-out clips against holding the last given frame still.

    python -m diffusers_ext.training.recipes.tiny_causal_shapes [--output diffusers_ext/assets/tiny-causal-shapes]
        [--steps 3000] [--eval-clips 32] [--checkpoints training_output/tiny-causal-shapes]

Ca2-VDM ("Efficient Autoregressive Video Diffusion Model with Causal Generation and Cache Sharing", Gao et al., arXiv
2411.16375) and ViD-GPT ("Introducing GPT-style Autoregressive Generation in Video Diffusion Models", Gao et al.,
arXiv 2406.10981) make a video model's attention over frames causal and extend a video chunk by chunk, the clean
frames made so far being the next chunk's context at timestep 0, so their keys and values are cached once for all its
denoising steps. Both start from a pretrained bidirectional video model and train it by teacher forcing. Here the
shipped ``tiny-fvdm-shapes`` transformer (bidirectional, 8-frame ``BouncingShapes`` clips of 16 x 16 RGB, recipe
``tiny_fvdm_shapes``) gets causal attention and learns ``CausalVideoObjective`` through the shared ``Trainer``:
chunks of 2 frames after 2, 4 or 6 clean context frames, flow matching, on that recipe's training clips (its
training seed) at its learning rate, batches of 16. No context length of 0 is trained: the model extends given
frames; it does not start a video from nothing.

Evaluation: ``--eval-clips`` clips of the held-out seed (``tiny_fvdm_shapes.HELD_OUT_SEED``), their first 4 frames
given, extended to 16 by ``CausalVideoPipeline`` in chunks of 2 with the KV cache of the newest 6 frames (10 Euler
steps a chunk, sampling seed = the clip's index); the mean squared error of frames 4-15 to the held-out clips' own
frames (pixels in [-1, 1]), next to the last given frame held still, each with its standard error over the clips, and
clip by clip (``tests/test_shipped_causal_model.py`` reproduces the first clips' figures). The folder is the causal
model as a ``CausalVideoPipeline`` saved with ``save_for_hub``: ``DiffusionPipeline.from_pretrained(folder,
trust_remote_code=True)``, with ``training_report.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from ...hub import save_for_hub
from ...pipelines.video.causal_attention import disable_causal_attention, enable_causal_attention
from ...pipelines.video.causal_demo import (
    DEMO_CHUNK_FRAMES,
    extend_held_out_clips,
    extension_errors,
)
from ...pipelines.video.pipeline_causal import CausalVideoPipeline
from ...schedulers import FrameAwareFlowMatchScheduler
from ...shipped import load_shipped_pipeline
from ..causal_video import CausalVideoObjective
from ..fvdm import BouncingShapes
from ..trainer import Trainer, TrainingConfig
from . import tiny_fvdm_shapes as fvdm_recipe

BASE_MODEL = "tiny-fvdm-shapes"
CONTEXT_FRAMES = (2, 4, 6)  # clean frames before the chunk; 6 + a chunk of 2 fill the base model's 8-frame clips
BATCH_SIZE, LEARNING_RATE = 16, 2e-3  # the base model's recipe's
GIVEN_FRAMES, EXTENDED_FRAMES, MAX_CACHE_FRAMES, INFERENCE_STEPS = 4, 16, 6, 10


def causal_finetune(steps: int, output_dir: str) -> tuple[CausalVideoPipeline, dict]:
    """The shipped ``BASE_MODEL`` transformer fine-tuned into a frame-causal one by teacher forcing (the module
    docstring's settings), in a ``CausalVideoPipeline``, and a summary of the run."""
    transformer = load_shipped_pipeline(BASE_MODEL).transformer
    enable_causal_attention(transformer)
    objective = CausalVideoObjective(FrameAwareFlowMatchScheduler(), DEMO_CHUNK_FRAMES, CONTEXT_FRAMES,
                                     prompt_embeds=torch.zeros(1, 1, fvdm_recipe.TEXT_DIM))
    # Enough clips that the run never repeats one; each is drawn when the loader asks for it.
    clips = BouncingShapes(steps * BATCH_SIZE, num_frames=fvdm_recipe.NUM_FRAMES, size=fvdm_recipe.FRAME_SIZE,
                           channels=fvdm_recipe.CHANNELS, seed=fvdm_recipe.TRAIN_SEED)
    config = TrainingConfig(output_dir=output_dir, max_steps=steps, batch_size=BATCH_SIZE,
                            learning_rate=LEARNING_RATE, checkpoint_every=0, seed=fvdm_recipe.TRAIN_SEED)
    start = time.perf_counter()
    result = Trainer(objective, transformer.train(), clips, config).train()
    model = result.model.eval()
    disable_causal_attention(model)  # the pipeline makes it causal for each call
    losses = np.asarray(result.losses)
    tail = losses[-max(1, len(losses) // 10):]
    run = {"steps": result.step, "batch_size": BATCH_SIZE, "learning_rate": LEARNING_RATE,
           "seconds": round(time.perf_counter() - start, 1), "final_loss": round(float(tail.mean()), 4)}
    return CausalVideoPipeline(model, FrameAwareFlowMatchScheduler()), run


def evaluate(pipe: CausalVideoPipeline, count: int) -> dict:
    """The held-out figures of the module docstring: means, standard errors and clip by clip."""
    truth = fvdm_recipe.bouncing_clips(count, fvdm_recipe.HELD_OUT_SEED, EXTENDED_FRAMES)
    start = time.perf_counter()
    videos = extend_held_out_clips(pipe, truth, GIVEN_FRAMES, EXTENDED_FRAMES, MAX_CACHE_FRAMES, INFERENCE_STEPS)
    seconds = time.perf_counter() - start
    per_clip = extension_errors(videos, truth, GIVEN_FRAMES)
    return {"clips": count, "given_frames": GIVEN_FRAMES, "num_frames": EXTENDED_FRAMES,
            "chunk_frames": DEMO_CHUNK_FRAMES, "max_cache_frames": MAX_CACHE_FRAMES,
            "num_inference_steps": INFERENCE_STEPS, "sampling_seconds": round(seconds, 1),
            "new_frames_mse": {name: round(float(errors.mean()), 4) for name, errors in per_clip.items()},
            "standard_errors": {name: round(float(errors.std() / len(errors) ** 0.5), 4) if len(errors) > 1 else 0.0
                                for name, errors in per_clip.items()},
            "per_clip": {name: [round(float(e), 5) for e in errors] for name, errors in per_clip.items()}}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="diffusers_ext/assets/tiny-causal-shapes")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--eval-clips", type=int, default=32)
    parser.add_argument("--checkpoints", default="training_output/tiny-causal-shapes")
    args = parser.parse_args(argv)

    pipe, run = causal_finetune(args.steps, args.checkpoints)
    pipe.set_progress_bar_config(disable=True)
    held_out = evaluate(pipe, args.eval_clips)
    report = {
        "base_model": BASE_MODEL,
        "clip": {"num_frames": fvdm_recipe.NUM_FRAMES, "size": fvdm_recipe.FRAME_SIZE,
                 "channels": fvdm_recipe.CHANNELS},
        "teacher_forcing": {"chunk_frames": DEMO_CHUNK_FRAMES, "context_frames": list(CONTEXT_FRAMES)},
        "seeds": {"train": fvdm_recipe.TRAIN_SEED, "held_out": fvdm_recipe.HELD_OUT_SEED},
        "parameters": sum(p.numel() for p in pipe.transformer.parameters()),
        "run": run,
        "held_out": held_out,
    }
    mse, errors = held_out["new_frames_mse"], held_out["standard_errors"]
    figures = ", ".join(f"{mse[name]:.3f} ± {errors[name]:.3f} ({name})" for name in mse)
    description = (
        f"A tiny pixel-space causal video model: the `{BASE_MODEL}` FVDM transformer (`WanTransformer3DModel`, "
        f"{report['parameters'] / 1e6:.2f} M parameters, bouncing shapes, {fvdm_recipe.FRAME_SIZE} x "
        f"{fvdm_recipe.FRAME_SIZE} RGB) with causal attention over frames, fine-tuned by teacher forcing "
        f"(Ca2-VDM / ViD-GPT) for {run['steps']} steps of {BATCH_SIZE} clips: chunks of {DEMO_CHUNK_FRAMES} frames "
        f"after {', '.join(map(str, CONTEXT_FRAMES))} clean context frames. It extends given frames chunk by chunk "
        "(it was not trained to start a video from nothing). A demonstration model: shapes drift and lose their "
        "form within a few chunks.\n\n"
        f"Held-out clips ({held_out['clips']}), first {GIVEN_FRAMES} frames given, extended to {EXTENDED_FRAMES} in "
        f"chunks of {DEMO_CHUNK_FRAMES} with the KV cache of the newest {MAX_CACHE_FRAMES} frames "
        f"({INFERENCE_STEPS} Euler steps a chunk): mean squared error of frames {GIVEN_FRAMES}-{EXTENDED_FRAMES - 1} "
        f"to the held-out frames (pixels in [-1, 1]) ± its standard error: {figures}.\n\n"
        f"Fine-tuning took {run['seconds'] / 60:.0f} minutes on one CPU thread. Reproduce with "
        "`python -m diffusers_ext.training.recipes.tiny_causal_shapes`."
    )
    save_for_hub(pipe, args.output, card_template="causal_video", repo_id="diffusers-ext/tiny-causal-shapes",
                 title="tiny-causal-shapes", description=description, license="apache-2.0", tags=["video"])
    Path(args.output, "training_report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(json.dumps({key: value for key, value in report.items() if key != "held_out"}, indent=2))
    print(f"held-out new frames MSE: {figures}")
    return report


if __name__ == "__main__":
    main()
