"""Checkpoints that load under ``torch.load(weights_only=True)``.

Since torch 2.6, ``torch.load`` refuses pickled Python objects unless told
otherwise, and mmengine 0.10.7 does not tell it otherwise: a full checkpoint its
runner wrote (the message hub keeps ``HistoryBuffer`` objects holding numpy
arrays) then fails to load for ``--resume`` and ``load_from``.

:class:`SafeCheckpointHook` fixes this where the problem is made, at save time:
in ``before_save_checkpoint`` (running after every other hook) it replaces every
value that is not a tensor or plain Python data by a tagged plain form, so the
file loads under ``weights_only=True`` with the stock loader -- no loader
override, and a user's untrusted file still gets torch's check. In
``after_load_checkpoint`` (which mmengine calls before it hands the message hub
its state) the tagged values are turned back into the original objects. Only
classes on an allow-list are rebuilt: ``HistoryBuffer`` and numpy arrays and
scalars. An object of any other class is reported when the checkpoint is saved.
"""
from __future__ import annotations

import warnings
from collections import OrderedDict
from typing import Any

import numpy as np
import torch

TAG = '__mmfisher_plain__'


def _is_plain_key(k: Any) -> bool:
    return isinstance(k, (str, int, float, bool)) or k is None


def to_plain(obj: Any, path: str = 'checkpoint') -> Any:
    """A copy of ``obj`` made of tensors, containers and plain scalars (tagged where needed)."""
    if isinstance(obj, np.generic):  # before the scalars: np.float64 is a float
        return {TAG: 'numpy_scalar', 'value': obj.item(), 'dtype': str(obj.dtype)}
    if obj is None or isinstance(obj, (bool, int, float, str, bytes, torch.Tensor, torch.dtype, torch.device,
                                       torch.Size)):
        return obj
    if isinstance(obj, np.ndarray):
        if obj.dtype == object:
            return {TAG: 'ndarray_object', 'items': [to_plain(x, path) for x in obj.ravel().tolist()],
                    'shape': list(obj.shape)}
        return {TAG: 'ndarray', 'data': torch.from_numpy(np.ascontiguousarray(obj)).clone(),
                'dtype': str(obj.dtype)}
    if isinstance(obj, dict):
        if all(_is_plain_key(k) for k in obj):
            out = {k: to_plain(v, f'{path}.{k}') for k, v in obj.items()}
            return OrderedDict(out) if isinstance(obj, OrderedDict) else out
        return {TAG: 'dict_items', 'items': [[to_plain(k, path), to_plain(v, path)] for k, v in obj.items()]}
    if isinstance(obj, list):
        return [to_plain(v, f'{path}[{i}]') for i, v in enumerate(obj)]
    if isinstance(obj, tuple):
        return tuple(to_plain(v, f'{path}[{i}]') for i, v in enumerate(obj))
    if isinstance(obj, (set, frozenset)):
        return {TAG: 'set', 'items': [to_plain(v, path) for v in obj]}
    from mmengine.logging import HistoryBuffer
    if isinstance(obj, HistoryBuffer):
        # HistoryBuffer.__getstate__ adds the class's statistics functions to the instance's __dict__ once
        # it was pickled or deep-copied; they are class-level (rebuilt on load), not state
        state = {k: v for k, v in obj.__dict__.items() if k != 'statistics_methods'}
        return {TAG: 'HistoryBuffer', 'state': {k: to_plain(v, f'{path}.{k}') for k, v in state.items()}}
    warnings.warn(f'mmfisher: {path} holds a {type(obj).__module__}.{type(obj).__qualname__}, which '
                  f'torch.load(weights_only=True) cannot read; the checkpoint will need a trusted load')
    return obj


def from_plain(obj: Any) -> Any:
    """Inverse of :func:`to_plain` for the allow-listed classes."""
    if isinstance(obj, dict):
        kind = obj.get(TAG) if TAG in obj else None
        if kind is None:
            for k in list(obj.keys()):
                obj[k] = from_plain(obj[k])
            return obj
        if kind == 'ndarray':
            return obj['data'].numpy().astype(obj['dtype'], copy=True)
        if kind == 'ndarray_object':
            arr = np.empty(len(obj['items']), dtype=object)
            arr[:] = [from_plain(x) for x in obj['items']]
            return arr.reshape(obj['shape'])
        if kind == 'numpy_scalar':
            return np.dtype(obj['dtype']).type(obj['value'])
        if kind == 'dict_items':
            return {from_plain(k): from_plain(v) for k, v in obj['items']}
        if kind == 'set':
            return {from_plain(v) for v in obj['items']}
        if kind == 'HistoryBuffer':
            from mmengine.logging import HistoryBuffer
            buf = HistoryBuffer.__new__(HistoryBuffer)
            buf.__dict__.update({k: from_plain(v) for k, v in obj['state'].items()})
            return buf
        raise ValueError(f'unknown mmfisher checkpoint tag {kind!r}')
    if isinstance(obj, list):
        for i, v in enumerate(obj):
            obj[i] = from_plain(v)
        return obj
    if isinstance(obj, tuple):
        return tuple(from_plain(v) for v in obj)
    return obj


def make_plain_in_place(checkpoint: dict) -> None:
    for key in list(checkpoint.keys()):
        if key in ('state_dict', 'ema_state_dict'):
            continue  # tensors already
        checkpoint[key] = to_plain(checkpoint[key], key)


def restore_in_place(checkpoint: dict) -> None:
    for key in list(checkpoint.keys()):
        if key in ('state_dict', 'ema_state_dict'):
            continue
        checkpoint[key] = from_plain(checkpoint[key])
