"""Rollover budget forcing: a per-step search over stochastic flow steps, with unused compute rolled over."""

from __future__ import annotations

import torch
from diffusers.configuration_utils import register_to_config

from ..diffusion_math import x0_and_eps_from_prediction
from .steering import (
    DenoisingStep,
    Reward,
    SteeringMethod,
    check_callable,
    check_positive_int,
    check_reward_space,
)


class RolloverBudgetForcing(SteeringMethod):
    r"""Rollover budget forcing (RBF) on rectified-flow pipelines (SD3, Flux, ...): at every step, draw candidate next
    samples from a stochastic version of the flow sampler until one improves the verifier's score, within a compute
    budget whose unused part rolls over to the next step.

    Paper: *Inference-Time Scaling for Flow Models via Stochastic Generation and Rollover Budget Forcing*, Kim et al.,
    arXiv 2503.19385.

    Stochastic generation: the flow ODE step is replaced by DDIM's step with ``eta = flow_eta`` on the VP path of the
    same signal-to-noise ratio (the paper's VP-SDE conversion; ``diffusion_math.ddim_step``). From ``x_t`` with x0 and
    noise predictions ``(x0_hat, eps_hat)`` and next noise level ``(alpha', sigma') = (1 - sigma', sigma')``:

        candidate = alpha' x0_hat + sqrt(sigma'^2 - c^2) eps_hat + c z,     z ~ N(0, I)
        c         = flow_eta * sigma' * sqrt(1 - (rho' / rho)^2),            rho = sigma / alpha

    Budget forcing, per trajectory (each batch element is one, with its own accounting). ``budget`` is the total NFE
    per trajectory: the pipeline's own denoiser call at each of the ``T`` steps, plus ``C = budget - T`` candidate
    evaluations, split evenly over the ``S`` steps whose next noise level is above zero (step ``s`` gets
    ``q_s = floor((s + 1) C / S) - floor(s C / S)``). At such a step, with ``r = r(x0_hat(x_t))`` the current
    trajectory's score (read on the pipeline's own prediction, no extra NFE):

        allowance += q_s
        while allowance >= 1:
            draw a candidate (one batch-parallel round for every trajectory still searching)
            r_c = r(x0_hat(candidate))     x0_hat from one denoiser call at t' = sigma' * num_train_timesteps
            allowance -= 1
            if r_c > r: accept the candidate, stop            (the rest of the allowance rolls over)
        otherwise take the best candidate seen (the plain stochastic step when the allowance was below 1)

    The last step, to noise level 0, is deterministic and is taken as is. ``nfe`` records the denoiser evaluations
    each trajectory was charged (``T`` plus the candidates it drew; a round evaluates the whole batch, so trajectories
    that stopped searching are computed too but not charged), ``accepted_steps`` how many steps found a better
    candidate, ``final_rewards`` the score of the returned sample. With ``budget = T`` this is the plain stochastic
    sampler.

    Args:
        reward: the verifier, ``reward(images_or_samples) -> (B,)`` tensor, higher is better; images are decoded to
            ``[0, 1]`` when the pipeline has a VAE and ``reward_space="image"``.
        budget: total denoiser evaluations per trajectory, at least the number of denoising steps.
        flow_eta: stochasticity of the flow step (``1`` is the VP reverse SDE's ancestral step); positive.
        reward_space: ``"image"`` or ``"sample"`` (the verifier reads latents / samples directly).
        seed: seeds the stochastic steps, so a run is reproducible.
    """

    supported_noise_paths = ("flow",)
    uses_denoiser = True
    ignore_for_config = ["reward"]

    @register_to_config
    def __init__(
        self,
        *,
        reward: Reward | None = None,
        budget: int = 100,
        flow_eta: float = 1.0,
        reward_space: str = "image",
        seed: int = 0,
    ):
        super().__init__()
        check_callable(reward, "RolloverBudgetForcing", "reward")
        check_positive_int(budget, "budget")
        if not flow_eta > 0:
            raise ValueError(f"flow_eta must be positive (candidates differ only through the stochastic step), got "
                             f"{flow_eta!r}")
        check_reward_space(reward_space)
        self.reward = reward
        self.flow_eta = flow_eta
        self.nfe: torch.Tensor | None = None
        self.accepted_steps: torch.Tensor | None = None
        self.final_rewards: torch.Tensor | None = None

    def begin(self) -> None:
        self.nfe = self.accepted_steps = self.final_rewards = None
        self._quotas: list[int] = []
        self._allowance = None

    def _plan(self, batch: int) -> None:
        """Split the candidate budget over the stochastic steps left in this run (the scheduler has just stepped, so
        ``sigmas[step_index]`` is this step's next noise level)."""
        sigmas = self.scheduler.sigmas.detach().cpu()
        upcoming = sigmas[self.scheduler.step_index:]
        num_steps, num_stochastic = len(upcoming), int((upcoming > 0).sum())
        candidates = self.config.budget - num_steps
        if candidates < 0:
            raise ValueError(
                f"budget={self.config.budget} is below the {num_steps} denoiser calls the pipeline makes; pass a "
                f"budget of at least {num_steps} (= {num_steps} is the plain stochastic sampler)"
            )
        self._quotas = [(s + 1) * candidates // num_stochastic - s * candidates // num_stochastic
                        for s in range(num_stochastic)]
        self._allowance = torch.zeros(batch, dtype=torch.long)
        self.nfe = torch.zeros(batch, dtype=torch.long)
        self.accepted_steps = torch.zeros(batch, dtype=torch.long)

    def _score_candidate(self, candidate, step: DenoisingStep, timestep, alpha, sigma) -> torch.Tensor:
        """``r(x0_hat(candidate))``, with ``x0_hat`` from one denoiser call at the candidate's noise level."""
        prediction = self.denoise(candidate, timestep, step)
        alpha, sigma = alpha.to(candidate.dtype), sigma.to(candidate.dtype)
        x0 = x0_and_eps_from_prediction(prediction, candidate, alpha, sigma, step.prediction_type)[0]
        return self.score(self.reward, x0)

    def after_step(self, step: DenoisingStep, prev_sample: torch.Tensor) -> torch.Tensor:
        if self.nfe is None:
            self._plan(prev_sample.shape[0])
        self.nfe += 1  # the pipeline's own denoiser call at this step
        alpha_next, sigma_next = self.next_flow_alpha_sigma()
        if step.is_last or not sigma_next > 0:
            self.final_rewards = self.score(self.reward, prev_sample)
            return prev_sample
        self._allowance += self._quotas.pop(0) if self._quotas else 0
        searching = self._allowance >= 1
        if not searching.any():
            return prev_sample
        next_timestep = sigma_next * self.scheduler.config.num_train_timesteps
        current = self.score(self.reward, step.x0)
        chosen, best = prev_sample.clone(), torch.full_like(current, float("-inf"))
        candidate = prev_sample  # the machine's stochastic step is the first candidate
        while True:
            rewards = self._score_candidate(candidate, step, next_timestep, alpha_next, sigma_next)
            self.nfe += searching
            self._allowance -= searching.long()
            better = searching & (rewards > best)
            chosen[better.to(chosen.device)] = candidate[better.to(candidate.device)]
            best = torch.where(better, rewards, best)
            accepted = searching & (rewards > current)
            self.accepted_steps += accepted
            searching = searching & ~accepted & (self._allowance >= 1)
            if not searching.any():
                return chosen
            candidate = self.stochastic_flow_step(step, step.model_output, step.sample, self.randn_like(prev_sample))
