"""MVDream's multi-view attention and camera embedding (arXiv 2308.16512): identical views attend exactly as one view
does; objects never see each other; one view per object is the 2D model exactly; the camera embedding starts at zero
and changes the prediction only when cameras are given; everything is removable; bad inputs raise one clear error."""

from __future__ import annotations

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from diffusers_ext.pipelines.three_d.multiview_attention import (
    CameraEmbedding,
    MultiViewAttnProcessor,
    add_multiview_attention,
    attach_camera_embedding,
    make_multiview,
    multiview_num_views,
    normalized_camera_features,
    remove_multiview,
    single_view_attention,
)
from diffusers_ext.pipelines.three_d.rendering import orbit_cameras

TEXT_DIM = 16


def tiny_unet() -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=8, in_channels=3, out_channels=3,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=TEXT_DIM, attention_head_dim=4, norm_num_groups=4).eval()


def unet_inputs(images: int = 8) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return (torch.randn(images, 3, 8, 8, generator=generator), torch.tensor(400),
            torch.randn(images, 2, TEXT_DIM, generator=generator))


def attention_layer() -> Attention:
    torch.manual_seed(0)
    return Attention(query_dim=16, heads=2, dim_head=8).eval()


def test_identical_views_attend_exactly_as_one_view_and_objects_stay_apart():
    layer, tokens = attention_layer(), torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(0))
    single = AttnProcessor2_0()(layer, tokens)
    processor = MultiViewAttnProcessor(3)
    # N copies of a view: every key appears N times with the same weight, so softmax gives the one-view attention.
    copies = tokens.repeat_interleave(3, dim=0)  # object 0's three views, then object 1's
    torch.testing.assert_close(processor(layer, copies), single.repeat_interleave(3, dim=0), rtol=1e-5, atol=1e-6)

    views = torch.randn(6, 5, 16, generator=torch.Generator().manual_seed(1))
    out = processor(layer, views)
    # Permuting an object's views permutes its outputs; another object's views change nothing of this one's.
    permuted = views[[2, 0, 1, 3, 4, 5]]
    torch.testing.assert_close(processor(layer, permuted), out[[2, 0, 1, 3, 4, 5]], rtol=1e-5, atol=1e-6)
    changed = views.clone()
    changed[4] += 1.0
    torch.testing.assert_close(processor(layer, changed)[:3], out[:3], rtol=0, atol=0)
    assert (processor(layer, changed)[3] - out[3]).abs().max() > 1e-3  # the same object's views do interact


def test_multiview_unet_is_the_2d_unet_with_one_view_and_comes_back_exactly():
    unet = tiny_unet()
    sample, timestep, text = unet_inputs()
    base = unet(sample, timestep, text).sample
    own = dict(unet.attn_processors)
    camera_embedding = CameraEmbedding(unet.time_embedding.linear_2.out_features)
    make_multiview(unet, 4, camera_embedding)
    assert multiview_num_views(unet) == 4
    cameras = orbit_cameras(4).repeat(2, 1, 1)
    joint = unet(sample, timestep, text, cameras=cameras).sample
    assert (joint - base).abs().max() > 1e-3  # views now see each other
    with single_view_attention(unet):
        # The camera embedding's output layer starts at zero: with one view per object this is the 2D model.
        torch.testing.assert_close(unet(sample, timestep, text, cameras=cameras).sample, base, rtol=0, atol=0)
    assert multiview_num_views(unet) == 4

    torch.nn.init.normal_(camera_embedding.linear_2.weight, generator=torch.Generator().manual_seed(2))
    with_cameras = unet(sample, timestep, text, cameras=cameras).sample
    assert (with_cameras - joint).abs().max() > 1e-3
    turned = unet(sample, timestep, text, cameras=orbit_cameras(4, start_azimuth=45.0).repeat(2, 1, 1)).sample
    assert (turned - with_cameras).abs().max() > 1e-3  # the prediction depends on the cameras
    torch.testing.assert_close(unet(sample, timestep, text).sample, joint, rtol=0, atol=0)  # no cameras: none added

    remove_multiview(unet)
    assert {name: type(p) for name, p in unet.attn_processors.items()} == {n: type(p) for n, p in own.items()}
    torch.testing.assert_close(unet(sample, timestep, text).sample, base, rtol=0, atol=0)
    with pytest.raises(TypeError):
        unet(sample, timestep, text, cameras=cameras)  # the hook is gone with the camera embedding


def test_camera_features_sit_on_the_unit_sphere_and_the_embedding_round_trips(tmp_path):
    near, far = orbit_cameras(3, radius=1.5), orbit_cameras(3, radius=4.0)
    features = normalized_camera_features(far)
    torch.testing.assert_close(features, normalized_camera_features(near), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(features.reshape(3, 4, 4)[:, :3, 3].norm(dim=-1), torch.ones(3), rtol=1e-5, atol=0)
    torch.testing.assert_close(features.reshape(3, 4, 4)[:, :3, :3], far[:, :3, :3])

    embedding = CameraEmbedding(embedding_dim=12)
    torch.nn.init.normal_(embedding.linear_2.weight, generator=torch.Generator().manual_seed(0))
    embedding.save_pretrained(tmp_path)
    loaded = CameraEmbedding.from_pretrained(tmp_path)
    torch.testing.assert_close(loaded(far), embedding(far), rtol=0, atol=0)


def test_bad_inputs_raise_one_clear_error():
    unet = tiny_unet()
    sample, timestep, text = unet_inputs(images=6)
    with pytest.raises(ValueError, match="num_views must be a positive integer"):
        MultiViewAttnProcessor(0)
    with pytest.raises(ValueError, match="width 5, the UNet's timestep embedding 32"):
        attach_camera_embedding(unet, CameraEmbedding(5))
    add_multiview_attention(unet, 4)
    with pytest.raises(ValueError, match="already has multi-view attention for 4 views"):
        add_multiview_attention(unet, 2)
    with pytest.raises(ValueError, match="built for 4 views per object, but the batch has 6 images"):
        unet(sample, timestep, text)
    attach_camera_embedding(unet, CameraEmbedding(32))
    with pytest.raises(ValueError, match=r"shape \(N, 4, 4\)"):
        unet(sample[:4], timestep, text[:4], cameras=torch.eye(4).repeat(4, 1, 1)[:, :3])
    with pytest.raises(ValueError, match="one camera per image: 4 images, 2 cameras"):
        unet(sample[:4], timestep, text[:4], cameras=orbit_cameras(2))
    with pytest.raises(ValueError, match="for self-attention layers"):
        MultiViewAttnProcessor(2)(attention_layer(), torch.zeros(2, 3, 16), encoder_hidden_states=torch.zeros(2, 1, 16))
