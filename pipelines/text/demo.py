"""The text part of ``diffusers-ext demo``: the shipped tiny masked-diffusion LM generates and infills text, and the
first-hitting sampler is timed against MDLM's ancestral sampler."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from ...schedulers import MaskedDiffusionScheduler
from ...shipped import load_shipped_pipeline
from .pipeline_masked_diffusion_lm import MaskedDiffusionLMPipeline

SHIPPED_MODEL = "tiny-mdlm-pydoc"


def run_text_demo(output: Path, sequence_length: int = 48, ancestral_steps: int = 1000) -> str:
    output.mkdir(parents=True, exist_ok=True)
    pipe = load_shipped_pipeline(SHIPPED_MODEL)
    pipe.set_progress_bar_config(disable=True)
    mask = pipe.tokenizer.mask_token
    generator = torch.Generator().manual_seed(0)
    lines = ["Generated (first-hitting sampler, 48 tokens):"]
    lines += [f"  - {text}" for text in pipe(num_sequences_per_prompt=3, sequence_length=sequence_length,
                                            generator=generator).texts]
    lines.append("Continued from the prompt 'The for statement':")
    lines += [f"  - {text}" for text in pipe(prompt="The for statement", num_sequences_per_prompt=2,
                                            sequence_length=sequence_length, generator=generator).texts]
    template = f"The{mask * 4} is used to{mask * 6} in a loop."
    lines.append(f"Infilled: {template!r}")
    lines += [f"  - {text}" for text in pipe(infill=template, num_sequences_per_prompt=2, generator=generator).texts]

    timings = {}
    for name, scheduler, steps in (
        ("first-hitting", pipe.scheduler, None),
        (f"ancestral, {ancestral_steps} steps", MaskedDiffusionScheduler.from_config(pipe.scheduler.config,
                                                                                  sampler="ancestral"), ancestral_steps),
    ):
        timed = MaskedDiffusionLMPipeline(tokenizer=pipe.tokenizer, model=pipe.model, scheduler=scheduler)
        timed.set_progress_bar_config(disable=True)
        start = time.perf_counter()
        result = timed(num_sequences_per_prompt=8, sequence_length=sequence_length, num_inference_steps=steps,
                       output_type="ids", generator=torch.Generator().manual_seed(1))
        seconds = time.perf_counter() - start
        timings[name] = (result.token_ids.numel() / seconds, result.num_model_calls)
    lines.append("Speed, 8 sequences (RADD caching on):")
    lines += [f"  {name:<24} {rate:8.0f} tokens/s, {calls:7.1f} denoiser calls" for name, (rate, calls) in
              timings.items()]
    text = "\n".join(lines)
    print(text)
    (output / "text.txt").write_text(text + "\n", encoding="utf-8")
    print(f"\nwritten to {output}/text.txt")
    return text
