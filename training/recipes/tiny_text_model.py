"""Train the tiny masked-diffusion language model that ships with the package.

    python -m diffusers_ext.training.recipes.tiny_text_model [--output diffusers_ext/assets/tiny-mdlm-pydoc]
        [--steps 3000]

A byte-level BPE tokenizer (2000 tokens) and a 4-layer BERT (``BertForMaskedLM``, hidden size 128) are trained on
the paragraphs of Python's own documentation (``pydoc_data``), 95 % of the 64-token chunks, with the MDLM / RADD
objective through the shared ``Trainer``. The held-out 5 % gives the negative ELBO before and after, written into
the model card. The folder is a ``MaskedDiffusionLMPipeline`` (first-hitting sampler) saved with ``save_for_hub``
(card and one-line loader files): ``DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)``.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
from transformers import BertConfig, BertForMaskedLM

from ...hub import save_for_hub
from ...pipelines import MaskedDiffusionLMPipeline
from ...schedulers import MaskedDiffusionScheduler
from ..masked_diffusion_lm import MaskedDiffusionLMObjective
from ..text_data import pydoc_paragraphs, token_chunks, train_and_held_out, train_tokenizer
from ..trainer import Trainer, TrainingConfig

SEQUENCE_LENGTH = 64


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="diffusers_ext/assets/tiny-mdlm-pydoc")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--checkpoints", default="training_output/tiny-mdlm-pydoc")
    args = parser.parse_args()

    paragraphs = pydoc_paragraphs()
    tokenizer = train_tokenizer(paragraphs, vocab_size=2000)
    train, held_out = train_and_held_out(token_chunks(tokenizer, paragraphs, SEQUENCE_LENGTH))

    torch.manual_seed(0)
    model = BertForMaskedLM(BertConfig(vocab_size=len(tokenizer), hidden_size=128, num_hidden_layers=4,
                                       num_attention_heads=4, intermediate_size=512,
                                       max_position_embeddings=SEQUENCE_LENGTH))
    scheduler = MaskedDiffusionScheduler(mask_token_id=tokenizer.mask_token_id, sampler="first_hitting")
    method = MaskedDiffusionLMObjective(scheduler)
    before = method.negative_elbo(model.eval(), held_out)
    config = TrainingConfig(output_dir=args.checkpoints, max_steps=args.steps, batch_size=64, learning_rate=1e-3,
                            checkpoint_every=500)
    result = Trainer(method, model.train(), train, config).train()
    model = result.model.eval()
    after = method.negative_elbo(model, held_out)

    pipe = MaskedDiffusionLMPipeline(tokenizer=tokenizer, model=model, scheduler=scheduler)
    report = {"train_chunks": len(train), "held_out_chunks": len(held_out), "sequence_length": SEQUENCE_LENGTH,
              "steps": result.step, "held_out_negative_elbo_before": round(before, 4),
              "held_out_negative_elbo_after": round(after, 4)}
    description = (
        f"A tiny masked-diffusion language model (4-layer BERT, hidden size 128, {len(tokenizer)}-token byte-level "
        f"BPE) trained for {result.step} steps on the paragraphs of Python's documentation (`pydoc_data`), "
        f"{SEQUENCE_LENGTH}-token chunks, with the MDLM / RADD objective. Held-out negative ELBO: {before:.2f} -> "
        f"{after:.2f} nats per token (perplexity bound {math.exp(after):.0f}). A demonstration model: its text is "
        "documentation-flavoured, not fluent. Reproduce with `python -m diffusers_ext.training.recipes.tiny_text_model`."
    )
    save_for_hub(pipe, args.output, repo_id="diffusers-ext/tiny-mdlm-pydoc", pipeline_tag="text-generation",
                 license="psf-2.0", title="tiny-mdlm-pydoc", description=description)
    Path(args.output, "training_report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
