"""Model-card templates (Jinja) per component kind, rendered by ``diffusers_ext.hub``."""
