"""Hub sharing: local folders and a real Hub-compatible HTTP server (olah) on 127.0.0.1; huggingface_hub is not
mocked. Uploads are not tested here: no local server accepts them (see shared/HUB_TESTING.md)."""

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_oracle, seeded
from diffusers import AutoModel, DDIMScheduler, DDPMPipeline, DiffusionPipeline
from huggingface_hub import ModelCard

from diffusers_ext.hub import available_card_templates, render_model_card, save_for_hub
from diffusers_ext.testing import GaussianMixtureDenoiser, GaussianMixtureSamplingPipeline


def test_pipeline_loads_back_through_stock_diffusers_with_trust_remote_code(tmp_path, ddim_pipeline):
    expected = ddim_pipeline(batch_size=8, num_inference_steps=5, generator=seeded(3)).samples
    save_for_hub(ddim_pipeline, tmp_path, repo_id="me/gm-sampler", base_model="me/base", pipeline_tag="unconditional-image-generation")

    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["_class_name"] == ["diffusers_ext_pipeline", "GaussianMixtureSamplingPipeline"]
    assert index["unet"] == ["diffusers_ext_unet", "GaussianMixtureDenoiser"]
    assert index["scheduler"] == ["diffusers", "DDIMScheduler"]
    loader = (tmp_path / "unet" / "diffusers_ext_unet.py").read_text()
    assert loader.startswith("from diffusers_ext.testing.oracle import GaussianMixtureDenoiser")
    assert not list(tmp_path.rglob("*.bin"))

    loaded = DiffusionPipeline.from_pretrained(tmp_path, trust_remote_code=True)
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded) is GaussianMixtureSamplingPipeline
    assert type(loaded.unet) is GaussianMixtureDenoiser
    torch.testing.assert_close(loaded(batch_size=8, num_inference_steps=5, generator=seeded(3)).samples, expected)


def test_loading_without_trust_remote_code_is_refused(tmp_path, ddim_pipeline):
    save_for_hub(ddim_pipeline, tmp_path)
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        DiffusionPipeline.from_pretrained(tmp_path)


def test_stock_pipeline_class_keeps_its_name_and_gets_a_component_loader(tmp_path, ddim_pipeline):
    pipe = DDPMPipeline(unet=ddim_pipeline.unet, scheduler=ddim_pipeline.scheduler)
    save_for_hub(pipe, tmp_path)
    assert json.loads((tmp_path / "model_index.json").read_text())["_class_name"] == "DDPMPipeline"
    loaded = DiffusionPipeline.from_pretrained(tmp_path, trust_remote_code=True)
    assert type(loaded) is DDPMPipeline and type(loaded.unet) is GaussianMixtureDenoiser


def test_model_loads_through_automodel(tmp_path):
    oracle = make_oracle(DDIMScheduler().config)
    save_for_hub(oracle, tmp_path)
    loaded = AutoModel.from_pretrained(str(tmp_path), trust_remote_code=True)  # AutoModel rejects Path objects
    assert type(loaded) is GaussianMixtureDenoiser
    x = torch.randn(3, 2, 1, 1, generator=seeded(0))
    torch.testing.assert_close(loaded(x, 321).sample, oracle(x, 321).sample)
    assert "AutoModel.from_pretrained" in (tmp_path / "README.md").read_text()


def test_scheduler_saves_with_its_card(tmp_path):
    save_for_hub(DDIMScheduler(), tmp_path, repo_id="me/sched")
    assert DDIMScheduler.from_pretrained(tmp_path).config.num_train_timesteps == 1000
    card = ModelCard.load(tmp_path / "README.md")
    assert "scheduler" in card.data.tags and card.data.library_name == "diffusers"


def test_steering_method_saves_with_its_card(tmp_path):
    from diffusers_ext.guidance import FKSteering, jpeg_compressibility

    save_for_hub(FKSteering(reward=jpeg_compressibility, num_particles=8), tmp_path, repo_id="me/fk")
    assert FKSteering.from_pretrained(tmp_path, reward=jpeg_compressibility).config.num_particles == 8
    card = ModelCard.load(tmp_path / "README.md")
    assert {"guidance", "fk-steering", "arxiv:2501.06848"} <= set(card.data.tags)
    assert "FKSteering.from_pretrained" in card.text


def test_card_metadata(tmp_path, ddim_pipeline):
    save_for_hub(ddim_pipeline, tmp_path, repo_id="me/gm", base_model="me/base", license="mit",
                 pipeline_tag="unconditional-image-generation", tags=["toy"])
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.library_name == "diffusers"
    assert card.data.base_model == "me/base"
    assert card.data.license == "mit"
    assert card.data.pipeline_tag == "unconditional-image-generation"
    assert {"diffusers", "diffusers-ext", "pipeline", "gaussian-mixture-denoiser", "toy"} <= set(card.data.tags)
    assert 'DiffusionPipeline.from_pretrained("me/gm", trust_remote_code=True)' in card.text
    assert "unet/diffusers_ext_unet.py" in card.text


def test_card_lists_paper_and_arxiv_tag():
    from diffusers_ext.components import Component

    method = Component("ToyScheduler", "scheduler", "x", "A toy", paper="A Paper", arxiv="2401.00001")
    card = render_model_card("scheduler", class_name="ToyScheduler", components=[method])
    assert "arxiv:2401.00001" in card.data.tags and "toy-scheduler" in card.data.tags
    assert "[A Paper](https://arxiv.org/abs/2401.00001)" in card.text


def test_missing_card_template_is_a_clear_error_and_writes_nothing(tmp_path, ddim_pipeline):
    assert set(available_card_templates()) >= {"pipeline", "model", "scheduler"}
    with pytest.raises(ValueError, match=r"no Hub card template named 'hologram'.*available"):
        save_for_hub(ddim_pipeline, tmp_path / "out", card_template="hologram")
    assert not (tmp_path / "out").exists()
    with pytest.raises(TypeError, match="DiffusionPipeline, a ModelMixin"):
        save_for_hub(torch.nn.Linear(2, 2), tmp_path / "out")


def run_against_local_hub(endpoint: str, home: Path, script: str, *args: str) -> dict:
    """Run ``script`` in a fresh Python with the local Hub as its endpoint and an empty cache in ``home``; the JSON
    object its last output line prints."""
    env = os.environ | {"HF_ENDPOINT": endpoint, "HF_HOME": str(home), "HF_HUB_DISABLE_TELEMETRY": "1"}
    env.pop("HF_HUB_OFFLINE", None)
    result = subprocess.run([sys.executable, "-c", script, *args], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def local_hub(tmp_path):
    """An olah server in offline mode serving git repositories under ``mirrors/models/<org>/<name>``."""
    port = _free_port()
    mirrors = tmp_path / "mirrors"
    (mirrors / "models").mkdir(parents=True)
    config = tmp_path / "olah.toml"
    config.write_text(textwrap.dedent(f"""
        [basic]
        host = "127.0.0.1"
        port = {port}
        repos-path = "{tmp_path / 'repos'}"
        mirrors-path = ["{mirrors}"]
        mirror-scheme = "http"
        mirror-netloc = "127.0.0.1:{port}"
        mirror-lfs-netloc = "127.0.0.1:{port}"
        [accessibility]
        offline = true
    """))
    olah = Path(sys.executable).parent / "olah-cli"
    server = subprocess.Popen(  # olah writes ./logs in its working directory
        [str(olah), "-c", str(config)], cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise RuntimeError("olah did not start") from None
                time.sleep(0.3)
        yield f"http://127.0.0.1:{port}", mirrors / "models"
    finally:
        server.terminate()
        server.wait(timeout=20)


def _commit_folder(folder: Path) -> None:
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@example.com"]
    subprocess.run(["git", "init", "-q", "-b", "main", str(folder)], check=True)
    subprocess.run([*git, "-C", str(folder), "add", "-A"], check=True)
    subprocess.run([*git, "-C", str(folder), "commit", "-q", "-m", "upload"], check=True)


LOAD_FROM_HUB = """
import json, sys, torch
from diffusers import DiffusionPipeline
# olah answers repo metadata offline only for an explicit revision.
pipe = DiffusionPipeline.from_pretrained("org/gm-sampler", revision="main", trust_remote_code=True)
pipe.set_progress_bar_config(disable=True)
out = pipe(batch_size=8, num_inference_steps=5, generator=torch.Generator().manual_seed(3)).samples
print(json.dumps({"class": type(pipe).__module__ + "." + type(pipe).__name__,
                  "unet": type(pipe.unet).__module__, "samples": out.tolist()}))
"""


def test_hub_id_round_trip_through_a_local_hub_server(tmp_path, local_hub, ddim_pipeline):
    endpoint, models = local_hub
    expected = ddim_pipeline(batch_size=8, num_inference_steps=5, generator=seeded(3)).samples
    repo = save_for_hub(ddim_pipeline, models / "org" / "gm-sampler", repo_id="org/gm-sampler")
    _commit_folder(repo)
    loaded = run_against_local_hub(endpoint, tmp_path / "hf_home", LOAD_FROM_HUB)
    assert loaded["class"] == "diffusers_ext.testing.pipeline_gaussian_mixture.GaussianMixtureSamplingPipeline"
    assert loaded["unet"] == "diffusers_ext.testing.oracle"
    torch.testing.assert_close(torch.tensor(loaded["samples"]), expected)
    # It really came over HTTP into the fresh cache.
    assert list((tmp_path / "hf_home").rglob("diffusers_ext_unet.py"))


LOAD_SPM_FROM_HUB = """
import json, sys, torch
sys.path.insert(0, sys.argv[1])
from tiny_pipelines import sd_pipeline
from diffusers_ext.training import load_spm
transport = load_spm(sd_pipeline(text_encoder=True), "org/spm-cat", revision="main")
images = transport("a cat", num_inference_steps=3, output_type="np", generator=torch.Generator().manual_seed(0)).images
print(json.dumps({"scales": transport.scales("a dog"), "images": images.tolist()}))
"""


def test_an_spm_membrane_loads_by_hub_id_through_a_local_hub_server(tmp_path, local_hub):
    from peft import LoraConfig
    from tiny_pipelines import sd_pipeline

    from diffusers_ext.training import TrainingConfig, load_spm, save_spm
    from diffusers_ext.training.spm import SPM_TARGET_MODULES

    endpoint, models = local_hub
    unet = sd_pipeline(text_encoder=True).unet
    torch.manual_seed(0)
    unet.add_adapter(LoraConfig(r=1, lora_alpha=1, init_lora_weights="gaussian", target_modules=SPM_TARGET_MODULES))
    for name, weight in unet.named_parameters():
        if "lora_B" in name:  # a membrane that does something
            weight.data.normal_(std=0.5)
    repo = save_spm(unet, models / "org" / "spm-cat", concept="a cat", repo_id="org/spm-cat",
                    config=TrainingConfig(lora_rank=1, lora_alpha=1, lora_target_modules=SPM_TARGET_MODULES))
    assert "load_spm" in (repo / "README.md").read_text()
    _commit_folder(repo)
    local = load_spm(sd_pipeline(text_encoder=True), repo)
    expected = local("a cat", num_inference_steps=3, output_type="np", generator=torch.Generator().manual_seed(0)).images
    loaded = run_against_local_hub(endpoint, tmp_path / "hf_home", LOAD_SPM_FROM_HUB, str(Path(__file__).parent))
    assert loaded["scales"] == local.scales("a dog")
    np.testing.assert_allclose(np.array(loaded["images"]), expected, atol=1e-6)
    assert list((tmp_path / "hf_home").rglob("spm.json"))  # it came over HTTP into the fresh cache
