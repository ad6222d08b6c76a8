"""``FrameAwareVideoPipeline`` on the Hub: saved with ``save_for_hub``, stock ``DiffusionPipeline.from_pretrained(...,
trust_remote_code=True)`` gives back the same pipeline, making the same frames for the same seed in every task, from
a folder and by Hub id through a local Hub server (olah; see shared/HUB_TESTING.md); without ``trust_remote_code``
stock diffusers refuses to run the loader files."""

import json

import pytest
import torch
from diffusers import AutoencoderKLWan, DiffusionPipeline, WanTransformer3DModel
from huggingface_hub import ModelCard
from test_hub import _commit_folder, local_hub, run_against_local_hub  # noqa: F401  (local_hub: the local Hub server fixture)
from tiny_video import FLOAT32_TOLERANCE, wan

from diffusers_ext.hub import save_for_hub
from diffusers_ext.pipelines.video import FrameAwareVideoPipeline
from diffusers_ext.schedulers import FrameAwareFlowMatchScheduler
from diffusers_ext.training.fvdm import BouncingShapes, toy_backbone


def pixel_pipeline() -> FrameAwareVideoPipeline:
    return FrameAwareVideoPipeline(toy_backbone(seed=0).eval(), FrameAwareFlowMatchScheduler(shift=2.0))


def vae_pipeline() -> FrameAwareVideoPipeline:
    vae = AutoencoderKLWan(base_dim=3, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True], latents_mean=[0.0] * 4, latents_std=[1.0] * 4)
    return FrameAwareVideoPipeline(wan(), FrameAwareFlowMatchScheduler(), vae=vae.eval())


def first_frame(size: int):
    """A held-out ``BouncingShapes`` frame ``(H, W, 3)`` in [0, 1]."""
    return ((BouncingShapes(1, num_frames=1, size=size, seed=7)[0][:, 0] + 1) / 2).permute(1, 2, 0).numpy()


def every_task(pipe: FrameAwareVideoPipeline, num_frames: int, size: int) -> dict[str, torch.Tensor]:
    """The pipeline's frames ``(F, C, H, W)`` for one seed in each task it takes: generation, image-to-video,
    interpolation where the VAE does not compress time, and a rolling window over twice the frames."""
    pipe.set_progress_bar_config(disable=True)
    image = first_frame(size)
    calls = {"generation": {}, "image-to-video": dict(conditioning_frames={0: image}),
             "rolling window": dict(num_frames=2 * num_frames - 1 if pipe.temporal_compression > 1
                                    else 2 * num_frames, window_frames=latent_window(pipe, num_frames),
                                    context_frames=1)}
    if pipe.temporal_compression == 1:
        calls["interpolation"] = dict(conditioning_frames={0: image, num_frames - 1: 1 - image})
    return {task: pipe(**(dict(num_frames=num_frames, height=size, width=size, num_inference_steps=3) | call),
                       generator=torch.Generator().manual_seed(4), output_type="pt").frames[0]
            for task, call in calls.items()}


def latent_window(pipe: FrameAwareVideoPipeline, num_frames: int) -> int:
    return (num_frames - 1) // pipe.temporal_compression + 1


@pytest.mark.parametrize(("make", "num_frames", "size"), [(pixel_pipeline, 8, 16), (vae_pipeline, 5, 16)],
                         ids=["pixels", "wan-vae"])
def test_save_for_hub_then_stock_from_pretrained_makes_the_same_frames_in_every_task(tmp_path, make, num_frames,
                                                                                   size):
    pipe = make()
    expected = every_task(pipe, num_frames, size)
    save_for_hub(pipe, tmp_path, card_template="video", repo_id="me/tiny-video", title="tiny video")

    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["_class_name"] == ["diffusers_ext_pipeline", "FrameAwareVideoPipeline"]
    assert index["scheduler"] == ["diffusers_ext_scheduler", "FrameAwareFlowMatchScheduler"]
    assert index["transformer"] == ["diffusers", "WanTransformer3DModel"]
    assert (index["vae"] == ["diffusers", "AutoencoderKLWan"]) == (make is vae_pipeline)
    assert not list(tmp_path.rglob("*.bin"))
    card = ModelCard.load(tmp_path / "README.md")
    assert 'DiffusionPipeline.from_pretrained("me/tiny-video", trust_remote_code=True)' in card.text
    assert {"frame-aware-video-pipeline", "arxiv:2410.03160"} <= set(card.data.tags)

    loaded = DiffusionPipeline.from_pretrained(tmp_path, trust_remote_code=True)
    assert type(loaded) is FrameAwareVideoPipeline and type(loaded.transformer) is WanTransformer3DModel
    assert type(loaded.scheduler) is FrameAwareFlowMatchScheduler and loaded.scheduler.config.shift == \
        pipe.scheduler.config.shift
    got = every_task(loaded, num_frames, size)
    assert list(got) == list(expected)
    for task in expected:
        torch.testing.assert_close(got[task], expected[task], **FLOAT32_TOLERANCE, msg=task)


def test_stock_diffusers_refuses_the_loader_files_without_trust_remote_code(tmp_path):
    save_for_hub(pixel_pipeline(), tmp_path)
    with pytest.raises(ValueError, match=r"(?s)custom code in diffusers_ext_pipeline\.py.*`trust_remote_code=True`"):
        DiffusionPipeline.from_pretrained(tmp_path)


LOAD_FROM_HUB = """
import json, torch
from diffusers import DiffusionPipeline
# olah answers repo metadata offline only for an explicit revision.
pipe = DiffusionPipeline.from_pretrained("org/tiny-video", revision="main", trust_remote_code=True)
pipe.set_progress_bar_config(disable=True)
frames = pipe(num_frames=16, window_frames=8, context_frames=2, num_inference_steps=3, output_type="pt",
              generator=torch.Generator().manual_seed(4)).frames
print(json.dumps({"class": type(pipe).__module__ + "." + type(pipe).__name__,
                  "scheduler": type(pipe.scheduler).__module__, "frames": frames.tolist()}))
"""


def test_hub_id_round_trip_through_a_local_hub_server(tmp_path, local_hub):  # noqa: F811
    endpoint, models = local_hub
    pipe = pixel_pipeline()
    pipe.set_progress_bar_config(disable=True)
    expected = pipe(num_frames=16, window_frames=8, context_frames=2, num_inference_steps=3, output_type="pt",
                    generator=torch.Generator().manual_seed(4)).frames
    repo = save_for_hub(pipe, models / "org" / "tiny-video", card_template="video", repo_id="org/tiny-video")
    _commit_folder(repo)
    loaded = run_against_local_hub(endpoint, tmp_path / "hf_home", LOAD_FROM_HUB)
    assert loaded["class"] == "diffusers_ext.pipelines.FrameAwareVideoPipeline"
    assert loaded["scheduler"].startswith("diffusers_ext.schedulers")
    torch.testing.assert_close(torch.tensor(loaded["frames"]), expected, **FLOAT32_TOLERANCE)
    assert list((tmp_path / "hf_home").rglob("diffusers_ext_scheduler.py"))  # it came over HTTP into the fresh cache


def test_the_shipped_model_round_trips_through_save_for_hub(tmp_path):
    from diffusers_ext import load_shipped_pipeline

    shipped = load_shipped_pipeline("tiny-fvdm-shapes")
    shipped.set_progress_bar_config(disable=True)
    save_for_hub(shipped, tmp_path / "hub", card_template="video", repo_id="you/tiny-fvdm-shapes")
    loaded = DiffusionPipeline.from_pretrained(tmp_path / "hub", trust_remote_code=True)
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded) is FrameAwareVideoPipeline
    run = dict(num_inference_steps=5, output_type="pt")
    expected = shipped(generator=torch.Generator().manual_seed(0), **run).frames
    torch.testing.assert_close(loaded(generator=torch.Generator().manual_seed(0), **run).frames, expected,
                               **FLOAT32_TOLERANCE)
