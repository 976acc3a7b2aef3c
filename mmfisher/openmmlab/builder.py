"""``type='PrunedModel'``: the compact model as an ordinary mmdet / mmpretrain model.

A fine-tune or test config wraps the original model config::

    model = dict(type='PrunedModel', architecture=_base_.model,
                 channel_spec='work_dirs/prune/pruned_flops_0.50.pth')
    load_from = 'work_dirs/prune/pruned_flops_0.50.pth'

The builder builds ``architecture`` (pretrained ``init_cfg`` weights are skipped: the
weights come from ``load_from`` or the tested checkpoint), analyses it, and removes
the channels the spec does not keep. The result is the detector / classifier class
itself, so ``tools/train.py`` fine-tunes it and ``tools/test.py CONFIG CHECKPOINT``
evaluates it unchanged. ``channel_spec``: a pruned checkpoint written by
:class:`FisherPruningHook` (its ``meta.channel_spec``), a JSON file, or the spec dict.
"""
from __future__ import annotations

import json
import os.path as osp
from typing import Any, Optional, Sequence, Tuple, Union

import torch
from mmengine.registry import MODELS

from ..core import SpecMismatchError, analyse, shrink, spec_to_keep
from .analysis import _drop_pretrained, example_forward


def load_channel_spec(source: Union[str, dict]) -> Tuple[dict, Optional[Sequence[int]]]:
    """``(spec, analysis_input_shape or None)`` from a pruned checkpoint, a JSON file or a dict."""
    if isinstance(source, dict):
        return dict(source), None
    if not isinstance(source, str):
        raise TypeError(f'channel_spec must be a path or a dict, not {type(source).__name__}')
    if not osp.isfile(source):
        raise FileNotFoundError(f'channel spec {source!r} does not exist: give the pruned checkpoint the '
                                f'FisherPruningHook wrote (pruned_<resource>_<ratio>.pth in the pruning '
                                f'work_dir) or a channel_spec JSON file')
    if source.endswith('.json'):
        with open(source) as f:
            return json.load(f), None
    ckpt = torch.load(source, map_location='cpu', weights_only=True)
    meta = ckpt.get('meta', {}) if isinstance(ckpt, dict) else {}
    if 'channel_spec' not in meta:
        raise ValueError(f'{source!r} has no channel spec in its meta: it is not a pruned checkpoint written by '
                         f'FisherPruningHook (those are named pruned_<resource>_<ratio>.pth)')
    shape = meta.get('mmfisher', {}).get('analysis_input_shape')
    return meta['channel_spec'], shape


def build_pruned_model(architecture: dict, channel_spec: Union[str, dict],
                       input_shape: Optional[Sequence[int]] = None, data_preprocessor: Optional[dict] = None,
                       **kwargs: Any):
    """Build ``architecture`` and shrink it to ``channel_spec`` (see module docstring).

    ``data_preprocessor``: what mmengine's runner passes from a config's top-level
    ``data_preprocessor`` (mmpretrain configs); it goes to the architecture as it would.
    """
    if kwargs:
        raise TypeError(f'PrunedModel got unknown option(s) {sorted(kwargs)}; valid options: '
                        f'architecture, channel_spec, input_shape, data_preprocessor')
    spec, saved_shape = load_channel_spec(channel_spec)
    cfg = architecture.copy() if hasattr(architecture, 'copy') else dict(architecture)
    if data_preprocessor is not None:
        cfg.setdefault('data_preprocessor', data_preprocessor)
    _drop_pretrained(cfg)
    model = MODELS.build(cfg)
    shape = input_shape or saved_shape or (320, 320)
    graph = analyse(model, forward=example_forward(model, (1, 3, int(shape[0]), int(shape[-1]))))
    try:
        keep = spec_to_keep(graph, spec)
    except SpecMismatchError as e:
        source = channel_spec if isinstance(channel_spec, str) else 'the channel spec'
        raise SpecMismatchError(f'{source} does not fit the configured architecture: {e}') from None
    shrink(model, graph, keep)
    return model


def _register() -> None:
    """Register ``PrunedModel`` in mmengine's MODELS, never replacing another module of that name
    (a re-import of this module, e.g. by a reload, replaces only its own earlier registration)."""
    existing = MODELS.module_dict.get('PrunedModel')
    if existing is not None:
        if getattr(existing, '__module__', None) != __name__ or \
                getattr(existing, '__qualname__', None) != build_pruned_model.__qualname__:
            raise KeyError(f"mmengine's MODELS registry already holds a 'PrunedModel' "
                           f'({getattr(existing, "__module__", "?")}.{getattr(existing, "__qualname__", existing)}); '
                           f"mmfisher will not replace it. Rename one of them.")
    MODELS.register_module(name='PrunedModel', module=build_pruned_model, force=existing is not None)


_register()
