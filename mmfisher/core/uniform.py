"""The baseline every pruning result must beat: the same architecture, uniformly narrower.

``uniform_keep(graph, width)`` keeps, in every prunable group, the first
``max(1, round(width * size))`` channels (a group's channel is its unit: a whole group
of a group conv or a GroupNorm group), so every coupled width (a residual stream, the
FPN outputs and the head that reads them) scales by the same factor, on any
architecture the analysis handles. Unprunable groups (model outputs, what the analysis
refused) keep their width. The weights are meant to be re-initialised and trained from
scratch (``PrunedModel`` without ``load_from``: the runner initialises the narrow layers
with their own fan-in).

``uniform_keep_for(graph, cost, resource, ratio)`` finds the width whose cost is nearest
to ``ratio`` of the original. ``random_keep(graph, fraction, seed)`` keeps as many channels per
group as ``uniform_keep``, chosen at random (the equivalence checks of the tests and the zoo check).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .cost import RESOURCES, CostModel
from .groups import CouplingGraph


def uniform_keep(graph: CouplingGraph, width: float, candidates: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``[num_channels]`` bool: the first ``max(1, round(width * size))`` channels of every prunable group
    (of every group with a candidate channel, if ``candidates`` is given)."""
    if not 0.0 < width <= 1.0:
        raise ValueError(f'width={width} must be in (0, 1]')
    keep = torch.ones(graph.num_channels, dtype=torch.bool)
    for g in graph.groups:
        allowed = g.prunable if candidates is None else bool(candidates[g.offset:g.offset + g.size].any())
        if not allowed:
            continue
        k = max(1, int(round(width * g.size)))
        keep[g.offset + k:g.offset + g.size] = False
    return keep


def random_keep(graph: CouplingGraph, fraction: float = 0.5, seed: int = 0) -> torch.Tensor:
    """``[num_channels]`` bool: ``max(1, round(fraction * size))`` channels of every prunable group, chosen
    by ``torch.randperm`` with a generator seeded ``seed``, group after group."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f'fraction={fraction} must be in (0, 1]')
    g = torch.Generator().manual_seed(seed)
    keep = torch.ones(graph.num_channels, dtype=torch.bool)
    for grp in graph.groups:
        if grp.prunable:
            k = max(1, int(round(grp.size * fraction)))
            sub = torch.zeros(grp.size, dtype=torch.bool)
            sub[torch.randperm(grp.size, generator=g)[:k]] = True
            keep[grp.offset:grp.offset + grp.size] = sub
    return keep


def uniform_keep_for(graph: CouplingGraph, cost: CostModel, resource: str, ratio: float,
                     tolerance: float = 0.02, candidates: Optional[torch.Tensor] = None
                     ) -> Tuple[float, torch.Tensor, float]:
    """``(width, keep, achieved ratio)`` with the achieved ``resource`` ratio nearest to ``ratio``.

    Raises ``ValueError`` if it is further than ``tolerance`` (relative) from ``ratio``: the
    channel counts are too small to hit it, or the unprunable part alone costs more.
    """
    if resource not in RESOURCES:
        raise ValueError(f'resource {resource!r} is not one of {RESOURCES}')
    lo, hi = 1e-3, 1.0
    best = (1.0, uniform_keep(graph, 1.0, candidates), 1.0)
    for _ in range(40):                      # the ratio grows with the width: bisect
        mid = 0.5 * (lo + hi)
        keep = uniform_keep(graph, mid, candidates)
        got = cost.ratios(keep)[resource]
        if abs(got - ratio) < abs(best[2] - ratio):
            best = (mid, keep, got)
        if got > ratio:
            hi = mid
        else:
            lo = mid
    width, keep, got = best
    if abs(got - ratio) > tolerance * ratio:
        raise ValueError(f'no uniform width gives {resource} {ratio:.3f} within {tolerance:.0%}: the nearest is '
                         f'width {width:.3f} at {got:.3f}')
    return width, keep, got
