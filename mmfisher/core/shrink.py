"""Last step: the compact model.

``shrink(model, graph, spec)`` removes the channels a channel spec (see
:mod:`mmfisher.core.spec`) does not keep from every layer of every group, in place: conv (plain, group, depthwise, transposed), BN/SyncBN,
GroupNorm (``num_groups`` follows), InstanceNorm, Linear (a flattened feature map
loses a block of inputs per channel) and modules registered with a handler. The
compact model prints, saves and reloads like any model of those sizes.
"""
from __future__ import annotations

from typing import Any, Iterable, Optional

import torch
import torch.nn as nn

from .groups import CouplingGraph
from .spec import SpecMismatchError, spec_to_keep
from .trace import handler_for


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


def _param(old: torch.Tensor, new: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(new.detach().clone().contiguous(), requires_grad=old.requires_grad)


def _index(module: nn.Module, name: str, dim: int, idx: torch.Tensor) -> None:
    t = getattr(module, name, None)
    if t is None:
        return
    new = t.detach().index_select(dim, idx.to(t.device))
    if isinstance(t, nn.Parameter):
        setattr(module, name, _param(t, new))
    else:
        setattr(module, name, new.clone())


def _shrink_conv(m: nn.modules.conv._ConvNd, keep_out: torch.Tensor, keep_in: torch.Tensor) -> None:
    transposed = getattr(m, 'transposed', False)
    g = m.groups
    if g > 1:
        opg, ipg = m.out_channels // g, m.in_channels // g
        new_g = keep_out.numel() // opg
        if keep_out.numel() % opg or keep_in.numel() != new_g * ipg:
            raise SpecMismatchError(f'group conv {m}: kept channels do not form whole groups')
        _index(m, 'weight', 1 if transposed else 0, keep_in if transposed else keep_out)
        m.groups = new_g
    elif transposed:
        _index(m, 'weight', 0, keep_in)
        _index(m, 'weight', 1, keep_out)
    else:
        _index(m, 'weight', 0, keep_out)
        _index(m, 'weight', 1, keep_in)
    _index(m, 'bias', 0, keep_out)
    m.out_channels, m.in_channels = keep_out.numel(), keep_in.numel()


def _shrink_linear(m: nn.Linear, keep_out: torch.Tensor, keep_in: torch.Tensor) -> None:
    _index(m, 'weight', 0, keep_out)
    _index(m, 'weight', 1, keep_in)
    _index(m, 'bias', 0, keep_out)
    m.out_features, m.in_features = keep_out.numel(), keep_in.numel()


def _shrink_norm(m: nn.Module, keep: torch.Tensor) -> None:
    n = keep.numel()
    if isinstance(m, nn.GroupNorm):
        per = m.num_channels // m.num_groups
        if n % per:
            raise SpecMismatchError(f'{m}: kept channels do not form whole GroupNorm groups')
        m.num_groups, m.num_channels = n // per, n
    else:
        m.num_features = n
    for name in ('weight', 'bias', 'running_mean', 'running_var'):
        _index(m, name, 0, keep)


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
        h = handler_for(m)
        if h is not None:
            h.shrink(m, kept)
        elif rec.kind == 'conv':
            _shrink_conv(m, kept['out'], kept['in'])
        elif rec.kind == 'linear':
            _shrink_linear(m, kept['out'], kept['in'])
        elif rec.kind == 'norm':
            _shrink_norm(m, kept['feat'])
    return model
