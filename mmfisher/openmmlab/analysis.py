"""Analyse models built from mmdet / mmpretrain configs.

``build_from_config(cfg)`` builds the model exactly as the config says (no
pretrained download: ``init_cfg`` checkpoints are not loaded here);
``example_forward(model, shape)`` returns the callable the tracer runs: the
detector's ``_forward`` ('tensor' mode, with minimal data samples so two-stage
detectors run their RoI head) or the classifier's ``forward(mode='tensor')``.
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn as nn

from ..core import CouplingGraph, analyse


def register_all_modules() -> None:
    """Register mmdet's and mmpretrain's modules (whichever are installed) and mmfisher's."""
    import importlib
    import importlib.util

    from ..compat import torchvision_fallback
    for scope in ('mmdet', 'mmpretrain'):
        if scope == 'mmpretrain' and importlib.util.find_spec('mmpretrain') is not None:
            torchvision_fallback.install()   # mmpretrain imports torchvision; only it needs the fallback
        try:
            mod = importlib.import_module(f'{scope}.utils')
            mod.register_all_modules(init_default_scope=False)
        except ImportError:
            pass
    import mmfisher.openmmlab  # noqa: F401  (handlers, hooks, builders)


def default_scope_of(cfg) -> str:
    scope = cfg.get('default_scope', None)
    if scope:
        return scope
    t = str(cfg.model.get('type', ''))
    return 'mmpretrain' if 'Classifier' in t else 'mmdet'


def build_from_config(cfg) -> nn.Module:
    """Build ``cfg.model`` in its default scope, without loading pretrained weights."""
    from mmengine.config import Config
    from mmengine.registry import DefaultScope
    if not isinstance(cfg, Config):
        cfg = Config.fromfile(cfg)
    register_all_modules()
    scope = default_scope_of(cfg)
    model_cfg = cfg.model.copy()
    _drop_pretrained(model_cfg)
    with DefaultScope.overwrite_default_scope(scope):
        if scope == 'mmpretrain':
            from mmpretrain.registry import MODELS
        else:
            from mmdet.registry import MODELS
        return MODELS.build(model_cfg)


def _drop_pretrained(cfg: Any) -> None:
    if isinstance(cfg, dict):
        init = cfg.get('init_cfg')
        if isinstance(init, dict) and init.get('type') == 'Pretrained':
            cfg.pop('init_cfg')
        for v in cfg.values():
            _drop_pretrained(v)
    elif isinstance(cfg, (list, tuple)):
        for v in cfg:
            _drop_pretrained(v)


def example_samples(model: nn.Module, shape: Sequence[int]) -> Optional[list]:
    """Minimal data samples a detector's ``_forward`` needs for a ``shape`` batch (None for classifiers)."""
    try:
        from mmdet.models.detectors import BaseDetector
    except ImportError:  # pragma: no cover
        return None
    if not isinstance(model, BaseDetector):
        return None
    from mmdet.structures import DetDataSample
    h, w = int(shape[-2]), int(shape[-1])
    return [DetDataSample(metainfo=dict(img_shape=(h, w), ori_shape=(h, w), pad_shape=(h, w),
                                        batch_input_shape=(h, w), scale_factor=(1.0, 1.0)))
            for _ in range(shape[0])]


def tensor_forward(model: nn.Module, x: torch.Tensor, samples: Optional[list]) -> Any:
    """The network in 'tensor' mode: a detector's ``_forward`` (with its RoI head, if any) or a
    classifier's ``forward(mode='tensor')``; no post-processing."""
    if samples is not None:
        return model._forward(x, samples)
    return model(x, mode='tensor')


def example_forward(model: nn.Module, shape: Sequence[int] = (1, 3, 320, 320)) -> Callable[[], Any]:
    """The forward the analysis records: ``shape`` is the (already normalised) input batch.

    The input is drawn from a generator of its own (seed 0): the same on every rank and every
    call, and the global random stream of a training run is left untouched.
    """
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0)).to(next(model.parameters()).device)
    samples = example_samples(model, shape)
    return lambda: tensor_forward(model, x, samples)


def analyse_model(model: nn.Module, shape: Sequence[int] = (1, 3, 320, 320), strict: bool = False) -> CouplingGraph:
    """Coupled groups of an OpenMMLab model, recorded on a random input of ``shape`` (``strict``: see
    :func:`mmfisher.core.analyse`)."""
    register_all_modules()
    return analyse(model, forward=example_forward(model, shape), strict=strict)
