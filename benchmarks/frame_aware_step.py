"""The cost of the frame-aware (vectorized per-frame timestep) step against diffusers' stock step and against one
deep-copied stock scheduler per frame (how SkyReels-V2's diffusion-forcing pipeline steps frames at their own levels).

    python benchmarks/frame_aware_step.py [--shape 2 16 16 32 32] [--steps 50] [--repeats 20] [--threads 1]

On float32 latents of ``--shape`` ``(B, C, F, H, W)`` (the issue's ``(2, 16, 16, 32, 32)`` by default), with one fixed
model output standing in for the model and a flow-matching grid of ``--steps`` levels (shift 5), every repeat runs
these sampling loops back to back, timing each ``step`` call:

- ``stock FlowMatchEuler``: ``FlowMatchEulerDiscreteScheduler.step`` over its grid (all frames at one level);
- ``frame-aware, standard plan``: ``FrameAwareFlowMatchScheduler.step`` over ``FrameTimestepPlan.standard`` (the
  same levels, all frames moving);
- ``frame-aware, diffusion forcing``: the same over a Diffusion Forcing plan (block ``b`` starts ``b * offset``
  steps late), where most steps have frames waiting or done, which are copied rather than computed;
- ``frame-aware 2M, diffusion forcing``: that with ``solver_order=2`` (DPM-Solver++(2M), history per frame);
- ``per-frame deep copies`` (``FlowMatchEulerDiscreteScheduler``) and ``per-frame deep copies, 2M``
  (``DPMSolverMultistepScheduler``, flow sigmas): the diffusion-forcing plan stepped as SkyReels-V2 does, one deep
  copy of the stock scheduler per frame, each stepped on its frame's slice of the latents when the frame moves.

It prints each loop's median time per step, its ratio to the stock step (the target for the frame-aware step is at
most 1.3), and the whole diffusion-forcing loop against the per-frame deep copies.

**Threads and memory.** ``--threads`` (default 1) sets torch's intra-op threads: on a shared machine a
multi-threaded kernel waits for a thread another process has preempted (measured here: 8 ms instead of 0.04 ms for
one add on these latents). On a virtual machine, fresh pages can also cost more than the arithmetic: glibc returns a
freed block of several MB to the system (its trim threshold) and the next allocation page-faults it back. Run it as
is and with ``MALLOC_MMAP_THRESHOLD_=16777216 MALLOC_TRIM_THRESHOLD_=1073741824``, which keeps freed memory as a
caching allocator does, to separate the two.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable

import torch
from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler

from diffusers_ext.pipelines.video import FrameTimestepPlan
from diffusers_ext.schedulers import FrameAwareFlowMatchScheduler

SHIFT = 5.0


def timed(call: Callable[[], torch.Tensor], times: list[float]) -> torch.Tensor:
    start = time.perf_counter()
    result = call()
    times.append(time.perf_counter() - start)
    return result


def stock_loop(scheduler, latents, model_output, times):
    for timestep in scheduler.timesteps:
        latents = timed(lambda t=timestep, x=latents: scheduler.step(model_output, t, x).prev_sample, times)


def frame_aware_loop(scheduler, plan, latents, model_output, times):
    for level, next_level in plan:
        latents = timed(lambda a=level, b=next_level, x=latents: scheduler.step(model_output, a, x, b).prev_sample,
                        times)


def per_frame_loop(scheduler, plan, latents, model_output, times):
    """SkyReels-V2's loop: one deep copy per frame, each frame's result written into the latents in place."""
    schedulers = [copy.deepcopy(scheduler) for _ in range(plan.num_frames)]
    moves = [0] * plan.num_frames
    latents = latents.clone()

    def step(active):
        for frame in range(plan.num_frames):
            if not active[frame].item():
                continue
            frame_scheduler = schedulers[frame]
            latents[:, :, frame] = frame_scheduler.step(
                model_output[:, :, frame], frame_scheduler.timesteps[moves[frame]], latents[:, :, frame],
                return_dict=False,
            )[0]
            moves[frame] += 1

    for active in plan.active:
        timed(lambda mask=active: step(mask), times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", type=int, nargs=5, default=[2, 16, 16, 32, 32], metavar=("B", "C", "F", "H", "W"))
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    if min(args.shape) < 1 or args.shape[2] < 2 or args.steps < 2 or args.repeats < 1 or args.threads < 1:
        parser.error("sizes must be positive, with at least 2 frames, 2 steps, 1 repeat and 1 thread")
    torch.set_num_threads(args.threads)

    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(args.shape, generator=generator)
    model_output = torch.randn(args.shape, generator=generator)
    num_frames = args.shape[2]

    stock = FlowMatchEulerDiscreteScheduler(shift=SHIFT)
    stock_2m = DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2, use_flow_sigmas=True,
                                           prediction_type="flow_prediction", flow_shift=SHIFT)
    ours = FrameAwareFlowMatchScheduler(shift=SHIFT)
    ours_2m = FrameAwareFlowMatchScheduler(shift=SHIFT, solver_order=2)
    for scheduler in (stock, stock_2m, ours, ours_2m):
        scheduler.set_timesteps(args.steps)
    standard = FrameTimestepPlan.standard(ours.noise_levels, num_frames)
    frame_offset = max(1, args.steps // 8)
    forcing = FrameTimestepPlan.diffusion_forcing(ours.noise_levels, num_frames, frame_offset=frame_offset)

    def fresh(scheduler):
        scheduler.set_timesteps(args.steps)  # resets the step counter and any history
        return scheduler

    loops = {
        "stock FlowMatchEuler": lambda t: stock_loop(fresh(stock), latents, model_output, t),
        "frame-aware, standard plan": lambda t: frame_aware_loop(fresh(ours), standard, latents, model_output, t),
        "frame-aware, diffusion forcing": lambda t: frame_aware_loop(fresh(ours), forcing, latents, model_output, t),
        "frame-aware 2M, diffusion forcing": lambda t: frame_aware_loop(fresh(ours_2m), forcing, latents,
                                                                        model_output, t),
        "per-frame deep copies": lambda t: per_frame_loop(fresh(stock), forcing, latents, model_output, t),
        "per-frame deep copies, 2M": lambda t: per_frame_loop(fresh(stock_2m), forcing, latents, model_output, t),
    }
    times = {name: [] for name in loops}
    for _ in range(args.repeats):
        for name, loop in loops.items():
            loop(times[name])

    moving = forcing.active.sum(1).float()
    print(f"latents {tuple(args.shape)} float32, torch threads {torch.get_num_threads()}, {args.repeats} repeats; "
          f"{args.steps}-level grid; diffusion-forcing plan: frame offset {frame_offset}, {forcing.num_steps} steps, "
          f"{moving.mean():.1f} of {num_frames} frames moving per step on average")
    baseline = statistics.median(times["stock FlowMatchEuler"])
    print(f"{'loop':36s} {'ms / step':>10s} {'/ stock':>8s} {'ms / loop':>10s}")
    for name, samples in times.items():
        per_step = statistics.median(samples)
        per_loop = sum(samples) / args.repeats
        print(f"{name:36s} {per_step * 1e3:10.3f} {per_step / baseline:8.2f} {per_loop * 1e3:10.1f}")
    for ours_name, theirs_name in (("frame-aware, diffusion forcing", "per-frame deep copies"),
                                   ("frame-aware 2M, diffusion forcing", "per-frame deep copies, 2M")):
        ratio = sum(times[theirs_name]) / sum(times[ours_name])
        print(f"{theirs_name} take {ratio:.2f}x the time of {ours_name} over the plan")


if __name__ == "__main__":
    main()
