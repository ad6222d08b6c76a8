"""T-Stitch: a small denoiser for the first steps of the trajectory, the pipeline's own for the rest."""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from diffusers.configuration_utils import register_to_config
from diffusers.utils import BaseOutput

from ..guidance.steering import check_positive_int
from ..testing.gaussian_mixture import GaussianMixture
from .base import CallbackHook, DenoisingClock, SpeedHook, check_fraction, pipeline_denoiser
from .module_reuse import denoiser_sample, stream_key

InputMap = Callable[..., dict[str, Any]]


@dataclass
class StitchedOutput(BaseOutput):
    """The small denoiser's prediction, returned where the pipeline's denoiser would return ``sample``."""

    sample: torch.Tensor


def first_output(output: Any) -> torch.Tensor:
    """A denoiser's prediction: the tensor itself, the first element of a tuple or a ``BaseOutput``."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, tuple | list | BaseOutput):
        return output[0]
    raise TypeError(f"the small denoiser returned {type(output).__name__}; expected a tensor, a tuple or a BaseOutput")


def accepts(function: Callable, names: set[str]) -> bool:
    parameters = inspect.signature(function).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return True
    return names <= {p.name for p in parameters}


class TStitch(SpeedHook):
    r"""T-Stitch: the first ``fraction`` of the sampling trajectory is denoised by a small model, the rest by the
    pipeline's own (large) denoiser.

    Paper: *T-Stitch: Accelerating Sampling in Pre-Trained Diffusion Models with Trajectory Stitching*, Pan et al.,
    arXiv 2402.14167.

    Both models must share the latent space and the noise schedule (and predict the same target), as a small and a
    large model of one family do (DiT-S / DiT-XL, a distilled SD UNet / SD). Early, high-noise steps only fix the
    coarse layout, which the small model gets right; the paper finds about the first 40 % of the steps can go to a
    model 10x smaller with little loss. With the call at position ``i`` of the scheduler's ``timesteps`` (img2img
    runs count from where they start) and ``n`` timesteps:

        prediction_i = small(x_i, t_i, ...)   if i < round(fraction * n)
                       large(x_i, t_i, ...)   otherwise

    The small model is called with the large one's arguments by name; ``small_inputs`` maps them for a small model
    with another signature (a UNet for a DiT pipeline or the other way round):
    ``small_inputs(**large_arguments) -> small_keyword_arguments``. Its prediction (a tensor, a tuple's first element
    or ``BaseOutput.sample``) is returned as the large model returns it (``return_dict=False``: a tuple).
    ``fraction=0`` is the stock pipeline, ``fraction=1`` the small model alone.

    Args:
        small: the small denoiser (not saved with the settings: pass it to ``from_pretrained`` again).
        fraction: share of the trajectory's steps, from the start, that the small model denoises, in ``[0, 1]``.
        small_inputs: optional argument map, see above (not saved either).
    """

    ignore_for_config = ["small", "small_inputs"]

    @register_to_config
    def __init__(self, *, small: torch.nn.Module | Callable | None = None, fraction: float = 0.4,
                 small_inputs: InputMap | None = None):
        super().__init__()
        if small is None or not callable(small):
            raise ValueError(f"TStitch needs the small denoiser: a module (or callable) taking the pipeline "
                             f"denoiser's arguments, got {small!r}")
        check_fraction(fraction, "fraction")
        if small_inputs is not None and not callable(small_inputs):
            raise ValueError(f"small_inputs must be a callable mapping the denoiser's arguments to the small "
                             f"model's, got {small_inputs!r}")
        self.small, self.small_inputs = small, small_inputs
        self.calls = {"small": 0, "large": 0}

    def uses_small(self, schedule_index: int, schedule_length: int | None) -> bool:
        if schedule_length is None:
            return False
        # Half-up rounding, so that fractions of round numbers of steps switch where written (0.4 of 5 steps: 2).
        return schedule_index < math.floor(self.config.fraction * schedule_length + 0.5)

    def _install(self, pipeline: Any) -> None:
        _, large = pipeline_denoiser(pipeline, type(self).__name__)
        signature = inspect.signature(large.forward)
        small_forward = self.small.forward if isinstance(self.small, torch.nn.Module) else self.small
        if self.small_inputs is None and not accepts(small_forward, set(signature.parameters)):
            raise ValueError(
                f"the small denoiser ({type(self.small).__name__}) does not take the arguments of the pipeline's "
                f"{type(large).__name__} ({list(signature.parameters)}); pass small_inputs=..., a function mapping "
                "them to the small model's keyword arguments"
            )
        clock = DenoisingClock(pipeline)

        def forward(original, module, *args, **kwargs):
            reading = clock.read(stream_key(hook.context_name, denoiser_sample(args, kwargs)))
            if not self.uses_small(reading.schedule_index, reading.schedule_length):
                self.calls["large"] += 1
                return original(*args, **kwargs)
            self.calls["small"] += 1
            arguments = signature.bind(*args, **kwargs).arguments
            return_dict = arguments.get("return_dict", True)  # diffusers models' default
            if self.small_inputs is not None:
                prediction = first_output(self.small(**self.small_inputs(**arguments)))
            else:
                prediction = first_output(self.small(**arguments))
            sample = denoiser_sample(args, kwargs)
            if sample is not None:  # the large model's dtype, for mixed-precision pairs
                prediction = prediction.to(sample.dtype)
            return StitchedOutput(sample=prediction) if return_dict else (prediction,)

        hook = CallbackHook(new_forward=forward)
        self._register_hook(large, hook)


def coarsened_mixture(law: GaussianMixture, num_components: int) -> GaussianMixture:
    """A coarser law for T-Stitch's exact "small model": ``law`` with its components merged, the closest pair first
    (Ward's cost ``w_a w_b / (w_a + w_b) |mu_a - mu_b|^2``), until ``num_components`` remain. A merge keeps the pair's
    weight, mean and covariance (moment matching):

        w = w_a + w_b,   mu = (w_a mu_a + w_b mu_b) / w,
        Sigma = sum_{k in a, b} w_k (Sigma_k + (mu_k - mu)(mu_k - mu)^T) / w

    so the coarse law has the fine law's mean and covariance; its exact denoiser agrees with the fine one where the
    noise hides the merged detail (high noise) and not below."""
    check_positive_int(num_components, "num_components")
    if num_components > law.num_components:
        raise ValueError(f"num_components must be at most the law's {law.num_components}, got {num_components}")
    weights = list(law.weights)
    means = list(law.means)
    covariances = list(law.covariances)
    while len(weights) > num_components:
        pairs = [(a, b) for a in range(len(weights)) for b in range(a + 1, len(weights))]
        a, b = min(pairs, key=lambda p: float(weights[p[0]] * weights[p[1]] / (weights[p[0]] + weights[p[1]])
                                             * (means[p[0]] - means[p[1]]).pow(2).sum()))
        weight = weights[a] + weights[b]
        mean = (weights[a] * means[a] + weights[b] * means[b]) / weight
        covariance = sum(weights[k] * (covariances[k] + torch.outer(means[k] - mean, means[k] - mean))
                         for k in (a, b)) / weight
        for k in (b, a):
            del weights[k], means[k], covariances[k]
        weights.append(weight)
        means.append(mean)
        covariances.append(covariance)
    return GaussianMixture(torch.stack(means), torch.stack(covariances), torch.stack(weights))
