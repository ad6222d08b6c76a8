from diffusers_ext.schedulers import FrameAwareFlowMatchScheduler  # noqa: F401
