"""Per-chunk cost of ``CausalVideoPipeline`` with and without the KV cache of the clean context (Ca2-VDM, arXiv
2411.16375): CPU time and cache memory against the chunk index, on a tiny Wan and on a Wan 1.3B-shaped transformer
with random weights (Wan2.1-T2V-1.3B's config: 30 blocks of width 1536, 12 heads, FFN 8960, 16 latent channels).

    nice -n 10 python benchmarks/causal_video_cache.py [--models tiny wan-1.3b] [--chunks 8] [--steps 2]
        [--chunk-frames 2] [--latent-size 8] [--max-cache-frames N] [--repeats 2] [--plot PATH]

Each chunk is ``--chunk-frames`` latent frames of ``--latent-size`` squared latents (``(size / 2)^2`` tokens a frame
after Wan's 2x2 patches), ``--steps`` denoising steps, one prompt of 8 random text tokens, float32, one thread.
Times are the transformer's forward calls (hooks) in CPU seconds of this process (``time.process_time``: on a shared
machine wall time measures the other processes too), per chunk: its denoising steps, and for the cached run the write
pass at timestep 0 that put the previous chunk into the cache (chunk 1 has none: its context is empty); the table
gives the minimum over ``--repeats`` runs. Cache memory: the keys and values of all layers the chunk's steps read.
Target: cached chunk 8 <= 1.3x cached chunk 1, while the uncached cost grows (it re-encodes the whole context at
every step).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from diffusers import WanTransformer3DModel

from diffusers_ext.pipelines.video import CausalVideoPipeline
from diffusers_ext.pipelines.video.causal_attention import causal_attention_state
from diffusers_ext.schedulers import FrameAwareFlowMatchScheduler

MODELS = {
    "tiny": dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
                 text_dim=16, freq_dim=32, ffn_dim=32, num_layers=2, rope_max_seq_len=32),
    # Wan-AI/Wan2.1-T2V-1.3B-Diffusers transformer/config.json
    "wan-1.3b": dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16,
                     out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
                     qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024),
}
TEXT_TOKENS = 8


def build_pipeline(name: str) -> CausalVideoPipeline:
    torch.manual_seed(0)
    transformer = WanTransformer3DModel(**MODELS[name]).eval()
    pipe = CausalVideoPipeline(transformer, FrameAwareFlowMatchScheduler(shift=3.0))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def chunk_costs(pipe: CausalVideoPipeline, use_cache: bool, chunks: int, steps: int, chunk_frames: int,
                latent_size: int, max_cache_frames: int | None) -> dict[str, list[float]]:
    """Per chunk: CPU seconds of its denoising steps, of the write pass that put the previous chunk into the cache
    (0 for chunk 1 and without the cache), and MB of cached keys and values its steps read."""
    calls = []  # (cache mode, seconds, cache bytes) of every transformer forward

    def before(module, args):
        calls.append([causal_attention_state(module).cache_mode, time.process_time(), 0])

    def after(module, args, output):
        cache = causal_attention_state(module).cache
        calls[-1][1] = time.process_time() - calls[-1][1]
        calls[-1][2] = cache.memory_bytes() if cache is not None else 0

    handles = [pipe.transformer.register_forward_pre_hook(before), pipe.transformer.register_forward_hook(after)]
    text = torch.randn(1, TEXT_TOKENS, pipe.transformer.config.text_dim, generator=torch.Generator().manual_seed(0))
    try:
        pipe(prompt_embeds=text, num_frames=chunks * chunk_frames, chunk_frames=chunk_frames, height=latent_size,
             width=latent_size, num_inference_steps=steps, use_cache=use_cache, max_cache_frames=max_cache_frames,
             output_type="latent", generator=torch.Generator().manual_seed(0))
    finally:
        for handle in handles:
            handle.remove()
    denoising = [call for call in calls if call[0] != "write"]
    writes = [call[1] for call in calls if call[0] == "write"]
    return dict(steps=[sum(call[1] for call in denoising[c * steps:(c + 1) * steps]) for c in range(chunks)],
                write=([0.0, *writes] + [0.0] * chunks)[:chunks],
                memory=[denoising[c * steps][2] / 2**20 for c in range(chunks)])


def run(name: str, args) -> list[dict]:
    pipe = build_pipeline(name)
    parameters = sum(p.numel() for p in pipe.transformer.parameters())
    tokens = (args.latent_size // 2) ** 2
    print(f"\n{name}: {parameters / 1e6:.1f} M parameters, {args.chunk_frames} latent frame(s) x {tokens} tokens a "
          f"chunk, {args.steps} steps, max_cache_frames={args.max_cache_frames}, {torch.get_num_threads()} "
          f"thread(s), minimum of {args.repeats} run(s)")
    results = {}
    for use_cache in (True, False):
        runs = [chunk_costs(pipe, use_cache, args.chunks, args.steps, args.chunk_frames, args.latent_size,
                            args.max_cache_frames) for _ in range(args.repeats)]
        results[use_cache] = {key: [min(run[key][c] for run in runs) for c in range(args.chunks)]
                              for key in ("steps", "write", "memory")}
    cached, uncached = results[True], results[False]
    print("| chunk | cached: steps CPU s | + cache write | = total | cache MB read | uncached: steps CPU s | "
          "uncached / cached total |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    rows = []
    for c in range(args.chunks):
        total = cached["steps"][c] + cached["write"][c]
        rows.append(dict(chunk=c + 1, cached=total, memory=cached["memory"][c], uncached=uncached["steps"][c]))
        print(f"| {c + 1} | {cached['steps'][c]:.3f} | {cached['write'][c]:.3f} | {total:.3f} | "
              f"{cached['memory'][c]:.2f} | {uncached['steps'][c]:.3f} | {uncached['steps'][c] / total:.2f} |")
    last = args.chunks - 1
    totals = [row["cached"] for row in rows]
    print(f"cached steps, chunk {args.chunks} / chunk 1: {cached['steps'][last] / cached['steps'][0]:.2f} "
          f"(target <= 1.3); cached total (steps + write), chunk {args.chunks} / chunk 2: "
          f"{totals[last] / totals[1]:.2f}, / chunk 1: {totals[last] / totals[0]:.2f}; "
          f"uncached, chunk {args.chunks} / chunk 1: {uncached['steps'][last] / uncached['steps'][0]:.2f}")
    return rows


def plot(all_rows: dict[str, list[dict]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    figure, axes = pyplot.subplots(len(all_rows), 2, figsize=(9, 3.2 * len(all_rows)), squeeze=False)
    for (name, rows), (time_axis, memory_axis) in zip(all_rows.items(), axes, strict=True):
        chunks = [row["chunk"] for row in rows]
        time_axis.plot(chunks, [row["cached"] for row in rows], "o-", label="KV cache")
        time_axis.plot(chunks, [row["uncached"] for row in rows], "s--", label="no cache")
        time_axis.set(title=f"{name}: time per chunk", xlabel="chunk", ylabel="CPU seconds", ylim=(0, None))
        time_axis.legend()
        memory_axis.plot(chunks, [row["memory"] for row in rows], "o-")
        memory_axis.set(title=f"{name}: cache read per chunk", xlabel="chunk", ylabel="MB", ylim=(0, None))
    figure.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    print(f"\nplot: {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--chunks", type=int, default=8)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--chunk-frames", type=int, default=2, help="latent frames per chunk")
    parser.add_argument("--latent-size", type=int, default=8, help="latent height = width")
    parser.add_argument("--max-cache-frames", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--plot", default="benchmarks/results/causal_video_cache.png")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    all_rows = {}
    with torch.inference_mode():
        for name in args.models:
            all_rows[name] = run(name, args)
    plot(all_rows, args.plot)


if __name__ == "__main__":
    main()
