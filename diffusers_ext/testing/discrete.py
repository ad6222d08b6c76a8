"""An exact denoiser for masked diffusion: the data law is a weighted set of fixed token strings."""

from __future__ import annotations

from collections.abc import Sequence

import torch


class StringMixtureDenoiser(torch.nn.Module):
    """``p(x0) = sum_m w_m [x0 = s_m]`` over strings ``s_m`` of one length; ``forward(x_t)`` returns the exact logits
    of ``p(x0^i | x_t)`` at every position (B, L, V): with ``c_m = [s_m agrees with x_t wherever x_t is unmasked]``,

        p(x0^i = v | x_t) = sum_m w_m c_m [s_m^i = v] / sum_m w_m c_m.

    Impossible tokens get logit ``-inf``. It needs no time input: in an absorbing process the clean-data
    conditionals do not depend on t (RADD).
    """

    def __init__(self, strings: Sequence[Sequence[int]], weights: Sequence[float], vocab_size: int, mask_token_id: int):
        super().__init__()
        strings = torch.as_tensor(strings, dtype=torch.long)
        weights = torch.as_tensor(weights, dtype=torch.float64)
        if strings.ndim != 2 or weights.shape != (strings.shape[0],):
            raise ValueError(f"need M strings of one length and M weights, got {tuple(strings.shape)} and "
                             f"{tuple(weights.shape)}")
        if (strings == mask_token_id).any() or strings.max() >= vocab_size or strings.min() < 0:
            raise ValueError("strings must use tokens in [0, vocab_size) other than the mask token")
        self.register_buffer("strings", strings)
        self.register_buffer("weights", weights / weights.sum())
        self.vocab_size = vocab_size
        self.mask_token_id = mask_token_id

    def forward(self, tokens: torch.LongTensor) -> torch.Tensor:
        known = tokens != self.mask_token_id
        agrees = (tokens[:, None, :] == self.strings[None]) | ~known[:, None, :]
        posterior = self.weights[None] * agrees.all(-1)
        posterior = posterior / posterior.sum(-1, keepdim=True)
        one_hot = torch.nn.functional.one_hot(self.strings, self.vocab_size).to(torch.float64)
        marginals = torch.einsum("bm,mlv->blv", posterior, one_hot)
        return marginals.log()

    def law_of(self, samples: torch.LongTensor) -> torch.Tensor:
        """Empirical frequencies of the strings among ``samples`` (B, L), plus a last entry for anything else."""
        matches = (samples[:, None, :] == self.strings[None]).all(-1)
        index = torch.where(matches.any(1), matches.double().argmax(1), len(self.strings))
        return torch.bincount(index, minlength=len(self.strings) + 1).double() / samples.shape[0]

    def total_variation(self, samples: torch.LongTensor) -> float:
        exact = torch.cat([self.weights, torch.zeros(1, dtype=torch.float64)])
        return float(0.5 * (self.law_of(samples) - exact).abs().sum())
