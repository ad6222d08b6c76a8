"""A method's settings saved the way diffusers saves a scheduler's config: one JSON file of numbers and names, in a
folder or a Hub repository."""

from __future__ import annotations

from diffusers.configuration_utils import ConfigMixin

HUB_DOWNLOAD_KEYS = ("cache_dir", "force_download", "local_files_only", "token", "revision")


class MethodSettingsMixin(ConfigMixin):
    """``save_pretrained`` / ``from_pretrained`` for methods configured by ``register_to_config``. The objects named
    in ``ignore_for_config`` (models, rewards, losses) are not saved; loading takes them again as keyword arguments,
    ``Method.from_pretrained(folder, reward=...)``."""

    def save_pretrained(self, save_directory, push_to_hub: bool = False, **kwargs) -> None:
        """Write ``config_name`` with the method's numbers and names."""
        self.save_config(save_directory, push_to_hub=push_to_hub, **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, subfolder: str | None = None, **kwargs):
        """The method with the saved settings of a folder or Hub id, and the objects passed in ``kwargs``."""
        hub_kwargs = {key: kwargs.pop(key) for key in HUB_DOWNLOAD_KEYS if key in kwargs}
        objects = {key: kwargs.pop(key) for key in cls.ignore_for_config if key in kwargs}
        config = cls.load_config(pretrained_model_name_or_path, subfolder=subfolder, **hub_kwargs)
        init_kwargs, unused, _ = cls.extract_init_dict(config, **kwargs)
        if unused_arguments := sorted(k for k in unused if not k.startswith("_")):
            raise ValueError(f"{cls.__name__} got unexpected arguments {unused_arguments}")
        return cls(**init_kwargs, **objects)
