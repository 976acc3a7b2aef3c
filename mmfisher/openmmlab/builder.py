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

Nothing runs half-built: the spec is checked in full before the model is built (form,
every group of the architecture and nothing else, the architecture's layers; see
:mod:`mmfisher.core.spec`), a pruned checkpoint's weights are checked against the SHA-256
it was saved with, and any checkpoint loaded into the compact model later (``load_from``,
``tools/test.py``, mmdet's own tools) must fill every tensor in its shape
(:class:`StrictWeights`); each failure is one error naming the file and the first misfit.
"""
from __future__ import annotations

import json
import os.path as osp
from typing import Any, Optional, Sequence, Tuple, Union

import torch
from mmengine.registry import MODELS

from ..core import SpecError, SpecFormatError, shrink, spec_to_keep, validate_spec, weights_digest
from ..core.spec import first_weight_mismatch
from .analysis import _drop_pretrained, analyse_model


class CheckpointMismatchError(ValueError):
    """Weights that do not fill the compact model exactly (another spec, another architecture)."""


def _read_spec_file(source: str) -> Tuple[Any, Optional[Sequence[int]]]:
    """The raw spec and analysis input shape a file holds; one clear error naming the file otherwise."""
    if not osp.isfile(source):
        raise FileNotFoundError(f'channel spec {source!r} does not exist: give the pruned checkpoint the '
                                f'FisherPruningHook wrote (pruned_<resource>_<ratio>.pth in the pruning '
                                f'work_dir) or a channel_spec JSON file')
    if source.endswith('.json'):
        try:
            with open(source) as f:
                return json.load(f), None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise SpecFormatError(f'channel spec {source!r} is not valid JSON: {e}') from None
    try:
        ckpt = torch.load(source, map_location='cpu', weights_only=True)
    except Exception as e:  # a truncated, corrupted or non-checkpoint file
        raise SpecFormatError(f'channel spec {source!r} could not be read as a checkpoint '
                              f'({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""}); give a pruned '
                              f'checkpoint (.pth) or a JSON spec (.json)') from None
    meta = ckpt.get('meta', {}) if isinstance(ckpt, dict) else {}
    if not isinstance(meta, dict) or 'channel_spec' not in meta:
        raise SpecFormatError(f'{source!r} has no channel spec in its meta: it is not a pruned checkpoint written '
                              f'by FisherPruningHook (those are named pruned_<resource>_<ratio>.pth)')
    info = meta.get('mmfisher', {})
    digest = info.get('weights_sha256')
    if digest is not None and isinstance(ckpt.get('state_dict'), dict) and \
            weights_digest(ckpt['state_dict']) != digest:
        raise CheckpointMismatchError(f'pruned checkpoint {source!r} is corrupted: its weights do not match the '
                                      f'SHA-256 written when it was saved. Use an intact copy.')
    return meta['channel_spec'], info.get('analysis_input_shape')


def load_channel_spec(source: Union[str, dict]) -> Tuple[dict, Optional[Sequence[int]]]:
    """``(spec, analysis_input_shape or None)`` from a pruned checkpoint, a JSON file or a dict,
    checked for form (:func:`mmfisher.core.validate_spec`); errors name the file."""
    if isinstance(source, dict):
        spec, shape = dict(source), None
    elif isinstance(source, str):
        spec, shape = _read_spec_file(source)
    else:
        raise TypeError(f'channel_spec must be a path or a dict, not {type(source).__name__}')
    try:
        validate_spec(spec)
    except SpecError as e:
        raise type(e)(f'{_name(source)}: {e}') from None
    return spec, shape


def _name(source: Any) -> str:
    return f'channel spec {source!r}' if isinstance(source, str) else 'the channel spec'


class StrictWeights:
    """``load_state_dict`` pre-hook of a compact model: a checkpoint must fill every tensor in its shape.

    mmengine loads ``load_from`` and tested checkpoints with ``strict=False``: weights of another
    channel spec would load with warnings, leave layers at random values and exit 0. This turns
    that into an error naming the first tensor that does not fit (whichever tool loads it).
    """

    def __init__(self, source: str) -> None:
        self.source = source

    def __call__(self, module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                 error_msgs) -> None:
        problem = first_weight_mismatch(module.state_dict(), state_dict, prefix)
        if problem is not None:
            raise CheckpointMismatchError(
                f'the checkpoint does not fit the pruned model built from {self.source}: {problem}. Load the '
                f'weights of the pruned checkpoint that spec came from (channel_spec and load_from the same '
                f'pruned_*.pth), or a checkpoint fine-tuned from it')


def build_pruned_model(architecture: dict, channel_spec: Union[str, dict],
                       input_shape: Optional[Sequence[int]] = None, data_preprocessor: Optional[dict] = None,
                       **kwargs: Any):
    """Build ``architecture`` and shrink it to ``channel_spec`` (see module docstring).

    ``data_preprocessor``: what mmengine's runner passes from a config's top-level
    ``data_preprocessor`` (mmpretrain configs); it goes to the architecture as it would.
    ``input_shape``: ``(H, W)`` (3 channels) or ``(C, H, W)`` of the analysis input; default: the one the
    pruned checkpoint was analysed at, else 320x320.
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
    shape = [int(v) for v in (input_shape or saved_shape or (320, 320))]
    chw = (3, shape[0], shape[-1]) if len(shape) < 3 else tuple(shape[:3])   # (H, W): 3 channels
    graph = analyse_model(model, (1,) + chw)
    try:
        keep = spec_to_keep(graph, spec)
    except SpecError as e:
        raise type(e)(f'{_name(channel_spec)} does not fit the configured architecture: {e}') from None
    shrink(model, graph, keep)
    model.register_load_state_dict_pre_hook(StrictWeights(_name(channel_spec)))
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
