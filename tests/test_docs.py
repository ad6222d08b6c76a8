"""Every Python snippet in README.md and docs/*.md runs as written, and every ``diffusers-ext`` command in them parses.

A snippet may use a name it does not define only if one of its comments says where the name comes from
(``# pipe: a Stable Diffusion pipeline ...``); the test then supplies a tiny stand-in of that kind (``STAND_INS``).
A snippet that trains for real may be followed by ``<!-- docs-test: max_steps=2 -->``: the test runs it with those
keyword values instead (the comment is invisible on the rendered page but visible in the source), and fails if such a
keyword no longer appears in the snippet.
"""

import ast
import builtins
import re
import shlex
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"```(python|bash)\n(.*?)```(?:\n<!-- docs-test: (.*?) -->)?", re.S)


def _stand_in_pipe():
    from tiny_pipelines import sd_pipeline

    return sd_pipeline(text_encoder=True)


def _stand_in_sd3():
    """SD3 with its two CLIP encoders built from configs and no T5 (which SD3 allows), so that it takes prompts."""
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )

    from diffusers_ext.testing import tiny_clip_text_encoder, tiny_clip_tokenizer
    from diffusers_ext.testing.sampler_accuracy import SD3_SCHEDULER_CONFIG
    from diffusers_ext.testing.tiny_text import TINY_TEXT_WIDTH

    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=1, in_channels=4, out_channels=4, num_layers=1, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=2 * TINY_TEXT_WIDTH, caption_projection_dim=16,
        pooled_projection_dim=2 * TINY_TEXT_WIDTH)
    vae = AutoencoderKL(block_out_channels=(8,), in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
                        up_block_types=("UpDecoderBlock2D",), latent_channels=4, norm_num_groups=4, sample_size=8,
                        shift_factor=0.0609, scaling_factor=1.5035, use_quant_conv=False, use_post_quant_conv=False)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer.eval(), scheduler=FlowMatchEulerDiscreteScheduler.from_config(SD3_SCHEDULER_CONFIG),
        vae=vae.eval(), text_encoder=tiny_clip_text_encoder(with_projection=True), tokenizer=tiny_clip_tokenizer(),
        text_encoder_2=tiny_clip_text_encoder(seed=1, with_projection=True), tokenizer_2=tiny_clip_tokenizer(),
        text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _stand_in_wan():
    """A Wan pipeline with a tiny transformer, Wan's tiny VAE, the stock UniPC flow scheduler and a CLIP text
    encoder (Wan's UMT5 is larger than a test wants; the transformer only needs embeddings of its text width)."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel

    from diffusers_ext.testing import tiny_clip_text_encoder, tiny_clip_tokenizer
    from diffusers_ext.testing.tiny_text import TINY_TEXT_WIDTH

    torch.manual_seed(0)
    transformer = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12,
                                        in_channels=4, out_channels=4, text_dim=TINY_TEXT_WIDTH, freq_dim=32,
                                        ffn_dim=32, num_layers=2, rope_max_seq_len=32)
    vae = AutoencoderKLWan(base_dim=3, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True], latents_mean=[0.0] * 4, latents_std=[1.0] * 4)
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    return WanPipeline(tokenizer=tiny_clip_tokenizer(), text_encoder=tiny_clip_text_encoder(),
                       transformer=transformer.eval(), vae=vae.eval(), scheduler=scheduler)


STAND_INS = {
    "pipe": _stand_in_pipe,  # a Stable Diffusion 1.x pipeline that takes prompts
    "wan": _stand_in_wan,  # a Wan text-to-video pipeline
    "sd3": _stand_in_sd3,  # an SD3 pipeline that takes prompts
    "prompt": lambda: "a photo of a cat",
}


def snippets(language: str) -> list:
    found = []
    for path in DOC_FILES:
        for index, match in enumerate(m for m in BLOCK.finditer(path.read_text()) if m.group(1) == language):
            found.append(pytest.param(match.group(2), match.group(3), id=f"{path.relative_to(ROOT)}#{index}"))
    return found


def undefined_names(code: str) -> set[str]:
    """Names the snippet reads but never binds (by assignment, import, loop, def, argument, ...)."""
    tree = ast.parse(code)
    bound, read = set(dir(builtins)), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            (read if isinstance(node.ctx, ast.Load) else bound).add(node.id)
        elif isinstance(node, ast.alias):
            bound.add((node.asname or node.name).split(".")[0])
        elif isinstance(node, ast.FunctionDef | ast.ClassDef):
            bound.add(node.name)
        elif isinstance(node, ast.arg):
            bound.add(node.arg)
    return read - bound


def with_overrides(code: str, marker: str | None) -> str:
    for assignment in (marker or "").split(","):
        if not assignment.strip():
            continue
        key, value = (part.strip() for part in assignment.split("="))
        code, count = re.subn(rf"\b{key}=[^,)\n]+", f"{key}={value}", code)
        assert count, f"the docs-test marker sets {key}, which the snippet no longer uses"
    return code


def test_the_docs_have_snippets():
    assert len(snippets("python")) >= 8 and len(snippets("bash")) >= 2


@pytest.mark.parametrize(("code", "marker"), snippets("python"))
def test_python_snippet_runs_as_written(code, marker, tmp_path, monkeypatch):
    comments = "\n".join(line.split("#", 1)[1] for line in code.splitlines() if "#" in line)
    namespace = {"__name__": "__docs__"}
    for name in sorted(undefined_names(code)):
        assert re.search(rf"\b{name}\b\s*:", comments), f"the snippet uses {name!r} without saying where it comes from"
        assert name in STAND_INS, f"no stand-in for {name!r}: add one to STAND_INS"
        namespace[name] = STAND_INS[name]()
    monkeypatch.chdir(tmp_path)  # snippets write their outputs (runs/, shared/, ...) where they run
    torch.manual_seed(0)
    exec(compile(with_overrides(code, marker), "<snippet>", "exec"), namespace)


@pytest.mark.parametrize(("code", "marker"), snippets("bash"))
def test_command_line_snippets_parse(code, marker):
    from diffusers_ext.cli import build_parser
    from diffusers_ext.training.cli import build_parser as build_train_parser

    for line in code.splitlines():
        words = shlex.split(line, comments=True)
        if not words or words[0] != "diffusers-ext":
            continue
        try:
            if words[1] == "train":  # the flags only: a --resume needs the run it continues
                build_train_parser().parse_args(words[2:])
            else:
                build_parser().parse_args(words[1:])
        except SystemExit as exit_:
            assert exit_.code == 0 and "--help" in words, f"{line!r} does not parse"
