"""Model cards rendered from the templates in ``diffusers_ext/hub_cards``."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from importlib import resources

from huggingface_hub import ModelCard, ModelCardData

from ..components import Component

PACKAGE_TAG = "diffusers-ext"


def available_card_templates() -> list[str]:
    return sorted(p.name[:-3] for p in resources.files("diffusers_ext.hub_cards").iterdir() if p.name.endswith(".md"))


def card_template_text(template: str) -> str:
    """The Jinja text of ``hub_cards/<template>.md``; a clear error when there is none."""
    path = resources.files("diffusers_ext.hub_cards") / f"{template}.md"
    if not path.is_file():
        raise ValueError(
            f"no Hub card template named {template!r} in diffusers_ext/hub_cards; "
            f"available: {available_card_templates()}"
        )
    return path.read_text(encoding="utf-8")


def _kebab(name: str) -> str:
    """``MaskedDiffusionLMPipeline`` -> ``masked-diffusion-lm-pipeline``: a hyphen before each capitalised word and
    after each run of capitals (an acronym)."""
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "-", name).lower()


def render_model_card(
    template: str,
    *,
    class_name: str,
    components: Sequence[Component] = (),
    repo_id: str | None = None,
    base_model: str | None = None,
    license: str = "apache-2.0",
    pipeline_tag: str | None = None,
    tags: Iterable[str] = (),
    title: str | None = None,
    description: str | None = None,
    loader_files: Sequence[str] = (),
) -> ModelCard:
    """Render ``hub_cards/<template>.md`` with Hub metadata: ``library_name: diffusers``, tags (``diffusers``,
    ``diffusers-ext``, the template kind, each method's name and ``arxiv:<id>``, then ``tags``), ``license``,
    ``base_model`` and ``pipeline_tag`` when given."""
    text = card_template_text(template)
    all_tags = ["diffusers", PACKAGE_TAG, template]
    all_tags += [_kebab(c.name) for c in components]
    all_tags += [f"arxiv:{c.arxiv}" for c in components if c.arxiv]
    all_tags += list(tags)
    card_data = ModelCardData(
        library_name="diffusers",
        license=license,
        base_model=base_model,
        pipeline_tag=pipeline_tag,
        tags=list(dict.fromkeys(all_tags)),
    )
    return ModelCard.from_template(
        card_data,
        template_str=text,
        title=title or repo_id or class_name,
        description=description or "",
        class_name=class_name,
        components=list(components),
        repo_id=repo_id or "<user>/<repo>",
        loader_files=list(loader_files),
    )
