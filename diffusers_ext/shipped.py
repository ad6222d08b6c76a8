"""The small models that ship inside the package, trained on data other packages ship (so they work offline):

- ``"tiny-resshift-sr4"``: 4x super-resolution of photos (``ResShiftPipeline``, 1.1 M parameters, trained on
  scikit-image's photos by ``python -m diffusers_ext.training.recipes.tiny_resshift_sr``);
- ``"tiny-mdlm-pydoc"``: a masked-diffusion language model of Python's documentation (``MaskedDiffusionLMPipeline``,
  trained by ``python -m diffusers_ext.training.recipes.tiny_text_model``);
- ``"tiny-fvdm-shapes"``: FVDM video of bouncing shapes, 8 frames of 16 x 16 px, in pixel space
  (``FrameAwareVideoPipeline``: generation, image-to-video, interpolation, long video; 0.31 M parameters, trained on
  synthetic clips by ``python -m diffusers_ext.training.recipes.tiny_fvdm_shapes``);
- ``"tiny-causal-shapes"``: that FVDM model fine-tuned frame-causal by teacher forcing (``CausalVideoPipeline``:
  extends given frames chunk by chunk with a KV cache; by
  ``python -m diffusers_ext.training.recipes.tiny_causal_shapes``);
- ``"tiny-slice-prior"``: a 2D prior of 32 x 32 volume slices for 3D inverse problems (``DiffusionMBIRPipeline``:
  sparse-view and limited-angle CT, through-plane super-resolution; trained on synthetic phantoms and blobs by
  ``python -m diffusers_ext.training.recipes.tiny_slice_prior``);
- ``"tiny-mvdream-shapes"``: MVDream multi-view generation of random coloured shapes, 4 views of 16 x 16 px around
  an object, unconditional (``MultiViewDiffusionPipeline``, 0.25 M parameters, its 2D base UNet in ``base_unet/``;
  trained on rendered synthetic shapes by ``python -m diffusers_ext.training.recipes.tiny_multiview_shapes``).

Each folder is laid out as a Hub repository (model card, ``training_report.json``, safetensors, and one-line loader
files that import this package's classes), so it loads like a shared pipeline.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

SHIPPED_MODELS = ("tiny-resshift-sr4", "tiny-mdlm-pydoc", "tiny-fvdm-shapes", "tiny-causal-shapes",
                  "tiny-slice-prior", "tiny-mvdream-shapes")


def shipped_model_path(name: str) -> Path:
    """The folder of the shipped model ``name`` inside the installed package."""
    if name not in SHIPPED_MODELS:
        raise ValueError(f"no shipped model {name!r}; the package ships {list(SHIPPED_MODELS)}")
    return Path(str(resources.files("diffusers_ext").joinpath("assets", name)))


def load_shipped_pipeline(name: str, **kwargs):
    """The shipped model ``name`` as its pipeline: ``DiffusionPipeline.from_pretrained(shipped_model_path(name),
    trust_remote_code=True, **kwargs)`` (its loader files import from this package, nothing else)."""
    from diffusers import DiffusionPipeline

    return DiffusionPipeline.from_pretrained(shipped_model_path(name), trust_remote_code=True, **kwargs)


def load_pipeline_or_shipped(expected: type, shipped_name: str, model: str | Path | None = None,
                             trust_remote_code: bool = False):
    """The shipped model ``shipped_name`` (``model=None``), or the pipeline in a folder or Hub id; a ``ValueError``
    unless it is an ``expected`` pipeline."""
    from diffusers import DiffusionPipeline

    if model is None:
        pipe = load_shipped_pipeline(shipped_name)
    else:
        pipe = DiffusionPipeline.from_pretrained(model, trust_remote_code=trust_remote_code)
    if not isinstance(pipe, expected):
        raise ValueError(f"{model} holds a {type(pipe).__name__}, not a {expected.__name__}")
    return pipe
