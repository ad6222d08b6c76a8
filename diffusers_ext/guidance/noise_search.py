"""Noise search: inference-time scaling by searching the starting noise, or the sampling path, with a verifier."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from diffusers.configuration_utils import register_to_config
from diffusers.utils import BaseOutput

from ..diffusion_math import per_sample
from .steering import (
    DenoisingStep,
    Reward,
    SteeringMethod,
    check_callable,
    check_positive_int,
    check_reward_space,
    derived_generator,
    particle_groups,
    reindex_batch_state,
)

MODES = ("random", "zero_order", "paths")


@dataclass
class NoiseSearchOutput(BaseOutput):
    """What ``NoiseSearch.search`` found, per batch element (per group of ``budget`` particles in ``"paths"`` mode).

    Args:
        output: the pipeline's own output made of the best sample found for each element.
        latents: the starting noise (the pipeline's ``latents=``) that produced each best sample; ``None`` in
            ``"paths"`` mode, where no single noise determines the result.
        rewards: ``(B,)`` verifier scores of the returned samples.
        reward_history: ``(runs, B)``, the verifier score of every sampling run in the order they ran; in ``"paths"``
            mode ``(budget, groups)``, the scores of each group's final particles, best first.
        nfe: denoiser evaluations spent per returned sample.
    """

    output: Any
    latents: torch.Tensor | None
    rewards: torch.Tensor
    reward_history: torch.Tensor
    nfe: int


def combine_rows(sources: list, picks: list[tuple[int, int]]) -> Any:
    """A pipeline output whose row ``i`` is row ``picks[i][1]`` of ``sources[picks[i][0]]``, field by field (tensors,
    arrays and lists of images; fields that are not per-sample, such as ``None``, are taken from the first source)."""
    first = sources[0]
    if dataclasses.is_dataclass(first) and not isinstance(first, type):
        return type(first)(**{
            field.name: combine_rows([getattr(source, field.name) for source in sources], picks)
            for field in dataclasses.fields(first)
        })
    if isinstance(first, tuple):
        return tuple(combine_rows(list(values), picks) for values in zip(*sources, strict=True))
    if isinstance(first, torch.Tensor) and first.ndim > 0:
        return torch.stack([sources[source][row] for source, row in picks])
    if isinstance(first, np.ndarray) and first.ndim > 0:
        return np.stack([sources[source][row] for source, row in picks])
    if isinstance(first, list):
        return [sources[source][row] for source, row in picks]
    return first


def keep_better(best: tuple, candidate: tuple) -> tuple:
    """Per batch row, ``candidate``'s ``(output, starting noise, rewards)`` where its reward is higher, else
    ``best``'s (ties keep ``best``)."""
    (best_output, best_noise, best_rewards), (output, noise, rewards) = best, candidate
    better = rewards > best_rewards
    mask = per_sample(better, noise, torch.bool)
    return (combine_rows([best_output, output], [(int(b), row) for row, b in enumerate(better)]),
            torch.where(mask, noise, best_noise), torch.where(better, rewards, best_rewards))


class NoiseSearch(SteeringMethod):
    r"""Inference-time scaling beyond denoising steps: spend a compute budget searching for the sampling noise that a
    verifier (any reward, higher is better) scores best.

    Paper: *Inference-Time Scaling for Diffusion Models beyond Scaling Denoising Steps*, Ma et al., arXiv 2501.09732.

    The budget is counted in full sampling runs: ``budget`` runs of ``T`` denoising steps cost ``budget * T`` denoiser
    evaluations (NFE) per returned sample in every mode. With ``r(n)`` the verifier's score of the sample the
    pipeline's deterministic sampler (DDIM, an ODE solver, the flow ODE) makes from starting noise ``n``
    (``lambda`` is ``neighborhood``, ``M`` is ``num_neighbors``, ``N`` is ``num_paths``):

        random:      n_1, ..., n_budget ~ N(0, I) independently;  return argmax_i r(n_i)
        zero_order:  pivot p = n_1;  each round draws M neighbours
                         n' = sqrt(1 - lambda^2) p + lambda z,    z ~ N(0, I)     (n' ~ N(0, I) when p is)
                     and moves p to the best of them when r(n') > r(p); rounds run until the budget is spent;
                     return p (always the best noise seen)
        paths:       the batch holds budget = N * (budget / N) particles per prompt. At step 0 the first N starting
                     noises are each copied budget / N times; every ``branch_every`` steps (but the last, which is
                     deterministic) the particles are scored on their x0 prediction, r(x0_hat(x_t)), the best N are
                     kept and each is copied budget / N times; the copies branch apart through the sampler's
                     stochastic step. After the last step each group is sorted by r(x0), best first.

    ``random`` and ``zero_order`` run in ``search(pipe, **pipeline_kwargs)``, which calls the stock pipeline
    ``budget`` times through its ``latents=`` argument (any pipeline that starts from noise and accepts ``latents``:
    Stable Diffusion, SD3, Flux, ...). The first run is the pipeline's own, from the ``generator`` passed, so
    ``budget=1`` returns exactly what the pipeline returns; further noise comes from the method's own generator,
    seeded by ``seed``. Each batch element is searched independently. These modes need a deterministic sampler for the
    noise to determine the sample (with a stochastic one the search is still best-of-N, but the returned ``latents``
    do not reproduce the sample). ``paths`` happens inside one pipeline call: attach the method and run the pipeline
    with ``num_images_per_prompt=budget`` (the first image of each group is the best), or call ``search``, which does
    that and returns each group's best. Branching needs a stochastic sampler: DDPM, DDIM with ``eta > 0``, SDE solvers
    on VP pipelines (``attach`` refuses deterministic schedulers such as PNDM, and a run at ``eta=0`` raises at its
    first step); flow pipelines are stepped by DDIM's step with ``eta = flow_eta > 0`` on the SNR-matched VP path
    (``diffusion_math.ddim_step``).

    Args:
        reward: the verifier, ``reward(images_or_samples) -> (B,)`` tensor, higher is better; images are decoded to
            ``[0, 1]`` when the pipeline has a VAE and ``reward_space="image"``.
        mode: ``"random"``, ``"zero_order"`` or ``"paths"``.
        budget: sampling runs per returned sample (``random``, ``zero_order``), or particles per prompt (``paths``).
        num_neighbors: ``M``, neighbours per zero-order round.
        neighborhood: ``lambda`` in ``(0, 1]``, the neighbours' distance from the pivot (``1`` is random search).
        num_paths: ``N``, paths kept at each branching of ``paths`` mode; must divide ``budget``.
        branch_every: in ``paths`` mode, score and branch every this many steps.
        flow_eta: stochasticity of the flow step in ``paths`` mode (the other modes follow the flow ODE).
        reward_space: ``"image"`` or ``"sample"`` (the verifier reads latents / samples directly).
        seed: seeds the searched noise and the stochastic flow steps, so a search is reproducible.
    """

    ignore_for_config = ["reward"]

    @register_to_config
    def __init__(
        self,
        *,
        reward: Reward | None = None,
        mode: str = "random",
        budget: int = 4,
        num_neighbors: int = 4,
        neighborhood: float = 0.5,
        num_paths: int = 2,
        branch_every: int = 5,
        flow_eta: float = 1.0,
        reward_space: str = "image",
        seed: int = 0,
    ):
        super().__init__()
        check_callable(reward, "NoiseSearch", "reward")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        check_positive_int(budget, "budget")
        check_positive_int(num_neighbors, "num_neighbors")
        check_positive_int(num_paths, "num_paths")
        check_positive_int(branch_every, "branch_every")
        if not 0 < neighborhood <= 1:
            raise ValueError(f"neighborhood (lambda) must lie in (0, 1], got {neighborhood!r}")
        if mode == "paths" and budget % num_paths:
            raise ValueError(f"in paths mode num_paths={num_paths} must divide budget={budget} (the particles)")
        if not flow_eta >= 0:
            raise ValueError(f"flow_eta must be non-negative, got {flow_eta!r}")
        check_reward_space(reward_space)
        self.reward = reward
        # Only path search steps flow models stochastically; noise search needs the deterministic map noise -> sample.
        self.flow_eta = flow_eta if mode == "paths" else None
        self.nfe = 0
        self.final_rewards: torch.Tensor | None = None

    @property
    def needs_stochastic_sampler(self) -> bool:
        """Path search branches copies through the sampler's noise; noise search needs none."""
        return self.config.mode == "paths"

    # Hooks: record a run (noise search) or branch and select particles (path search) ---------------------------

    def begin(self) -> None:
        self.nfe = 0
        self.final_rewards = None
        self._starting_noise = None

    def before_step(self, step: DenoisingStep) -> tuple[torch.Tensor, torch.Tensor]:
        self.nfe += self.config.budget if self.config.mode == "paths" else 1
        if step.index == 0:
            self._starting_noise = step.sample.clone()  # init_noise_sigma is 1 on every path steering accepts
        if self.config.mode != "paths" or step.index % self.config.branch_every or step.is_last:
            return step.model_output, step.sample
        k, n = self.config.budget, self.config.num_paths
        groups = particle_groups(step.sample.shape[0], k)
        if step.index == 0:
            keep = torch.arange(n).expand(groups, n)
        else:
            keep = self.score(self.reward, step.x0).reshape(groups, k).topk(n, dim=1).indices
        index = (keep.repeat_interleave(k // n, dim=1) + k * torch.arange(groups)[:, None]).reshape(-1)
        reindex_batch_state(self.scheduler, index, step.sample.shape)
        index = index.to(step.sample.device)
        return step.model_output[index], step.sample[index]

    def after_step(self, step: DenoisingStep, prev_sample: torch.Tensor) -> torch.Tensor:
        if not step.is_last:
            return prev_sample
        rewards = self.score(self.reward, prev_sample)
        if self.config.mode == "paths":
            k = self.config.budget
            groups = particle_groups(prev_sample.shape[0], k)
            order = rewards.reshape(groups, k).argsort(dim=1, descending=True, stable=True)
            index = (order + k * torch.arange(groups)[:, None]).reshape(-1)
            rewards, prev_sample = rewards[index], prev_sample[index.to(prev_sample.device)]
        self.final_rewards = rewards
        return prev_sample

    # Noise search ---------------------------------------------------------------------------------------------

    def _rounds(self) -> list[int]:
        """Sampling runs per round: one each for random search; the pivot, then rounds of neighbours."""
        budget = self.config.budget
        if self.config.mode == "random":
            return [1] * budget
        full, partial = divmod(budget - 1, self.config.num_neighbors)
        return [1] + [self.config.num_neighbors] * full + ([partial] if partial else [])

    def _run(self, pipe: Any, latents: torch.Tensor | None, pipeline_kwargs: dict) -> Any:
        output = pipe(**pipeline_kwargs, latents=latents)
        if self.final_rewards is None:
            raise RuntimeError("the pipeline run ended before its last denoising step; nothing to score")
        return output

    def _draw(self, pivot: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Fresh noise (random search) or a neighbour of the pivot (zero-order search)."""
        z = torch.randn(pivot.shape, generator=generator, dtype=torch.float32).to(pivot)
        if self.config.mode == "random":
            return z
        lam = self.config.neighborhood
        return math.sqrt(1 - lam**2) * pivot + lam * z

    def search(self, pipe: Any, **pipeline_kwargs) -> NoiseSearchOutput:
        """Run the search on ``pipe`` called with ``pipeline_kwargs`` (as you would call it, without ``latents``) and
        return the best sample found for each batch element. The pipeline is left exactly as it was."""
        if "latents" in pipeline_kwargs:
            raise ValueError("NoiseSearch.search draws the starting noise itself; do not pass `latents`")
        with self.attached(pipe):
            if self.config.mode == "paths":
                return self._search_paths(pipe, pipeline_kwargs)
            generator = derived_generator(self.config.seed, 0x5EA4C4)
            best, history, nfe = None, [], 0
            rounds = self._rounds()
            with pipe.progress_bar(total=len(rounds)) as progress:
                for runs in rounds:
                    pivot = None if best is None else best[1]
                    for _ in range(runs):
                        latents = None if pivot is None else self._draw(pivot, generator)
                        found = (self._run(pipe, latents, pipeline_kwargs), self._starting_noise, self.final_rewards)
                        best = found if best is None else keep_better(best, found)
                        history.append(self.final_rewards)
                        nfe += self.nfe
                    progress.update()
        output, latents, rewards = best
        return NoiseSearchOutput(output=output, latents=latents, rewards=rewards, reward_history=torch.stack(history),
                                 nfe=nfe)

    def _search_paths(self, pipe: Any, pipeline_kwargs: dict) -> NoiseSearchOutput:
        output = self._run(pipe, None, pipeline_kwargs)
        k = self.config.budget
        rewards = self.final_rewards.reshape(-1, k)
        best = combine_rows([output], [(0, group * k) for group in range(rewards.shape[0])])
        return NoiseSearchOutput(output=best, latents=None, rewards=rewards[:, 0], reward_history=rewards.T,
                                 nfe=self.nfe)
