"""OpenMMLab adapters: analysis of config-built models, the pruning hook, the pruned-model builder."""
from .handlers import register_openmmlab_handlers

register_openmmlab_handlers()

from .analysis import analyse_model, build_from_config, example_forward, register_all_modules  # noqa: E402
from .builder import build_pruned_model, load_channel_spec  # noqa: E402
from .hooks import FisherPruningHook, SafeCheckpointHook  # noqa: E402

__all__ = ['analyse_model', 'build_from_config', 'example_forward', 'register_all_modules',
           'build_pruned_model', 'load_channel_spec', 'FisherPruningHook', 'SafeCheckpointHook']
