from diffusers_ext.schedulers import ResShiftScheduler  # noqa: F401
