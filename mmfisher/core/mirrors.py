"""Copies kept in step with a part of the model lose the channels that part loses.

A self-supervised model's momentum encoder (MoCo, BYOL, DenseCL: an ``ExponentialMovingAverage``
of ``nn.Sequential(backbone, neck)``) or any averaged copy of a submodule is updated by copying or
averaging the source's parameters into it, name by name. The trace cannot see that copy (it is an
in-place parameter update between iterations, not a forward op), and the copy's forward often runs
only under ``no_grad`` in the loss, or not at all in the analysed forward. Pruned on its own, or
left whole while its source shrinks, the next update fails on mismatched shapes.

So every layer of a *mirror* (the copy) shares the channels of its *source* layer: their atoms are
united position by position; a mirror layer no traced forward ran gets the source's arrays (it is
shrunk like the source, and costs nothing in the analysed forward). A mirror whose source cannot be
told apart from another identical module makes both unprunable.

* :func:`find_mirrors`: ``(mirror, source)`` module-name pairs of every averaged copy in the model
  (mmengine's ``BaseAveragedModel``, ``torch.optim.swa_utils.AveragedModel``, anything with a
  ``module`` and ``avg_parameters`` or ``n_averaged``), found by matching type and parameter shapes.
* :func:`tie_mirrors`: applies them to a trace.
* :func:`refresh_averaged`: after a shrink, re-point an averaged copy's cached parameter dict at the
  new (smaller) parameters.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Dict, List, Sequence, Tuple

import torch.nn as nn

from .layers import ModuleRecord

if TYPE_CHECKING:
    from .trace import ChannelTracer


def is_averaged_copy(m: nn.Module) -> bool:
    """An averaged copy of another module: it wraps a ``module`` and averages parameters into it."""
    return isinstance(getattr(m, 'module', None), nn.Module) and (
        hasattr(m, 'avg_parameters') or hasattr(m, 'n_averaged'))


def _signature(m: nn.Module) -> Tuple:
    return (type(m),) + tuple((k, tuple(v.shape)) for k, v in m.state_dict().items())


def find_mirrors(model: nn.Module) -> Tuple[List[Tuple[str, str]], List[Tuple[str, List[str]]]]:
    """The averaged copies of ``model`` and what they copy.

    Returns ``(pairs, ambiguous)``: ``pairs`` lists ``(mirror, source)`` module names (the copy's
    wrapped module, or each of its children when it wraps a container built on the fly such as
    ``nn.Sequential(backbone, neck)``); ``ambiguous`` lists ``(mirror, candidates)`` where several
    identical modules could be the source. A copy matching nothing in the model is left alone."""
    named = dict(model.named_modules())
    copies = [n for n, m in named.items() if is_averaged_copy(m)]
    if not copies:
        return [], []
    inside = tuple(c + '.' for c in copies if c)

    def outside(n: str) -> bool:          # not an averaged copy, nor inside one
        return n not in copies and not (n + '.').startswith(inside)
    by_sig: Dict[Tuple, List[str]] = {}
    for n, m in named.items():
        if n and outside(n) and any(True for _ in m.parameters()):
            by_sig.setdefault(_signature(m), []).append(n)
    pairs: List[Tuple[str, str]] = []
    ambiguous: List[Tuple[str, List[str]]] = []
    for c in copies:
        wrapped = named[c].module
        prefix = f'{c}.module' if c else 'module'
        sig = _signature(wrapped)
        todo = ([(prefix, sig)] if sig in by_sig else
                [(f'{prefix}.{k}', _signature(ch)) for k, ch in wrapped.named_children()])
        for name, sig in todo:
            cands = by_sig.get(sig, [])
            cands = [s for s in cands if not any(s.startswith(o + '.') for o in cands if o != s)]
            if len(cands) == 1:
                pairs.append((name, cands[0]))
            elif cands:
                ambiguous.append((name, cands))
    return pairs, ambiguous


def tie_mirrors(tracer: 'ChannelTracer', model: nn.Module,
                pairs: Sequence[Tuple[str, str]] = (), ambiguous: Sequence[Tuple[str, List[str]]] = ()) -> None:
    """Make every mirror layer share its source layer's channels, in the trace (see module docstring)."""
    named = dict(model.named_modules())
    for mirror, source in pairs:
        src_root, mir_root = named[source], named[mirror]
        mirror_mods = dict(mir_root.named_modules())
        for suffix, src in src_root.named_modules():
            src_rec = tracer.records.get(id(src))
            mir = mirror_mods.get(suffix)
            mir_rec = tracer.records.get(id(mir)) if mir is not None else None
            if src_rec is None:
                if mir_rec is not None:
                    for atoms in mir_rec.arrays.values():
                        tracer.sets.taint(atoms, f'{mir_rec.name}: copy of {source}{"." + suffix if suffix else ""}, '
                                                 f'which no traced forward ran')
                continue
            if mir is None or type(mir) is not type(src):
                for atoms in src_rec.arrays.values():
                    tracer.sets.taint(atoms, f'{src_rec.name}: its averaged copy under {mirror} has no '
                                             f'matching layer')
                continue
            if mir_rec is None:
                name = f'{mirror}.{suffix}' if suffix else mirror
                rec = ModuleRecord(name, mir, src_rec.layer_type, arrays=dict(src_rec.arrays))
                tracer.records[id(mir)] = rec
                tracer.order.append(id(mir))
                continue
            for role in set(src_rec.arrays) | set(mir_rec.arrays):
                a, b = src_rec.arrays.get(role), mir_rec.arrays.get(role)
                if a is not None and b is not None and a.numel() == b.numel():
                    tracer.sets.union_arrays(a, b)
                else:
                    for atoms in (a, b):
                        if atoms is not None:
                            tracer.sets.taint(atoms, f'{mir_rec.name}: channels differ from its source '
                                                     f'{src_rec.name}\'s')
    for mirror, cands in ambiguous:
        reason = (f'{mirror} is an averaged copy of one of {", ".join(cands)} (identical modules): which one '
                  f'is not known, so none of them is pruned')
        for root in [mirror] + list(cands):
            for m in named[root].modules():
                rec = tracer.records.get(id(m))
                if rec is not None:
                    for atoms in rec.arrays.values():
                        tracer.sets.taint(atoms, reason)


def refresh_averaged(model: nn.Module) -> None:
    """Re-point mmengine's ``BaseAveragedModel.avg_parameters`` (a dict of the copy's tensors, built
    once) at the copy's current parameters (and buffers), after a shrink replaced them."""
    for m in model.modules():
        if is_averaged_copy(m) and isinstance(getattr(m, 'avg_parameters', None), dict):
            m.avg_parameters = (m.module.state_dict() if getattr(m, 'update_buffers', False)
                                else dict(m.module.named_parameters()))


__all__ = ['find_mirrors', 'tie_mirrors', 'refresh_averaged', 'is_averaged_copy']
