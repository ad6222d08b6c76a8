"""``per_frame_prediction``: each backbone gets the timestep shape it takes. Per-frame timesteps that are all equal give
the backbone's own output with one timestep per clip (the shapes are right); with no transformer block a frame's
timestep reaches that frame's tokens and no other (the token order is right); with attention the frame whose timestep
changed moves most (the conditioning is per frame); backbones with one timestep per clip raise a ValueError naming
those that take one per frame."""

import pytest
import torch
from diffusers import CogVideoXTransformer3DModel, UNet3DConditionModel
from tiny_video import BATCH, CHANNELS, FLOAT32_TOLERANCE, FRAMES, HEIGHT, TEXT_DIM, WIDTH, ltx, oracle, skyreels, wan

from diffusers_ext.pipelines.video.backbones import PER_FRAME_BACKBONES, check_per_frame_backbone, per_frame_prediction


def inputs(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn(BATCH, CHANNELS, FRAMES, HEIGHT, WIDTH, generator=generator)
    return latents, torch.randn(BATCH, 5, TEXT_DIM, generator=generator)


def ltx_own_output(model, latents, clip_timesteps, text):
    """LTXPipeline's call: packed tokens, one timestep per clip, an all-ones text mask; unpacked back."""
    tokens = latents.permute(0, 2, 3, 4, 1).reshape(BATCH, -1, CHANNELS)  # patch size 1: a token per position
    output = model(tokens, text, clip_timesteps, torch.ones(text.shape[:2]), num_frames=FRAMES, height=HEIGHT,
                   width=WIDTH).sample
    return output.reshape(BATCH, FRAMES, HEIGHT, WIDTH, CHANNELS).permute(0, 4, 1, 2, 3)


# name: (build, the backbone's own call with one timestep per clip, extra keyword arguments of per_frame_prediction)
BACKBONES = {
    "wan": (wan, lambda m, x, t, text: m(x, t, text).sample, {}),
    "skyreels": (skyreels, lambda m, x, t, text: m(x, t, text).sample, {}),
    "skyreels-fps": (lambda **kw: skyreels(inject_sample_info=True, **kw),
                     lambda m, x, t, text: m(x, t, text, fps=[0, 1]).sample, {"fps": [0, 1]}),
    "ltx": (ltx, ltx_own_output, {}),
}


@pytest.mark.parametrize("name", list(BACKBONES))
def test_equal_frame_timesteps_give_the_backbones_output_for_one_timestep_per_clip(name):
    build, own_output, extra = BACKBONES[name]
    model, (latents, text) = build(), inputs()
    clip_timesteps = torch.tensor([300.0, 720.0])
    with torch.no_grad():
        expected = own_output(model, latents, clip_timesteps, text)
        frame_timesteps = clip_timesteps[:, None].expand(BATCH, FRAMES)
        output = per_frame_prediction(model, latents, frame_timesteps, text, **extra)
    assert output.shape == latents.shape
    torch.testing.assert_close(output, expected, **FLOAT32_TOLERANCE)


def test_the_oracle_takes_frame_timesteps_through_the_same_entry_point():
    model, (latents, _) = oracle(), inputs()
    frame_timesteps = torch.tensor([[0.0, 250.0, 500.0, 990.0], [990.0, 990.0, 10.0, 600.0]])
    expected = model(latents, frame_timesteps).sample
    torch.testing.assert_close(per_frame_prediction(model, latents, frame_timesteps), expected, rtol=0, atol=0)
    # Text embeddings are accepted and ignored: the oracle's law is unconditional.
    torch.testing.assert_close(per_frame_prediction(model, latents, frame_timesteps, inputs()[1]), expected,
                               rtol=0, atol=0)


def frame_changes(model, extra, frame: int, seed: int = 1) -> torch.Tensor:
    """Per frame, the largest change of the output when only ``frame``'s timestep moves from 200 to 800."""
    latents, text = inputs(seed)
    frame_timesteps = torch.full((BATCH, FRAMES), 200.0)
    moved = frame_timesteps.clone()
    moved[:, frame] = 800.0
    with torch.no_grad():
        before = per_frame_prediction(model, latents, frame_timesteps, text, **extra)
        after = per_frame_prediction(model, latents, moved, text, **extra)
    return (after - before).abs().amax(dim=(0, 1, 3, 4))


@pytest.mark.parametrize("name", list(BACKBONES))
def test_without_attention_a_frames_timestep_reaches_that_frame_only(name):
    """No transformer block: the output is the patch embedding modulated per token by its timestep, so a wrong token
    order (the timestep of another frame, or of another clip) would move other frames."""
    build, _, extra = BACKBONES[name]
    model = build(num_layers=0)
    for frame in range(FRAMES):
        changes = frame_changes(model, extra, frame)
        assert changes[frame] > 1e-3
        assert torch.all(changes[torch.arange(FRAMES) != frame] == 0), changes


@pytest.mark.effect
@pytest.mark.parametrize("name", ["wan", "skyreels", "ltx"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_with_attention_the_frame_whose_timestep_changed_moves_most(name, seed):
    """Attention mixes frames, so every frame moves; the changed frame, modulated directly at every block, moves more
    than any other: over initialisation seeds 0-5 and every frame, at least 28 times the next largest change (Wan,
    SkyReels-V2) and 41 times (LTX-Video) at random initialisation. Asserted: 3 times."""
    build, _, extra = BACKBONES[name]
    model = build(seed=seed)
    for frame in range(FRAMES):
        changes = frame_changes(model, extra, frame, seed=seed + 10)
        others = changes[torch.arange(FRAMES) != frame]
        assert changes[frame] > 3 * others.max(), (frame, changes)


def test_unsupported_backbones_raise_a_value_error_naming_the_supported_ones():
    torch.manual_seed(0)
    cogvideox = CogVideoXTransformer3DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
                                            time_embed_dim=8, text_embed_dim=16, num_layers=1, sample_width=8,
                                            sample_height=8, sample_frames=9, patch_size=2,
                                            temporal_compression_ratio=4, max_text_seq_length=5)
    unet3d = UNet3DConditionModel(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, sample_size=8,
                                  in_channels=4, out_channels=4, cross_attention_dim=16, attention_head_dim=4,
                                  down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
                                  up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"))
    latents, text = inputs()
    for model in (cogvideox, unet3d, torch.nn.Linear(2, 2)):
        with pytest.raises(ValueError, match=type(model).__name__) as error:
            check_per_frame_backbone(model)
        assert all(name in str(error.value) for name in PER_FRAME_BACKBONES)
        with pytest.raises(ValueError, match="one timestep per clip"):
            per_frame_prediction(model, latents, 500.0, text)


def test_wrapped_backbones_are_recognised():
    check_per_frame_backbone(torch.compile(wan()))  # compiled lazily: nothing runs here


@pytest.mark.parametrize("make, call, message", [
    (lambda: wan(patch_size=(2, 2, 2)), lambda m, x, t: per_frame_prediction(m, x, 5.0, t), "temporal patch size 2"),
    (wan, lambda m, x, t: per_frame_prediction(m, x, 5.0), "needs encoder_hidden_states"),
    (lambda: skyreels(inject_sample_info=True), lambda m, x, t: per_frame_prediction(m, x, 5.0, t), "pass fps"),
    (wan, lambda m, x, t: per_frame_prediction(m, x, torch.ones(BATCH, FRAMES + 1), t), "frame_timesteps must be"),
    (wan, lambda m, x, t: per_frame_prediction(m, x[:, :, 0], 5.0, t), r"latents must be a \(B, C, F, H, W\)"),
])
def test_bad_inputs_raise_value_errors(make, call, message):
    latents, text = inputs()
    with pytest.raises(ValueError, match=message):
        call(make(), latents, text)
