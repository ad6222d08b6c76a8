"""The 3D pipelines on the Hub: the shipped ``tiny-slice-prior`` ``DiffusionMBIRPipeline`` (the ``volume`` card) and a
tiny random ``MultiViewDiffusionPipeline`` (the ``multiview`` card), saved with ``save_for_hub`` into a local Hub
server (olah; see shared/HUB_TESTING.md), loaded by Hub id in one fresh Python with stock
``DiffusionPipeline.from_pretrained(..., trust_remote_code=True)``, reconstruct the same held-out volume from its
8-view sinogram and make the same views for the same seed as the pipelines they were saved from. One fresh Python
for both: its imports are most of the test's time."""

import torch
from huggingface_hub import ModelCard
from test_hub import _commit_folder, local_hub, run_against_local_hub  # noqa: F401  (local_hub: the local Hub server fixture)
from test_multiview_pipeline import NUM_VIEWS, tiny_pipeline
from tiny_video import FLOAT32_TOLERANCE

from diffusers_ext.hub import save_for_hub
from diffusers_ext.pipelines.three_d.volume_operators import ParallelBeamProjection, sparse_view_angles
from diffusers_ext.shipped import load_shipped_pipeline
from diffusers_ext.testing.tiny_text import TINY_TEXT_WIDTH
from diffusers_ext.training.volume_data import held_out_volumes

LOAD_BOTH_FROM_HUB = """
import json, torch
from diffusers import DiffusionPipeline
from huggingface_hub import hf_hub_download
from diffusers_ext.pipelines.three_d.volume_operators import ParallelBeamProjection, sparse_view_angles
from diffusers_ext.training.volume_data import held_out_volumes

torch.set_num_threads(1)  # as the suite's workers (conftest.py): more threads than free cores slow torch down
results = {}
for repo_id in ("org/tiny-slice-prior", "org/tiny-multiview"):
    # olah answers repo metadata offline only for an explicit revision.
    pipe = DiffusionPipeline.from_pretrained(repo_id, revision="main", trust_remote_code=True)
    pipe.set_progress_bar_config(disable=True)
    results[repo_id] = {"class": type(pipe).__module__ + "." + type(pipe).__name__,
                        "card": open(hf_hub_download(repo_id, "README.md", revision="main")).read()}
    if repo_id == "org/tiny-slice-prior":
        volume = held_out_volumes("phantom", 1, 32)[0]
        operator = ParallelBeamProjection(sparse_view_angles(8), size=32)
        output = pipe(operator.forward(volume), operator, volume.shape, num_inference_steps=4, output_type="pt",
                      generator=torch.Generator().manual_seed(0)).volume
    else:
        embeds = torch.randn(1, 3, pipe.unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(7))
        output = pipe(prompt_embeds=embeds, num_objects_per_prompt=2, num_inference_steps=2, guidance_scale=3.0,
                      output_type="latent", generator=torch.Generator().manual_seed(0)).images
        results[repo_id] |= {"camera_embedding": type(pipe.camera_embedding).__module__, "num_views": pipe.num_views}
    results[repo_id]["output"] = output.tolist()
print(json.dumps(results))
"""


def reconstruct_held_out_phantom(pipe) -> torch.Tensor:
    """What ``LOAD_BOTH_FROM_HUB`` computes with the slice prior, here: 8-view CT of a 32^3 held-out phantom."""
    volume = held_out_volumes("phantom", 1, 32)[0]
    operator = ParallelBeamProjection(sparse_view_angles(8), size=32)
    return pipe(operator.forward(volume), operator, volume.shape, num_inference_steps=4, output_type="pt",
                generator=torch.Generator().manual_seed(0)).volume


def two_objects_views(pipe) -> torch.Tensor:
    """What ``LOAD_BOTH_FROM_HUB`` computes with the multi-view pipeline, here: the views of two objects before
    clipping (``"latent"``: this pipeline has no VAE), since the random tiny UNet's clipped views are almost all 0 or 1
    (99.6 % of the pixels) and would hide a difference."""
    embeds = torch.randn(1, 3, TINY_TEXT_WIDTH, generator=torch.Generator().manual_seed(7))
    return pipe(prompt_embeds=embeds, num_objects_per_prompt=2, num_inference_steps=2, guidance_scale=3.0,
                output_type="latent", generator=torch.Generator().manual_seed(0)).images


def test_both_3d_pipelines_round_trip_by_hub_id_and_give_the_same_output(tmp_path, local_hub):  # noqa: F811
    endpoint, models = local_hub
    slice_prior = load_shipped_pipeline("tiny-slice-prior")
    slice_prior.set_progress_bar_config(disable=True)
    multiview = tiny_pipeline()
    expected = {"org/tiny-slice-prior": reconstruct_held_out_phantom(slice_prior),
                "org/tiny-multiview": two_objects_views(multiview)}
    for pipe, repo_id, template in ((slice_prior, "org/tiny-slice-prior", "volume"),
                                    (multiview, "org/tiny-multiview", "multiview")):
        _commit_folder(save_for_hub(pipe, models / repo_id, card_template=template, repo_id=repo_id))

    loaded = run_against_local_hub(endpoint, tmp_path / "hf_home", LOAD_BOTH_FROM_HUB)

    # The installed package's own classes, not copies diffusers made of downloaded code.
    assert loaded["org/tiny-slice-prior"]["class"] == "diffusers_ext.pipelines.DiffusionMBIRPipeline"
    assert loaded["org/tiny-multiview"]["class"] == "diffusers_ext.pipelines.MultiViewDiffusionPipeline"
    assert loaded["org/tiny-multiview"]["camera_embedding"] == "diffusers_ext.pipelines.three_d.multiview_attention"
    assert loaded["org/tiny-multiview"]["num_views"] == NUM_VIEWS
    for repo_id, template, card_tags, card_phrase in (
            ("org/tiny-slice-prior", "volume", {"diffusion-mbir-pipeline", "arxiv:2211.10655"},
             "3D-reconstruction pipeline"),
            ("org/tiny-multiview", "multiview", {"multi-view-diffusion-pipeline", "arxiv:2308.16512"},
             "multi-view pipeline")):
        output = torch.tensor(loaded[repo_id]["output"])
        assert output.shape == expected[repo_id].shape, repo_id
        torch.testing.assert_close(output, expected[repo_id], **FLOAT32_TOLERANCE,
                                   msg=lambda mismatch, repo_id=repo_id: f"{repo_id}: {mismatch}")
        card = ModelCard(loaded[repo_id]["card"])  # as the Hub serves it
        assert {template, *card_tags} <= set(card.data.tags), repo_id
        assert card_phrase in card.text, repo_id
        assert f'DiffusionPipeline.from_pretrained("{repo_id}", trust_remote_code=True)' in card.text, repo_id
    # The loader files came over HTTP into the fresh cache.
    assert list((tmp_path / "hf_home").rglob("camera_embedding/diffusers_ext_camera_embedding.py"))
    assert len(list((tmp_path / "hf_home").rglob("diffusers_ext_pipeline.py"))) >= 2
