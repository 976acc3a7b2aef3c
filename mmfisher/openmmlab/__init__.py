"""OpenMMLab adapters: analysis of config-built models, the pruning hook, the pruned-model builder."""
import importlib.util

from ..compat import torchvision_fallback

if importlib.util.find_spec('mmpretrain') is not None:
    # before anything imports mmdet.models: mmdet's ReID data preprocessor and models import mmpretrain,
    # which imports torchvision; a failed import there leaves them refusing to build ("mim install
    # mmpretrain"). Never shadows a real torchvision (see torchvision_fallback).
    torchvision_fallback.install()

from .handlers import register_openmmlab_handlers  # noqa: E402

register_openmmlab_handlers()

from .analysis import analyse_model, build_from_config, example_forward, register_all_modules  # noqa: E402
from .builder import build_pruned_model, load_channel_spec  # noqa: E402
from .hooks import FisherPruningHook, SafeCheckpointHook  # noqa: E402

__all__ = ['analyse_model', 'build_from_config', 'example_forward', 'register_all_modules',
           'build_pruned_model', 'load_channel_spec', 'FisherPruningHook', 'SafeCheckpointHook']
