"""Replaying discrete decisions, so that a masked and a compact model can be compared on any detector.

The masked and the compact model compute the same values up to float rounding; a top-k, sort, NMS or
threshold over near-equal scores (random-init RPN proposals, DETR query selection) can still choose
other elements after a 1e-7 difference, and then no output is comparable. :class:`SameDecisions`
records the first run's choices and replays them in the second.
"""
from __future__ import annotations

import os
import os.path as osp
import sys

import torch
from torch.overrides import TorchFunctionMode

from ..core.op_rules import function_name, normalise

_PACKAGE = osp.dirname(osp.dirname(osp.abspath(__file__))) + os.sep     # mmfisher/


class DecisionMismatch(RuntimeError):
    """The second run did not take the same kinds of decisions in the same order as the first."""


class SameDecisions:
    """Replays, in the compact model's run, every discrete decision the masked model's run took.

    The masked and the compact model compute the same values up to float rounding, but a top-k, a
    sort, an NMS or a threshold over near-equal random-init scores can flip on a 1e-7 difference
    (DETR-style query selection, RPN proposals), after which the outputs are not comparable. Used as
    ``with SameDecisions() as rec: masked run`` then ``with SameDecisions(rec): compact run``: the
    second run gets the first run's indices and masks (values are gathered from its own tensors).
    Replaying fixes only which elements are chosen: every value is still the second model's own.
    A wrong score that would change a choice, with no wrong value anywhere in the outputs, is not
    seen this way; the scores themselves are outputs of every detector's tensor forward.
    """

    INDEXED = {'topk', 'sort', 'kthvalue', 'max', 'min', 'cummax', 'cummin'}   # (values, indices)
    CHOICES = {'argsort', 'argmax', 'argmin', 'nonzero', 'gt', 'ge', 'lt', 'le', 'eq', 'ne'}

    def __init__(self, record=None):
        self.record = record
        self.log = [] if record is None else record.log
        self.at = 0

    def __enter__(self):
        outer = self

        class Mode(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                return outer.call(func, args, kwargs or {})
        self._mode = Mode()
        self._mode.__enter__()
        self._nms = self._patch_nms()
        return self

    def __exit__(self, *exc):
        self._mode.__exit__(*exc)
        if self._nms is not None:
            self._nms[0].forward = self._nms[1]
        if exc[0] is None and self.record is not None and self.at != len(self.log):
            raise DecisionMismatch(f'the compact model took {self.at} decisions, the masked one {len(self.log)}')

    def _patch_nms(self):
        try:
            from mmcv.ops.nms import NMSop
        except ImportError:
            return None
        orig = NMSop.__dict__['forward']

        def forward(*args, **kwargs):
            boxes = next((a for a in args if isinstance(a, torch.Tensor)), None)
            return self.decided('nms', orig.__func__(*args, **kwargs), None if boxes is None else boxes.shape)
        NMSop.forward = staticmethod(forward)
        return NMSop, orig

    def decided(self, name, out, in_shape):
        """Record ``out`` (first run) or return the recorded one (second run). A decision over an input of
        another shape (a feature map whose channels the compact model lost: CornerNet's corner pooling
        runs cummax over it) is not a choice between the same elements: the second run keeps its own."""
        if self.record is None:
            self.log.append((name, tuple(in_shape) if in_shape is not None else None,
                             out.detach().clone() if isinstance(out, torch.Tensor) else out))
            return out
        if self.at >= len(self.log):
            raise DecisionMismatch(f'the compact model took more decisions than the masked one ({name})')
        was, shape, value = self.log[self.at]
        self.at += 1
        if was != name:
            raise DecisionMismatch(f'decision {self.at}: {name} in the compact model, {was} in the masked one')
        if shape != (tuple(in_shape) if in_shape is not None else None):
            return out
        return value

    @staticmethod
    def _from_mmfisher():
        """Whether the op was called by mmfisher's own code (the masks' hooks), not by the model."""
        f = sys._getframe(3)
        return f is not None and f.f_code.co_filename.startswith(_PACKAGE)

    def call(self, func, args, kwargs):
        out = func(*args, **kwargs)
        name, inplace = normalise(function_name(func))
        if inplace or not args or not isinstance(args[0], torch.Tensor) or self._from_mmfisher():
            return out
        if name in self.INDEXED and isinstance(out, tuple) and len(out) == 2 and not out[1].is_floating_point():
            if self.record is None:
                self.decided(name, out[1], args[0].shape)
                return out
            dim = kwargs.get('dim', args[2] if name in ('topk', 'kthvalue') and len(args) > 2 else
                             args[1] if name not in ('topk', 'kthvalue') and len(args) > 1 and
                             isinstance(args[1], int) else -1)
            idx = self.decided(name, out[1], args[0].shape)
            if idx is out[1]:
                return out
            src = args[0]
            take = idx if idx.dim() == src.dim() else idx.unsqueeze(dim)
            values = torch.take_along_dim(src, take, dim)
            if idx.dim() != src.dim():
                values = values.squeeze(dim)
            return type(out)((values, idx))
        if name in self.CHOICES and isinstance(out, torch.Tensor) and not out.is_floating_point():
            return self.decided(name, out, args[0].shape)
        return out


__all__ = ['SameDecisions', 'DecisionMismatch']
