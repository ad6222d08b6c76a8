"""CREPA (arXiv 2506.09229): the neighbour weights and the alignment term against hand computations; features mapped
to token frames (causal VAE and temporal patch groups) and to the token grid; on tiny Wan and CogVideoX transformers
with LoRA adapters, the loss is the base loss plus lambda times the alignment of the hooked block's hidden states
(recomputed here from a hook of the test's own), the hook is gone afterwards (also when the base loss raises), and the
adapter and the projection head get gradients from the alignment term; the Trainer trains the head and resumes it
exactly; bad inputs raise one clear error; ``diffusers-ext train crepa`` writes an adapter that loads."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import CogVideoXTransformer3DModel, FlowMatchEulerDiscreteScheduler
from tiny_video import wan

from diffusers_ext.diffusion_math import flow_alpha_sigma, prediction_from_x0_and_eps
from diffusers_ext.training import FVDMObjective, Trainer, TrainingConfig
from diffusers_ext.training.cli import main as train_main
from diffusers_ext.training.crepa import (
    CREPAObjective,
    RandomConvFrameEncoder,
    crepa_alignment_loss,
    crepa_neighbour_weights,
    features_on_token_grid,
    features_per_token_frame,
    frame_similarities,
)
from diffusers_ext.training.fvdm import toy_backbone
from diffusers_ext.training.trainer import add_lora_adapter

TEXT_DIM = 16


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def cogvideox(num_layers: int = 2, seed: int = 0) -> CogVideoXTransformer3DModel:
    """A tiny CogVideoX transformer: latents (B, F, 4, 8, 8) with up to 3 latent frames (9 pixel frames through its
    4x temporal compression), 2 x 2 patches, hidden size 16."""
    torch.manual_seed(seed)
    return CogVideoXTransformer3DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
                                       time_embed_dim=8, text_embed_dim=TEXT_DIM, num_layers=num_layers,
                                       sample_width=8, sample_height=8, sample_frames=9, patch_size=2,
                                       temporal_compression_ratio=4, max_text_seq_length=5).eval()


class ClipTimestepFlowLoss:
    """A flow-matching loss with one timestep per clip, for CogVideoX (which takes one timestep per clip and
    (B, F, C, H, W) latents; per_frame_prediction, and so FVDMObjective, does not take it). Batches:
    {"latents": (B, C, F, H, W), ...}."""

    name = "clip-timestep-flow"

    def loss(self, model, batch, generator):
        clean = batch["latents"]
        timesteps = torch.rand(clean.shape[0], generator=generator) * 1000
        alpha, sigma = (value.float()[:, None, None, None, None] for value in flow_alpha_sigma(timesteps, 1000))
        noise = torch.randn(clean.shape, generator=generator)
        target = prediction_from_x0_and_eps(clean, noise, alpha, sigma, "flow_prediction")
        prediction = model((alpha * clean + sigma * noise).transpose(1, 2), torch.zeros(clean.shape[0], 5, TEXT_DIM),
                           timesteps, return_dict=False)[0].transpose(1, 2)
        return torch.nn.functional.mse_loss(prediction, target)


def wan_setup(lora_rank: int | None = 2, **crepa_kwargs):
    """A tiny Wan (2 blocks, hidden 24, 2 x 2 patches) with a LoRA adapter, the FVDM base loss and CREPA with the
    default encoder on 4-channel clips of 4 frames of 8 x 8."""
    model = wan()
    if lora_rank is not None:
        model = add_lora_adapter(model, TrainingConfig(lora_rank=lora_rank))
    base = FVDMObjective(FlowMatchEulerDiscreteScheduler(), prompt_embeds=torch.zeros(1, 1, TEXT_DIM))
    return model, CREPAObjective(base, model, **crepa_kwargs), torch.randn(2, 4, 4, 8, 8, generator=seeded(3))


def cogvideox_setup(**crepa_kwargs):
    """A tiny CogVideoX with a LoRA adapter and CREPA on latents of 3 frames and RGB pixel frames (9 of 16 x 16)."""
    model = add_lora_adapter(cogvideox(), TrainingConfig(lora_rank=2))
    objective = CREPAObjective(ClipTimestepFlowLoss(), model, encoder=RandomConvFrameEncoder(3, feature_dim=8),
                               **crepa_kwargs)
    batch = {"latents": torch.randn(2, 4, 3, 8, 8, generator=seeded(4)),
             "frames": torch.rand(2, 3, 9, 16, 16, generator=seeded(5)) * 2 - 1}
    return model, objective, batch


def test_neighbour_weights_decay_with_frame_distance_up_to_the_neighbour_distance():
    tau = 0.7
    expected = [[1.0 if f == k else math.exp(-abs(f - k) / tau) if abs(f - k) <= 2 else 0.0 for k in range(5)]
                for f in range(5)]
    torch.testing.assert_close(crepa_neighbour_weights(5, tau, 2), torch.tensor(expected))
    torch.testing.assert_close(crepa_neighbour_weights(3, 1.0, 0), torch.eye(3))  # REPA*: own frame only
    with pytest.raises(ValueError, match="num_frames must be a positive integer"):
        crepa_neighbour_weights(0)


def test_alignment_loss_matches_a_hand_computation():
    projected = [[[1.0, 0.0], [1.0, 1.0]], [[0.0, 2.0], [3.0, -1.0]], [[-1.0, 1.0], [0.5, 0.5]]]  # F=3, N=2, D=2
    features = [[[2.0, 1.0], [0.0, 1.0]], [[1.0, -1.0], [1.0, 2.0]], [[0.0, 1.0], [-2.0, 1.0]]]
    tau = 0.5

    def cosine(a, b):
        return (a[0] * b[0] + a[1] * b[1]) / math.hypot(*a) / math.hypot(*b)

    total = 0.0
    for f in range(3):
        for k in range(3):
            weight = 1.0 if k == f else math.exp(-abs(k - f) / tau) if abs(k - f) == 1 else 0.0
            total += weight * sum(cosine(projected[f][n], features[k][n]) for n in range(2)) / 2
    similarities = frame_similarities(torch.tensor([projected]), torch.tensor([features]))
    loss = crepa_alignment_loss(similarities, crepa_neighbour_weights(3, tau, 1))
    assert loss.item() == pytest.approx(-total / 3, rel=1e-6)
    # A batch of two clips averages them.
    both = torch.tensor([projected, features])
    pair = crepa_alignment_loss(frame_similarities(both, both.flip(0)), crepa_neighbour_weights(3, tau, 1))
    swapped = crepa_alignment_loss(frame_similarities(torch.tensor([features]), torch.tensor([projected])),
                                   crepa_neighbour_weights(3, tau, 1))
    assert pair.item() == pytest.approx((loss.item() + swapped.item()) / 2, rel=1e-6)


def test_features_map_onto_token_frames_and_the_token_grid():
    pixel = torch.arange(9, dtype=torch.float32).reshape(1, 9, 1)  # frame index as its feature
    # A causal VAE with 4x compression: 9 frames -> 3 latent frames, frame 0 alone, then frames 1-4 and 5-8.
    torch.testing.assert_close(features_per_token_frame(pixel, 3), torch.tensor([[[0.0], [2.5], [6.5]]]))
    # A temporal patch of 2 over 8 frames -> 4 token frames.
    torch.testing.assert_close(features_per_token_frame(pixel[:, 1:], 4), torch.tensor([[[1.5], [3.5], [5.5], [7.5]]]))
    assert features_per_token_frame(pixel, 9) is pixel
    with pytest.raises(ValueError, match="the clip's 9 frames do not map onto the block's 4 token frames"):
        features_per_token_frame(pixel, 4)

    maps = torch.randn(2, 5, 3, 4, generator=seeded(0))  # (N, D, h, w)
    tokens = features_on_token_grid(maps, (3, 4))  # same grid: row-major tokens, features last
    torch.testing.assert_close(tokens, maps.flatten(2).transpose(1, 2))
    global_features = features_on_token_grid(maps[:, :, 0, 0], (2, 2))  # (N, D): the same at every token
    torch.testing.assert_close(global_features, maps[:, None, :, 0, 0].expand(2, 4, 5))
    constant_blocks = torch.ones(1, 1, 2, 2).repeat_interleave(2, 2).repeat_interleave(2, 3) * torch.tensor(
        [[1.0, 2.0], [3.0, 4.0]]).repeat_interleave(2, 0).repeat_interleave(2, 1)
    torch.testing.assert_close(features_on_token_grid(constant_blocks, (2, 2)), torch.tensor([[[1.0], [2.0], [3.0],
                                                                                                 [4.0]]]))


def alignment_from_own_hook(model, objective, batch, generator_seed):
    """The base loss and the CREPA term recomputed with the test's own forward hook on the block: the block's tokens
    frame by frame (frame f is token rows f * T .. f * T + T - 1), the encoder on every pixel frame."""
    latents = batch["latents"] if isinstance(batch, dict) else batch
    frames = batch["frames"] if isinstance(batch, dict) else batch
    captured = []
    block = (model.blocks if hasattr(model, "blocks") else model.transformer_blocks)[objective.block_index]
    handle = block.register_forward_hook(lambda module, args, output: captured.append(
        output[0] if isinstance(output, tuple) else output))
    base = objective.base_objective.loss(model, batch, seeded(generator_seed))
    handle.remove()
    grid = (latents.shape[-2] // objective.patch[0], latents.shape[-1] // objective.patch[1])
    tokens = grid[0] * grid[1]
    hidden = captured[0]
    num_token_frames = hidden.shape[1] // tokens
    per_frame = torch.stack([hidden[:, f * tokens:(f + 1) * tokens] for f in range(num_token_frames)], dim=1)
    maps = torch.stack([objective.encoder(frames[:, :, f]) for f in range(frames.shape[2])], dim=1)
    maps = features_per_token_frame(maps, num_token_frames)
    features = torch.stack([features_on_token_grid(maps[:, f], grid) for f in range(num_token_frames)], dim=1)
    weights = crepa_neighbour_weights(num_token_frames, objective.tau, objective.neighbour_distance)
    return base, crepa_alignment_loss(frame_similarities(objective.head(per_frame), features), weights)


@pytest.mark.parametrize("setup", [wan_setup, cogvideox_setup], ids=["wan", "cogvideox"])
def test_loss_is_the_base_loss_plus_the_weighted_alignment_of_the_hooked_block(setup):
    model, objective, batch = setup(loss_weight=0.3, tau=2.0, block_index=1)
    loss = objective.loss(model, batch, seeded(7))
    assert not any(module._forward_hooks for module in model.modules())  # the hook is removed after the call
    base, alignment = alignment_from_own_hook(model, objective, batch, 7)
    torch.testing.assert_close(loss, base + 0.3 * alignment, rtol=1e-5, atol=1e-6)
    assert objective.last_terms["crepa_alignment"] == pytest.approx(alignment.item(), rel=1e-5, abs=1e-6)
    assert -3 < alignment.item() < 3  # own frame plus two neighbours at weight exp(-1/2): |sum| <= 1 + 2 * 0.61


def test_the_default_encoder_takes_rgb_frames_of_a_latent_model():
    model, objective, latents = wan_setup()  # 4 latent channels; the frames below are RGB pixels
    frames = torch.rand(2, 3, 4, 16, 16, generator=seeded(6)) * 2 - 1
    loss = objective.loss(model, {"latents": latents, "frames": frames}, seeded(7))
    assert torch.isfinite(loss) and objective.encoder.channels == 3
    # the same seeded network as one built for RGB frames
    rgb = RandomConvFrameEncoder(3)
    assert all(torch.equal(a, b) for a, b in zip(objective.encoder.state_dict().values(), rgb.state_dict().values(),
                                                 strict=True))


def test_the_hook_is_removed_when_the_base_loss_raises():
    class Failing:
        def loss(self, model, batch, generator):
            model(batch, torch.zeros(batch.shape[0] * 16), torch.zeros(batch.shape[0], 1, TEXT_DIM))
            raise RuntimeError("base loss failed")

    model = wan()
    objective = CREPAObjective(Failing(), model)
    with pytest.raises(RuntimeError, match="base loss failed"):
        objective.loss(model, torch.randn(1, 4, 1, 8, 8), seeded(0))
    assert not any(module._forward_hooks for module in model.modules())


@pytest.mark.parametrize("setup", [wan_setup, cogvideox_setup], ids=["wan", "cogvideox"])
def test_the_adapter_and_the_head_get_gradients_from_the_alignment_term(setup):
    def gradients(loss_weight):
        model, objective, batch = setup(loss_weight=loss_weight)
        objective.loss(model, batch, seeded(1)).backward()
        adapter = {n: p.grad for n, p in model.named_parameters() if "lora_" in n}
        assert all(not p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)
        return adapter, [p.grad for p in objective.head.parameters()]

    adapter, head = gradients(0.5)
    # LoRA's B factors start at 0, so at the first step only they (not the A factors) have a gradient.
    lora_b = [g for n, g in adapter.items() if "lora_B" in n]
    assert lora_b and all(g is not None and g.abs().sum() > 0 for g in [*lora_b, *head])
    # The alignment term reaches the adapter: without it (lambda = 0) the adapter's gradient differs and the head's
    # is zero.
    without, head_without = gradients(0.0)
    assert all(g is None or g.abs().sum() == 0 for g in head_without)
    assert any(not torch.allclose(adapter[n], without[n]) for n in adapter if "lora_B" in n)


def training_config(tmp_path, **settings):
    return TrainingConfig(**{"output_dir": str(tmp_path), "max_steps": 2, "batch_size": 2, "learning_rate": 1e-2,
                             "lora_rank": 2, "checkpoint_every": 1, "seed": 0, **settings})


def test_the_trainer_trains_the_head_and_resumes_it_exactly(tmp_path):
    clips = torch.randn(8, 4, 4, 8, 8, generator=seeded(2))

    def run(folder, **settings):
        model, objective, _ = wan_setup(lora_rank=None)
        trainer = Trainer(objective, model, clips, training_config(folder, **settings))
        return trainer, objective, trainer.train()

    _, straight, result = run(tmp_path / "a")
    initial_head = wan_setup(lora_rank=None)[1].head.state_dict()
    assert any(not torch.equal(value, initial_head[name]) for name, value in straight.head.state_dict().items())
    run(tmp_path / "b", max_steps=1)
    _, resumed, resumed_result = run(tmp_path / "b", resume_from="latest")
    for name, value in straight.head.state_dict().items():
        torch.testing.assert_close(resumed.head.state_dict()[name], value, rtol=0, atol=0)
    for (name, value), (_, other) in zip(result.model.state_dict().items(), resumed_result.model.state_dict().items(),
                                         strict=True):
        torch.testing.assert_close(other, value, rtol=0, atol=0, msg=name)


def test_bad_inputs_raise_one_clear_error():
    model, objective, clips = wan_setup(lora_rank=None)
    base = objective.base_objective
    mismatched = CREPAObjective(base, model, encoder=RandomConvFrameEncoder(4, feature_dim=8), feature_dim=16)
    with pytest.raises(ValueError, match="the encoder gives 8 features per position, but the projection head maps to "
                                         "feature_dim = 16"):
        mismatched.loss(model, clips, seeded(0))
    with pytest.raises(ValueError, match="has no non-empty block list"):
        CREPAObjective(base, torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match=r"block_index must be an integer in \[0, 2\)"):
        CREPAObjective(base, model, block_index=2)
    for kwargs, message in [(dict(tau=0.0), "tau must be a finite number > 0"),
                            (dict(loss_weight=-1.0), "loss_weight must be a finite number >= 0"),
                            (dict(neighbour_distance=-1), "neighbour_distance must be an integer >= 0"),
                            (dict(encoder=lambda frames: frames), "feature_dim must be a positive integer")]:
        with pytest.raises(ValueError, match=message):
            CREPAObjective(base, model, **kwargs)
    with pytest.raises(TypeError, match="base_objective must have loss"):
        CREPAObjective(object(), model)
    with pytest.raises(TypeError, match="encoder must be a callable"):
        CREPAObjective(base, model, encoder="dinov2")
    with pytest.raises(ValueError, match="a CREPA batch is clean latents"):
        objective.loss(model, clips[:, 0], seeded(0))
    with pytest.raises(ValueError, match="the encoder must map frames"):
        CREPAObjective(base, model, encoder=lambda frames: frames.mean(dim=(2, 3))[:, :, None], feature_dim=4).loss(
            model, clips, seeded(0))
    cog_model, cog_objective, batch = cogvideox_setup()
    with pytest.raises(ValueError, match="the clip's 8 frames do not map onto the block's 3 token frames"):
        cog_objective.loss(cog_model, {**batch, "frames": batch["frames"][:, :, :8]}, seeded(0))


def test_train_crepa_writes_an_adapter_that_loads(tmp_path):
    output = tmp_path / "run"
    assert train_main(["crepa", "--max-steps", "1", "--batch-size", "2", "--checkpoint-every", "0", "--seed", "1",
                       "--output-dir", str(output)]) == 0
    model = toy_backbone(1)
    model.load_lora_adapter(output / "final", prefix=None, use_safetensors=True)
    assert any("lora_B" in name and value.abs().sum() > 0 for name, value in model.state_dict().items())
