r"""Frame-causal attention on stock video backbones, and a key/value cache of clean context frames shared by every
denoising step of the next chunk.

Papers: *Ca2-VDM: Efficient Autoregressive Video Diffusion Model with Causal Generation and Cache Sharing*
(Gao et al., arXiv 2411.16375) and *ViD-GPT: Introducing GPT-style Autoregressive Generation in Video Diffusion
Models* (Gao et al., arXiv 2406.10981).

Attention over frames is made causal by a mask on frames. Frame ``i`` (absolute index ``p_i``, block ``b_i``,
window start ``w_i``) may attend to frame ``j`` iff

    b_j <= b_i  and  p_j >= w_i

``frames_per_block = 1`` gives frame-causal attention (``b_i = p_i``: a frame's tokens see its own and earlier
frames'), ``frames_per_block = n`` block-causal attention by chunks of ``n`` frames (``b_i = p_i // n``); ``w_i = 0``
unless a cache bound drops old frames. Within a frame all tokens see each other.

Because a frame never sees later frames, the keys and values of a clean context frame ``x^j_0`` at each layer ``l``,
``K^l_j = W_K h^l_j(x^{<=j}_0, t = 0)``, do not depend on the frames being denoised. Ca2-VDM computes them once, with
timestep 0, when the frames are appended to the context (a *write* pass), and every denoising step ``k`` of the next
chunk ``c`` then attends to ``[K^l_cache ; K^l_c(x_{t_k})]`` (a *read* pass) instead of re-encoding the context:

    Attention(Q_c, [K_cache ; K_c], [V_cache ; V_c])  with the mask above

``FrameKVCache(max_frames)`` bounds the cache: after each write it keeps the newest ``max_frames`` frames (Ca2-VDM's
``max_cond_len``; the oldest frames are dropped). The frames kept keep the keys and values they were written with,
so a bounded cache equals the uncached model under the mask with ``w_i`` = the oldest frame the cache held when
frame ``i`` was generated (``FrameLayout.window_starts``). Positions: Ca2-VDM's temporal positional embedding is
absolute and was trained on ``L`` positions, so it takes positions cyclically (``p mod L``, trained with random
cyclic shifts); the cached keys keep the position they were written with. Wan's rotary embedding makes the attention
score depend only on the distance ``p_i - p_j``, so here frames take their absolute index (rotary angles computed for
any index, beyond the model's table): a window of frames attends exactly as if it started at position 0, and
distances stay below ``max_frames`` plus the chunk. ``position_period=L`` takes Ca2-VDM's cyclic positions instead
(for a model trained with cyclic shifts).

Backbones: ``WanTransformer3DModel`` (self-attention ``attn1`` of every block over the ``F h' w'`` frame tokens; the
KV cache) and ``UNet3DConditionModel`` (its temporal attention, ``transformer_in`` and ``temp_attentions``, attends
over frames per pixel; the mask only, as it takes one timestep per clip and so cannot hold clean context at
timestep 0). ``enable_causal_attention`` installs processors with ``set_attn_processor`` and, on Wan, replaces the
rotary embedding's ``forward`` (an instance attribute) by one that reads the frame grid and places frames at their
positions; ``disable_causal_attention`` puts the original processors back and deletes that attribute.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from diffusers import UNet3DConditionModel, WanTransformer3DModel
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.attention_processor import AttnProcessor2_0
from diffusers.models.embeddings import get_1d_rotary_pos_embed
from diffusers.models.transformers.transformer_wan import WanAttnProcessor, _get_qkv_projections

CAUSAL_BACKBONES = ("WanTransformer3DModel", "UNet3DConditionModel")
CACHE_MODES = (None, "read", "write")
# WanRotaryPosEmbed's theta (diffusers 0.42 builds it with the default).
WAN_ROPE_THETA = 10000.0
_STATE_ATTRIBUTE = "_causal_attention_state"
_ROTARY_HOOK = "causal_rotary_positions"


@dataclass
class FrameLayout:
    """The frames of one forward call: absolute frame index, causal block and window start (the oldest absolute
    frame index the frame may attend to), each ``(F,)`` long."""

    positions: torch.Tensor
    blocks: torch.Tensor
    window_starts: torch.Tensor

    def __post_init__(self):
        for name in ("positions", "blocks", "window_starts"):
            value = getattr(self, name)
            if not torch.is_tensor(value) or value.ndim != 1:
                raise ValueError(f"FrameLayout.{name} must be a 1-D tensor, got {value!r}")
            setattr(self, name, value.long())
        if not self.positions.shape == self.blocks.shape == self.window_starts.shape:
            raise ValueError(f"FrameLayout's positions, blocks and window_starts must have one entry per frame, got "
                             f"{len(self.positions)}, {len(self.blocks)}, {len(self.window_starts)}")

    def __len__(self) -> int:
        return len(self.positions)

    @classmethod
    def block_causal(cls, num_frames: int, frames_per_block: int = 1, first_position: int = 0, first_block: int = 0,
                     window_start: int = 0) -> FrameLayout:
        """``num_frames`` consecutive frames from ``first_position`` in blocks of ``frames_per_block`` numbered from
        ``first_block``, all attending back to ``window_start``."""
        offsets = torch.arange(num_frames)
        return cls(first_position + offsets, first_block + offsets // frames_per_block,
                   torch.full((num_frames,), window_start))

    @classmethod
    def cat(cls, layouts: list[FrameLayout]) -> FrameLayout:
        return cls(*(torch.cat([getattr(layout, name) for layout in layouts])
                     for name in ("positions", "blocks", "window_starts")))


def frame_visibility(query: FrameLayout, key_positions: torch.Tensor, key_blocks: torch.Tensor) -> torch.Tensor:
    """``(F_query, F_key)`` bool: query frame ``i`` sees key frame ``j`` iff ``b_j <= b_i`` and ``p_j >= w_i``."""
    return (key_blocks[None, :] <= query.blocks[:, None]) & (key_positions[None, :] >= query.window_starts[:, None])


def token_visibility(frames: torch.Tensor, query_tokens_per_frame: int, key_tokens_per_frame: int) -> torch.Tensor:
    """The frame mask repeated to tokens (frame-major token order, as Wan patches ``(frame, row, column)``)."""
    return frames.repeat_interleave(query_tokens_per_frame, 0).repeat_interleave(key_tokens_per_frame, 1)


class FrameKVCache:
    """Per-layer keys and values ``(B, F_cached * T, heads, head_dim)`` (rotary applied) of clean context frames,
    with each cached frame's absolute position and block; ``max_frames`` bounds it (oldest frames dropped after each
    write; ``None``: unbounded)."""

    def __init__(self, max_frames: int | None = None):
        if max_frames is not None and (isinstance(max_frames, bool) or not isinstance(max_frames, int)
                                       or max_frames < 1):
            raise ValueError(f"max_frames must be a positive int or None (unbounded), got {max_frames!r}")
        self.max_frames = max_frames
        self.layers: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._pending: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.positions = torch.zeros(0, dtype=torch.long)
        self.blocks = torch.zeros(0, dtype=torch.long)
        self.tokens_per_frame: int | None = None

    @property
    def num_frames(self) -> int:
        return len(self.positions)

    @property
    def next_position(self) -> int:
        return int(self.positions[-1]) + 1 if self.num_frames else 0

    @property
    def next_block(self) -> int:
        return int(self.blocks[-1]) + 1 if self.num_frames else 0

    @property
    def window_start(self) -> int:
        """The oldest cached frame's position: where frames that read this cache start attending."""
        return int(self.positions[0]) if self.num_frames else self.next_position

    def memory_bytes(self) -> int:
        return sum(tensor.numel() * tensor.element_size() for pair in self.layers.values() for tensor in pair)

    def keys_values(self, layer: str, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's cached keys and values (empty ones shaped like ``like`` when nothing is cached)."""
        if layer not in self.layers:
            empty = like.new_zeros((like.shape[0], 0, *like.shape[2:]))
            return empty, empty
        keys, values = self.layers[layer]
        if keys.shape[0] != like.shape[0]:
            raise ValueError(f"the KV cache holds a batch of {keys.shape[0]} (with classifier-free guidance, twice "
                             f"the videos); this call has {like.shape[0]}")
        return keys, values

    def stage(self, layer: str, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Holds a write pass's keys and values until ``commit`` (later layers of the pass read the old cache)."""
        self._pending[layer] = (keys, values)

    def commit(self, layout: FrameLayout, tokens_per_frame: int) -> None:
        """Appends the staged frames (``layout``) and drops the oldest beyond ``max_frames``."""
        if not self._pending:
            raise ValueError("nothing to write: run the model inside causal_attention_context(cache_mode='write')")
        if self.tokens_per_frame not in (None, tokens_per_frame):
            raise ValueError(f"the KV cache holds frames of {self.tokens_per_frame} tokens; these have "
                             f"{tokens_per_frame} (the frame size must not change within a video)")
        self.tokens_per_frame = tokens_per_frame
        for layer, (keys, values) in self._pending.items():
            old_keys, old_values = self.keys_values(layer, keys)
            self.layers[layer] = (torch.cat([old_keys, keys], 1), torch.cat([old_values, values], 1))
        self._pending = {}
        self.positions = torch.cat([self.positions, layout.positions.cpu()])
        self.blocks = torch.cat([self.blocks, layout.blocks.cpu()])
        if self.max_frames is not None and self.num_frames > self.max_frames:
            self.positions, self.blocks = self.positions[-self.max_frames:], self.blocks[-self.max_frames:]
            kept = self.max_frames * tokens_per_frame
            # clone: a slice would keep the dropped frames' storage alive.
            self.layers = {layer: (keys[:, -kept:].clone(), values[:, -kept:].clone())
                           for layer, (keys, values) in self.layers.items()}

    def discard_staged(self) -> None:
        self._pending = {}


@dataclass
class CausalAttentionState:
    """What the causal processors of one model share: the block size, and per call the frame layout, the cache and
    its mode (set by ``causal_attention_context``), the frame grid of the latest input (set by the rotary
    embedding's forward)."""

    frames_per_block: int
    original_processors: dict
    layout: FrameLayout | None = None
    cache: FrameKVCache | None = None
    cache_mode: str | None = None
    position_period: int | None = None
    tokens_per_frame: int = 1
    num_frames: int = 0
    # The token mask of the current forward pass, built by its first layer and shared by the others (None inside:
    # every key visible, so attention runs unmasked); reset by the rotary hook at the start of each pass.
    token_mask: tuple[torch.Tensor | None] | None = None

    def query_layout(self, num_frames: int) -> FrameLayout:
        """The layout given to ``causal_attention_context``, or ``num_frames`` frames following the cache."""
        if self.layout is not None:
            if len(self.layout) != num_frames:
                raise ValueError(f"the frame layout has {len(self.layout)} frames; the model got {num_frames}")
            return self.layout
        if self.cache is not None and self.cache_mode is not None:
            return FrameLayout.block_causal(num_frames, self.frames_per_block, self.cache.next_position,
                                            self.cache.next_block, self.cache.window_start)
        return FrameLayout.block_causal(num_frames, self.frames_per_block)


def is_causal_attention_enabled(model: torch.nn.Module) -> bool:
    return getattr(model, _STATE_ATTRIBUTE, None) is not None


def causal_attention_state(model: torch.nn.Module) -> CausalAttentionState:
    state = getattr(model, _STATE_ATTRIBUTE, None)
    if state is None:
        raise ValueError(f"causal attention is not enabled on this {type(model).__name__}: call "
                         "enable_causal_attention(model) first")
    return state


def _mask(state: CausalAttentionState, query: FrameLayout, device: torch.device) -> torch.Tensor:
    key_positions, key_blocks = query.positions, query.blocks
    if state.cache is not None and state.cache_mode is not None:
        key_positions = torch.cat([state.cache.positions, query.positions])
        key_blocks = torch.cat([state.cache.blocks, query.blocks])
    return frame_visibility(query, key_positions, key_blocks).to(device)


def apply_rotary(hidden_states: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Wan's rotary embedding on ``(B, S, heads, head_dim)``: each channel pair ``(x1, x2)`` rotated by its angle."""
    x1, x2 = hidden_states.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos[..., 0::2], sin[..., 1::2]
    rotated = torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2)
    return rotated.type_as(hidden_states)


class CausalWanAttnProcessor(WanAttnProcessor):
    """Wan self-attention with the frame mask, reading (and in a write pass staging) the layer's cached context."""

    def __init__(self, state: CausalAttentionState, layer: str):
        super().__init__()
        self.state, self.layer = state, layer

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        if encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError(f"{self.layer}: the causal processor is for Wan's frame self-attention (attn1), which "
                             "gets neither encoder states nor a mask")
        state = self.state
        query, key, value = _get_qkv_projections(attn, hidden_states, None)
        query, key = attn.norm_q(query), attn.norm_k(key)
        query, key, value = (tensor.unflatten(2, (attn.heads, -1)) for tensor in (query, key, value))
        if rotary_emb is not None:
            query, key = apply_rotary(query, *rotary_emb), apply_rotary(key, *rotary_emb)

        tokens = state.tokens_per_frame
        layout = state.query_layout(hidden_states.shape[1] // tokens)
        keys, values = key, value
        if state.cache is not None and state.cache_mode is not None:
            cached_keys, cached_values = state.cache.keys_values(self.layer, key)
            keys, values = torch.cat([cached_keys, key], 1), torch.cat([cached_values, value], 1)
            if state.cache_mode == "write":
                state.cache.stage(self.layer, key, value)
        if state.token_mask is None:
            visibility = _mask(state, layout, query.device)
            state.token_mask = (None if bool(visibility.all()) else token_visibility(visibility, tokens, tokens),)
        hidden_states = dispatch_attention_fn(query, keys, values, attn_mask=state.token_mask[0], dropout_p=0.0, is_causal=False,
                                              backend=self._attention_backend, parallel_config=None)
        hidden_states = hidden_states.flatten(2, 3).type_as(query)
        return attn.to_out[1](attn.to_out[0](hidden_states))


class CausalTemporalAttnProcessor(AttnProcessor2_0):
    """UNet3D temporal self-attention (sequence = the frames of one pixel) with the frame mask."""

    def __init__(self, state: CausalAttentionState, layer: str):
        super().__init__()
        self.state, self.layer = state, layer

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args,
                 **kwargs):
        if encoder_hidden_states is None:
            if attention_mask is not None:
                raise ValueError(f"{self.layer}: temporal attention got its own mask; the causal processor sets it")
            layout = self.state.query_layout(hidden_states.shape[1])
            mask = frame_visibility(layout, layout.positions, layout.blocks).to(hidden_states.device)
            attention_mask = mask.expand(hidden_states.shape[0], *mask.shape)
        return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)


def wan_rotary_embedding(rope: torch.nn.Module, latent_shape: torch.Size, frame_positions: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """``WanRotaryPosEmbed``'s ``(cos, sin)`` for latents of ``latent_shape`` whose frames sit at
    ``frame_positions`` (any non-negative ints, also beyond the model's table) instead of ``0 .. F-1``."""
    _, _, num_frames, height, width = latent_shape
    patch_t, patch_h, patch_w = rope.patch_size
    frames, rows, columns = num_frames // patch_t, height // patch_h, width // patch_w
    dtype = torch.float32 if torch.backends.mps.is_available() else torch.float64  # as WanRotaryPosEmbed
    frame_cos, frame_sin = get_1d_rotary_pos_embed(rope.t_dim, frame_positions.to(rope.freqs_cos.device),
                                                   WAN_ROPE_THETA, use_real=True, repeat_interleave_real=True,
                                                   freqs_dtype=dtype)
    outputs = []
    for table, frame_part in ((rope.freqs_cos, frame_cos), (rope.freqs_sin, frame_sin)):
        _, row_part, column_part = table.split([rope.t_dim, rope.h_dim, rope.w_dim], dim=1)
        parts = (frame_part.to(table.dtype).view(frames, 1, 1, -1).expand(frames, rows, columns, -1),
                 row_part[:rows].view(1, rows, 1, -1).expand(frames, rows, columns, -1),
                 column_part[:columns].view(1, 1, columns, -1).expand(frames, rows, columns, -1))
        outputs.append(torch.cat(parts, dim=-1).reshape(1, frames * rows * columns, 1, -1))
    return outputs[0], outputs[1]


class CausalRotaryHook(ModelHook):
    """Wan's rotary embedding while causal attention is on (a diffusers hook on ``model.rope``): reads the frame
    grid, and computes the rotary angles of the frames' positions itself (the model's table covers only
    ``0 .. rope_max_seq_len - 1``)."""

    def __init__(self, state: CausalAttentionState):
        super().__init__()
        self.state = state

    def new_forward(self, rope: torch.nn.Module, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        state = self.state
        state.token_mask = None
        patch_t, patch_h, patch_w = rope.patch_size
        state.tokens_per_frame = (hidden_states.shape[3] // patch_h) * (hidden_states.shape[4] // patch_w)
        state.num_frames = hidden_states.shape[2] // patch_t
        positions = state.query_layout(state.num_frames).positions
        if state.position_period is not None:
            positions = positions % state.position_period
        return wan_rotary_embedding(rope, hidden_states.shape, positions)


def _causal_layers(model: torch.nn.Module) -> list[str]:
    """Processor names of the attention over frames: Wan's ``blocks.i.attn1``, UNet3D's temporal attention."""
    names = list(model.attn_processors)
    if isinstance(model, WanTransformer3DModel):
        return [name for name in names if name.endswith(".attn1.processor")]
    if isinstance(model, UNet3DConditionModel):
        return [name for name in names if name.startswith("transformer_in.") or ".temp_attentions." in name]
    raise ValueError(f"{type(model).__name__} has no attention over frames that causal attention knows; it "
                     f"supports {', '.join(CAUSAL_BACKBONES)}")


def enable_causal_attention(model: torch.nn.Module, frames_per_block: int = 1) -> CausalAttentionState:
    """Makes ``model``'s attention over frames causal (module docstring): frame-causal for ``frames_per_block=1``,
    block-causal by chunks of ``frames_per_block`` frames otherwise. Returns the state the processors share."""
    if isinstance(frames_per_block, bool) or not isinstance(frames_per_block, int) or frames_per_block < 1:
        raise ValueError(f"frames_per_block must be a positive int, got {frames_per_block!r}")
    if is_causal_attention_enabled(model):
        raise ValueError("causal attention is already enabled on this model; disable_causal_attention(model) first")
    layers = _causal_layers(model)
    original = dict(model.attn_processors)
    state = CausalAttentionState(frames_per_block, original_processors=original)
    processor_class = CausalWanAttnProcessor if isinstance(model, WanTransformer3DModel) \
        else CausalTemporalAttnProcessor
    processors = dict(original)
    processors.update({name: processor_class(state, name.removesuffix(".processor")) for name in layers})
    model.set_attn_processor(processors)  # it empties the dict it gets (a fresh one here)
    if isinstance(model, WanTransformer3DModel):
        HookRegistry.check_if_exists_or_initialize(model.rope).register_hook(CausalRotaryHook(state),
                                                                             _ROTARY_HOOK)
    setattr(model, _STATE_ATTRIBUTE, state)
    return state


def disable_causal_attention(model: torch.nn.Module) -> None:
    """Puts the original processors back and removes the rotary embedding's hook: the model computes exactly as
    before."""
    state = causal_attention_state(model)
    model.set_attn_processor(dict(state.original_processors))
    if isinstance(model, WanTransformer3DModel):
        HookRegistry.check_if_exists_or_initialize(model.rope).remove_hook(_ROTARY_HOOK, recurse=False)
    delattr(model, _STATE_ATTRIBUTE)


@contextmanager
def causal_attention_context(model: torch.nn.Module, layout: FrameLayout | None = None,
                             cache: FrameKVCache | None = None, cache_mode: str | None = None,
                             position_period: int | None = None) -> Iterator[CausalAttentionState]:
    """Within the block, the causal model's forward calls use ``layout`` (default: frames ``0..F-1`` in blocks of
    ``frames_per_block``, or the frames following the cache) and ``cache``: ``"read"`` attends to the cached context
    too, ``"write"`` also appends this call's frames (timestep 0: clean context) to the cache when the block ends
    (then the bound drops the oldest). ``position_period``: cyclic positions ``p mod L`` (Ca2-VDM)."""
    state = causal_attention_state(model)
    if cache_mode not in CACHE_MODES:
        raise ValueError(f"cache_mode must be one of {CACHE_MODES}, got {cache_mode!r}")
    if (cache is None) != (cache_mode is None):
        raise ValueError("pass a FrameKVCache together with cache_mode 'read' or 'write', or neither")
    if cache_mode is not None and not isinstance(model, WanTransformer3DModel):
        raise ValueError(f"the KV cache needs per-frame timesteps (context at timestep 0); {type(model).__name__} "
                         "takes one timestep per clip: use the mask alone")
    if position_period is not None and (isinstance(position_period, bool) or not isinstance(position_period, int)
                                        or position_period < 1):
        raise ValueError(f"position_period must be a positive int or None, got {position_period!r}")
    saved = (state.layout, state.cache, state.cache_mode, state.position_period)
    state.layout, state.cache, state.cache_mode, state.position_period = layout, cache, cache_mode, position_period
    try:
        yield state
        if cache_mode == "write":
            cache.commit(state.query_layout(state.num_frames), state.tokens_per_frame)
    finally:
        if cache is not None:
            cache.discard_staged()
        state.layout, state.cache, state.cache_mode, state.position_period = saved

