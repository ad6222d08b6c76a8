from diffusers_ext.schedulers import MaskedDiffusionScheduler  # noqa: F401
