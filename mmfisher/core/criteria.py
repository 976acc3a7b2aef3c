"""Step 4, as a choice: what a pruning decision ranks channels by.

A criterion answers, at every decision, ``(importance, evidence, valid)``: ``[U]`` float64
importance per flat channel, ``[U]`` bool "may be decided on" and the number of passes
the importance rests on (0 postpones the step). The pruner divides the importance by
the saving (the normalization) and removes the lowest; groups, masks, costs, schedule,
stop criterion and checkpoints are the same whatever the criterion.

* ``'fisher'`` (default): the Group Fisher accumulated since the last step
  (:class:`mmfisher.core.importance.FisherImportance`).
* ``'l1'``: the sum, over every layer that writes the channel (all producers of its
  group), of the L1 norm of the filter that writes it, counting only the inputs still
  kept (Li et al., "Pruning Filters for Efficient ConvNets", ICLR 2017; NNCF's default).
* ``'random'``: a uniform random number per channel, drawn afresh at every step from a
  generator seeded by ``(seed, step)``: the same on every rank and in a resumed run.

A criterion of one's own::

    @register_criterion('taylor')
    class Taylor(ImportanceCriterion):
        def importance(self, pruner): ...

then ``GroupFisherPruner(..., importance='taylor')`` or, in a config,
``dict(type='FisherPruningHook', importance=dict(type='taylor', **options))``.
"""
from __future__ import annotations

from typing import Any, Dict, Tuple, Type

import torch

CRITERIA: Dict[str, Type['ImportanceCriterion']] = {}


def register_criterion(name: str):
    """Class decorator: make an :class:`ImportanceCriterion` available by ``name``."""
    def add(cls):
        if name in CRITERIA and CRITERIA[name] is not cls:
            raise KeyError(f'an importance criterion named {name!r} is already registered ({CRITERIA[name]})')
        cls.name = name
        CRITERIA[name] = cls
        return cls
    return add


class ImportanceCriterion:
    """Base class. ``uses_fisher``: whether the pruner must gather the Fisher during training."""

    name = ''
    uses_fisher = False

    def importance(self, pruner) -> Tuple[torch.Tensor, torch.Tensor, int]:
        raise NotImplementedError

    def options(self) -> Dict[str, Any]:
        """Plain data that rebuilds this criterion with :func:`build_criterion`."""
        return {'type': self.name}


def build_criterion(spec: Any) -> ImportanceCriterion:
    """A criterion from its name, ``dict(type=name, **options)`` or an instance."""
    if isinstance(spec, ImportanceCriterion):
        return spec
    if isinstance(spec, str):
        spec = {'type': spec}
    if not isinstance(spec, dict) or 'type' not in spec:
        raise ValueError(f'importance={spec!r}: give a criterion name ({sorted(CRITERIA)}) or '
                         f'dict(type=name, **options)')
    options = dict(spec)
    name = options.pop('type')
    if name not in CRITERIA:
        raise ValueError(f'importance={name!r} is not a registered criterion; registered: {sorted(CRITERIA)} '
                         f'(add one with mmfisher.core.criteria.register_criterion)')
    try:
        return CRITERIA[name](**options)
    except TypeError as e:
        raise ValueError(f'importance={spec!r}: {e}') from None


@register_criterion('fisher')
class FisherCriterion(ImportanceCriterion):
    """The Group Fisher gathered since the last step, with its evidence and valid-pass count."""

    uses_fisher = True

    def importance(self, pruner):
        f = pruner.fisher
        return f.accum.double(), f.evidence.clone(), int(f.valid_passes)


@register_criterion('l1')
class L1Criterion(ImportanceCriterion):
    """Sum over the channel's producing layers of its filter's L1 norm (kept inputs only)."""

    def importance(self, pruner):
        graph, keep = pruner.graph, pruner.keep
        U = graph.num_channels
        imp = torch.zeros(U + 1, dtype=torch.float64)
        ext = torch.cat([keep.bool(), torch.ones(1, dtype=torch.bool)])
        modules = dict(pruner.model.named_modules())
        for name, rec in graph.records.items():
            if not rec.layer_type.produces or 'out' not in rec.arrays:
                continue
            m = modules.get(name, rec.module)
            keep_in = ext[graph.arrays[(name, 'in')].channel]      # untracked inputs (-1) count as kept
            l1 = rec.layer_type.filter_l1(m, keep_in)
            out_chan = graph.arrays[(name, 'out')].channel
            imp.index_add_(0, torch.where(out_chan >= 0, out_chan, torch.full_like(out_chan, U)), l1)
        return imp[:U], torch.ones(U, dtype=torch.bool), 1


@register_criterion('random')
class RandomCriterion(ImportanceCriterion):
    """A fresh uniform number per channel at every step, from a generator seeded by (seed, step)."""

    def __init__(self, seed: int = 0) -> None:
        self.seed = int(seed)

    def options(self) -> Dict[str, Any]:
        return {'type': self.name, 'seed': self.seed}

    def importance(self, pruner):
        U = pruner.graph.num_channels
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + len(pruner.history) * 7919 + pruner.steps)
        return torch.rand(U, generator=g, dtype=torch.float64), torch.ones(U, dtype=torch.bool), 1


__all__ = ['ImportanceCriterion', 'register_criterion', 'build_criterion', 'CRITERIA',
           'FisherCriterion', 'L1Criterion', 'RandomCriterion']
