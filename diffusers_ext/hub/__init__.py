"""Sharing on the Hugging Face Hub: model cards from ``hub_cards/`` and folders stock diffusers can load."""

from .cards import available_card_templates, render_model_card
from .publish import push_to_hub, save_for_hub, upload_to_hub

__all__ = ["available_card_templates", "push_to_hub", "render_model_card", "save_for_hub", "upload_to_hub"]
