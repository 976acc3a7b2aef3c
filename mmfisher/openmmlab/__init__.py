"""OpenMMLab adapters: analysis of config-built models (hooks and builders build on it)."""
from .handlers import register_openmmlab_handlers

register_openmmlab_handlers()

from .analysis import analyse_model, build_from_config, example_forward, register_all_modules  # noqa: E402

__all__ = ['analyse_model', 'build_from_config', 'example_forward', 'register_all_modules']
