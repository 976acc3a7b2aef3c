"""Let mmpretrain 1.2.0 import on a machine without torchvision.

mmpretrain imports torchvision at module level (box ops for grounding metrics,
``transforms`` for wrappers and one MAE transform), although image
classification with its own transforms does not use it. torchvision's PyPI
wheel does not load beside the CPU torch this project installs, so mmfisher does
not depend on it. :func:`install` is called just before mmpretrain is imported, and only when
torchvision is not installed; it registers a small ``torchvision`` package in ``sys.modules``,
with proper module specs (``importlib.util.find_spec('torchvision')`` works and names the
fallback):

* ``torchvision.ops.boxes``: ``box_area``, ``box_iou``, ``generalized_box_iou``,
  ``_upcast`` -- real implementations (a few lines of torch);
* ``torchvision.transforms.functional.pil_to_tensor`` -- real (used by
  mmpretrain's ``PackInputs`` for PIL images);
* ``torchvision.transforms.InterpolationMode`` -- the enum;
* anything else (torchvision's own transforms, ``resized_crop``) raises an
  ImportError naming torchvision when it is *used*, so a config that needs it
  fails clearly instead of silently.

With torchvision installed (even one that fails to load), nothing is changed.
"""
from __future__ import annotations

import enum
import importlib.machinery
import importlib.util
import sys
import types

import numpy as np
import torch

_MSG = ('{what} needs torchvision, which is not installed (its PyPI wheel does not load beside the CPU '
        'torch build mmfisher installs). Install a torchvision matching your torch to use it.')


def _unavailable(what: str):
    def fail(*args, **kwargs):
        raise ImportError(_MSG.format(what=what))
    return fail


class _NeedsTorchvision:
    """Base for torchvision classes mmpretrain subclasses at import time; fails when instantiated."""

    def __init__(self, *args, **kwargs):
        raise ImportError(_MSG.format(what=type(self).__name__))


class InterpolationMode(enum.Enum):
    NEAREST = 'nearest'
    NEAREST_EXACT = 'nearest-exact'
    BILINEAR = 'bilinear'
    BICUBIC = 'bicubic'
    BOX = 'box'
    HAMMING = 'hamming'
    LANCZOS = 'lanczos'


def _upcast(t: torch.Tensor) -> torch.Tensor:
    if t.is_floating_point():
        return t if t.dtype in (torch.float32, torch.float64) else t.float()
    return t if t.dtype in (torch.int32, torch.int64) else t.int()


def box_area(boxes: torch.Tensor) -> torch.Tensor:
    boxes = _upcast(boxes)
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


def _inter_union(b1: torch.Tensor, b2: torch.Tensor):
    a1, a2 = box_area(b1), box_area(b2)
    lt = torch.max(b1[:, None, :2], b2[:, :2])
    rb = torch.min(b1[:, None, 2:], b2[:, 2:])
    wh = _upcast(rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    return inter, a1[:, None] + a2 - inter


def box_iou(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    inter, union = _inter_union(boxes1, boxes2)
    return inter / union


def generalized_box_iou(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    inter, union = _inter_union(boxes1, boxes2)
    iou = inter / union
    lt = torch.min(boxes1[:, None, :2], boxes2[:, :2])
    rb = torch.max(boxes1[:, None, 2:], boxes2[:, 2:])
    wh = _upcast(rb - lt).clamp(min=0)
    area = wh[..., 0] * wh[..., 1]
    return iou - (area - union) / area


def pil_to_tensor(pic) -> torch.Tensor:
    arr = np.array(pic, copy=True)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def _module(name: str, **attrs) -> types.ModuleType:
    mod = types.ModuleType(name)
    mod.__dict__.update(attrs)
    mod.__file__ = __file__
    mod.__spec__ = importlib.machinery.ModuleSpec(name, None, origin=__file__, is_package=True)
    mod.__path__ = []          # a package: its submodules are the ones registered below
    mod.__mmfisher_fallback__ = True
    return mod


def installed() -> bool:
    """Whether the torchvision in ``sys.modules`` is this fallback."""
    return bool(getattr(sys.modules.get('torchvision'), '__mmfisher_fallback__', False))


def install() -> bool:
    """Register the fallback if torchvision is absent; returns True if it did."""
    if 'torchvision' in sys.modules:
        return False
    try:
        if importlib.util.find_spec('torchvision') is not None:
            return False       # a real torchvision: never shadowed
    except (ImportError, ValueError):
        return False
    boxes = _module('torchvision.ops.boxes', box_area=box_area, box_iou=box_iou,
                    generalized_box_iou=generalized_box_iou, _upcast=_upcast)
    ops = _module('torchvision.ops', boxes=boxes, box_area=box_area, box_iou=box_iou,
                  generalized_box_iou=generalized_box_iou)
    functional = _module('torchvision.transforms.functional', pil_to_tensor=pil_to_tensor,
                         InterpolationMode=InterpolationMode,
                         resized_crop=_unavailable('torchvision.transforms.functional.resized_crop'))
    tr_transforms = _module('torchvision.transforms.transforms', InterpolationMode=InterpolationMode)
    rrc = type('RandomResizedCrop', (_NeedsTorchvision,), {})
    transforms = _module('torchvision.transforms', functional=functional, transforms=tr_transforms,
                         InterpolationMode=InterpolationMode, RandomResizedCrop=rrc)
    # mmpretrain registers every capitalised class of torchvision.transforms as a pipeline step:
    # expose none, so no placeholder lands in its registry
    transforms.__dir__ = lambda: []  # type: ignore[assignment]
    root = _module('torchvision', ops=ops, transforms=transforms, __version__='0.0.0+mmfisher-fallback')

    def missing(name: str):
        if name.startswith('__'):
            raise AttributeError(name)
        raise ImportError(_MSG.format(what=f'torchvision.{name}'))
    root.__getattr__ = missing  # type: ignore[attr-defined]
    for mod in (root, ops, boxes, transforms, functional, tr_transforms):
        sys.modules[mod.__name__] = mod
    return True
