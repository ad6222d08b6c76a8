"""A-SDM's feature inheritance: chosen blocks reuse their output of an earlier step."""

from __future__ import annotations

from typing import Any

from diffusers.configuration_utils import register_to_config

from ..guidance.steering import check_positive_int
from .base import ClockReading, DenoisingClock, SpeedHook, pipeline_denoiser
from .module_reuse import ModuleReuse


class FeatureInheritance(SpeedHook):
    r"""Feature inheritance: the named blocks of the denoiser compute only every ``interval``-th step and otherwise
    inherit (return) their output of the last step they computed; the rest of the network runs as usual.

    Paper: *A-SDM: Accelerating Stable Diffusion through Model Assembly and Feature Inheritance Strategies*, Zhu et
    al., arXiv 2406.00210 (its tuning-free part: skipping local computations at block, layer or unit level, with
    several step-level patterns).

    For a block ``B`` among ``modules`` and the call at index ``i`` of a run:

        out_B(i) = B(in_B(i))        if i < w or (i - w + 1) % interval == 0      (w = warmup_steps)
                   out_B(i')         otherwise, i' the last computing call

    (the last warm-up call starts the pattern: ``w = 1, interval = 2`` computes calls 0, 2, 4, ...)

    Any sub-module of any denoiser can be named (``unet.get_submodule(name)``: ``"mid_block"``, ``"up_blocks.1"``,
    ``"down_blocks.2.attentions.0"``, ``"transformer_blocks.5"``); each must run once per denoiser call. Modules
    before a skipped one still run (name the whole prefix of the network to skip it too: that prefix is Faster
    Diffusion's encoder). The paper's own choice of blocks is not reproduced here, so there is no default:
    ``modules`` is required. ``interval=1`` is the stock output, bit for bit.

    Args:
        modules: sub-module names to inherit.
        interval: compute every ``interval``-th call after the warm-up.
        warmup_steps: calls at the start of a run that always compute (at least 1).
    """

    @register_to_config
    def __init__(self, *, modules: list[str] = (), interval: int = 2, warmup_steps: int = 1):
        super().__init__()
        if isinstance(modules, str) or not modules or not all(isinstance(m, str) and m for m in modules):
            raise ValueError(f"modules must be a non-empty list of sub-module names (e.g. ['mid_block', "
                             f"'up_blocks.0']), got {modules!r}")
        check_positive_int(interval, "interval")
        check_positive_int(warmup_steps, "warmup_steps")
        self.blocks: ModuleReuse | None = None

    def computes(self, reading: ClockReading) -> bool:
        warmup = self.config.warmup_steps
        return reading.index < warmup or (reading.index - warmup + 1) % self.config.interval == 0

    def _install(self, pipeline: Any) -> None:
        _, denoiser = pipeline_denoiser(pipeline, type(self).__name__)
        self.blocks = ModuleReuse(self, denoiser, list(self.config.modules), DenoisingClock(pipeline), self.computes)
