"""Speed hooks against the stock pipeline and diffusers' own caches, in one run: wall time, FLOPs, fidelity.

    python benchmarks/speed_hooks.py [--output benchmarks/results] [--latent-size 32] [--steps 10] [--repeats 1]
        [--sections sd15,stream,oracle,trained] [--sd3] [--sdxl] [--flux] [--methods faster-diffusion,ras,...]

Sections (default: sd15, stream, oracle and trained, about 7 minutes on 2 cores; the transformer
sections with ``--sd3`` / ``--flux``, SDXL with ``--sdxl``; ``--steps 50`` or ``--latent-size 64`` for the figures
at the papers' settings, which take an hour each here):

- ``sd15`` / ``sdxl`` / ``sd3`` / ``flux``: full-size denoisers with random weights (the SD 1.5 UNet config, the
  SDXL UNet, an SD3-medium-shaped transformer with 333 text tokens, and with ``--flux`` a Flux-shaped transformer of
  ``--flux-blocks`` double + single blocks), fp32 on CPU, in the stock pipelines with precomputed prompt embeddings
  and ``output_type="latent"`` (no VAE or text encoder work), guidance scale 1. Each method runs the same seed;
  repeats are interleaved (stock, method 1, method 2, ..., stock, ...) and the wall-time ratio is the median of the
  per-repeat ratios to that repeat's stock run; the CPU-time ratio (``time.process_time``, all threads) is reported
  next to it, as it is less sensitive to other processes on a shared machine. FLOPs (``torch.utils.flop_counter``) and denoiser calls are counted in
  the first repeat. Fidelity: PSNR / SSIM of the final latents to the stock latents (scaled to [-1, 1] by the stock
  latents' range). Random weights make the fidelity figures a check that the method is wired right, not a
  quality measure: the trained-model section measures quality.
  Methods: ours (Faster Diffusion with the paper's key steps, with and without its prior noise injection and with
  parallel decoding, feature inheritance of the deepest blocks, T-Stitch
  with a UNet of half the depth, RAS with the official SD3 settings) and diffusers' caches that run on the model
  (Pyramid Attention Broadcast, TaylorSeer with explicit identifiers on the UNet, FirstBlockCache on Flux).
- ``stream``: StreamDiffusion against the naive per-frame img2img loop at the same step count (SD 1.5 UNet, a
  random-weight TAESD-shaped ``AutoencoderTiny`` for both, LCM scheduler, 2 steps, classifier-free guidance 1.2 in the
  naive loop): frames per second, UNet calls per frame.
- ``oracle``: T-Stitch on the exact oracles: the large model is exact for the benchmark mixture, the small one exact
  for a coarser law; sliced W2 excess, raw sliced W2 and mixture-weight error against the stitching fraction.
- ``calls`` (not in the default run): Faster Diffusion's decoder-only calls on the SD 1.5 UNet and RAS's partial
  calls on the SD3-shaped transformer against full calls, alternating (``--call-latent-size``, default 64, and
  ``--call-repeats`` pairs), and the speed-up of the papers' schedules projected from them (50 DDIM steps with 9 key
  steps; 28 steps with 6 full): on a shared machine, calls seconds apart see the same load where whole runs minutes
  apart do not. The FLOPs projections are repeated at twice the latent side (1024 px for SD3) on the meta device.
- ``trained``: the shipped super-resolution model (a trained ``UNet2DModel``, 15 steps): PSNR / SSIM of Faster
  Diffusion, feature inheritance and TaylorSeer to its stock output on held-out photo crops.

The same run as ``diffusers-ext bench speed-hooks``. Writes ``speed_hooks.csv`` and ``speed_hooks.png`` (speed-up against fidelity per method; T-Stitch error against
fraction) to ``--output`` and prints the tables.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import gc
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    AutoencoderTiny,
    DDIMScheduler,
    FirstBlockCacheConfig,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    LCMScheduler,
    PyramidAttentionBroadcastConfig,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    TaylorSeerCacheConfig,
    UNet2DConditionModel,
)
from diffusers.hooks import HookRegistry, apply_first_block_cache, apply_pyramid_attention_broadcast
from diffusers.hooks.hooks import CacheContext
from diffusers.hooks.taylorseer_cache import apply_taylorseer_cache
from diffusers.utils import logging
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode

from diffusers_ext import load_shipped_pipeline
from diffusers_ext.hooks import (
    FasterDiffusion,
    FeatureInheritance,
    RegionAdaptiveSampling,
    StreamPipeline,
    TStitch,
    coarsened_mixture,
)
from diffusers_ext.pipelines.restoration.demo import super_resolve_held_out
from diffusers_ext.testing import GaussianMixtureSamplingPipeline, mixture_weight_error
from diffusers_ext.testing.sampler_accuracy import SD_SCHEDULER_CONFIG, benchmark_mixture, law_yardstick, oracle_for
from diffusers_ext.training.restoration_data import psnr, ssim

SD_DDIM = {k: v for k, v in SD_SCHEDULER_CONFIG.items() if not k.startswith("_") and k != "skip_prk_steps"}
SD3_TEXT_TOKENS = 333  # 77 CLIP + 256 T5 tokens, SD3's default
FLUX_TEXT_TOKENS = 512


@dataclass
class Row:
    section: str
    method: str
    seconds: float
    speedup: float
    cpu_speedup: float
    flops_speedup: float
    gflops: float
    denoiser_calls: int
    psnr: float
    ssim: float
    note: str = ""


# Models and pipelines (random weights, full-size configs) --------------------------------------------------------


def latent_vae(latent_channels: int) -> AutoencoderKL:
    """A minimal VAE whose only role is the pipelines' ``vae_scale_factor`` of 8 (outputs are latents)."""
    return AutoencoderKL(block_out_channels=(8, 8, 8, 8), down_block_types=("DownEncoderBlock2D",) * 4,
                         up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=latent_channels,
                         norm_num_groups=4).eval()


def sd15_unet(**overrides) -> UNet2DConditionModel:
    """Stable Diffusion 1.5's UNet config (diffusers' defaults with 768-wide text): 860 M parameters."""
    torch.manual_seed(0)
    return UNet2DConditionModel(sample_size=64, cross_attention_dim=768, **overrides).eval()


def sd15_pipeline(unet: UNet2DConditionModel | None = None) -> StableDiffusionPipeline:
    pipe = StableDiffusionPipeline(vae=latent_vae(4), text_encoder=None, tokenizer=None, unet=unet or sd15_unet(),
                                   scheduler=DDIMScheduler(**SD_DDIM), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sd15_inputs(latent_size: int, steps: int) -> dict:
    embeds = torch.randn(1, 77, 768, generator=torch.Generator().manual_seed(1))
    return dict(prompt_embeds=embeds, num_inference_steps=steps, guidance_scale=1.0, height=8 * latent_size,
                width=8 * latent_size, output_type="latent", generator=torch.Generator().manual_seed(0))


def sdxl_pipeline() -> StableDiffusionXLPipeline:
    """SDXL's UNet config (2.6 B parameters)."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 2, 10),
        attention_head_dim=(5, 10, 20), cross_attention_dim=2048, use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
    ).eval()
    pipe = StableDiffusionXLPipeline(vae=latent_vae(4), text_encoder=None, text_encoder_2=None, tokenizer=None,
                                     tokenizer_2=None, unet=unet, scheduler=DDIMScheduler(**SD_DDIM))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sdxl_inputs(latent_size: int, steps: int) -> dict:
    generator = torch.Generator().manual_seed(1)
    return dict(prompt_embeds=torch.randn(1, 77, 2048, generator=generator),
                pooled_prompt_embeds=torch.randn(1, 1280, generator=generator), num_inference_steps=steps,
                guidance_scale=1.0, height=8 * latent_size, width=8 * latent_size, output_type="latent",
                generator=torch.Generator().manual_seed(0))


def sd3_pipeline() -> StableDiffusion3Pipeline:
    """An SD3-medium-shaped transformer (24 joint blocks of width 1536, 2 B parameters)."""
    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(
        sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64, num_attention_heads=24,
        joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048, out_channels=16,
        pos_embed_max_size=192,
    ).eval()
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                                    vae=latent_vae(16), text_encoder=None, tokenizer=None, text_encoder_2=None,
                                    tokenizer_2=None, text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def transformer_inputs(text_tokens: int, pooled_dim: int, latent_size: int, steps: int) -> dict:
    """A transformer pipeline's call with random prompt embeddings (4096 wide, as T5-XXL's) and a fixed seed."""
    generator = torch.Generator().manual_seed(1)
    return dict(prompt_embeds=torch.randn(1, text_tokens, 4096, generator=generator),
                pooled_prompt_embeds=torch.randn(1, pooled_dim, generator=generator), num_inference_steps=steps,
                height=8 * latent_size, width=8 * latent_size, output_type="latent",
                generator=torch.Generator().manual_seed(0))


def sd3_inputs(latent_size: int, steps: int) -> dict:
    return transformer_inputs(SD3_TEXT_TOKENS, 2048, latent_size, steps) | {"guidance_scale": 1.0}


def flux_pipeline(blocks: int) -> FluxPipeline:
    """A Flux-shaped transformer (width 3072, 24 heads) with ``blocks`` double-stream and ``2 * blocks`` single-stream
    blocks (FLUX.1 has 19 and 38)."""
    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(in_channels=64, num_layers=blocks, num_single_layers=2 * blocks,
                                         attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
                                         pooled_projection_dim=768, axes_dims_rope=(16, 56, 56)).eval()
    pipe = FluxPipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                        vae=latent_vae(16), text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def flux_inputs(latent_size: int, steps: int) -> dict:
    return transformer_inputs(FLUX_TEXT_TOKENS, 768, latent_size, steps)


# Methods: each attaches to a pipeline and returns the function that detaches it --------------------------------


Attach = Callable[[object], Callable[[], None]]


def speed_hook(make) -> Attach:
    def attach(pipe):
        hook = make().attach(pipe)
        return hook.detach

    return attach


def diffusers_cache(apply, hook_names: tuple[str, ...], stateful_context: bool = False) -> Attach:
    """A diffusers cache applied with its ``apply_*`` function on the denoiser; per-run state reset before each
    run (the SD / SD3 pipelines do not reset hooks on these models), a cache context set for the stateful caches
    that need one (the SD / SD3 pipelines set none)."""

    def attach(pipe):
        model = pipe.unet if hasattr(pipe, "unet") else pipe.transformer
        had_registry = hasattr(model, "_diffusers_hook")
        apply(model)
        registry = HookRegistry.check_if_exists_or_initialize(model)
        registry.invalidate_child_registries_cache()

        def reset(*_):
            registry.reset_stateful_hooks(recurse=True)
            if stateful_context:
                for _, module in model.named_modules():
                    for hook in getattr(getattr(module, "_diffusers_hook", None), "hooks", {}).values():
                        if hasattr(hook, "state_manager"):
                            hook.state_manager.set_context(CacheContext("cond"))

        pipe._benchmark_before_run = reset

        def detach():
            for name in hook_names:
                registry.remove_hook(name, recurse=True)
            if not had_registry:
                del model._diffusers_hook
            del pipe._benchmark_before_run

        return detach

    return attach


class TimestepRecorder:
    """The timestep of the denoiser's latest call: Pyramid Attention Broadcast asks for it, and the SD / SD3
    pipelines do not expose it (Flux's ``current_timestep`` does)."""

    def __init__(self):
        self.value = 999

    def __call__(self, module, args, kwargs):
        timestep = kwargs.get("timestep", args[1] if len(args) > 1 else None)
        self.value = float(torch.as_tensor(timestep).reshape(-1)[0])


def pab(recorder: TimestepRecorder, cross: bool) -> Attach:
    config = PyramidAttentionBroadcastConfig(spatial_attention_block_skip_range=2,
                                             cross_attention_block_skip_range=6 if cross else None,
                                             spatial_attention_timestep_skip_range=(100, 800),
                                             cross_attention_timestep_skip_range=(100, 800),
                                             current_timestep_callback=lambda: recorder.value)
    return diffusers_cache(lambda model: apply_pyramid_attention_broadcast(model, config),
                           ("pyramid_attention_broadcast",))


def taylorseer(identifiers: list[str] | None) -> Attach:
    config = TaylorSeerCacheConfig(cache_interval=2, disable_cache_before_step=2, max_order=1,
                                   taylor_factors_dtype=torch.float32, cache_identifiers=identifiers)
    return diffusers_cache(lambda model: apply_taylorseer_cache(model, config), ("taylorseer_cache",),
                           stateful_context=True)


def first_block_cache(threshold: float) -> Attach:
    config = FirstBlockCacheConfig(threshold=threshold)
    return diffusers_cache(lambda model: apply_first_block_cache(model, config),
                           ("fbc_leader_block_hook", "fbc_block_hook"))


# Measuring ------------------------------------------------------------------------------------------------------


def count_cpu_attention_flops() -> None:
    """torch's FLOP counter has a formula for the GPU attention kernels but none for the CPU one
    (``aten._scaled_dot_product_flash_attention_for_cpu``), so attention would count 0 FLOPs on CPU: register the
    same formula (``sdpa_flop_count``: the two batched matrix products) for it."""
    target = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    if target not in flop_counter.flop_registry:
        flop_counter.register_flop_formula(target)(
            lambda query, key, value, *args, out_shape=None, **kwargs: flop_counter.sdpa_flop_count(query, key, value))


def latent_fidelity(latents: torch.Tensor, reference: torch.Tensor) -> tuple[float, float]:
    """PSNR and SSIM of latents to the reference latents, both scaled to [-1, 1] by the reference's range."""
    low, high = reference.min(), reference.max()
    scale = lambda x: (2 * (x - low) / (high - low) - 1).float()  # noqa: E731
    x, y = scale(latents), scale(reference)
    if x.ndim == 3:  # Flux's packed tokens: one channel image of tokens x features
        x, y = x[:, None], y[:, None]
    score = float(psnr(x, y).mean())
    structure = float(ssim(x, y).mean()) if min(x.shape[-2:]) >= 11 else float("nan")
    return score, structure


def run_once(pipe, inputs: dict, count_flops: bool) -> tuple[torch.Tensor, tuple[float, float], float, int]:
    """The run's latents, ``(wall, CPU)`` seconds, GFLOPs (when counted) and denoiser calls."""
    model = pipe.unet if hasattr(pipe, "unet") else pipe.transformer
    calls = []
    handle = model.register_forward_pre_hook(lambda *_: calls.append(1))
    before_run = getattr(pipe, "_benchmark_before_run", None)
    if before_run is not None:
        before_run()
    counter = FlopCounterMode(display=False) if count_flops else None
    start, cpu_start = time.perf_counter(), time.process_time()
    with torch.no_grad(), counter if counter is not None else contextlib.nullcontext():
        latents = pipe(**inputs).images
    seconds = (time.perf_counter() - start, time.process_time() - cpu_start)
    handle.remove()
    gflops = counter.get_total_flops() / 1e9 if counter is not None else float("nan")
    return latents, seconds, gflops, len(calls)


def compare(section: str, pipe, make_inputs: Callable[[], dict], methods: dict[str, Attach], repeats: int,
            notes: dict[str, str] | None = None) -> list[Row]:
    """Stock and each method on the same inputs, repeats interleaved; the stock run is ``methods['stock']``."""
    recorder = TimestepRecorder()
    model = pipe.unet if hasattr(pipe, "unet") else pipe.transformer
    recorder_handle = model.register_forward_pre_hook(recorder, with_kwargs=True)
    times = {name: [] for name in methods}
    first = {}
    try:
        with torch.no_grad():  # a one-step warm-up: the first call of a fresh model is slower (first touch of weights)
            pipe(**make_inputs() | {"num_inference_steps": 1})
        for repeat in range(repeats):
            for name, attach in methods.items():
                detach = attach(pipe) if attach is not None else (lambda: None)
                try:
                    latents, seconds, gflops, calls = run_once(pipe, make_inputs(), count_flops=repeat == 0)
                finally:
                    detach()
                times[name].append(seconds)
                if repeat == 0:
                    first[name] = (latents, gflops, calls)
                print(f"  {section} {name}: {seconds[0]:.1f} s wall, {seconds[1]:.1f} s CPU", flush=True)
    finally:
        recorder_handle.remove()
    reference, stock_gflops = first["stock"][0], first["stock"][1]
    rows = []
    for name in methods:
        latents, gflops, calls = first[name]
        fidelity = latent_fidelity(latents, reference) if name != "stock" else (float("inf"), 1.0)
        rows.append(Row(section, name, statistics.median(t[0] for t in times[name]),
                        *median_ratios(times["stock"], times[name]), stock_gflops / gflops, gflops, calls, *fidelity,
                        (notes or {}).get(name, "")))
    return rows


def median_ratios(reference: list[tuple[float, float]], own: list[tuple[float, float]]) -> tuple[float, float]:
    """Medians over repeats of ``reference / own`` for wall and CPU time (repeat by repeat: interleaved runs share
    the machine's load of the moment)."""
    return tuple(statistics.median(r[k] / o[k] for r, o in zip(reference, own, strict=True)) for k in (0, 1))


def free(*objects) -> None:
    del objects
    gc.collect()


# Sections ---------------------------------------------------------------------------------------------------------


def compare_chosen(section: str, pipe, make_inputs, methods: dict[str, Attach | None], notes: dict[str, str],
                   recorder: TimestepRecorder, args) -> list[Row]:
    """``compare`` on the methods ``--methods`` chose (all when it is empty), with ``recorder`` reading each
    denoiser call's timestep for PAB."""
    methods = {k: v for k, v in methods.items()
               if k == "stock" or not args.methods or k.split(" (")[0] in args.methods}
    model = pipe.unet if hasattr(pipe, "unet") else pipe.transformer
    handle = model.register_forward_pre_hook(recorder, with_kwargs=True)
    try:
        return compare(section, pipe, make_inputs, methods, args.repeats, notes)
    finally:
        handle.remove()


def unet_section(section: str, pipe, make_inputs, args, include_t_stitch: bool) -> list[Row]:
    recorder = TimestepRecorder()
    methods: dict[str, Attach | None] = {
        "stock": None,
        "faster-diffusion": speed_hook(lambda: FasterDiffusion()),
        "faster-diffusion (no prior noise)": speed_hook(lambda: FasterDiffusion(prior_noise_injection=0)),
        "faster-diffusion (parallel decoding)": speed_hook(lambda: FasterDiffusion(parallel_decoding=True)),
        "feature-inheritance": speed_hook(lambda: FeatureInheritance(
            modules=[f"down_blocks.{len(pipe.unet.down_blocks) - 1}", "mid_block", "up_blocks.0"], interval=2)),
        "diffusers PAB": pab(recorder, cross=True),
        "diffusers TaylorSeer": taylorseer(["mid_block", r"up_blocks\.\d+"]),
    }
    notes = {"faster-diffusion": "paper key steps (scaled to the run), prior noise injection",
             "faster-diffusion (no prior noise)": "paper key steps, prior_noise_injection=0",
             "faster-diffusion (parallel decoding)": "paper key steps, prior noise, non-key decoders batched",
             "feature-inheritance": "deepest down/mid/up blocks, every 2nd step",
             "diffusers PAB": "self-attn every 2nd call, cross-attn every 6th, t in (100, 800)",
             "diffusers TaylorSeer": "mid + up blocks predicted (order 1), compute every 2nd step after 2"}
    if include_t_stitch:
        small = sd15_unet(layers_per_block=1)
        methods["t-stitch"] = speed_hook(lambda: TStitch(small=small, fraction=0.4))
        notes["t-stitch"] = "first 40% by a 1-layer-per-block UNet (random weights: fidelity n/a)"
    return compare_chosen(section, pipe, make_inputs, methods, notes, recorder, args)


def transformer_section(section: str, pipe, make_inputs, args) -> list[Row]:
    recorder = TimestepRecorder()
    is_flux = isinstance(pipe, FluxPipeline)
    methods: dict[str, Attach | None] = {
        "stock": None,
        "ras": speed_hook(lambda: RegionAdaptiveSampling()),
        "diffusers PAB": pab(recorder, cross=False),
        "diffusers TaylorSeer": taylorseer(None),
    }
    notes = {"ras": "official SD3 settings, moved to the run length",
             "diffusers PAB": "joint attention every 2nd call, t in (100, 800)",
             "diffusers TaylorSeer": "default identifiers (attention), compute every 2nd step after 2"}
    if is_flux:
        methods["diffusers FirstBlockCache"] = first_block_cache(0.1)
        notes["diffusers FirstBlockCache"] = "threshold 0.1"
    return compare_chosen(section, pipe, make_inputs, methods, notes, recorder, args)


def stream_section(args) -> list[Row]:
    """Frames per second: the naive loop calls the stock img2img pipeline per frame (CFG 1.2, batch 2 per step); the
    stream runs one UNet batch per frame."""
    base = sd15_pipeline()
    pipe = StableDiffusionImg2ImgPipeline(**base.components | {"scheduler": LCMScheduler(**SD_DDIM)})
    pipe.vae = AutoencoderTiny().eval()  # TAESD's architecture, as StreamDiffusion pairs it
    pipe.set_progress_bar_config(disable=True)
    size = 8 * args.latent_size
    frames = [torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(i)) for i in range(args.frames)]
    embeds = torch.randn(1, 77, 768, generator=torch.Generator().manual_seed(1))
    negative = torch.zeros_like(embeds)
    settings = dict(num_inference_steps=4, strength=0.5)
    calls = []
    handle = pipe.unet.register_forward_pre_hook(lambda *_: calls.append(1))

    def naive() -> tuple[float, float]:
        start, cpu_start = time.perf_counter(), time.process_time()
        for frame in frames:
            pipe(prompt_embeds=embeds, negative_prompt_embeds=negative, image=frame, guidance_scale=1.2,
                 output_type="pt", generator=torch.Generator().manual_seed(0), **settings)
        return time.perf_counter() - start, time.process_time() - cpu_start

    def stream(guidance: str) -> Callable[[], tuple[float, float]]:
        def run() -> tuple[float, float]:
            with StreamPipeline(guidance=guidance, guidance_scale=1.2, seed=0, **settings).attached(pipe) as s:
                s.prepare(prompt_embeds=embeds, negative_prompt_embeds=negative)
                s(frames[0], output_type="pt")  # fills the stream's slots; not timed
                calls.clear()
                start, cpu_start = time.perf_counter(), time.process_time()
                for frame in frames:
                    s(frame, output_type="pt")
                return time.perf_counter() - start, time.process_time() - cpu_start

        return run

    runs = {"naive img2img loop": naive, "stream batch + self-negative RCFG": stream("self"),
            "stream batch + full CFG": stream("full")}
    times = {name: [] for name in runs}
    calls_per_frame = {}
    for _ in range(args.repeats):
        for name, run in runs.items():
            calls.clear()
            times[name].append(run())
            calls_per_frame[name] = len(calls) / len(frames)
            print(f"  stream {name}: {times[name][-1][0]:.1f} s wall, {times[name][-1][1]:.1f} s CPU for "
                  f"{len(frames)} frames", flush=True)
    handle.remove()
    rows = []
    for name in runs:
        seconds = statistics.median(t[0] for t in times[name])
        rows.append(Row("stream", name, seconds / len(frames), *median_ratios(times["naive img2img loop"], times[name]),
                        float("nan"), float("nan"),
                        round(calls_per_frame[name]), float("nan"), float("nan"),
                        f"{len(frames) / seconds:.2f} frames/s; UNet calls per frame; 2 steps, "
                        f"{8 * args.latent_size} px"))
    free(pipe, base)
    return rows


@dataclass
class CallCost:
    model: str
    call: str
    seconds: float
    cpu_seconds: float
    gflops: float


def alternating_call_costs(model, arguments: dict, kinds: tuple[str, str], repeats: int) -> dict[str, CallCost]:
    """Median wall and CPU seconds and the FLOPs of two kinds of calls of one model that alternate (the attached
    hook makes calls 0, 2, 4, ... full and 1, 3, 5, ... reduced): consecutive calls share the machine's load of the
    moment, so their ratio is steadier than that of runs minutes apart."""
    times = {kind: [] for kind in kinds}
    with torch.no_grad():
        for index in range(2 * repeats + 2):
            kind = kinds[index % 2]
            counter = FlopCounterMode(display=False) if index < 2 else contextlib.nullcontext()
            start, cpu_start = time.perf_counter(), time.process_time()
            with counter:
                model(**arguments)
            elapsed = (time.perf_counter() - start, time.process_time() - cpu_start)
            if index < 2:  # the first pair, counted, also warms the caches up: not timed
                times[f"{kind} flops"] = counter.get_total_flops() / 1e9
            else:
                times[kind].append(elapsed)
            print(f"    {kind} call: {elapsed[0]:.1f} s wall, {elapsed[1]:.1f} s CPU", flush=True)
    return {kind: CallCost("", kind, statistics.median(t[0] for t in times[kind]),
                           statistics.median(t[1] for t in times[kind]), times[f"{kind} flops"]) for kind in kinds}


def projected_speedup(costs: dict[str, CallCost], full: int, reduced: int, field: str) -> float:
    """The run's speed-up over the stock run if ``full`` calls cost a full call and ``reduced`` calls a reduced one."""
    full_cost, reduced_cost = getattr(costs["full"], field), getattr(costs["reduced"], field)
    return (full + reduced) * full_cost / (full * full_cost + reduced * reduced_cost)


def call_costs_section(args) -> tuple[list[CallCost], list[str]]:
    """Faster Diffusion on the SD 1.5 UNet and RAS on the SD3-medium-shaped transformer at ``--call-latent-size``
    (64: 512 px for SD 1.5, 1024 image tokens + 333 text tokens for SD3): full and reduced calls alternating, and the
    speed-up of the papers' schedules projected from them (50 DDIM steps with 9 key steps; 28 steps with 6 full)."""
    size, repeats = args.call_latent_size, args.call_repeats
    costs, lines = [], []
    pipe = sd15_pipeline()
    generator = torch.Generator().manual_seed(0)
    arguments = dict(sample=torch.randn(1, 4, size, size, generator=generator), timestep=torch.tensor(500),
                     encoder_hidden_states=torch.randn(1, 77, 768, generator=generator))
    print(f"  SD 1.5 UNet, {size}x{size} latents: full calls and Faster Diffusion's decoder-only calls", flush=True)
    steps = len(pipe.scheduler.timesteps)  # outside a run the hooks count calls against the scheduler's timesteps
    with FasterDiffusion(key_steps=list(range(0, steps, 2)), reference_steps=steps).attached(pipe):
        unet_costs = alternating_call_costs(pipe.unet, arguments, ("full", "reduced"), repeats)
    for cost in unet_costs.values():
        cost.model = "sd15 unet (faster-diffusion)"
    costs += unet_costs.values()
    lines.append(f"Faster Diffusion, paper schedule (9 of 50 calls full): {projected_speedup(unet_costs, 9, 41, 'seconds'):.2f}x "
                 f"wall, {projected_speedup(unet_costs, 9, 41, 'cpu_seconds'):.2f}x CPU, "
                 f"{projected_speedup(unet_costs, 9, 41, 'gflops'):.2f}x FLOPs")
    free(pipe)
    pipe = sd3_pipeline()
    generator = torch.Generator().manual_seed(0)
    arguments = dict(hidden_states=torch.randn(1, 16, size, size, generator=generator), timestep=torch.tensor([500.0]),
                     encoder_hidden_states=torch.randn(1, SD3_TEXT_TOKENS, 4096, generator=generator),
                     pooled_projections=torch.randn(1, 2048, generator=generator), return_dict=False)
    print(f"  SD3-medium-shaped transformer, {size}x{size} latents: full calls and RAS calls at sample ratio 0.5",
          flush=True)
    steps = len(pipe.scheduler.timesteps)
    ras = RegionAdaptiveSampling(sample_ratio=0.5, start_step=1, error_reset_steps=list(range(2, steps, 2)),
                                 reference_steps=steps)
    with ras.attached(pipe):
        transformer_costs = alternating_call_costs(pipe.transformer, arguments, ("full", "reduced"), repeats)
    for cost in transformer_costs.values():
        cost.model = "sd3 transformer (ras)"
    costs += transformer_costs.values()
    lines.append(f"RAS, official SD3 schedule (6 of 28 calls full): "
                 f"{projected_speedup(transformer_costs, 6, 22, 'seconds'):.2f}x wall, "
                 f"{projected_speedup(transformer_costs, 6, 22, 'cpu_seconds'):.2f}x CPU, "
                 f"{projected_speedup(transformer_costs, 6, 22, 'gflops'):.2f}x FLOPs")
    free(pipe)
    return costs, lines


def meta_flops_projections(size: int) -> list[str]:
    """The FLOPs projections of ``call_costs_section`` at latent side ``size`` (128: SD3's 1024 px), counted on the
    meta device: the models are not run, so any size is cheap."""

    def flops(model, arguments) -> float:
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), counter:
            model(**arguments)
        return counter.get_total_flops() / 1e9

    lines = []
    with torch.device("meta"):
        pipe = sd15_pipeline()
        arguments = dict(sample=torch.randn(1, 4, size, size), timestep=torch.tensor(500),
                         encoder_hidden_states=torch.randn(1, 77, 768))
    steps = len(pipe.scheduler.timesteps)
    with FasterDiffusion(key_steps=list(range(0, steps, 2)), reference_steps=steps).attached(pipe):
        full, reduced = flops(pipe.unet, arguments), flops(pipe.unet, arguments)
    lines.append(f"Faster Diffusion, SD 1.5 UNet at {size}x{size}: {full:.0f} / {reduced:.0f} GFLOPs per full / "
                 f"decoder-only call, paper schedule {50 * full / (9 * full + 41 * reduced):.2f}x FLOPs")
    with torch.device("meta"):
        pipe = sd3_pipeline()
        arguments = dict(hidden_states=torch.randn(1, 16, size, size), timestep=torch.tensor([500.0]),
                         encoder_hidden_states=torch.randn(1, SD3_TEXT_TOKENS, 4096),
                         pooled_projections=torch.randn(1, 2048), return_dict=False)
    steps = len(pipe.scheduler.timesteps)
    with RegionAdaptiveSampling(sample_ratio=0.5, start_step=1, error_reset_steps=list(range(2, steps, 2)),
                                reference_steps=steps).attached(pipe):
        full, reduced = flops(pipe.transformer, arguments), flops(pipe.transformer, arguments)
    lines.append(f"RAS, SD3-medium-shaped transformer at {size}x{size} ({(size // 2) ** 2} image + {SD3_TEXT_TOKENS} "
                 f"text tokens): {full:.0f} / {reduced:.0f} GFLOPs per full / partial call, official schedule "
                 f"{28 * full / (6 * full + 22 * reduced):.2f}x FLOPs")
    return lines


def format_call_costs(costs: list[CallCost]) -> str:
    header = f"{'model':<32}{'call':<9}{'wall s':>8}{'CPU s':>8}{'GFLOPs':>9}"
    lines = [header, "-" * len(header)]
    for c in costs:
        lines.append(f"{c.model:<32}{c.call:<9}{c.seconds:>8.2f}{c.cpu_seconds:>8.2f}{c.gflops:>9.0f}")
    return "\n".join(lines)


@dataclass
class StitchRow:
    dim: int
    small_components: int
    fraction: float
    sw2: float
    sw2_excess: float
    weight_error: float


def oracle_section(num_samples: int = 4096, seeds: int = 3) -> list[StitchRow]:
    """T-Stitch on the exact oracles (DDIM, SD 1.x schedule, 20 steps): mean over noise seeds."""
    rows = []
    for dim in (2, 64):
        law = benchmark_mixture(dim)
        scheduler = DDIMScheduler.from_config(SD_SCHEDULER_CONFIG)
        large = oracle_for(law, scheduler.config)
        pipe = GaussianMixtureSamplingPipeline(unet=large, scheduler=scheduler)
        pipe.set_progress_bar_config(disable=True)
        yardsticks = [law_yardstick(law, large.sample_shape, num_samples, seed) for seed in range(seeds)]
        for components in (1, law.num_components // 2):
            small = oracle_for(coarsened_mixture(law, components), scheduler.config)
            for fraction in (0.0, 0.2, 0.4, 0.6, 0.8, 1.0):
                sw2, excess, weights = [], [], []
                for yardstick in yardsticks:
                    with TStitch(small=small, fraction=fraction).attached(pipe):
                        samples = pipe(batch_size=num_samples, num_inference_steps=20,
                                       latents=yardstick.noise.clone()).samples
                    distance = yardstick.distance_to_law(samples)
                    sw2.append(distance)
                    excess.append(distance - yardstick.floor)
                    weights.append(mixture_weight_error(samples, law))
                rows.append(StitchRow(dim, components, fraction, statistics.mean(sw2), statistics.mean(excess),
                                      statistics.mean(weights)))
    return rows


def trained_section() -> list[Row]:
    """Fidelity on trained weights: the shipped ResShift super-resolution UNet2DModel at 15 steps, PSNR / SSIM of
    each method's restored crops to the stock restored crops (eight 128 px held-out crops)."""
    pipe = load_shipped_pipeline("tiny-resshift-sr4")
    pipe.set_progress_bar_config(disable=True)
    methods = {
        "faster-diffusion": lambda: FasterDiffusion(),
        "faster-diffusion (key steps 0, 2)": lambda: FasterDiffusion(key_steps=[0, 2], reference_steps=15),
        "feature-inheritance": lambda: FeatureInheritance(modules=["down_blocks.2", "mid_block", "up_blocks.0"],
                                                          interval=2),
    }
    stock = super_resolve_held_out(pipe, tiles=2, num_inference_steps=15)["restored"]
    rows = []
    for name, make in methods.items():
        with make().attached(pipe) as hook:
            restored = super_resolve_held_out(pipe, tiles=2, num_inference_steps=15)["restored"]
        reuse = getattr(hook, "encoder", None) or hook.blocks
        rows.append(Row("trained", name, float("nan"), float("nan"), float("nan"), float("nan"), float("nan"), 15,
                        float(psnr(restored, stock).mean()),
                        float(ssim(restored, stock).mean()), f"{reuse.calls['reuse']} of 15 calls reuse"))
    recorder = TimestepRecorder()
    taylor = taylorseer(["mid_block", r"up_blocks\.\d+"])
    handle = pipe.unet.register_forward_pre_hook(recorder, with_kwargs=True)
    detach = taylor(pipe)
    try:
        pipe._benchmark_before_run()
        restored = super_resolve_held_out(pipe, tiles=2, num_inference_steps=15)["restored"]
    finally:
        detach()
        handle.remove()
    rows.append(Row("trained", "diffusers TaylorSeer", float("nan"), float("nan"), float("nan"), float("nan"),
                    float("nan"), 15,
                    float(psnr(restored, stock).mean()), float(ssim(restored, stock).mean()),
                    "mid + up blocks predicted, compute every 2nd step after 2"))
    return rows


# Output -------------------------------------------------------------------------------------------------------------


def format_rows(rows: list[Row]) -> str:
    header = (f"{'section':<9}{'method':<36}{'s/run':>8}{'wall x':>8}{'CPU x':>7}{'FLOPs x':>8}{'GFLOPs':>9}"
              f"{'calls':>6}{'PSNR':>7}{'SSIM':>7}  note")
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(f"{r.section:<9}{r.method:<36}{r.seconds:>8.2f}{r.speedup:>8.2f}{r.cpu_speedup:>7.2f}"
                     f"{r.flops_speedup:>8.2f}{r.gflops:>9.0f}{r.denoiser_calls:>6}{r.psnr:>7.1f}{r.ssim:>7.3f}  {r.note}")
    return "\n".join(lines)


def format_stitch(rows: list[StitchRow]) -> str:
    header = f"{'dim':>4}{'small K':>8}{'fraction':>9}{'SW2':>9}{'excess':>9}{'w err':>8}"
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(f"{r.dim:>4}{r.small_components:>8}{r.fraction:>9.1f}{r.sw2:>9.4f}{r.sw2_excess:>9.4f}"
                     f"{r.weight_error:>8.3f}")
    return "\n".join(lines)


def plot(rows: list[Row], stitch: list[StitchRow], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for row in rows:
        if row.method == "stock" or row.section in ("trained", "stream") or row.method == "t-stitch":
            continue
        marker = "s" if row.method.startswith("diffusers") else "o"
        left.scatter(row.flops_speedup, min(row.psnr, 90), marker=marker)
        left.annotate(f"{row.section}: {row.method}", (row.flops_speedup, min(row.psnr, 90)), fontsize=7)
    left.axvline(1.0, color="gray", linewidth=1)
    left.set(xlabel="FLOPs of the stock run / FLOPs of the run",
             ylabel="PSNR of latents to stock (dB, random weights)",
             title="speed hooks (circles: ours, squares: diffusers caches)")
    for dim in sorted({r.dim for r in stitch}):
        for components in sorted({r.small_components for r in stitch if r.dim == dim}):
            points = [r for r in stitch if r.dim == dim and r.small_components == components]
            right.plot([r.fraction for r in points], [r.sw2_excess for r in points], "o-",
                       label=f"{dim}-D, small model of {components} component(s)")
    right.axvline(0.4, color="gray", linestyle="--", linewidth=1)
    right.set(xlabel="fraction of steps by the small model", ylabel="sliced W2 excess over the noise floor",
              title="T-Stitch on exact oracles")
    if stitch:
        right.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def run(args: argparse.Namespace) -> int:
    """Run the sections ``args`` select, print the tables, write the CSV and the plot."""
    args = argparse.Namespace(**vars(args) | {"output": Path(args.output)})
    sections = set(args.sections)
    sections |= {name for name in ("sd3", "sdxl", "flux") if getattr(args, name)}
    logging.set_verbosity_error()
    count_cpu_attention_flops()
    args.output.mkdir(parents=True, exist_ok=True)
    rows: list[Row] = []
    stitch: list[StitchRow] = []
    print(f"speed hooks: latents {args.latent_size}x{args.latent_size}, {args.steps} steps, {args.repeats} repeat(s), "
          f"{torch.get_num_threads()} threads")
    if "sd15" in sections:
        pipe = sd15_pipeline()
        rows += unet_section("sd15", pipe, lambda: sd15_inputs(args.latent_size, args.steps), args, True)
        free(pipe)
    if "sdxl" in sections:
        pipe = sdxl_pipeline()
        rows += unet_section("sdxl", pipe, lambda: sdxl_inputs(args.latent_size, args.steps), args, False)
        free(pipe)
    if "sd3" in sections:
        pipe = sd3_pipeline()
        rows += transformer_section("sd3", pipe, lambda: sd3_inputs(args.latent_size, args.steps), args)
        free(pipe)
    if "flux" in sections:
        pipe = flux_pipeline(args.flux_blocks)
        rows += transformer_section("flux", pipe, lambda: flux_inputs(args.latent_size, args.steps), args)
        free(pipe)
    if "stream" in sections:
        rows += stream_section(args)
    if "trained" in sections:
        rows += trained_section()
    if "oracle" in sections:
        stitch = oracle_section()
    if "calls" in sections:
        costs, projections = call_costs_section(args)
        print("\nfull and reduced calls, alternating (medians):")
        print(format_call_costs(costs))
        print("\n".join(projections))
        print("\n".join(meta_flops_projections(2 * args.call_latent_size)))
    written = []
    if rows:
        print(format_rows(rows))
        with open(args.output / "speed_hooks.csv", "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(asdict(rows[0])))
            writer.writeheader()
            writer.writerows(asdict(r) for r in rows)
        written.append(args.output / "speed_hooks.csv")
    if stitch:
        print("\nT-Stitch on exact oracles (DDIM, 20 steps, 4096 samples, 3 seeds):")
        print(format_stitch(stitch))
    if rows or stitch:
        plot(rows, stitch, args.output / "speed_hooks.png")
        written.append(args.output / "speed_hooks.png")
    print(f"\nwrote {', '.join(map(str, written)) or 'no files'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    from ..cli import add_speed_hooks_arguments

    parser = add_speed_hooks_arguments(argparse.ArgumentParser(description=__doc__.split("\n\n")[0]))
    return run(parser.parse_args(argv))
