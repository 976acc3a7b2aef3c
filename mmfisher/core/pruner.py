"""The pruning decision and the pruner's state.

:class:`GroupFisherPruner` ties the pipeline together for a training loop::

    pruner = GroupFisherPruner(model, analyse(model, example))
    pruner.attach()                      # masks + Fisher hooks on the consumers
    for it, batch in enumerate(loader):
        loss(model(batch)).backward(); optimizer.step()
        pruner.accumulate()              # after every backward
        if (it + 1) % 10 == 0 and not pruner.reached():
            pruner.step()                # remove the least important channel(s)
    compact = pruner.export()            # physically smaller copy

A step removes, globally, the channel with the lowest ``Fisher / saving``
(``saving``: memory, FLOPs or 1), never one whose removal would leave any layer
with fewer than ``min_channels`` channels, then resets the accumulated Fisher.

With latency normalisation on a device whose kernels work in blocks of ``q`` channels
(``LatencyModel.quantum > 1``: on this project's CPU a 3x3 conv with 49 channels in and out takes about
twice as long as with 48), a decision is a block: the channels that take one group from its
count to the next multiple of ``q`` below, its least important ones, scored by their summed
importance over their summed saving. Groups then keep counts on multiples of ``q``, where the
device is fast, instead of stopping one channel past one; only the block that reaches the target
may stop part-way (the target is what was asked for).
"""
from __future__ import annotations

import warnings
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from .cost import RESOURCES, CostModel
from .groups import CouplingGraph
from .importance import FisherImportance
from .criteria import build_criterion
from .masks import ConsumerInputs
from .shrink import copy_model, round_keep, shrink
from .spec import make_spec

NORMALIZATIONS = ('memory', 'flops', 'latency', 'none')


class TargetUnreachableError(ValueError):
    """The target ratio is below what removing every removable channel achieves."""


class GroupFisherPruner:
    """Masks, accumulated importance, the ordered history of removed channels.

    Args:
        model: the model the graph was analysed on.
        graph: :func:`mmfisher.core.analyse` result.
        normalization: 'memory' (default, the paper's -M), 'flops' (-F), 'latency' (-L: the milliseconds
            a channel costs on the device, predicted by ``latency``) or 'none' (-U).
        min_channels: no layer keeps fewer channels than this.
        internal_only: prune only groups written by one layer (depthwise convs that read and
            write the group aside): the paper's -I, no residual streams, FPN outputs or other
            cross-layer groups.
        exclude: module names (prefix match) whose groups are never pruned.
        target: ``(resource, ratio)``, e.g. ``('flops', 0.5)``: :meth:`reached` turns true when
            the resource falls to ``ratio`` of the original; checked for reachability here.
        frozen_every: score layers whose input does not require grad (frozen stages) on every
            k-th backward pass only (see :mod:`mmfisher.core.importance`); 1 = exact.
        importance: what channels are ranked by: 'fisher' (default), 'l1', 'random', a registered
            criterion's name, ``dict(type=name, **options)`` or an instance (:mod:`mmfisher.core.criteria`).
            Everything else (groups, normalization, constraints, schedule) is the same for every criterion.
        latency: a :class:`~mmfisher.core.latency.LatencyModel` of this model and graph, or its
            ``state_dict()``; needed by ``normalization='latency'`` and ``target=('latency', r)``.
    """

    def __init__(self, model: nn.Module, graph: CouplingGraph, *, normalization: str = 'memory',
                 min_channels: int = 1, internal_only: bool = False, exclude: Sequence[str] = (),
                 target: Optional[Sequence[Any]] = None, frozen_every: int = 1,
                 importance: Any = 'fisher', latency: Any = None) -> None:
        if normalization not in NORMALIZATIONS:
            raise ValueError(f'normalization={normalization!r} is not one of {NORMALIZATIONS}')
        if int(min_channels) < 1:
            raise ValueError(f'min_channels={min_channels} must be at least 1')
        self.model = model
        self.graph = graph
        self.normalization = normalization
        self.min_channels = int(min_channels)
        self.consumers = ConsumerInputs(model, graph)
        self.criterion = build_criterion(importance)
        self.fisher = FisherImportance(self.consumers, frozen_every)
        self.fisher.enabled = self.criterion.uses_fisher      # no Fisher hooks' work for other criteria
        self.cost = CostModel(model, graph)
        needs_latency = normalization == 'latency' or (target is not None and len(target) == 2
                                                       and target[0] == 'latency')
        if latency is not None:
            from .latency import LatencyModel
            if not isinstance(latency, LatencyModel):
                latency = LatencyModel.from_state(self.cost, latency)
            elif latency.cost is not self.cost:
                latency = LatencyModel.from_state(self.cost, latency.state_dict())
            self.cost.attach_latency(latency)
        elif needs_latency:
            raise ValueError("normalization='latency' and target ('latency', r) need a latency model of this "
                             "model: latency=LatencyModel.measure(model, graph, forward_of) (FisherPruningHook "
                             "measures one before training)")
        U = graph.num_channels
        self.keep = torch.ones(U, dtype=torch.bool)
        self._ratios: Optional[Tuple[int, Dict[str, float]]] = None   # (channels removed, ratios)
        self.history: List[Dict[str, Any]] = []
        self.steps = 0
        self.status: Optional[str] = None          # what the last step() did
        self.postponed_reason: Optional[str] = None
        self.postponed = 0                         # steps postponed so far
        self.candidates = self._candidates(internal_only, exclude)
        self._build_members()
        self._alive_pos = self._member_sizes.clone()
        self.target = self._check_target(target)

    # ------------------------------------------------------------------ #
    def _candidates(self, internal_only: bool, exclude: Sequence[str]) -> torch.Tensor:
        cand = self.graph.prunable.clone()
        for g in self.graph.groups:
            # a depthwise conv reads and writes the same group: it does not make the group cross-layer
            sources = [p for p in g.producers if p not in g.consumers]
            drop = (internal_only and len(sources) > 1) or any(
                m.startswith(p) for p in exclude for m in g.producers + g.consumers + g.norms)
            if drop:
                cand[g.offset:g.offset + g.size] = False
        return cand

    def _build_members(self) -> None:
        """For each channel, the (array, positions) pairs it occupies, for the min-channels rule."""
        self._members: List[List[tuple]] = [[] for _ in range(self.graph.num_channels)]
        sizes = []
        for a, arr in enumerate(self.graph.arrays.values()):
            sizes.append(arr.channel.numel())
            u, n = torch.unique(arr.channel[arr.channel >= 0], return_counts=True)
            for ch, cnt in zip(u.tolist(), n.tolist()):
                self._members[ch].append((a, cnt))
        self._member_sizes = torch.tensor(sizes, dtype=torch.long)
        pairs = [(ch, a, cnt) for ch, mem in enumerate(self._members) for a, cnt in mem]
        # the same pairs as three [pairs] long tensors: channel, array, positions (see _all_fitting)
        self._member_pairs = tuple(torch.tensor([p[i] for p in pairs], dtype=torch.long) for i in range(3))

    def _all_fitting(self, alive: torch.Tensor) -> torch.Tensor:
        """``[num_channels]`` bool: :meth:`_fits` of every channel at once."""
        ch, a, cnt = self._member_pairs
        short = (alive[a] - cnt < self.min_channels).long()
        return torch.zeros(self.graph.num_channels, dtype=torch.long).index_add_(0, ch, short) == 0

    def _fits(self, ch: int, alive: torch.Tensor) -> bool:
        """Whether every array holding ``ch`` keeps ``min_channels`` positions without it."""
        return all(int(alive[a]) - cnt >= self.min_channels for a, cnt in self._members[ch])

    def _take(self, ch: int, alive: torch.Tensor) -> None:
        """Count ``ch``'s positions out of ``alive`` (positions left per array)."""
        for a, cnt in self._members[ch]:
            alive[a] -= cnt

    def _check_target(self, target: Optional[Sequence[Any]]):
        if target is None:
            return None
        if not (isinstance(target, (list, tuple)) and len(target) == 2):
            raise ValueError(f'target={target!r}: expected (resource, ratio), e.g. ("flops", 0.5)')
        resource, ratio = target[0], float(target[1])
        if resource not in RESOURCES:
            raise ValueError(f'target resource {resource!r} is not one of {RESOURCES}')
        if not 0.0 < ratio < 1.0:
            raise ValueError(f'target ratio {ratio} must be in (0, 1): it is the fraction of {resource} to keep')
        if resource == 'latency':
            # the fixed part of the latency does not shrink: say so before any long work
            lat = self.cost.latency
            fixed = lat.fixed / lat.original if lat.original else 0.0
            if fixed > ratio:
                raise TargetUnreachableError(
                    f'latency cannot fall to {ratio:.3f} of the original: the latency model predicts {lat.fixed:.1f} '
                    f'of its {lat.original:.1f} ms ({fixed:.3f}) outside the layers, whatever is pruned. Raise the '
                    f'target ratio.')
        floor = self.lowest_ratio(resource)
        if floor > ratio:
            raise TargetUnreachableError(
                f'{resource} cannot fall to {ratio:.3f} of the original: removing every removable channel '
                f'(min_channels={self.min_channels}) leaves {floor:.3f}. Raise the target ratio or prune '
                f'more groups (internal_only / exclude).')
        return (resource, ratio)

    def constraint_violations(self) -> List[str]:
        """What the current masks break under this pruner's options (after a resume with new ones):
        removed channels of groups that are no longer candidates (``exclude``, ``internal_only``), and
        layers that lost channels and keep fewer than ``min_channels``. Empty when all is well."""
        problems = []
        removed = ~self.keep
        for g in self.graph.groups:
            sl = slice(g.offset, g.offset + g.size)
            if bool((removed[sl] & ~self.candidates[sl]).any()):
                problems.append(f'group {g.name} lost {int(removed[sl].sum())} channels but may not be pruned '
                                f'under the new options (exclude / internal_only)')
        arrays = list(self.graph.arrays.values())
        for a, arr in enumerate(arrays):
            alive, size = int(self._alive_pos[a]), int(self._member_sizes[a])
            if alive < size and alive < self.min_channels:
                problems.append(f'{arr.module} ({arr.role}) keeps {alive} channels, fewer than '
                                f'min_channels={self.min_channels}')
        return problems

    def lowest_ratio(self, resource: str) -> float:
        """The ratio left if every candidate channel were removed, honouring ``min_channels`` greedily."""
        keep = self.keep.clone()
        alive = self._alive_pos.clone()
        for ch in self.candidates.nonzero().flatten().tolist():
            if keep[ch] and self._fits(ch, alive):
                keep[ch] = False
                self._take(ch, alive)
        return self.cost.ratios(keep)[resource]

    # ------------------------------------------------------------------ #
    def attach(self) -> 'GroupFisherPruner':
        """Install mask and Fisher hooks on the consumer layers."""
        self.consumers.set_keep(self.keep)
        self.consumers.attach()
        return self

    def detach(self) -> None:
        self.consumers.detach()

    def accumulate(self) -> None:
        """Fold the last backward pass into the importance; call once after every backward."""
        self.fisher.accumulate()

    def ratios(self) -> Dict[str, float]:
        """Current ``{'flops', 'memory', 'params'}`` as fractions of the unpruned model.

        Asked every training iteration (hook, stop criterion) but changed only by a step:
        measured again only when the number of removed channels changed."""
        removed = int((~self.keep).sum())
        if self._ratios is None or self._ratios[0] != removed:
            self._ratios = (removed, self.cost.ratios(self.keep))
        return dict(self._ratios[1])

    def reached(self) -> bool:
        """Whether the target resource has fallen to its ratio. Only that resource is evaluated: a step
        asks after every channel it removes, and predicting the latency for a FLOPs target made a
        16-channel latency-normalised step on RetinaNet-R50-FPN take 0.58 s instead of 0.24 s
        (``benchmarks/step_time.py``)."""
        if self.target is None:
            return False
        resource, ratio = self.target
        removed = int((~self.keep).sum())
        if self._ratios is not None and self._ratios[0] == removed:
            return self._ratios[1][resource] <= ratio
        return self.cost.ratio(resource, self.keep) <= ratio

    def scores(self, importance: Optional[torch.Tensor] = None, evidence: Optional[torch.Tensor] = None,
               saving: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``[num_channels]`` normalised scores, importance / saving (inf where a channel may not be
        removed now: not a candidate, already removed, or no evidence since the last step)."""
        if importance is None or evidence is None:
            imp, ev, _ = self.criterion.importance(self)
            importance = imp if importance is None else importance
            evidence = ev if evidence is None else evidence
        saving = self.cost.saving(self.normalization, self.keep) if saving is None else saving
        s = importance.double() / saving.clamp_min(1e-12)
        s[~(self.candidates & self.keep & evidence.bool())] = float('inf')
        s[~torch.isfinite(importance.double())] = float('inf')
        return s

    def _tie_permutation(self, n: int) -> torch.Tensor:
        """``[n]`` the random order that breaks the last ties: the same on every rank and run (seeded by
        the step count and the channels removed)."""
        g = torch.Generator().manual_seed(1_000_003 * (self.steps + 1) + len(self.history))
        return torch.randperm(n, generator=g)

    def _order(self, scores: torch.Tensor, saving: torch.Tensor) -> torch.Tensor:
        """Channels by score; equal scores by larger saving, then in a random order that is the same
        on every rank and run (:meth:`_tie_permutation`), never by index."""
        order = self._tie_permutation(scores.numel())
        order = order[torch.argsort(-saving[order], stable=True)]
        return order[torch.argsort(scores[order], stable=True)]

    def _first_fitting(self, scores: torch.Tensor, saving: torch.Tensor) -> Optional[int]:
        """The channel :meth:`_order` puts first among those with a finite score that fit ``min_channels``,
        or None: the lowest score, then the larger saving, then the earlier tie position. Found with
        O(channels) minima instead of two sorts per removed channel (a one-shot step removes thousands)."""
        if bool((scores == float('-inf')).any()):  # first in _order, and not finite: nothing is chosen
            return None
        if bool(torch.isnan(saving).any()):      # NaN sorts last in _order; min/max would not say so
            order = self._order(scores, saving)
            for ch in order.tolist():
                if not torch.isfinite(scores[ch]):
                    return None
                if self._fits(ch, self._alive_pos):
                    return ch
            return None
        perm = self._tie_permutation(scores.numel())
        position = torch.empty_like(perm)
        position[perm] = torch.arange(perm.numel())
        live = torch.isfinite(scores)
        masked = False
        while bool(live.any()):
            best = live & (scores == scores[live].min())
            best &= saving == saving[best].max()
            idx = best.nonzero().flatten()
            ch = int(idx[position[idx].argmin()])
            if self._fits(ch, self._alive_pos):
                return ch
            live[ch] = False
            if not masked:      # layers at min_channels: leave out every channel that does not fit, at once
                live &= self._all_fitting(self._alive_pos)
                masked = True
        return None

    def step(self, num_channels: int = 1, reduce: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
             ) -> List[Dict[str, Any]]:
        """Remove up to ``num_channels`` channels, globally least important first.

        ``reduce``: applied to the accumulated evidence (Fisher, evidence, valid passes in one
        float64 vector) before deciding (e.g. a sum over DDP ranks), so every rank takes the same
        decision. Costs are re-measured after each removal and the accumulated Fisher is reset
        afterwards. Stops early at the target.

        ``self.status`` tells what happened: 'removed', 'reached' (nothing to do), 'exhausted' (no
        candidate can lose a channel under ``min_channels``) or 'postponed' (no finite pass since the
        last step, or no removable channel got a gradient signal: nothing is decided, the Fisher
        keeps accumulating, ``self.postponed_reason`` says why).
        """
        U = self.graph.num_channels
        imp, ev, valid = self.criterion.importance(self)
        packed = torch.cat([imp.double(), ev.double(), torch.tensor([float(valid)])])
        if reduce is not None:
            packed = reduce(packed)
        importance, evidence, valid = packed[:U], packed[U:2 * U] > 0, int(packed[2 * U])
        self.postponed_reason = None
        if self.reached():
            self.status = 'reached'
            return []
        if not bool((self.candidates & self.keep & self._all_fitting(self._alive_pos)).any()):
            self.status = 'exhausted'
            return []
        if valid == 0:
            return self._postpone('no pass with a finite Fisher since the last step')
        removed = []
        while len(removed) < int(num_channels):
            if self.reached():
                break
            saving = self.cost.saving(self.normalization, self.keep)
            scores = self.scores(importance, evidence, saving)
            tie = saving if self.normalization != 'none' else self.cost.saving('memory', self.keep)
            chosen = None
            if self.block_quantum > 1:
                chosen = self._best_block(self._order(scores, tie), scores, importance, saving)
            if chosen is None:
                ch = self._first_fitting(scores, tie)
                chosen = [] if ch is None else [ch]
            if not chosen:
                break
            for ch in chosen:
                if len(chosen) > 1 and self.reached():
                    break                    # the target, not the block, ends pruning
                self.keep[ch] = False
                self._take(ch, self._alive_pos)
                g = self.graph.groups[self.graph.group_index(ch)]
                entry = {'step': self.steps, 'channel': ch, 'group': g.name, 'index': ch - g.offset,
                         'score': float(scores[ch]), 'importance': float(importance[ch])}
                self.history.append(entry)
                removed.append(entry)
        if not removed:
            return self._postpone('no removable channel got a gradient signal since the last step')
        if self.criterion.uses_fisher and all(e['importance'] == 0.0 for e in removed):
            warnings.warn(f'mmfisher: step {self.steps}: every removed channel ({len(removed)}) had Fisher 0 '
                          f'(no effect on the loss: dead channels); equal scores went to the larger saving, then '
                          f'to a seeded random order')
        self.status = 'removed'
        self.steps += 1
        self.consumers.set_keep(self.keep)
        self.fisher.reset()
        return removed

    @property
    def block_quantum(self) -> int:
        """The channel block a decision removes: the latency model's quantum under latency normalisation, else 1."""
        lat = self.cost.latency
        return lat.quantum if self.normalization == 'latency' and lat is not None else 1

    def _best_block(self, order: torch.Tensor, scores: torch.Tensor, importance: torch.Tensor,
                    saving: torch.Tensor) -> Optional[List[int]]:
        """The block with the least summed importance over summed saving: in every group, its removable
        channels (by ``order``: least important first) that take its kept count to the next multiple of
        the quantum below (fewer where ``min_channels`` or the removable channels run out). Groups are
        compared in the order of their best channel, so ties go the way :meth:`_order` sends them."""
        q = self.block_quantum
        kept = {}
        best = None
        for ch in order.tolist():
            if not torch.isfinite(scores[ch]):
                break
            gi = self.graph.group_index(ch)
            if gi not in kept:
                g = self.graph.groups[gi]
                n = int(self.keep[g.offset:g.offset + g.size].sum())
                # channels to the multiple below; positions left per array, as if this block went
                kept[gi] = [max(1, n - max(1, (n - 1) // q * q)), [], self._alive_pos.clone()]
            want, block, alive = kept[gi]
            if len(block) < want and self._fits(ch, alive):
                self._take(ch, alive)        # the block's own channels count against min_channels
                block.append(ch)
        for gi, (want, block, _) in kept.items():
            if not block:
                continue
            score = float(importance[block].double().sum()) / max(float(saving[block].sum()), 1e-12)
            if best is None or score < best[0]:
                best = (score, block)
        return best[1] if best else None

    def _postpone(self, reason: str) -> List[Dict[str, Any]]:
        self.status = 'postponed'
        self.postponed_reason = reason
        self.postponed += 1
        warnings.warn(f'mmfisher: pruning step postponed: {reason}')
        return []

    # ------------------------------------------------------------------ #
    def export_keep(self, divisor: Optional[int] = None) -> torch.Tensor:
        """The kept channels, optionally rounded up to multiples of ``divisor`` per group."""
        if not divisor or divisor == 1:
            return self.keep.clone()
        return round_keep(self.graph, self.keep, divisor, [h['channel'] for h in self.history])

    def channel_spec(self, divisor: Optional[int] = None) -> Dict[str, Any]:
        return make_spec(self.graph, self.export_keep(divisor))

    def export(self, divisor: Optional[int] = None, state_dict: Optional[Dict[str, torch.Tensor]] = None) -> nn.Module:
        """A compact copy of the model (the pruner's hooks are not copied); ``divisor`` rounds
        every group's channel count up to a multiple of it (see :func:`round_keep`). ``state_dict``: weights
        of the full-width model to shrink instead of its own (e.g. an exponential moving average of them)."""
        attached = bool(self.consumers._handles)
        self.detach()
        try:
            compact = copy_model(self.model)
        finally:
            if attached:
                self.attach()
        if state_dict is not None:
            compact.load_state_dict(state_dict, strict=True)
        return shrink(compact, self.graph, self.export_keep(divisor))

    def signature(self) -> Dict[str, Any]:
        return {'num_channels': self.graph.num_channels,
                'groups': [[g.name, g.size] for g in self.graph.groups]}

    def state_dict(self) -> Dict[str, Any]:
        """Tensors and plain Python data only (loads under ``torch.load(weights_only=True)``)."""
        return {
            'keep': self.keep.clone(),
            **self.fisher.state_dict(),
            'steps': int(self.steps),
            'postponed': int(self.postponed),
            'history': [dict(h) for h in self.history],
            'normalization': self.normalization,
            'min_channels': self.min_channels,
            'criterion': self.criterion.options(),
            'signature': self.signature(),
            **({'latency': self.cost.latency.state_dict()} if self.cost.latency is not None else {}),
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        sig = state.get('signature')
        mine = self.signature()
        if sig != mine:
            detail = ''
            if sig is not None:
                for a, b in zip(sig['groups'], mine['groups']):
                    if a != b:
                        detail = f': first mismatch at group {b[0]!r} ({b[1]} channels here, {a[0]!r} with ' \
                                 f'{a[1]} in the state)'
                        break
                else:
                    detail = f': {len(sig["groups"])} groups in the state, {len(mine["groups"])} here'
            raise ValueError('pruning state does not belong to this architecture' + detail)
        self.keep = state['keep'].clone().bool()
        self._ratios = None
        self.fisher.load_state_dict(state)
        self.steps = int(state['steps'])
        self.postponed = int(state.get('postponed', 0))
        self.history = [dict(h) for h in state['history']]
        self._alive_pos = self._member_sizes.clone()
        for ch in (~self.keep).nonzero().flatten().tolist():
            self._take(ch, self._alive_pos)
        self.consumers.set_keep(self.keep)
