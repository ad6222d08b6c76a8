"""Sampler accuracy on the exact oracles: error versus NFE, the yardstick every new sampler is measured with.

For each scheduler, data dimension and NFE budget, the same starting noise is sampled through the stock loop
(``GaussianMixtureSamplingPipeline``) and compared with

- the exact law: sliced W2 against a large exact sample, next to its noise floor (what exact samples of the same size
  score) and its ODE limit (what the exact ODE endpoints of the same noise score: the error no step count removes,
  such as a schedule's non-zero terminal SNR making ``x_T ~ N(0, I)`` differ from the true marginal at ``T``);
- the exact probability-flow ODE endpoints of the same noise (``probability_flow_ode_solution``);
- the mixture weights (total variation of the component fractions).

NFE is counted, not assumed: each scheduler gets the largest ``num_inference_steps`` whose denoiser calls fit the
budget, found by a dry run.
"""

from __future__ import annotations

import csv
import math
import statistics
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from diffusers import (
    DDIMScheduler,
    DEISMultistepScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    UniPCMultistepScheduler,
)
from diffusers.utils import logging
from tqdm.auto import tqdm

from ..diffusion_math import noise_path_from_scheduler_config
from .gaussian_mixture import GaussianMixture
from .metrics import SlicedWasserstein2, distance_to_reference, mixture_weight_error, sliced_wasserstein2_noise_floor
from .oracle import GaussianMixtureDenoiser
from .pipeline_gaussian_mixture import GaussianMixtureSamplingPipeline
from .reference import probability_flow_ode_solution

# Stable Diffusion 1.x's published scheduler config and SD3's: schedulers are built from them with ``from_config``,
# as users swap samplers, so each keeps its own defaults for everything else.
SD_SCHEDULER_CONFIG = {
    "_class_name": "PNDMScheduler",
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "trained_betas": None,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "clip_sample": False,
}
SD3_SCHEDULER_CONFIG = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}

BUILTIN_SCHEDULERS = {
    "DDIM": DDIMScheduler,
    "DPM-Solver++ 2M": DPMSolverMultistepScheduler,
    "UniPC": UniPCMultistepScheduler,
    "Euler": EulerDiscreteScheduler,
    "DEIS": DEISMultistepScheduler,
    "FlowMatchEuler": FlowMatchEulerDiscreteScheduler,
}


def benchmark_mixture(dim: int) -> GaussianMixture:
    """The benchmark's data law in ``dim`` dimensions: unequal weights, anisotropic, well-separated components.

    2-D: eight components on a circle of radius 2 (variance 0.01). Otherwise: six components with standard-normal
    means and diagonal variances in [0.02, 0.32], drawn from a fixed seed.
    """
    if dim == 2:
        angles = torch.arange(8, dtype=torch.float64) * (2 * math.pi / 8)
        means = 2 * torch.stack([angles.cos(), angles.sin()], dim=1)
        weights = torch.tensor([8, 7, 6, 5, 4, 3, 2, 1], dtype=torch.float64)
        return GaussianMixture(means, torch.full((8,), 0.01), weights / weights.sum())
    generator = torch.Generator().manual_seed(dim)
    means = torch.randn(6, dim, generator=generator, dtype=torch.float64)
    variances = 0.02 + 0.3 * torch.rand(6, dim, generator=generator, dtype=torch.float64)
    return GaussianMixture(means, variances, [0.3, 0.25, 0.2, 0.12, 0.08, 0.05])


def _sample_shape(dim: int) -> tuple[int, int]:
    """(in_channels, sample_size): a 4-channel square latent where ``dim`` allows, else a single pixel."""
    side = math.isqrt(dim // 4) if dim % 4 == 0 else 0
    return (4, side) if side and 4 * side * side == dim else (dim, 1)


def oracle_for(law: GaussianMixture, scheduler_config: Mapping) -> GaussianMixtureDenoiser:
    in_channels, sample_size = _sample_shape(law.dim)
    return GaussianMixtureDenoiser(
        means=law.means.tolist(),
        covariances=law.covariances.tolist(),
        weights=law.weights.tolist(),
        scheduler_config=dict(scheduler_config),
        sample_size=sample_size,
        in_channels=in_channels,
    ).eval()


def scheduler_from_pipeline_config(scheduler_class) -> tuple[object, str]:
    """Build ``scheduler_class`` the way a user swaps it into SD 1.x (VP) or SD3 (flow); returns it and the path."""
    path = noise_path_from_scheduler_config(scheduler_class().config)
    base = SD_SCHEDULER_CONFIG if path == "vp" else SD3_SCHEDULER_CONFIG
    return scheduler_class.from_config(base), path


class _CallCounter:
    def __init__(self, module: torch.nn.Module):
        self.calls = 0
        self._handle = module.register_forward_hook(self._count)

    def _count(self, *_):
        self.calls += 1

    def remove(self):
        self._handle.remove()


def steps_for_budget(pipe: GaussianMixtureSamplingPipeline, nfe: int) -> tuple[int, int]:
    """The largest ``num_inference_steps`` whose denoiser calls are at most ``nfe``, and that call count."""
    counter = _CallCounter(pipe.unet)
    try:
        for steps in range(nfe, 0, -1):
            counter.calls = 0
            pipe(batch_size=1, num_inference_steps=steps, generator=torch.Generator().manual_seed(0))
            if counter.calls <= nfe:
                return steps, counter.calls
    finally:
        counter.remove()
    raise ValueError(f"no step count fits an NFE budget of {nfe}")


@dataclass
class ConvergenceMeasurement:
    """Distance to the exact PF-ODE solution at each NFE, and the fitted convergence order
    (``-slope`` of log error versus log NFE over the last ``fit_points`` budgets)."""

    nfes: list[int]
    errors: list[float]
    order: float


def measure_convergence_order(
    scheduler_for_steps: Callable[[int], object],
    law: GaussianMixture,
    step_counts: Iterable[int],
    num_samples: int = 128,
    seed: int = 0,
    timestep_end: float | None = None,
    fit_points: int = 3,
) -> ConvergenceMeasurement:
    """Run ``scheduler_for_steps(n)`` for ``n`` in ``step_counts`` through the stock loop on the exact oracle of
    ``law`` (float64 throughout) and compare with the exact PF-ODE solution of the same noise, which ends at
    ``timestep_end`` (``None``: the data end). NFE is counted with a forward hook."""
    nfes, errors, reference = [], [], None
    for steps in step_counts:
        scheduler = scheduler_for_steps(steps)
        oracle = oracle_for(law, scheduler.config).double()
        pipe = GaussianMixtureSamplingPipeline(unet=oracle, scheduler=scheduler)
        pipe.set_progress_bar_config(disable=True)
        noise = torch.randn(num_samples, *oracle.sample_shape, generator=torch.Generator().manual_seed(seed),
                            dtype=torch.float64)
        if reference is None:
            reference = probability_flow_ode_solution(oracle, noise, rtol=1e-11, atol=1e-11, timestep_end=timestep_end)
        counter = _CallCounter(oracle)
        try:
            samples = pipe(batch_size=num_samples, num_inference_steps=steps, latents=noise,
                           generator=torch.Generator().manual_seed(seed + 1)).samples
        finally:
            counter.remove()
        nfes.append(counter.calls)
        errors.append(distance_to_reference(samples, reference))
    log_nfe, log_error = torch.tensor(nfes[-fit_points:]).log(), torch.tensor(errors[-fit_points:]).log()
    slope = ((log_nfe - log_nfe.mean()) * (log_error - log_error.mean())).sum() / ((log_nfe - log_nfe.mean()) ** 2).sum()
    return ConvergenceMeasurement(nfes=nfes, errors=errors, order=-float(slope))


@dataclass
class AccuracyRow:
    scheduler: str
    path: str
    dim: int
    nfe: int
    steps: int
    ode_error: float
    sw2: float
    sw2_floor: float
    sw2_ode_limit: float
    sw2_excess: float
    weight_error: float


@dataclass
class AccuracyReport:
    rows: list[AccuracyRow]
    floors: dict[tuple[int, str], float]
    ode_limits: dict[tuple[int, str], float]
    samples_2d: dict[tuple[str, int], torch.Tensor] = field(default_factory=dict)
    truth_2d: dict[str, torch.Tensor] = field(default_factory=dict)

    def table(self) -> str:
        header = (f"{'scheduler':<18}{'dim':>4}{'NFE':>5}{'steps':>6}{'ODE err':>11}{'SW2':>9}{'floor':>9}"
                  f"{'ODE lim':>9}{'excess':>9}{'w err':>8}")
        lines = [header, "-" * len(header)]
        for r in self.rows:
            lines.append(
                f"{r.scheduler:<18}{r.dim:>4}{r.nfe:>5}{r.steps:>6}{r.ode_error:>11.2e}{r.sw2:>9.4f}"
                f"{r.sw2_floor:>9.4f}{r.sw2_ode_limit:>9.4f}{r.sw2_excess:>9.4f}{r.weight_error:>8.3f}"
            )
        return "\n".join(lines)

    def best(self, dim: int, nfe: int, metric: str = "sw2_excess") -> AccuracyRow:
        return min((r for r in self.rows if r.dim == dim and r.nfe == nfe), key=lambda r: getattr(r, metric))

    def write_csv(self, path: str | Path) -> None:
        with open(path, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(asdict(self.rows[0])))
            writer.writeheader()
            writer.writerows(asdict(r) for r in self.rows)


def measure_sampler_accuracy(
    schedulers: Mapping[str, type] | None = None,
    dims: Iterable[int] = (2, 64),
    nfes: Iterable[int] = (5, 10, 20, 50),
    num_samples: int = 2048,
    seed: int = 0,
    progress: bool = True,
) -> AccuracyReport:
    """Measure each scheduler (default: ``BUILTIN_SCHEDULERS``) on the benchmark mixtures: a class is built from
    SD 1.x's or SD3's config, an instance is used as it is."""
    schedulers = dict(schedulers or BUILTIN_SCHEDULERS)
    dims, nfes = list(dims), sorted(nfes)
    report = AccuracyReport(rows=[], floors={}, ode_limits={})
    references = {}
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # from_config warns about every SD key a scheduler does not use
    try:
        for name, dim in tqdm([(n, d) for d in dims for n in schedulers], desc="sampler accuracy", disable=not progress):
            _measure_one(report, references, schedulers[name], name, dim, nfes, num_samples, seed)
    finally:
        logging.set_verbosity(verbosity)
    return report


@dataclass
class LawYardstick:
    """What every sampler on one law is measured with: the starting noise (the same for all), the sliced W2 to a
    large exact sample and its noise floor (what exact samples of the same size score)."""

    noise: torch.Tensor
    distance_to_law: SlicedWasserstein2
    floor: float
    truth: torch.Tensor


def law_yardstick(law: GaussianMixture, sample_shape: tuple[int, ...], num_samples: int, seed: int) -> LawYardstick:
    noise = torch.randn(num_samples, *sample_shape, generator=torch.Generator().manual_seed(seed))
    truth = law.sample(16 * num_samples, torch.Generator().manual_seed(seed + 1))
    distance_to_law = SlicedWasserstein2(truth, num_samples)
    floor = sliced_wasserstein2_noise_floor(law, distance_to_law, seed=seed + 2).mean
    return LawYardstick(noise=noise, distance_to_law=distance_to_law, floor=floor, truth=truth[:num_samples])


def _sampling_pipeline(law: GaussianMixture, scheduler) -> GaussianMixtureSamplingPipeline:
    pipe = GaussianMixtureSamplingPipeline(unet=oracle_for(law, scheduler.config), scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _measure_one(report, references, scheduler_class, name, dim, nfes, num_samples, seed) -> None:
    if isinstance(scheduler_class, type):
        scheduler, path = scheduler_from_pipeline_config(scheduler_class)
    else:  # an already configured scheduler (e.g. with an optimised schedule)
        scheduler, path = scheduler_class, noise_path_from_scheduler_config(scheduler_class.config)
    law = benchmark_mixture(dim)
    pipe = _sampling_pipeline(law, scheduler)
    if (dim, path) not in references:
        yardstick = law_yardstick(law, pipe.unet.sample_shape, num_samples, seed)
        reference = probability_flow_ode_solution(pipe.unet, yardstick.noise, rtol=1e-8, atol=1e-8)
        references[dim, path] = reference, yardstick
        report.floors[dim, path] = yardstick.floor
        report.ode_limits[dim, path] = yardstick.distance_to_law(reference)
        if dim == 2:
            report.truth_2d[path] = yardstick.truth
    reference, yardstick = references[dim, path]
    noise, distance_to_law = yardstick.noise, yardstick.distance_to_law
    floor, ode_limit = report.floors[dim, path], report.ode_limits[dim, path]
    for nfe in nfes:
        steps, calls = steps_for_budget(pipe, nfe)
        samples = pipe(batch_size=num_samples, num_inference_steps=steps, latents=noise.clone()).samples
        sw2 = distance_to_law(samples)
        report.rows.append(AccuracyRow(
            scheduler=name, path=path, dim=dim, nfe=calls, steps=steps,
            ode_error=distance_to_reference(samples, reference), sw2=sw2, sw2_floor=floor,
            sw2_ode_limit=ode_limit, sw2_excess=sw2 - floor, weight_error=mixture_weight_error(samples, law),
        ))
        if dim == 2:
            report.samples_2d[name, calls] = samples.detach().double()


def plot_accuracy(report: AccuracyReport, path: str | Path) -> None:
    """Error versus NFE (log-log) per dimension: distance to the exact ODE solution, and sliced W2 with its floor."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dims = sorted({r.dim for r in report.rows})
    names = list(dict.fromkeys(r.scheduler for r in report.rows))
    fig, axes = plt.subplots(len(dims), 2, figsize=(11, 4.2 * len(dims)), squeeze=False)
    for row_axes, dim in zip(axes, dims, strict=True):
        for name in names:
            rows = [r for r in report.rows if r.dim == dim and r.scheduler == name]
            nfe = [r.nfe for r in rows]
            row_axes[0].loglog(nfe, [r.ode_error for r in rows], "o-", label=name)
            row_axes[1].semilogx(nfe, [r.sw2 for r in rows], "o-", label=name)
        for floor in {r.sw2_floor for r in report.rows if r.dim == dim}:
            row_axes[1].axhline(floor, color="gray", linestyle="--", linewidth=1)
        for limit in {r.sw2_ode_limit for r in report.rows if r.dim == dim}:
            row_axes[1].axhline(limit, color="gray", linestyle=":", linewidth=1)
        row_axes[0].set(title=f"{dim}-D: distance to exact PF-ODE solution", xlabel="NFE", ylabel="mean RMS distance")
        row_axes[1].set(title=f"{dim}-D: sliced W2 (dashed: noise floor, dotted: ODE limits)", xlabel="NFE", ylabel="SW2")
        for ax in row_axes:
            ax.grid(True, which="both", alpha=0.3)
        row_axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_samples_2d(report: AccuracyReport, path: str | Path) -> None:
    """2-D samples of each scheduler at the smallest NFE, over exact samples of the law."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in report.rows if r.dim == 2]
    smallest = min(r.nfe for r in rows)
    rows = [r for r in rows if r.nfe == smallest]
    fig, axes = plt.subplots(1, len(rows), figsize=(3.2 * len(rows), 3.4), squeeze=False)
    for ax, row in zip(axes[0], rows, strict=True):
        truth, samples = report.truth_2d[row.path], report.samples_2d[row.scheduler, row.nfe]
        ax.scatter(truth[:, 0], truth[:, 1], s=2, color="lightgray")
        ax.scatter(samples[:, 0], samples[:, 1], s=2)
        ax.set(title=f"{row.scheduler}, NFE {row.nfe}", xlim=(-3, 3), ylim=(-3, 3), aspect="equal")
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle("2-D samples (colour) over exact samples (grey)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def law_family(seed: int = 0) -> dict[str, GaussianMixture]:
    """Eight Gaussian-mixture laws that differ in what makes sampling hard, in 2 to 256 dimensions, each scaled to
    roughly unit variance per coordinate (as VAE latents are): the sampler comparison's family.

    The structure of each law is fixed; ``seed`` draws its means, variances, rotations and weights, so that a
    schedule fitted on one seed's family is evaluated on another's.

    - ``ring-2d``: 8 narrow components (variance 0.01) on a circle, unequal weights.
    - ``blobs-8d``: 4 well-separated isotropic components (means 2 N(0, I), variance 0.05), equal weights.
    - ``overlap-16d``: 10 overlapping components (means 0.6 N(0, I), diagonal variances in [0.2, 0.5]).
    - ``aniso-64d``: 6 components with diagonal variances in [0.02, 0.32] (the 64-D benchmark law's structure).
    - ``low-rank-64d``: 5 components whose full covariances have eigenvalues from 1 down to 1e-3 (data near
      low-dimensional subspaces, as images are).
    - ``many-128d``: 32 components of variance 0.1 with Zipf weights (1/k): many rare modes.
    - ``sharp-256d``: 3 nearly deterministic components (variance 1e-3).
    - ``broad-256d``: 2 broad, barely separated components (variance 0.9): almost Gaussian.
    """
    generator = torch.Generator().manual_seed(seed)

    def normal(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64)

    def uniform(low, high, *shape):
        return low + (high - low) * torch.rand(*shape, generator=generator, dtype=torch.float64)

    def dirichlet(count):
        weights = -torch.rand(count, generator=generator, dtype=torch.float64).log()
        return weights / weights.sum()

    def zipf(count):
        weights = 1.0 / torch.arange(1, count + 1, dtype=torch.float64)
        return (weights / weights.sum())[torch.randperm(count, generator=generator)]

    def rotated_spectrum(count, dim, spectrum):
        rotations = torch.linalg.qr(normal(count, dim, dim)).Q
        return rotations @ torch.diag_embed(spectrum.expand(count, dim)) @ rotations.transpose(1, 2)

    angles = uniform(0, 2 * math.pi, 1) + torch.arange(8, dtype=torch.float64) * (2 * math.pi / 8)
    return {
        "ring-2d": GaussianMixture(1.4 * torch.stack([angles.cos(), angles.sin()], 1), torch.full((8,), 0.01),
                                   zipf(8)),
        "blobs-8d": GaussianMixture(2 * normal(4, 8) / math.sqrt(5), torch.full((4,), 0.05), None),
        "overlap-16d": GaussianMixture(0.6 * normal(10, 16), uniform(0.2, 0.5, 10, 16), dirichlet(10)),
        "aniso-64d": GaussianMixture(normal(6, 64), uniform(0.02, 0.32, 6, 64), dirichlet(6)),
        "low-rank-64d": GaussianMixture(normal(5, 64) * 0.8, rotated_spectrum(5, 64, torch.logspace(0, -3, 64, dtype=torch.float64)),
                                        dirichlet(5)),
        "many-128d": GaussianMixture(normal(32, 128), torch.full((32,), 0.1), zipf(32)),
        "sharp-256d": GaussianMixture(normal(3, 256), torch.full((3,), 1e-3), dirichlet(3)),
        "broad-256d": GaussianMixture(0.3 * normal(2, 256), torch.full((2,), 0.9), dirichlet(2)),
    }


@dataclass
class FamilyRow:
    """One sampler on one law of the family at one NFE budget (``nfe``: the budget; ``calls``: denoiser calls
    made)."""

    sampler: str
    law: str
    path: str
    nfe: int
    calls: int
    steps: int
    sw2: float
    sw2_floor: float

    @property
    def sw2_excess(self) -> float:
        return self.sw2 - self.sw2_floor


@dataclass
class FamilyReport:
    """Rows of ``measure_law_family``; ``builtins``: the samplers that are diffusers' own (the yardstick)."""

    rows: list[FamilyRow]
    builtins: list[str]

    def ratios(self, sampler: str, nfe: int, reference: str | None = None) -> dict[tuple[str, str], float]:
        """Per (law, path): the sampler's excess sliced W2 over the noise floor divided by that of ``reference``
        (``None``: the best built-in on that law, path and budget)."""
        ratios = {}
        for row in self.rows:
            if row.sampler != sampler or row.nfe != nfe:
                continue
            peers = [r for r in self.rows if (r.law, r.path, r.nfe) == (row.law, row.path, nfe)
                     and (r.sampler == reference if reference else r.sampler in self.builtins)]
            if peers:
                ratios[row.law, row.path] = row.sw2_excess / min(r.sw2_excess for r in peers)
        return ratios

    def summary(self, reference: str | None = None) -> list[tuple[str, str, int, float, float]]:
        """``(sampler, path, nfe, median ratio, worst ratio)`` over the family (see ``ratios``)."""
        lines = []
        for sampler in dict.fromkeys(r.sampler for r in self.rows):
            path = next(r.path for r in self.rows if r.sampler == sampler)
            for nfe in sorted({r.nfe for r in self.rows}):
                values = list(self.ratios(sampler, nfe, reference).values())
                if values:
                    lines.append((sampler, path, nfe, statistics.median(values), max(values)))
        return lines

    def summary_table(self, reference: str | None = None) -> str:
        against = reference or "the best built-in"
        header = f"{'sampler':<34}{'path':>5}{'NFE':>5}{'median':>9}{'worst':>9}"
        lines = [f"excess sliced W2 over the noise floor, as a ratio to {against} on each of the "
                 f"{len({r.law for r in self.rows})} laws (under the sampler's noise path); below 1: better", header,
                 "-" * len(header)]
        for sampler, path, nfe, median, worst in self.summary(reference):
            mark = "  (built-in)" if sampler in self.builtins else ""
            lines.append(f"{sampler:<34}{path:>5}{nfe:>5}{median:>9.2f}{worst:>9.2f}{mark}")
        return "\n".join(lines)

    def table(self) -> str:
        header = f"{'sampler':<34}{'law':<14}{'path':>5}{'NFE':>5}{'calls':>6}{'SW2':>9}{'floor':>9}{'excess':>9}"
        lines = [header, "-" * len(header)]
        for r in self.rows:
            lines.append(f"{r.sampler:<34}{r.law:<14}{r.path:>5}{r.nfe:>5}{r.calls:>6}{r.sw2:>9.4f}"
                         f"{r.sw2_floor:>9.4f}{r.sw2_excess:>9.4f}")
        return "\n".join(lines)

    def write_csv(self, path: str | Path) -> None:
        with open(path, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=[*asdict(self.rows[0]), "sw2_excess"])
            writer.writeheader()
            writer.writerows({**asdict(r), "sw2_excess": r.sw2_excess} for r in self.rows)


def measure_law_family(
    samplers: Mapping[str, object],
    laws: Mapping[str, GaussianMixture] | None = None,
    nfes: Iterable[int] = (5, 10),
    num_samples: int = 4096,
    seed: int = 0,
    progress: bool = True,
) -> FamilyReport:
    """Sample every law of ``laws`` (default: ``law_family()``) with every sampler at every NFE budget, from the
    same noise, and measure the excess sliced W2 over the noise floor.

    A sampler is a scheduler class (built from SD 1.x's config, or SD3's for flow matching) or a configured
    instance; it runs on the laws under its own noise path (VP or rectified flow). diffusers' scheduler classes,
    given as classes (so with their defaults), are the built-ins: the yardstick of ``FamilyReport.ratios``.
    """
    laws = dict(laws or law_family())
    nfes = sorted(nfes)
    schedulers = {}
    for name, spec in samplers.items():
        schedulers[name] = scheduler_from_pipeline_config(spec)[0] if isinstance(spec, type) else spec
    report = FamilyReport(rows=[], builtins=[n for n, spec in samplers.items()
                                             if isinstance(spec, type) and spec.__module__.startswith("diffusers.")])
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        jobs = [(law_name, name) for law_name in laws for name in schedulers]
        yardsticks = {}
        for law_name, name in tqdm(jobs, desc="law family", disable=not progress):
            law, scheduler = laws[law_name], schedulers[name]
            path = noise_path_from_scheduler_config(scheduler.config)
            pipe = _sampling_pipeline(law, scheduler)
            if (law_name, path) not in yardsticks:
                yardsticks[law_name, path] = law_yardstick(law, pipe.unet.sample_shape, num_samples, seed)
            yardstick = yardsticks[law_name, path]
            for nfe in nfes:
                steps, calls = steps_for_budget(pipe, nfe)
                samples = pipe(batch_size=num_samples, num_inference_steps=steps, latents=yardstick.noise.clone(),
                               generator=torch.Generator().manual_seed(seed + 3)).samples
                report.rows.append(FamilyRow(sampler=name, law=law_name, path=path, nfe=nfe, calls=calls, steps=steps,
                                             sw2=yardstick.distance_to_law(samples), sw2_floor=yardstick.floor))
    finally:
        logging.set_verbosity(verbosity)
    return report
