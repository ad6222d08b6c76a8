"""Save diffusers-ext pipelines, models and schedulers so that stock diffusers loads them from a folder or the Hub.

Stock diffusers only imports component libraries it knows (diffusers, transformers) when loading from a Hub id, so a
``model_index.json`` entry ``["diffusers_ext.schedulers.scheduling_x", "XScheduler"]`` cannot be loaded from the Hub.
``save_for_hub`` therefore replaces each such entry with a one-line loader file in the component's folder,

    unet/diffusers_ext_unet.py:   from diffusers_ext.testing.oracle import GaussianMixtureDenoiser
    model_index.json:             "unet": ["diffusers_ext_unet", "GaussianMixtureDenoiser"]

(and ``diffusers_ext_pipeline.py`` at the root for a pipeline class of ours), which diffusers runs only with
``trust_remote_code=True``; the class it returns is the installed package's own. Models get an ``auto_map`` entry so
that ``diffusers.AutoModel.from_pretrained(..., trust_remote_code=True)`` works the same way.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from diffusers import DiffusionPipeline, ModelMixin, SchedulerMixin
from huggingface_hub import HfApi

from ..components import find_component
from .cards import card_template_text, render_model_card

PACKAGE = "diffusers_ext"
PIPELINE_LOADER = f"{PACKAGE}_pipeline"
MODEL_LOADER = f"{PACKAGE}_model"


def _is_ours(cls: type) -> bool:
    return cls.__module__.split(".")[0] == PACKAGE


def _write_loader(path: Path, cls: type) -> None:
    path.write_text(f"from {cls.__module__} import {cls.__name__}  # noqa: F401\n", encoding="utf-8")


def _kind_of(obj: Any) -> str:
    if isinstance(obj, DiffusionPipeline):
        return "pipeline"
    if isinstance(obj, ModelMixin):
        return "model"
    if isinstance(obj, SchedulerMixin):
        return "scheduler"
    from ..guidance.steering import SteeringMethod

    if isinstance(obj, SteeringMethod):
        return "guidance"
    raise TypeError(
        "save_for_hub takes a DiffusionPipeline, a ModelMixin model, a SchedulerMixin scheduler or a steering method, "
        f"got {type(obj)}"
    )


def _add_pipeline_loaders(folder: Path, pipeline: DiffusionPipeline) -> tuple[list[type], list[str]]:
    """Rewrite ``model_index.json`` to load our classes through loader files; return the classes and the files."""
    index_path = folder / "model_index.json"
    index = json.loads(index_path.read_text(encoding="utf-8"))
    classes, files = [], []
    for name, component in pipeline.components.items():
        if component is None or not _is_ours(type(component)):
            continue
        module = f"{PACKAGE}_{name}"
        _write_loader(folder / name / f"{module}.py", type(component))
        index[name] = [module, type(component).__name__]
        classes.append(type(component))
        files.append(f"{name}/{module}.py")
    if _is_ours(type(pipeline)):
        _write_loader(folder / f"{PIPELINE_LOADER}.py", type(pipeline))
        index["_class_name"] = [PIPELINE_LOADER, type(pipeline).__name__]
        classes.insert(0, type(pipeline))
        files.insert(0, f"{PIPELINE_LOADER}.py")
    index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return classes, files


def _add_model_loader(folder: Path, model: ModelMixin) -> list[str]:
    if not _is_ours(type(model)):
        return []
    _write_loader(folder / f"{MODEL_LOADER}.py", type(model))
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["auto_map"] = {"AutoModel": f"{MODEL_LOADER}.{type(model).__name__}"}
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return [f"{MODEL_LOADER}.py"]


def save_for_hub(
    obj: Any,
    folder: str | Path,
    *,
    card_template: str | None = None,
    **card_fields: Any,
) -> Path:
    """Save ``obj`` (safetensors) into ``folder`` with a model card and what stock diffusers needs to load it.

    Args:
        obj: a pipeline, model, scheduler or steering method (``diffusers_ext.guidance``).
        folder: created if missing.
        card_template: a template name in ``diffusers_ext/hub_cards`` (default: the object's kind).
        card_fields: ``repo_id``, ``base_model``, ``license``, ``pipeline_tag``, ``tags``, ``title``, ``description``
            (see ``render_model_card``).

    Returns:
        The folder. Load it back with ``DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)`` (pipelines),
        ``AutoModel.from_pretrained(folder, trust_remote_code=True)`` (models) or ``<Class>.from_pretrained(folder)``.
    """
    kind = _kind_of(obj)
    template = card_template or kind
    card_template_text(template)  # fail before writing anything
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)

    if kind in ("scheduler", "guidance"):
        obj.save_pretrained(folder)
        classes, loader_files = [type(obj)], []
    else:
        obj.save_pretrained(folder, safe_serialization=True)
        if kind == "pipeline":
            classes, loader_files = _add_pipeline_loaders(folder, obj)
        else:
            classes, loader_files = [type(obj)], _add_model_loader(folder, obj)

    components = [c for c in (find_component(cls.__name__) for cls in classes) if c is not None]
    if components and components[0].name == type(obj).__name__:
        card_fields.setdefault("description", components[0].summary + ".")
    card = render_model_card(
        template, class_name=type(obj).__name__, components=components, loader_files=loader_files, **card_fields
    )
    card.save(folder / "README.md")
    return folder


def push_to_hub(
    obj: Any,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool | None = None,
    commit_message: str = "Upload with diffusers-ext",
    **card_fields: Any,
):
    """``save_for_hub`` into a temporary folder, then ``upload_to_hub``. Returns huggingface_hub's ``CommitInfo``."""
    return upload_to_hub(lambda folder: save_for_hub(obj, folder, repo_id=repo_id, **card_fields), repo_id,
                         token=token, private=private, commit_message=commit_message)


def upload_to_hub(write: Callable[[Path], Any], repo_id: str, *, token: str | None = None,
                  private: bool | None = None, commit_message: str = "Upload with diffusers-ext"):
    """``write(folder)`` into a temporary folder, then huggingface_hub's ``create_repo`` (kept if it exists) and
    ``upload_folder``. Returns huggingface_hub's ``CommitInfo``."""
    with tempfile.TemporaryDirectory() as folder:
        write(Path(folder))
        api = HfApi(token=token)
        api.create_repo(repo_id, private=private, exist_ok=True)
        return api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message=commit_message)
