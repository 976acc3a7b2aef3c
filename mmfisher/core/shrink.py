"""Last step: the compact model.

``shrink(model, graph, spec)`` removes the channels a channel spec (see
:mod:`mmfisher.core.spec`) does not keep from every layer of every group, in place, each module by its layer type (:mod:`mmfisher.core.layers`): conv
(plain, group, depthwise, transposed), BN/SyncBN, GroupNorm (``num_groups``
follows), InstanceNorm, Linear (a flattened feature map loses a block of inputs
per channel) and registered types. The compact model prints, saves and reloads
like any model of those sizes.
"""
from __future__ import annotations

import copy
import functools
import weakref
from typing import Any, Iterable, Optional

import torch
import torch.nn as nn

from .groups import CouplingGraph
from .mirrors import refresh_averaged
from .spec import spec_to_keep


def copy_model(model: nn.Module) -> nn.Module:
    """``copy.deepcopy(model)``, with every module's own ``forward`` pointing at the copy.

    ``copy.deepcopy`` keeps weak references as they are. A module whose instance ``forward`` is a
    ``functools.partial`` over a weak reference to the module itself (fairscale's
    ``checkpoint_wrapper``, which mmdet's DETR, Deformable DETR and Grounding DINO encoders use with
    ``num_cp``) would then run the *original* module's layers from inside the copy: a shrunk copy
    computes the full-width layers. Every such weak reference to a module of ``model`` is pointed at
    that module's copy."""
    twin = copy.deepcopy(model)
    pairs = {id(a): b for a, b in zip(model.modules(), twin.modules())}

    def retarget(v):
        if isinstance(v, weakref.ReferenceType) and id(v()) in pairs:
            return weakref.ref(pairs[id(v())])
        return v
    for m in twin.modules():
        f = m.__dict__.get('forward')
        if isinstance(f, functools.partial):
            m.forward = functools.partial(f.func, *map(retarget, f.args),
                                          **{k: retarget(v) for k, v in f.keywords.items()})
    return twin


def round_keep(graph: CouplingGraph, keep: torch.Tensor, divisor: int,
               removal_order: Optional[Iterable[int]] = None) -> torch.Tensor:
    """Round every pruned group's kept channel count up to a multiple of ``divisor`` (at most its size).

    Hardware runs channel counts that are multiples of 8/16/32 faster. Channels are given back
    in reverse ``removal_order`` (the last removed, i.e. the most important of the removed,
    first), else by index. Returns a new ``[num_channels]`` bool vector.
    """
    if int(divisor) < 1:
        raise ValueError(f'divisor={divisor} must be a positive channel count')
    keep = keep.clone().bool()
    order = list(removal_order or [])
    restore_rank = {ch: i for i, ch in enumerate(reversed(order))}
    for g in graph.groups:
        sl = slice(g.offset, g.offset + g.size)
        kept = int(keep[sl].sum())
        if kept == g.size:
            continue
        want = min(g.size, -(-kept // divisor) * divisor)
        removed = (~keep[sl]).nonzero().flatten().add(g.offset).tolist()
        removed.sort(key=lambda ch: (restore_rank.get(ch, len(restore_rank)), ch))
        for ch in removed[:want - kept]:
            keep[ch] = True
    return keep


def kept_positions(graph: CouplingGraph, keep: torch.Tensor, module: str, role: str) -> torch.Tensor:
    """Positions of one channel array that survive: untracked (-1) or kept channels."""
    chan = graph.arrays[(module, role)].channel
    ext = torch.cat([keep.bool(), torch.ones(1, dtype=torch.bool)])
    return ext[chan].nonzero().flatten()


def shrink(model: nn.Module, graph: CouplingGraph, spec_or_keep: Any) -> nn.Module:
    """Remove every channel the spec does not keep, in place; returns ``model``.

    ``spec_or_keep``: a channel spec (see module docstring) or a ``[num_channels]``
    bool vector.
    """
    keep = spec_or_keep if isinstance(spec_or_keep, torch.Tensor) else spec_to_keep(graph, spec_or_keep)
    keep = keep.bool()
    modules = dict(model.named_modules())
    done = set()
    for name, rec in graph.records.items():
        m = modules.get(name, rec.module)
        if id(m) in done:
            continue
        done.add(id(m))
        kept = {role: kept_positions(graph, keep, name, role) for role in rec.arrays}
        if all(kept[r].numel() == graph.arrays[(name, r)].channel.numel() for r in kept):
            continue
        rec.layer_type.shrink(m, kept)
    refresh_averaged(model)
    return model
