r"""MVDream's two changes to a 2D text-to-image UNet, as drop-in diffusers pieces ("MVDream: Multi-view Diffusion for
3D Generation", Shi et al., arXiv 2308.16512; facts checked against the authors' code, github.com/bytedance/MVDream).

A batch holds ``B`` objects of ``N`` views each, views of one object consecutive: row ``b N + n`` is view ``n`` of
object ``b`` (the authors' ``(b f)`` layout).

1. Multi-view self-attention (``MultiViewAttnProcessor``, on every self-attention layer ``attn1``). The tokens
   ``h`` ``(B N, L, C)`` of the ``N`` views of one object are concatenated into one sequence before self-attention
   and split again after it (the authors' ``BasicTransformerBlock3D``: ``(b f) l c -> b (f l) c``)::

       h'[b]  = Attention(concat_n h[b N + n])          # one sequence of N L tokens per object
       out    = split_n h'[b]                            # back to (B N, L, C)

   so every view attends to every view of its object; the projections are the 2D model's own. Cross-attention
   (``attn2``, to the text) stays per view. With ``N = 1`` it is the 2D model's self-attention exactly.

2. Camera embedding (``CameraEmbedding``), added to the timestep embedding (the authors' ``camera_embed``)::

       c      = flatten(normalize(T_c2w))                # 16 numbers, row-major 4 x 4
       emb    = time_embedding(t) + W_2 SiLU(W_1 c + b_1) + b_2

   ``normalize`` puts the camera's centre on the unit sphere (the authors' ``normalize_camera``: the translation
   divided by its norm + 1e-8; the rotation is kept). Cameras are camera-to-world OpenGL matrices, the convention of
   ``pipelines.three_d.rendering`` (the authors convert theirs to Blender's axes first; that fixed change of world
   axes only matters for loading their weights). ``cameras=None`` adds nothing: the 2D model, which is how the
   authors train on 2D images (``camera=None, num_frames=1``). ``W_2, b_2`` start at zero, so a freshly attached
   embedding leaves a pretrained UNet's predictions unchanged.

How the camera reaches the UNet without forking it. ``attach_camera_embedding`` registers two diffusers hooks
(``diffusers.hooks.ModelHook``): one on the UNet takes a ``cameras=`` keyword from the call, one on
``unet.time_embedding`` adds the camera embedding to its output. The alternative, the UNet's own class-embedding path
(``class_embed_type="projection"``, ``class_labels=cameras``), was rejected: the UNet's config would have to change
(a ``class_embedding`` the config does not declare makes ``save_pretrained`` write weights ``from_pretrained`` does
not expect), it cannot express "no camera" (it raises without ``class_labels``), and UNets that already use it (Stable
Diffusion's x4 upscaler, for its noise level) would lose it. With hooks the UNet's modules, config and weights are
untouched: ``save_pretrained``, ``save_lora_weights`` and stock pipelines see the 2D UNet, and removing the hooks
gives it back exactly.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from diffusers import ModelMixin
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.models.attention_processor import AttnProcessor2_0

from .rendering import check_cameras

CAMERA_DIM = 16  # a flattened 4 x 4 camera-to-world matrix
CAMERA_HOOK = "mvdream_camera"  # the name of both hooks: removing it from the UNet removes both


def normalized_camera_features(cameras: torch.Tensor) -> torch.Tensor:
    """``(N, 4, 4)`` camera-to-world matrices -> ``(N, 16)``: the camera centre moved onto the unit sphere
    (translation / (|translation| + 1e-8), MVDream's ``normalize_camera``), then flattened row-major."""
    cameras = check_cameras(cameras)
    translation = cameras[:, :3, 3]
    unit_translation = translation / (translation.norm(dim=-1, keepdim=True) + 1e-8)
    normalized = torch.cat([cameras[:, :3, :3], unit_translation[:, :, None]], dim=2)
    return torch.cat([normalized, cameras[:, 3:]], dim=1).reshape(-1, CAMERA_DIM)


class CameraEmbedding(ModelMixin, ConfigMixin):
    r"""MVDream's camera embedding (arXiv 2308.16512, module docstring): ``W_2 SiLU(W_1 c + b_1) + b_2`` of the
    normalized, flattened camera-to-world matrix ``c``, a vector of the UNet's timestep-embedding width, added to the
    timestep embedding by ``attach_camera_embedding``. ``W_2, b_2`` start at zero.

    Args:
        embedding_dim: the UNet's timestep-embedding width (``unet.time_embedding.linear_2.out_features``: 4 x the
            first block's channels in Stable Diffusion).
        camera_dim: the camera features' length (16: a 4 x 4 matrix).
    """

    @register_to_config
    def __init__(self, embedding_dim: int, camera_dim: int = CAMERA_DIM):
        super().__init__()
        if camera_dim != CAMERA_DIM:
            raise ValueError(f"camera_dim must be {CAMERA_DIM} (a flattened 4 x 4 camera matrix), got {camera_dim}")
        self.linear_1 = torch.nn.Linear(camera_dim, embedding_dim)
        self.act = torch.nn.SiLU()
        self.linear_2 = torch.nn.Linear(embedding_dim, embedding_dim)
        torch.nn.init.zeros_(self.linear_2.weight)
        torch.nn.init.zeros_(self.linear_2.bias)

    def forward(self, cameras: torch.Tensor) -> torch.Tensor:
        """``(N, 4, 4)`` camera-to-world matrices -> ``(N, embedding_dim)``."""
        features = normalized_camera_features(cameras).to(self.linear_1.weight.dtype)
        return self.linear_2(self.act(self.linear_1(features)))


class MultiViewAttnProcessor:
    r"""Self-attention across the ``num_views`` views of each object (MVDream, arXiv 2308.16512, module docstring):
    the views' tokens ``(B N, L, C) -> (B, N L, C)``, the layer's own attention (``base_processor``, diffusers'
    ``AttnProcessor2_0`` by default), and back to ``(B N, L, C)``. Set it on self-attention layers only
    (``add_multiview_attention`` does); ``remove_multiview_attention`` puts each layer's ``base_processor`` back.

    Args:
        num_views: ``N``, the views per object it is built for; a batch that is not a whole number of objects is a
            ``ValueError``.
        base_processor: the processor that computes the attention on the concatenated sequence (the layer's own).
    """

    def __init__(self, num_views: int, base_processor: Any | None = None):
        if isinstance(num_views, bool) or not isinstance(num_views, int) or num_views < 1:
            raise ValueError(f"num_views must be a positive integer, got {num_views!r}")
        self.num_views = num_views
        self.base_processor = base_processor if base_processor is not None else AttnProcessor2_0()

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None) -> torch.Tensor:
        if encoder_hidden_states is not None:
            raise ValueError("MultiViewAttnProcessor is for self-attention layers (attn1); this call got "
                             "encoder_hidden_states (a cross-attention layer)")
        if attention_mask is not None:
            raise ValueError("MultiViewAttnProcessor takes no attention_mask (its sequence spans the views)")
        if hidden_states.ndim != 3:
            raise ValueError("MultiViewAttnProcessor needs tokens (B*N, L, C), got shape "
                             f"{tuple(hidden_states.shape)}")
        rows, length, channels = hidden_states.shape
        if rows % self.num_views:
            raise ValueError(f"this multi-view attention is built for {self.num_views} views per object, but the "
                             f"batch has {rows} images, not a multiple of {self.num_views}")
        objects = rows // self.num_views
        joined = hidden_states.reshape(objects, self.num_views * length, channels)
        if temb is not None:  # one embedding per object: its views share the timestep
            temb = temb[:: self.num_views]
        out = self.base_processor(attn, joined, temb=temb)
        return out.reshape(rows, length, out.shape[-1])


def self_attention_processor_names(unet: torch.nn.Module) -> list[str]:
    """The processor names (``attn_processors`` keys) of the self-attention layers: those ending in
    ``attn1.processor``, the self-attention of diffusers' ``BasicTransformerBlock``."""
    return [name for name in unet.attn_processors if name.endswith("attn1.processor")]


def multiview_processors(unet: torch.nn.Module) -> list[MultiViewAttnProcessor]:
    """The ``MultiViewAttnProcessor`` s set on ``unet``."""
    return [p for p in getattr(unet, "attn_processors", {}).values() if isinstance(p, MultiViewAttnProcessor)]


def multiview_num_views(denoiser: torch.nn.Module) -> int | None:
    """The views per object ``denoiser`` is built for: its ``MultiViewAttnProcessor`` s' ``num_views``, or a
    ``num_views`` in its config (the exact multi-view oracle); ``None`` for a 2D denoiser."""
    counts = {p.num_views for p in multiview_processors(denoiser)}
    if len(counts) > 1:
        raise ValueError(f"the UNet's multi-view attention layers disagree on the view count: {sorted(counts)}")
    if counts:
        return counts.pop()
    return getattr(getattr(denoiser, "config", None), "num_views", None)


def add_multiview_attention(unet: torch.nn.Module, num_views: int) -> None:
    """Make every self-attention layer of ``unet`` (a ``UNet2DConditionModel``) attend across the ``num_views``
    views of each object (``MultiViewAttnProcessor`` wrapping the layer's current processor)."""
    if multiview_processors(unet):
        raise ValueError(f"the UNet already has multi-view attention for {multiview_num_views(unet)} views; "
                         "remove_multiview_attention first")
    names = self_attention_processor_names(unet)
    if not names:
        raise ValueError(f"{type(unet).__name__} has no self-attention layers (attn1) to make multi-view")
    current = unet.attn_processors
    processors = {name: MultiViewAttnProcessor(num_views, current[name]) if name in names else processor
                  for name, processor in current.items()}
    unet.set_attn_processor(processors)  # set_attn_processor empties the dict it is given


def remove_multiview_attention(unet: torch.nn.Module) -> None:
    """Put back the processors ``add_multiview_attention`` wrapped."""
    processors = {name: processor.base_processor if isinstance(processor, MultiViewAttnProcessor) else processor
                  for name, processor in unet.attn_processors.items()}
    unet.set_attn_processor(processors)


@contextmanager
def single_view_attention(unet: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """``unet`` with its multi-view attention set to one view per object for the block: every image attends to
    itself only, the 2D model's attention (how MVDream trains on 2D images, ``num_frames=1``)."""
    processors = multiview_processors(unet)
    counts = [p.num_views for p in processors]
    for processor in processors:
        processor.num_views = 1
    try:
        yield unet
    finally:
        for processor, count in zip(processors, counts, strict=True):
            processor.num_views = count


class _CameraState:
    """The camera embedding of the call in progress, from the UNet's hook to the time embedding's."""

    embedding: torch.Tensor | None = None


class _CamerasArgumentHook(ModelHook):
    """On the UNet: takes ``cameras=`` from the call and embeds them for the time-embedding hook."""

    def __init__(self, camera_embedding: CameraEmbedding, state: _CameraState):
        super().__init__()
        self.camera_embedding, self.state = camera_embedding, state

    def new_forward(self, module: torch.nn.Module, *args: Any, cameras: torch.Tensor | None = None,
                    **kwargs: Any) -> Any:
        if cameras is not None:
            sample = args[0] if args else kwargs["sample"]
            if check_cameras(cameras).shape[0] != sample.shape[0]:
                raise ValueError(f"cameras must hold one camera per image: {sample.shape[0]} images, "
                                 f"{cameras.shape[0]} cameras")
            self.state.embedding = self.camera_embedding(cameras.to(sample.device))
        try:
            return self.fn_ref.original_forward(*args, **kwargs)
        finally:
            self.state.embedding = None


class _AddCameraEmbeddingHook(ModelHook):
    """On ``unet.time_embedding``: adds the call's camera embedding, if any, to the timestep embedding."""

    def __init__(self, state: _CameraState):
        super().__init__()
        self.state = state

    def post_forward(self, module: torch.nn.Module, output: torch.Tensor) -> torch.Tensor:
        if self.state.embedding is None:
            return output
        return output + self.state.embedding.to(output.dtype)


def attach_camera_embedding(unet: torch.nn.Module, camera_embedding: CameraEmbedding) -> None:
    """Let ``unet(sample, t, encoder_hidden_states, cameras=...)`` add ``camera_embedding(cameras)`` (one
    ``(4, 4)`` camera per image) to its timestep embedding, through diffusers hooks (module docstring); without
    ``cameras`` the UNet is the 2D model. ``detach_camera_embedding`` removes it."""
    time_embedding = getattr(unet, "time_embedding", None)
    width = getattr(getattr(time_embedding, "linear_2", None), "out_features", None)
    if width is None:
        raise ValueError(f"{type(unet).__name__} has no time_embedding.linear_2 (a UNet2DConditionModel's) to add a "
                         "camera embedding to")
    if camera_embedding.config.embedding_dim != width:
        raise ValueError(f"camera_embedding has width {camera_embedding.config.embedding_dim}, the UNet's timestep "
                         f"embedding {width}: build CameraEmbedding(embedding_dim={width})")
    if camera_embedding_of(unet) is not None:
        raise ValueError("the UNet already has a camera embedding; detach_camera_embedding first")
    state = _CameraState()
    HookRegistry.check_if_exists_or_initialize(time_embedding).register_hook(_AddCameraEmbeddingHook(state),
                                                                            CAMERA_HOOK)
    HookRegistry.check_if_exists_or_initialize(unet).register_hook(_CamerasArgumentHook(camera_embedding, state),
                                                                  CAMERA_HOOK)


def camera_embedding_of(unet: torch.nn.Module) -> CameraEmbedding | None:
    """The camera embedding ``attach_camera_embedding`` attached to ``unet``, or ``None``."""
    registry = getattr(unet, "_diffusers_hook", None)
    hook = registry.get_hook(CAMERA_HOOK) if registry is not None else None
    return hook.camera_embedding if hook is not None else None


def detach_camera_embedding(unet: torch.nn.Module) -> None:
    """Remove what ``attach_camera_embedding`` added: the UNet is its 2D self again."""
    registry = getattr(unet, "_diffusers_hook", None)
    if registry is not None:
        registry.remove_hook(CAMERA_HOOK, recurse=True)


def make_multiview(unet: torch.nn.Module, num_views: int, camera_embedding: CameraEmbedding) -> torch.nn.Module:
    """``unet`` turned into MVDream's multi-view UNet in place (``add_multiview_attention`` and
    ``attach_camera_embedding``); ``remove_multiview`` undoes it."""
    add_multiview_attention(unet, num_views)
    try:
        attach_camera_embedding(unet, camera_embedding)
    except ValueError:
        remove_multiview_attention(unet)
        raise
    return unet


def remove_multiview(unet: torch.nn.Module) -> torch.nn.Module:
    """The 2D UNet back: its own attention processors, no camera embedding."""
    remove_multiview_attention(unet)
    detach_camera_embedding(unet)
    return unet
