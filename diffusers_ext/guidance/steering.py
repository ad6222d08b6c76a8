"""The machine every steering method plugs into: it attaches to a stock diffusers pipeline without copying its
``__call__``, shows each method the scheduler step (model output, timestep, sample and the x0 prediction), and
detaches leaving the pipeline exactly as it was.

How it attaches (public diffusers APIs only):

- ``pipe.scheduler`` is replaced by a ``SteeredScheduler`` (a ``diffusers_ext.scheduler_proxy.SchedulerProxy``) that
  forwards everything to the original scheduler but runs the method around ``step``; detaching takes it out again,
  restoring the object and ``model_index``.
- Methods that call the denoiser themselves (gradients through it, scoring candidates) record the pipeline's last
  denoiser call with a removable torch forward pre-hook, and re-run it on their own samples, combining the
  classifier-free-guidance halves with ``pipe.guidance_scale`` as the pipeline does.
- The batch is the set of particles: ``num_images_per_prompt=K`` gives consecutive groups of ``K`` per prompt.

x0 predictions come from ``diffusers_ext.diffusion_math`` for VP (DDPM family) and rectified-flow schedulers alike.
"""

from __future__ import annotations

import copy
import inspect
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..diffusion_math import (
    alpha_sigma_function,
    ddim_step,
    default_prediction_type,
    noise_path_from_scheduler_config,
    x0_and_eps_from_prediction,
)
from ..method_settings import MethodSettingsMixin
from ..scheduler_proxy import (
    SchedulerProxy,
    install_scheduler_proxy,
    plain_scheduler,
    proxies_of,
    remove_scheduler_proxy,
    with_prev_sample,
)

Reward = Callable[[torch.Tensor], torch.Tensor]  # higher is better
Loss = Callable[[torch.Tensor], torch.Tensor]  # lower is better
DENOISER_NAMES = ("unet", "transformer")


@dataclass
class DenoisingStep:
    """One scheduler step as a steering method sees it.

    ``x = alpha x0 + sigma eps`` at ``timestep``; ``alpha`` and ``sigma`` are float64 scalars.
    """

    index: int
    timestep: torch.Tensor
    sample: torch.Tensor
    model_output: torch.Tensor
    alpha: torch.Tensor
    sigma: torch.Tensor
    prediction_type: str
    is_last: bool

    def x0_and_eps(self, model_output: torch.Tensor | None = None, sample: torch.Tensor | None = None):
        """``(x0_hat, eps_hat)`` from this step's (or the given) model output and sample, in the sample's dtype."""
        model_output = self.model_output if model_output is None else model_output
        sample = self.sample if sample is None else sample
        alpha, sigma = (v.to(sample.dtype) for v in (self.alpha, self.sigma))
        return x0_and_eps_from_prediction(model_output, sample, alpha, sigma, self.prediction_type)

    @property
    def x0(self) -> torch.Tensor:
        return self.x0_and_eps()[0]


def check_reward_values(values: Any, batch: int, name: str = "reward") -> torch.Tensor:
    """A reward's output as a float tensor of shape ``(batch,)``, or a ``ValueError`` saying what is wrong."""
    if not isinstance(values, torch.Tensor):
        raise ValueError(f"{name} must return a torch.Tensor of shape ({batch},), got {type(values).__name__}")
    if values.shape != (batch,):
        raise ValueError(f"{name} must return one value per sample, shape ({batch},); got {tuple(values.shape)}")
    if not torch.isfinite(values).all():
        raise ValueError(f"{name} returned non-finite values (NaN or inf): {values.tolist()}")
    return values.float()


def reindex_batch_state(scheduler: Any, index: torch.Tensor, sample_shape: torch.Size) -> None:
    """Reorder a scheduler's per-sample history (multistep solvers keep past model outputs and samples) so it follows
    resampled particles: every tensor of the sample's shape, alone or in a list, is indexed along the batch."""
    for name, value in vars(scheduler).items():
        if isinstance(value, torch.Tensor) and value.shape == sample_shape:
            setattr(scheduler, name, value[index.to(value.device)])
        elif isinstance(value, list) and any(isinstance(v, torch.Tensor) and v.shape == sample_shape for v in value):
            setattr(scheduler, name, [
                v[index.to(v.device)] if isinstance(v, torch.Tensor) and v.shape == sample_shape else v for v in value
            ])


def step_can_add_noise(scheduler: Any) -> bool:
    """Whether ``scheduler.step`` can be stochastic: one step of a copy (``eta=1`` where the step takes an ``eta``) on
    two identical rows, which a stochastic step sends apart. The copy and a forked RNG leave the scheduler and the
    global random state untouched."""
    probe = copy.deepcopy(plain_scheduler(scheduler))
    probe.set_timesteps(10)
    parameters = inspect.signature(probe.step).parameters
    with torch.random.fork_rng(devices=[]):
        generator = torch.Generator().manual_seed(0)
        sample, model_output = (row.expand(2, -1, -1, -1) for row in torch.randn(2, 1, 4, 4, 4, generator=generator))
        kwargs = {"eta": 1.0} if "eta" in parameters else {}
        if "generator" in parameters:
            kwargs["generator"] = generator
        prev_sample = probe.step(model_output.clone(), probe.timesteps[0], sample.clone(), **kwargs)[0]
    return not torch.equal(prev_sample[0], prev_sample[1])


class DenoiserCall:
    """Records the pipeline's latest denoiser call (a removable torch forward pre-hook) and re-runs it on other
    samples or timesteps, combining classifier-free-guidance halves like the pipeline."""

    def __init__(self, pipeline: Any):
        self.pipeline = pipeline
        name = next((n for n in DENOISER_NAMES if getattr(pipeline, n, None) is not None), None)
        if name is None:
            raise ValueError(
                f"{type(pipeline).__name__} has no denoiser to re-run (looked for {DENOISER_NAMES}); this method "
                "needs one"
            )
        self.denoiser = getattr(pipeline, name)
        self.args: tuple = ()
        self.kwargs: dict = {}
        self._replaying = False
        self._time_scale = 1.0
        self._handle = self.denoiser.register_forward_pre_hook(self._record, with_kwargs=True)

    def _record(self, module, args, kwargs):
        if not self._replaying:
            self.args, self.kwargs = args, kwargs

    def remove(self) -> None:
        self._handle.remove()

    def _sample_slot(self) -> tuple[str | int, torch.Tensor]:
        for key in ("sample", "hidden_states"):
            if key in self.kwargs:
                return key, self.kwargs[key]
        if self.args:
            return 0, self.args[0]
        raise RuntimeError("the denoiser has not been called yet in this run")

    def _timestep_slot(self) -> tuple[str | int, Any]:
        if "timestep" in self.kwargs:
            return "timestep", self.kwargs["timestep"]
        if len(self.args) > 1:
            return 1, self.args[1]
        raise RuntimeError("could not find the timestep in the denoiser's recorded call")

    def __call__(self, sample: torch.Tensor, timestep: torch.Tensor, recorded_timestep: torch.Tensor) -> torch.Tensor:
        """The pipeline's (guided) prediction at ``sample`` and ``timestep``; ``recorded_timestep`` is the scheduler
        timestep of the recorded call, used to map ``timestep`` onto the denoiser's own scale (Flux divides by 1000).
        Differentiable when called under ``torch.enable_grad()``."""
        sample_key, recorded_sample = self._sample_slot()
        repeats, remainder = divmod(recorded_sample.shape[0], sample.shape[0])
        if remainder or repeats not in (1, 2):
            raise ValueError(
                f"cannot match a batch of {sample.shape[0]} samples to the denoiser's batch of "
                f"{recorded_sample.shape[0]} (expected the same, or twice that with classifier-free guidance)"
            )
        args, kwargs = list(self.args), dict(self.kwargs)
        model_input = torch.cat([sample] * repeats).to(recorded_sample.dtype)
        if isinstance(sample_key, int):
            args[sample_key] = model_input
        else:
            kwargs[sample_key] = model_input
        time_key, recorded_time = self._timestep_slot()
        recorded_time = torch.as_tensor(recorded_time)
        # The denoiser's timestep over the scheduler's (1, or 1/1000 for Flux), kept from a call where both are
        # non-zero: at the last DDPM step the recorded scheduler timestep is 0 and says nothing about the scale.
        if float(recorded_timestep) != 0:
            self._time_scale = float(recorded_time.reshape(-1)[0]) / float(recorded_timestep)
        mapped = torch.full_like(recorded_time, float(timestep) * self._time_scale, dtype=torch.float32)
        if recorded_time.dtype in (torch.int32, torch.int64) and float(timestep).is_integer():
            mapped = mapped.to(recorded_time.dtype)
        if isinstance(time_key, int):
            args[time_key] = mapped
        else:
            kwargs[time_key] = mapped
        self._replaying = True
        try:
            prediction = self.denoiser(*args, **kwargs)[0]
        finally:
            self._replaying = False
        if repeats == 2:
            unconditional, conditional = prediction.chunk(2)
            prediction = unconditional + self.pipeline.guidance_scale * (conditional - unconditional)
        return prediction.to(sample.dtype)


class SteeredScheduler(SchedulerProxy):
    """Stands in for a pipeline's scheduler while a steering method is attached: ``set_timesteps`` starts the method's
    run and ``step`` runs the method around the scheduler's own step."""

    own_attributes = SchedulerProxy.own_attributes | {"method", "step_signature"}

    def __init__(self, scheduler: Any, method: SteeringMethod):
        super().__init__(scheduler)
        self.method = method
        self.step_signature = inspect.signature(scheduler.step)

    def begin_run(self) -> None:
        self.method._begin_run()

    def wrapped_step(self, *args, **kwargs):
        bound = self.step_signature.bind(*args, **kwargs)
        if self.method.step_index == 0:
            self.method._check_step_is_stochastic(bound)
        model_output, timestep, sample = (bound.arguments[k] for k in ("model_output", "timestep", "sample"))
        step = self.method._describe_step(timestep, sample, model_output)
        bound.arguments["model_output"], bound.arguments["sample"] = self.method.before_step(step)
        output = self.scheduler.step(*bound.args, **bound.kwargs)
        prev_sample = self.method._propose(step, bound.arguments["model_output"], bound.arguments["sample"], output[0])
        return with_prev_sample(output, self.method.after_step(step, prev_sample))


class SteeringMethod(MethodSettingsMixin):
    """Base class of the steering methods: attach to a pipeline, override ``before_step`` / ``after_step``.

    Config (saved as ``steering_config.json``; rewards, losses and other callables are passed again when loading,
    ``Method.from_pretrained(folder, reward=...)``) holds the method's numbers. Subclass ``__init__`` arguments are
    keyword-only: diffusers' ``register_to_config`` would pair positional values with the wrong names when a
    callable is left out of the config. Subclasses set
    ``supported_noise_paths``, ``uses_denoiser`` (re-runs the denoiser: gradients or candidate scoring) and
    ``flow_eta`` (a stochastic step is needed on rectified-flow pipelines, whose stock schedulers are deterministic).
    Methods that branch particles through the sampler's noise set ``needs_stochastic_sampler``: on VP pipelines
    ``attach`` then refuses a scheduler whose step never adds noise (PNDM, DEIS, UniPC, DPM-Solver's ODE solvers), and
    a run whose step takes ``eta`` raises at its first step when it is 0 (DDIM's default), rather than returning
    identical copies; on flow pipelines ``flow_eta`` must be positive.
    """

    config_name = "steering_config.json"
    supported_noise_paths: tuple[str, ...] = ("vp", "flow")
    uses_denoiser = False
    needs_stochastic_sampler = False

    def __init__(self) -> None:
        self.pipeline = None
        self._proxy: SteeredScheduler | None = None
        self._denoiser_call: DenoiserCall | None = None
        self.generator: torch.Generator | None = None
        self.step_index = 0

    # Attaching --------------------------------------------------------------------------------------------------

    def attach(self, pipeline: Any) -> SteeringMethod:
        """Steer ``pipeline`` until ``detach()``. Raises ``ValueError`` for a pipeline family the method does not
        support."""
        if self.pipeline is not None:
            raise ValueError(f"{type(self).__name__} is already attached to a pipeline; detach it first")
        scheduler = getattr(pipeline, "scheduler", None)
        if scheduler is None or not hasattr(scheduler, "step"):
            raise ValueError(f"{type(pipeline).__name__} has no scheduler to steer")
        if any(isinstance(proxy, SteeredScheduler) for proxy in proxies_of(scheduler)):
            raise ValueError("this pipeline is already steered; detach the other method first")
        path = noise_path_from_scheduler_config(scheduler.config)
        if path not in self.supported_noise_paths:
            raise ValueError(
                f"{type(self).__name__} supports {self.supported_noise_paths} pipelines; "
                f"{type(pipeline).__name__} with {type(scheduler).__name__} is a {path!r} pipeline"
            )
        if path == "vp" and float(getattr(scheduler, "init_noise_sigma", 1.0)) != 1.0:
            raise ValueError(
                f"{type(scheduler).__name__} works on sigma-scaled samples (k-diffusion style, init_noise_sigma="
                f"{float(scheduler.init_noise_sigma):.3g}); steering needs a scheduler on the VP sample scale "
                "(DDPM, DDIM, DPM-Solver, UniPC, DEIS, ER-SDE, ...)"
            )
        if self.needs_stochastic_sampler and path == "flow" and not self.flow_eta:
            raise ValueError(f"{type(self).__name__} branches particles through the flow step's noise: flow_eta must be "
                             f"positive, got {self.flow_eta!r}")
        if self.needs_stochastic_sampler and path == "vp" and not step_can_add_noise(scheduler):
            raise ValueError(
                f"{type(self).__name__} needs a stochastic sampler: copies of a particle would stay identical "
                f"under {type(scheduler).__name__}'s deterministic step. Swap in one that adds noise, e.g. "
                "pipe.scheduler = DDPMScheduler.from_config(pipe.scheduler.config), or DDIMScheduler.from_config(...) "
                "and pipe(..., eta=1.0)"
            )
        if path == "flow" and self.flow_eta and not (hasattr(scheduler, "sigmas") and hasattr(scheduler, "step_index")):
            raise ValueError(f"{type(self).__name__} needs a flow scheduler exposing `sigmas` and `step_index`")
        if path == "flow" and self.flow_eta and getattr(scheduler, "order", 1) != 1:
            raise ValueError(f"{type(self).__name__} steps flow models itself and needs a one-call-per-step scheduler")
        self.noise_path = path
        self._alpha_sigma = alpha_sigma_function(scheduler.config)
        self._prediction_type = default_prediction_type(scheduler.config)
        if self.uses_denoiser:
            self._denoiser_call = DenoiserCall(pipeline)
        self.pipeline = pipeline
        self._proxy = install_scheduler_proxy(pipeline, lambda wrapped: SteeredScheduler(wrapped, self))
        return self

    def detach(self) -> None:
        """Give the pipeline its scheduler back and remove every hook."""
        if self.pipeline is None:
            return
        remove_scheduler_proxy(self.pipeline, self._proxy)
        if self._denoiser_call is not None:
            self._denoiser_call.remove()
        self.pipeline = self._proxy = self._denoiser_call = None

    @contextmanager
    def attached(self, pipeline: Any) -> Iterator[SteeringMethod]:
        """``with method.attached(pipe): images = pipe(...).images``"""
        self.attach(pipeline)
        try:
            yield self
        finally:
            self.detach()

    # What methods override -------------------------------------------------------------------------------------

    def begin(self) -> None:
        """A pipeline run starts (``set_timesteps`` was called): reset per-run state."""

    def before_step(self, step: DenoisingStep) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``(model_output, sample)`` the scheduler steps with."""
        return step.model_output, step.sample

    def after_step(self, step: DenoisingStep, prev_sample: torch.Tensor) -> torch.Tensor:
        """The sample the pipeline continues from."""
        return prev_sample

    # Shared services ------------------------------------------------------------------------------------------

    flow_eta: float | None = None

    @property
    def scheduler(self) -> Any:
        """The scheduler the method's proxy wraps (``None`` while detached)."""
        return None if self._proxy is None else self._proxy.scheduler

    def _begin_run(self) -> None:
        self.step_index = 0
        self.generator = None
        self.begin()

    def _check_step_is_stochastic(self, bound: inspect.BoundArguments) -> None:
        """A run's first step: a step that takes ``eta`` (DDIM, TCD) is deterministic at ``eta=0``."""
        if not self.needs_stochastic_sampler or self.noise_path != "vp":
            return
        parameter = bound.signature.parameters.get("eta")
        eta = bound.arguments.get("eta", parameter.default if parameter is not None else None)
        if eta == 0:
            raise ValueError(
                f"{type(self).__name__} needs a stochastic sampler, but {type(self.scheduler).__name__} is stepping with "
                "eta=0, a deterministic step under which copies of a particle stay identical; pass eta=1.0 to the "
                "pipeline (pipe(..., eta=1.0))"
            )

    def _describe_step(self, timestep, sample, model_output) -> DenoisingStep:
        if self.step_index == 0 and "seed" in self.config:
            self.generator = run_generator(self.config.seed, sample)
        alpha, sigma = self.alpha_sigma(timestep)
        timesteps = self.scheduler.timesteps
        is_last = bool(torch.as_tensor(timestep).to(timesteps.device) == timesteps[-1])
        step = DenoisingStep(self.step_index, torch.as_tensor(timestep), sample, model_output, alpha, sigma,
                             self._prediction_type, is_last)
        self.step_index += 1
        return step

    def alpha_sigma(self, timestep) -> tuple[torch.Tensor, torch.Tensor]:
        """``(alpha_t, sigma_t)`` of the attached pipeline's noise path, float64."""
        return self._alpha_sigma(torch.as_tensor(timestep).detach().cpu().reshape(-1)[0])

    def randn_like(self, sample: torch.Tensor) -> torch.Tensor:
        """Noise from the method's own seeded generator (same seed, same output)."""
        return torch.randn(sample.shape, generator=self.generator, dtype=torch.float32).to(sample)

    def next_flow_alpha_sigma(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(alpha, sigma)`` of the flow scheduler's next noise level, read after its ``step`` advanced."""
        scheduler = self.scheduler
        sigma = scheduler.sigmas[min(scheduler.step_index, len(scheduler.sigmas) - 1)].double().cpu()
        return 1 - sigma, sigma

    def stochastic_flow_step(self, step: DenoisingStep, model_output, sample, noise: torch.Tensor) -> torch.Tensor:
        """The flow ODE step replaced by DDIM's step with ``eta = flow_eta`` (the VP-SDE of the same
        signal-to-noise ratio, see ``diffusion_math.ddim_step``)."""
        x0, eps = step.x0_and_eps(model_output, sample)
        alpha_next, sigma_next = (v.to(sample.dtype) for v in self.next_flow_alpha_sigma())
        alpha, sigma = step.alpha.to(sample.dtype), step.sigma.to(sample.dtype)
        return ddim_step(x0, eps, alpha, sigma, alpha_next, sigma_next, self.flow_eta, noise)

    def _propose(self, step: DenoisingStep, model_output, sample, prev_sample: torch.Tensor) -> torch.Tensor:
        if self.noise_path == "flow" and self.flow_eta:
            return self.stochastic_flow_step(step, model_output, sample, self.randn_like(sample))
        return prev_sample

    def denoise(self, sample: torch.Tensor, timestep, step: DenoisingStep) -> torch.Tensor:
        """The pipeline's model prediction at ``sample`` and ``timestep``, reusing the conditioning of ``step``'s
        model call; differentiable under ``torch.enable_grad()``."""
        if self._denoiser_call is None:
            raise RuntimeError(f"{type(self).__name__} does not re-run the denoiser (uses_denoiser is False)")
        return self._denoiser_call(sample, torch.as_tensor(timestep), step.timestep)

    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        """What rewards see: images in ``[0, 1]`` decoded by the pipeline's VAE when it has one and
        ``reward_space == "image"``, else ``x0`` itself (pixel and oracle pipelines, latent-space rewards)."""
        vae = getattr(self.pipeline, "vae", None)
        if vae is None or self.config.get("reward_space", "image") == "sample":
            return x0
        if x0.ndim != 4:
            raise ValueError(
                f"image rewards need 4-D latents (B, C, H, W), got {tuple(x0.shape)} (packed latents such as "
                "Flux's); pass reward_space='sample' and a reward on latents"
            )
        latents = x0 / vae.config.scaling_factor + (getattr(vae.config, "shift_factor", None) or 0.0)
        images = vae.decode(latents.to(vae.dtype), return_dict=False)[0]
        return (images.float() / 2 + 0.5).clamp(0, 1)

    def score(self, reward: Reward, x0: torch.Tensor, name: str = "reward") -> torch.Tensor:
        """``reward(decode(x0))`` checked for shape and finiteness."""
        return check_reward_values(reward(self.decode(x0)), x0.shape[0], name)


REWARD_SPACES = ("image", "sample")


def check_non_negative(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
        raise ValueError(f"{name} must be a non-negative number, got {value!r}")
    return float(value)


def check_reward_space(reward_space: str) -> str:
    if reward_space not in REWARD_SPACES:
        raise ValueError(f"reward_space must be one of {REWARD_SPACES}, got {reward_space!r}")
    return reward_space


def check_guidance_range(start: float, end: float) -> None:
    if not 0 <= start < end <= 1:
        raise ValueError(f"need 0 <= guidance_start < guidance_end <= 1, got {start!r} and {end!r}")


def gradient_of_sum(
    values: torch.Tensor, inputs: torch.Tensor | tuple[torch.Tensor, ...], name: str = "loss"
) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """``grad_inputs sum(values)`` (a tuple of gradients for a tuple of inputs, from one backward pass), or a
    ``ValueError`` when ``values`` do not depend differentiably on ``inputs``."""
    if not values.requires_grad:
        raise ValueError(
            f"the {name} is not differentiable with respect to the sample (its output carries no gradient); gradient "
            f"guidance needs a differentiable {name} (torch operations, no .detach(), numpy or PIL)"
        )
    gradients = torch.autograd.grad(values.sum(), inputs)
    return gradients if isinstance(inputs, tuple) else gradients[0]


def step_position(scheduler: Any, step: DenoisingStep) -> tuple[int, int]:
    """``(position, count)`` of ``step`` in the scheduler's timesteps, found by its timestep so that runs starting
    part-way (img2img's ``strength``) count from the schedule's start; the step counter when it is not found."""
    timesteps = torch.as_tensor(scheduler.timesteps).detach().cpu()
    matches = (timesteps == torch.as_tensor(step.timestep).detach().cpu().reshape(-1)[0]).nonzero()
    return (int(matches[0, 0]) if len(matches) else step.index), len(timesteps)


def in_guidance_range(scheduler: Any, step: DenoisingStep, start: float, end: float) -> bool:
    position, count = step_position(scheduler, step)
    return start <= position / count < end


def derived_generator(seed: int, *entropy: int) -> torch.Generator:
    """A generator for a method's own noise, derived from ``seed`` and ``entropy`` by ``numpy.random.SeedSequence``.
    Seeding with ``seed`` itself would replay the stream of a user's ``torch.Generator().manual_seed(seed)``."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, *entropy]).generate_state(1)[0]))


def run_generator(seed: int, first_sample: torch.Tensor) -> torch.Generator:
    """The generator of a method's noise in one pipeline run, derived from the method's ``seed`` and the run's first
    sample: a stochastic flow step from pure noise keeps nothing of ``x_T``, so without the sample the pipeline's own
    ``generator`` would not change the output."""
    checksum = zlib.crc32(first_sample.detach().float().cpu().numpy().tobytes())
    return derived_generator(seed, checksum)


def check_callable(value: Any, owner: str, role: str) -> Callable:
    """``value`` if it is callable, else a ``ValueError`` saying ``owner`` needs a ``role`` (reward or loss)."""
    if value is None or not callable(value):
        better = "higher" if role == "reward" else "lower"
        raise ValueError(
            f"{owner} needs a {role}: a callable mapping a batch to a (B,) tensor, {better} is better; got {value!r}"
        )
    return value


def check_positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def particle_groups(batch: int, num_particles: int) -> int:
    """How many groups of ``num_particles`` consecutive samples a batch holds (``num_images_per_prompt`` layout)."""
    if batch % num_particles:
        raise ValueError(
            f"the batch of {batch} samples does not split into groups of num_particles={num_particles}; pass "
            f"num_images_per_prompt={num_particles} (or a batch size that is a multiple of it)"
        )
    return batch // num_particles
