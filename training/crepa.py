r"""CREPA: a video model's base diffusion loss plus an alignment of one block's hidden states with frozen image features
of the same frame and of its neighbours, as a loss for the shared ``Trainer``.

Paper: *Cross-Frame Representation Alignment for Fine-Tuning Video Diffusion Models* (Sungwon Hwang, Hyojin Jang,
Kinam Kim, Minho Park, Jaegul Choo; arXiv 2506.09229).

REPA (arXiv 2410.06940) aligns a diffusion transformer's hidden states at an encoder-side block with a pretrained image
encoder's features of the clean image; CREPA applies it to a video model frame by frame and adds the features of
neighbouring frames, so that a frame's hidden state is pulled towards a trajectory that changes smoothly from frame to
frame. With the clean clip's frames ``x^f_0``, the frozen encoder ``E``, the chosen block's hidden states ``h^f_t`` of
frame ``f`` of the noisy clip (one row per token of the frame's ``h' x w'`` patch grid) and a projection head
``h_phi`` trained with the model, one loss evaluation is

    y^k        = E(x^k_0), resized to the token grid                              (features of frame k, per token)
    sim(f, k)  = mean over tokens n of  cos( h_phi(h^f_t)[n], y^k[n] )
    W[f, k]    = 1                      for k = f
               = exp(-|k - f| / tau)    for 1 <= |k - f| <= d                    (the neighbours K of frame f)
               = 0                      otherwise
    L_align    = - (1 / F) sum_f sum_k W[f, k] sim(f, k)                        (averaged over the batch)
    L          = L_score + lambda L_align

``L_score`` is the backbone's own diffusion loss, computed by the base objective given to ``CREPAObjective`` (e.g.
``FVDMObjective`` of ``training.fvdm``, whose noising and target this module does not repeat); the hidden states are
read from that same forward pass by a forward hook on the block, registered for the call and removed after it. The
paper sums over frames; the mean over frames used here only rescales ``lambda`` by ``F`` and keeps one ``lambda`` for
clips of any length (SimpleTuner's CREPA does the same by default). With ``d = 0`` the loss is the paper's frame-wise
REPA* baseline.

Defaults: ``lambda = 0.5``, ``tau = 1`` and neighbours at distance ``d = 1`` (``K = {f - 1, f + 1}``), the settings
SimpleTuner's CREPA documentation gives as matching the paper (the paper's own experiment section could not be read
offline to confirm them); the block is a quarter of the way into the transformer (REPA aligns SiT-XL's block 8 of 28,
``len(blocks) // 4 = 7`` counting from 0); the head is REPA's three-layer SiLU MLP.

Temporal and spatial correspondence: the encoder runs on each clean pixel frame; its feature map is resized to the
block's token grid of that frame (each token gets the mean of the features over the area it covers, or a bilinear
interpolation when the map is coarser than the grid; ``features_on_token_grid``). When the backbone sees fewer token
frames than there are pixel frames (a causal video VAE that encodes ``1 + r (F' - 1)`` frames into ``F'`` latent
frames, as Wan's and CogVideoX's do, or a temporal patch of ``r`` frames), each token frame's features are the mean
over the pixel frames it covers (``features_per_token_frame``).

The default encoder, ``RandomConvFrameEncoder``, is a fixed random convolutional network: the package must build it
offline, with no download (DINOv2, the paper's encoder, cannot be fetched here), and a random conv net with a fixed
seed gives, like DINOv2's patch tokens, a spatially resolved, multi-channel, nonlinear description of each frame
(local colour, edges and blobs), the same on every machine. It carries no semantics learnt from data, so what the toy
run can show is the regulariser's effect on temporal consistency of such features, not the paper's semantic gains;
any frozen encoder (a callable ``frames (N, C, H, W) -> features (N, D, h, w) or (N, D)``) can replace it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from accelerate.utils import extract_model_from_parallel
from torch import nn
from torch.nn import functional

# SimpleTuner's CREPA defaults, given there as the paper's setting (module docstring).
PAPER_LOSS_WEIGHT = 0.5
PAPER_TAU = 1.0
PAPER_NEIGHBOUR_DISTANCE = 1
# The attributes under which diffusers' video transformers keep their blocks (Wan, SkyReels-V2: ``blocks``;
# CogVideoX, LTX-Video, HunyuanVideo, Mochi: ``transformer_blocks``).
BLOCK_LISTS = ("blocks", "transformer_blocks")


def crepa_neighbour_weights(num_frames: int, tau: float = PAPER_TAU,
                            distance: int = PAPER_NEIGHBOUR_DISTANCE) -> torch.Tensor:
    """``W`` ``(F, F)`` float32: 1 on the diagonal (a frame's own features), ``exp(-|k - f| / tau)`` for the
    neighbours ``1 <= |k - f| <= distance`` inside the clip, 0 elsewhere (CREPA, arXiv 2506.09229)."""
    if isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < 1:
        raise ValueError(f"num_frames must be a positive integer, got {num_frames!r}")
    offsets = (torch.arange(num_frames)[None, :] - torch.arange(num_frames)[:, None]).abs().to(torch.float32)
    weights = torch.exp(-offsets / tau)
    return torch.where(offsets <= distance, weights, torch.zeros_like(weights))


def frame_similarities(projected: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """``sim`` ``(B, F, F)``: ``sim[b, f, k]``, the cosine similarity of frame ``f``'s projected hidden states with
    frame ``k``'s features, averaged over the token positions. Both inputs are ``(B, F, N, D)``."""
    projected, features = functional.normalize(projected, dim=-1), functional.normalize(features, dim=-1)
    return torch.einsum("bfnd,bknd->bfk", projected, features) / projected.shape[2]


def crepa_alignment_loss(similarities: torch.Tensor, neighbour_weights: torch.Tensor) -> torch.Tensor:
    """``L_align = -(1 / F) sum_f sum_k W[f, k] sim[b, f, k]``, averaged over the batch (module docstring)."""
    return -(similarities * neighbour_weights).sum(dim=(1, 2)).mean() / similarities.shape[1]


def features_per_token_frame(features: torch.Tensor, num_token_frames: int) -> torch.Tensor:
    """``(B, F_pixel, ...) -> (B, F', ...)``: each token frame's features, the mean over the pixel frames it covers.
    ``F_pixel = F'``: one each; ``F_pixel = 1 + r (F' - 1)`` (a causal video VAE with temporal compression ``r``):
    token frame 0 is pixel frame 0, token frame ``i > 0`` pixel frames ``r (i - 1) + 1 .. r i``;
    ``F_pixel = r F'`` (a temporal patch or a non-causal VAE): token frame ``i`` is pixel frames ``r i .. r i + r - 1``.
    """
    num_pixel_frames = features.shape[1]
    if num_pixel_frames == num_token_frames:
        return features
    if num_token_frames > 1 and (num_pixel_frames - 1) % (num_token_frames - 1) == 0:
        ratio = (num_pixel_frames - 1) // (num_token_frames - 1)
        later = features[:, 1:].unflatten(1, (num_token_frames - 1, ratio)).mean(dim=2)
        return torch.cat([features[:, :1], later], dim=1)
    if num_pixel_frames % num_token_frames == 0:
        return features.unflatten(1, (num_token_frames, num_pixel_frames // num_token_frames)).mean(dim=2)
    raise ValueError(f"the clip's {num_pixel_frames} frames do not map onto the block's {num_token_frames} token "
                     f"frames (expected {num_token_frames}, 1 + r * {num_token_frames - 1} or r * {num_token_frames})")


def features_on_token_grid(feature_maps: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """``(N, D, h, w)`` feature maps (or ``(N, D)`` global features, as ``h = w = 1``) on the token grid
    ``(h', w')``, ``(N, h' w', D)`` in row-major token order: a token's feature is the mean of the map over the area
    the token covers when the map is at least as fine as the grid (area interpolation), bilinear interpolation
    otherwise."""
    if feature_maps.ndim == 2:
        feature_maps = feature_maps[:, :, None, None]
    shrinks = feature_maps.shape[-2] >= grid[0] and feature_maps.shape[-1] >= grid[1]
    resized = functional.interpolate(feature_maps.float(), size=grid, mode="area" if shrinks else "bilinear",
                                     **({} if shrinks else {"align_corners": False}))
    return resized.flatten(2).transpose(1, 2)


class RandomConvFrameEncoder(nn.Module):
    """CREPA's default frozen image encoder: two fixed random 3 x 3 convolutions (the second with stride 2) with
    ReLUs, ``frames (N, C, H, W) -> features (N, feature_dim, H / 2, W / 2)``, drawn from ``seed`` (the same weights
    on every machine, no download). Why this one: module docstring.

    Args:
        channels: the frames' colour channels.
        feature_dim: features per position.
        width: channels of the hidden layer.
        seed: which random network.
    """

    def __init__(self, channels: int = 3, feature_dim: int = 64, width: int = 32, seed: int = 0):
        super().__init__()
        for name, value in (("channels", channels), ("feature_dim", feature_dim), ("width", width)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        self.channels, self.feature_dim = channels, feature_dim
        with torch.random.fork_rng(devices=[]):  # its own weights, the caller's random state untouched
            torch.manual_seed(seed)
            self.layers = nn.Sequential(nn.Conv2d(channels, width, 3, padding=1), nn.ReLU(),
                                        nn.Conv2d(width, feature_dim, 3, stride=2, padding=1), nn.ReLU())
        self.requires_grad_(False).eval()

    @torch.no_grad()
    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        return self.layers(frames.to(self.layers[0].weight.dtype))


class CREPAProjectionHead(nn.Module):
    """``h_phi``: REPA's projector, three linear layers with SiLUs between, ``hidden_size -> width -> width ->
    feature_dim``, applied to each token's hidden state; trained with the model, used only in training."""

    def __init__(self, hidden_size: int, feature_dim: int, width: int | None = None):
        super().__init__()
        width = width or max(hidden_size, feature_dim)
        self.hidden_size, self.feature_dim = hidden_size, feature_dim
        self.layers = nn.Sequential(nn.Linear(hidden_size, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU(),
                                    nn.Linear(width, feature_dim))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.layers(hidden_states.float())


def transformer_blocks(model: torch.nn.Module) -> nn.ModuleList:
    """The backbone's list of transformer blocks (``BLOCK_LISTS``); a ``ValueError`` for a model without one."""
    backbone = extract_model_from_parallel(model, keep_torch_compile=False)
    for name in BLOCK_LISTS:
        blocks = getattr(backbone, name, None)
        if isinstance(blocks, nn.ModuleList) and len(blocks) > 0:
            return blocks
    raise ValueError(f"CREPA reads a transformer block's hidden states, but {type(backbone).__name__} has no "
                     f"non-empty block list ({' or '.join(BLOCK_LISTS)})")


def spatial_patch_size(model: torch.nn.Module) -> tuple[int, int]:
    """``(p_h, p_w)`` from the backbone config's ``patch_size`` (``(p_t, p_h, p_w)`` as Wan's, or one ``p`` as
    CogVideoX's and LTX-Video's)."""
    backbone = extract_model_from_parallel(model, keep_torch_compile=False)
    patch = getattr(getattr(backbone, "config", None), "patch_size", None)
    if isinstance(patch, int) and patch > 0:
        return patch, patch
    if isinstance(patch, list | tuple) and len(patch) in (2, 3) and all(isinstance(p, int) for p in patch):
        return int(patch[-2]), int(patch[-1])
    raise ValueError(f"CREPA maps tokens to frame positions through config.patch_size; {type(backbone).__name__} "
                     f"has patch_size {patch!r}")


def transformer_width(model: torch.nn.Module) -> int:
    """The hidden size of a diffusers video transformer's blocks: ``num_attention_heads * attention_head_dim``."""
    config = getattr(extract_model_from_parallel(model, keep_torch_compile=False), "config", None)
    heads, head_dim = getattr(config, "num_attention_heads", None), getattr(config, "attention_head_dim", None)
    if not (isinstance(heads, int) and isinstance(head_dim, int)):
        raise ValueError(f"cannot read the hidden size of {type(model).__name__} (config.num_attention_heads * "
                         "config.attention_head_dim); pass hidden_size")
    return heads * head_dim


class CREPAObjective:
    """The CREPA loss ``L_score + lambda L_align`` (arXiv 2506.09229; equations in the module docstring) on top of a
    base objective's diffusion loss. Batches are what the base objective takes: clean latents ``(B, C, F, H, W)`` or
    a dict with them under ``"latents"``; for a latent-space model the dict also carries the clean pixel frames
    ``(B, C_pixel, F_pixel, H_pixel, W_pixel)`` under ``"frames"`` (the encoder's input; without them it sees the
    latents, right for pixel-space models).

    The projection head (``self.head``) is trained with the model: ``trainable_modules()`` hands it to the
    ``Trainer``, whose optimizer trains it and whose checkpoints keep it.

    Args:
        base_objective: the backbone's diffusion loss, anything with ``loss(model, batch, generator)`` (e.g.
            ``FVDMObjective``); its forward pass is the one whose hidden states are aligned.
        backbone: the model to be trained (read here for its blocks, hidden size and patch size; not kept).
        encoder: the frozen feature source, ``frames (N, C, H, W) -> (N, D, h, w)`` or ``(N, D)``, called without
            gradients; ``None``: ``RandomConvFrameEncoder(channels)`` for the backbone's input channels.
        feature_dim: ``D``, the encoder's features per position (default: ``encoder.feature_dim``).
        block_index: the block whose output is aligned (default ``len(blocks) // 4``).
        loss_weight: ``lambda``.
        tau: the neighbour weights' decay ``tau``.
        neighbour_distance: ``d``, how far the neighbours ``K`` reach (0: frame-wise REPA*).
        hidden_size: the block's hidden size (default: the transformer's ``num_attention_heads * attention_head_dim``).
        head_width: the projection head's hidden width (default: the larger of ``hidden_size`` and ``D``).
        seed: the projection head's initialisation.
    """

    name = "crepa"

    def __init__(
        self,
        base_objective: Any,
        backbone: torch.nn.Module,
        encoder: Callable[[torch.Tensor], torch.Tensor] | None = None,
        feature_dim: int | None = None,
        block_index: int | None = None,
        loss_weight: float = PAPER_LOSS_WEIGHT,
        tau: float = PAPER_TAU,
        neighbour_distance: int = PAPER_NEIGHBOUR_DISTANCE,
        hidden_size: int | None = None,
        head_width: int | None = None,
        seed: int = 0,
    ):
        if not callable(getattr(base_objective, "loss", None)):
            raise TypeError(f"base_objective must have loss(model, batch, generator), got "
                            f"{type(base_objective).__name__}")
        if isinstance(loss_weight, bool) or not (isinstance(loss_weight, int | float) and 0 <= loss_weight < math.inf):
            raise ValueError(f"loss_weight must be a finite number >= 0, got {loss_weight!r}")
        if isinstance(tau, bool) or not (isinstance(tau, int | float) and 0 < tau < math.inf):
            raise ValueError(f"tau must be a finite number > 0, got {tau!r}")
        if isinstance(neighbour_distance, bool) or not isinstance(neighbour_distance, int) or neighbour_distance < 0:
            raise ValueError(f"neighbour_distance must be an integer >= 0, got {neighbour_distance!r}")
        blocks = transformer_blocks(backbone)
        block_index = len(blocks) // 4 if block_index is None else block_index
        if isinstance(block_index, bool) or not isinstance(block_index, int) or not 0 <= block_index < len(blocks):
            raise ValueError(f"block_index must be an integer in [0, {len(blocks)}) for this "
                             f"{type(backbone).__name__}, got {block_index!r}")
        # The default encoder takes whatever frames the batches hold: the backbone's own channels for a pixel-space
        # model, RGB pixels under "frames" for a latent one; it is rebuilt (same seed) for the channels it meets.
        self.default_encoder = encoder is None
        if encoder is None:
            encoder = RandomConvFrameEncoder()
        if not callable(encoder):
            raise TypeError(f"encoder must be a callable frames -> features, got {type(encoder).__name__}")
        feature_dim = getattr(encoder, "feature_dim", None) if feature_dim is None else feature_dim
        if isinstance(feature_dim, bool) or not isinstance(feature_dim, int) or feature_dim < 1:
            raise ValueError(f"feature_dim must be a positive integer (the encoder's features per position), got "
                             f"{feature_dim!r}")
        hidden_size = transformer_width(backbone) if hidden_size is None else hidden_size
        self.base_objective, self.encoder, self.block_index = base_objective, encoder, block_index
        self.patch = spatial_patch_size(backbone)
        self.loss_weight, self.tau, self.neighbour_distance = float(loss_weight), float(tau), neighbour_distance
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.head = CREPAProjectionHead(hidden_size, feature_dim, head_width)
        self.last_terms: dict[str, float] = {}

    def trainable_modules(self) -> dict[str, nn.Module]:
        """The modules the method trains besides the model: the projection head."""
        return {"crepa_head": self.head}

    @staticmethod
    def _latents_and_frames(batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        latents = batch.get("latents") if isinstance(batch, Mapping) else batch
        frames = batch.get("frames", latents) if isinstance(batch, Mapping) else batch
        for name, value in (("latents", latents), ("frames", frames)):
            if not torch.is_tensor(value) or value.ndim != 5:
                shape = tuple(value.shape) if torch.is_tensor(value) else type(value).__name__
                raise ValueError(f"a CREPA batch is clean latents (B, C, F, H, W), or a dict with them under "
                                 f"'latents' and optionally the pixel frames (B, C, F, H, W) under 'frames'; got "
                                 f"{name} {shape}")
        if frames.shape[0] != latents.shape[0]:
            raise ValueError(f"frames hold {frames.shape[0]} clips, latents {latents.shape[0]}")
        return latents, frames

    def frame_features(self, frames: torch.Tensor) -> torch.Tensor:
        """The encoder's features of every clean frame, ``(B, F, D, h, w)`` (or ``(B, F, D)``), checked against the
        projection head's ``D``."""
        batch, channels, num_frames = frames.shape[:3]
        if self.default_encoder and self.encoder.channels != channels:
            self.encoder = RandomConvFrameEncoder(channels, self.encoder.feature_dim)
        if isinstance(self.encoder, nn.Module):
            self.encoder.to(frames.device)
        with torch.no_grad():
            features = self.encoder(frames.transpose(1, 2).flatten(0, 1))
        if not torch.is_tensor(features) or features.ndim not in (2, 4) or features.shape[0] != batch * num_frames:
            shape = tuple(features.shape) if torch.is_tensor(features) else type(features).__name__
            raise ValueError(f"the encoder must map frames (N, C, H, W) to features (N, D, h, w) or (N, D); for "
                             f"N = {batch * num_frames} it gave {shape}")
        if features.shape[1] != self.head.feature_dim:
            raise ValueError(f"the encoder gives {features.shape[1]} features per position, but the projection "
                             f"head maps to feature_dim = {self.head.feature_dim}")
        return features.unflatten(0, (batch, num_frames))

    def _hidden_states_per_frame(self, hidden_states: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """The block's token rows ``(B, F' h' w', hidden)`` as ``(B, F', h' w', hidden)``."""
        tokens_per_frame = (latents.shape[-2] // self.patch[0]) * (latents.shape[-1] // self.patch[1])
        if (hidden_states.ndim != 3 or hidden_states.shape[-1] != self.head.hidden_size
                or hidden_states.shape[1] % tokens_per_frame):
            raise ValueError(f"block {self.block_index} gave hidden states {tuple(hidden_states.shape)}; CREPA needs "
                             f"(B, frames x {tokens_per_frame} tokens, hidden_size = {self.head.hidden_size})")
        return hidden_states.unflatten(1, (hidden_states.shape[1] // tokens_per_frame, tokens_per_frame))

    def loss(self, model: torch.nn.Module, batch: Any, generator: torch.Generator) -> torch.Tensor:
        latents, frames = self._latents_and_frames(batch)
        features = self.frame_features(frames)
        captured: list[torch.Tensor] = []

        def capture(module, inputs, output):
            captured.append(output[0] if isinstance(output, tuple | list) else output)

        handle = transformer_blocks(model)[self.block_index].register_forward_hook(capture)
        try:
            score_loss = self.base_objective.loss(model, batch, generator)
        finally:
            handle.remove()
        if not captured:
            raise ValueError(f"block {self.block_index} did not run in the base objective's forward pass")
        hidden_states = self._hidden_states_per_frame(captured[0], latents)
        batch_size, num_token_frames = hidden_states.shape[:2]
        grid = (latents.shape[-2] // self.patch[0], latents.shape[-1] // self.patch[1])
        features = features_per_token_frame(features.float(), num_token_frames)
        features = features_on_token_grid(features.flatten(0, 1), grid).unflatten(0, (batch_size, num_token_frames))
        self.head.to(hidden_states.device)
        projected = self.head(hidden_states)
        similarities = frame_similarities(projected, features.to(projected.device))
        weights = crepa_neighbour_weights(num_token_frames, self.tau, self.neighbour_distance).to(projected.device)
        alignment = crepa_alignment_loss(similarities, weights)
        self.last_terms = {"score_loss": float(score_loss.detach()), "crepa_alignment": float(alignment.detach()),
                           "crepa_own_frame_similarity": float(similarities.detach().diagonal(dim1=1, dim2=2).mean())}
        return score_loss + self.loss_weight * alignment


def toy_run(config: Any, args: Any = None) -> tuple[CREPAObjective, torch.nn.Module, Any]:
    """``diffusers-ext train crepa``: CREPA (defaults of the module docstring: lambda 0.5, tau 1, neighbours at
    distance 1, block ``len(blocks) // 4``, ``RandomConvFrameEncoder``) over the FVDM toy run's base loss
    (``training.fvdm.toy_run``: flow matching on ``toy_backbone(config.seed)``, 1024 ``BouncingShapes`` clips of
    8 frames of 16 x 16 RGB pixels, unconditional)."""
    from .fvdm import toy_run as fvdm_toy_run

    base_objective, backbone, dataset = fvdm_toy_run(config, args)
    return CREPAObjective(base_objective, backbone, seed=config.seed), backbone, dataset
