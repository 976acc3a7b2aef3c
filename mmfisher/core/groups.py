"""Step 2: coupled channel groups from a trace.

A *channel* of a group is one union-find class of atoms: the positions, in
every layer of the group, that must be removed together (one position per
layer for a plain conv, a whole group of positions for a group conv or a
GroupNorm group). A *group* is the set of channels that share producers: a
conv's output channels, or a whole residual stream (every conv3, the
downsample conv and all their consumers).

``analyse(model, inputs)`` runs the trace and returns a :class:`CouplingGraph`:
the groups, and for every channel-indexed array of every recorded module the
flat channel index of each position (``-1``: never pruned).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from .atoms import connected_roots
from .layers import ChannelwiseCall, ModuleRecord
from .mirrors import find_mirrors, tie_mirrors
from .trace import ChannelTracer


@dataclass
class ChannelGroup:
    """Layers that lose channels together.

    ``offset``/``size``: the group's channels are ``offset .. offset+size-1`` of
    the flat channel vector every other step uses (masks, importance, cost).
    """

    index: int
    name: str                         # first producer that ran, e.g. 'backbone.layer1.0.conv3'
    offset: int
    size: int
    producers: List[str] = field(default_factory=list)   # modules whose 'out' holds the channels
    consumers: List[str] = field(default_factory=list)   # modules whose 'in' holds them
    norms: List[str] = field(default_factory=list)       # per-channel modules ('feat')
    reasons: List[str] = field(default_factory=list)     # why not prunable (empty: prunable)
    positions_per_channel: int = 1                       # in the first producer

    @property
    def prunable(self) -> bool:
        return not self.reasons

    @property
    def channels(self) -> range:
        return range(self.offset, self.offset + self.size)


@dataclass
class LayerArray:
    """One channel-indexed dim of one module: ``channel[p]`` is the flat channel of position p (-1: kept)."""

    module: str
    role: str
    channel: torch.Tensor


def _gather(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``table[index]`` where ``index >= 0``, and ``index`` itself (negative: untracked) elsewhere."""
    return torch.where(index >= 0, table.index_select(0, index.clamp(min=0)), index)


class CouplingGraph:
    """The result of the analysis: groups, and for every recorded module its arrays."""

    def __init__(self, tracer: ChannelTracer, seconds: float) -> None:
        self.seconds = seconds
        self.batch_size = tracer.batch_size
        self.records: Dict[str, ModuleRecord] = {}
        for i in tracer.order:
            rec = tracer.records[i]
            self.records[rec.name] = rec
        self.ops_seen = dict(tracer.ops_seen)
        # layers no traced forward ran (another mode's branch): reported, and never shrunk
        self.unseen: List[str] = tracer.unseen()
        self.skipped: List[str] = list(tracer.skipped)     # extra forwards that failed, and why
        self.mirrors: List[Tuple[str, str]] = []           # (copy, source): the copy loses the source's channels
        self.groups: List[ChannelGroup] = []
        self.arrays: Dict[Tuple[str, str], LayerArray] = {}
        # calls of child-less modules without a layer type on channels (activations, pooling): their
        # module, input shape and ``channel`` ([in_shape[1]] flat channel of each position, -1: kept)
        self.channelwise: List[Tuple[ChannelwiseCall, torch.Tensor]] = []
        self._build(tracer)

    # ------------------------------------------------------------------ #
    def _build(self, tracer: ChannelTracer) -> None:
        sets = tracer.sets
        root = sets.roots()                                   # [atoms] class root of every atom
        # every array of every record, end to end: [positions] atoms, and each array's key and length
        keys = [(name, role) for name, rec in self.records.items() for role in rec.arrays]
        lengths = [self.records[name].arrays[role].numel() for name, role in keys]
        flat = torch.cat([self.records[name].arrays[role] for name, role in keys]) if keys else \
            torch.zeros(0, dtype=torch.long)
        flat_roots = root.index_select(0, flat)               # class root of every position (arrays: allocated atoms)
        roots_of: Dict[Tuple[str, str], torch.Tensor] = dict(zip(keys, flat_roots.split(lengths)))

        # the classes some producer writes, in order of first appearance over the producers' outputs
        producers = [name for name, rec in self.records.items()
                     if rec.layer_type.produces and 'out' in rec.arrays and rec.arrays['out'].numel()]
        outs = [roots_of[(name, 'out')] for name in producers]
        n_prod = len(outs)
        seq = torch.cat(outs) if outs else torch.zeros(0, dtype=torch.long)    # [positions] class of each
        seq_producer = torch.repeat_interleave(torch.arange(n_prod), torch.tensor([o.numel() for o in outs],
                                                                                  dtype=torch.long))
        never = seq.numel()
        first_pos = torch.full((sets.size,), never).scatter_reduce_(0, seq, torch.arange(never), 'amin')
        # producers that write a common class are one group (a residual stream): the connected producers, each
        # linked to the first writer of every class it writes; a group's root is its first producer
        first_writer = seq_producer.index_select(0, first_pos.index_select(0, seq))   # [positions]
        group_rep = connected_roots(n_prod, [(first_writer, seq_producer)])
        classes = (first_pos < never).nonzero().flatten()      # the classes in seq, ascending
        first = first_pos.index_select(0, classes)
        by_first = first.argsort()                             # by first write
        classes, first = classes.index_select(0, by_first), first.index_select(0, by_first)
        class_rep = group_rep.index_select(0, seq_producer.index_select(0, first))
        order = class_rep.argsort(stable=True)                 # groups in order of their first producer
        classes = classes.index_select(0, order)               # [num_channels] root of every flat channel
        class_rep = class_rep.index_select(0, order)
        self.num_channels = int(classes.numel())
        chan_of_root = torch.full((sets.size,), -1, dtype=torch.long)
        chan_of_root[classes] = torch.arange(self.num_channels)

        starts = [0] + (torch.nonzero(class_rep[1:] != class_rep[:-1]).flatten() + 1).tolist()
        ends = starts[1:] + [self.num_channels]
        rep_list = class_rep.tolist()
        for a, b in zip(starts, ends):
            if a < b:
                self.groups.append(ChannelGroup(index=len(self.groups), name=producers[rep_list[a]],
                                                offset=a, size=b - a))
        group_of_chan = torch.repeat_interleave(torch.arange(len(self.groups)),
                                                torch.tensor([g.size for g in self.groups], dtype=torch.long))

        reasons = sets.reasons()
        tainted_roots = list(reasons)
        tainted_chan = chan_of_root.index_select(0, torch.tensor(tainted_roots, dtype=torch.long)).tolist()
        tainted = sorted((c, r) for c, r in zip(tainted_chan, tainted_roots) if c >= 0)
        group_list = group_of_chan.tolist()
        for chan, r in tainted:
            grp = self.groups[group_list[chan]]
            grp.reasons.extend(x for x in reasons[r] if x not in grp.reasons)

        flat_chan = chan_of_root.index_select(0, flat_roots)  # flat channel of every position, -1: untracked
        if tracer.channelwise:
            cw_atoms = torch.cat([c.atoms for c in tracer.channelwise])
            cw_chan = _gather(chan_of_root, _gather(root, cw_atoms))
            self.channelwise = list(zip(tracer.channelwise, cw_chan.split([c.atoms.numel()
                                                                           for c in tracer.channelwise])))
        for (name, role), chan in zip(keys, flat_chan.split(lengths)):
            self.arrays[(name, role)] = LayerArray(name, role, chan)
        # (array, group) pairs, ordered by array then group: each array's module joins its groups' lists
        array_of = torch.repeat_interleave(torch.arange(len(keys)), torch.tensor(lengths, dtype=torch.long))
        tracked = (flat_chan >= 0).nonzero().flatten()
        n_groups = max(1, len(self.groups))
        seen = torch.zeros(len(keys) * n_groups, dtype=torch.bool)   # a mask, not unique(): much faster here
        seen[array_of.index_select(0, tracked) * n_groups
             + group_of_chan.index_select(0, flat_chan.index_select(0, tracked))] = True
        for pair in seen.nonzero().flatten().tolist():
            (name, role), grp = keys[pair // n_groups], self.groups[pair % n_groups]
            lst = {'out': grp.producers, 'in': grp.consumers}.get(role, grp.norms)
            if name not in lst:
                lst.append(name)
        for grp in self.groups:
            chan = self.arrays[(grp.name, 'out')].channel
            grp.positions_per_channel = int((chan == grp.offset).sum())
            if grp.prunable and not grp.consumers:
                # written, never read by a layer the trace saw, and not an output: whatever reads it
                # (a compiled kernel called outside torch) would be mis-pruned
                grp.reasons.append('no traced layer reads these channels: an operation the analysis cannot '
                                   'see reads them')

        prunable = torch.zeros(self.num_channels, dtype=torch.bool)
        for grp in self.groups:
            if grp.prunable:
                prunable[grp.offset:grp.offset + grp.size] = True
        self.prunable = prunable
        # modules whose layer type maps their output rows to samples (RoI extractors)
        self.row_sources = [name for name, rec in self.records.items() if rec.layer_type.maps_rows()]
        self.row_level = self._row_level()

    def _row_level(self) -> Dict[str, Optional[str]]:
        """Conv/linear layers whose input rows are not the samples of the batch (RoI heads).

        ``name -> row source``: the module (an RoI extractor, whose layer type maps its output rows to
        samples) that wrote as many rows in the trace, or None when no such module did (those rows
        cannot be mapped to samples; their Fisher is squared per row). For the report: in training,
        a layer's rows are mapped by the latest row source that wrote as many rows (the extractor of
        its own cascade stage)."""
        sources: Dict[int, str] = {}
        for name in self.row_sources:
            for call in self.records[name].calls:
                sources.setdefault(int(call.out_shape[0]), name)
        out: Dict[str, Optional[str]] = {}
        for name, rec in self.records.items():
            if not rec.layer_type.produces or self.batch_size is None:
                continue
            rows = [int(c.in_shape[0]) for c in rec.calls if len(c.in_shape) >= 2]
            if any(r != self.batch_size for r in rows):
                out[name] = next((sources[r] for r in rows if r in sources), None)
        return out

    # ------------------------------------------------------------------ #
    def group(self, name: str) -> ChannelGroup:
        for g in self.groups:
            if g.name == name:
                return g
        raise KeyError(f'no channel group named {name!r}; groups are named after their first producer, '
                       f'e.g. {[g.name for g in self.groups[:3]]}')

    def groups_of(self, module: str, role: str = 'out') -> List[ChannelGroup]:
        """The groups that own the channels of ``module``'s ``role`` array."""
        chan = self.arrays[(module, role)].channel
        return [self.groups[i] for i in sorted({self.group_index(c) for c in chan.tolist() if c >= 0})]

    def group_index(self, channel: int) -> int:
        lo, hi = 0, len(self.groups) - 1
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self.groups[mid].offset <= channel:
                lo = mid
            else:
                hi = mid - 1
        return lo

    def channel_group_index(self) -> torch.Tensor:
        """``[num_channels]`` LongTensor: group index of every flat channel."""
        out = torch.empty(self.num_channels, dtype=torch.long)
        for g in self.groups:
            out[g.offset:g.offset + g.size] = g.index
        return out

    def layers(self) -> List[str]:
        """Producing layers (conv, linear), in call order."""
        return [n for n, r in self.records.items() if r.layer_type.produces]

    def prunable_layers(self) -> set:
        """Layers that write or read a prunable group."""
        pr = set()
        for g in self.groups:
            if g.prunable:
                pr.update(g.producers)
                pr.update(g.consumers)
        return pr

    def summary(self) -> Dict[str, Any]:
        layers, pr = self.layers(), self.prunable_layers()
        return {
            'groups': len(self.groups),
            'prunable_groups': sum(g.prunable for g in self.groups),
            'channels': self.num_channels,
            'prunable_channels': int(self.prunable.sum()),
            'layers': len(layers),
            'prunable_layers': sum(1 for n in layers if n in pr),
            'unseen_layers': len(self.unseen),
            'seconds': self.seconds,
        }

    def report(self) -> str:
        """One block per group: members, channels, prunable or why not."""
        lines = []
        for g in self.groups:
            state = 'prunable' if g.prunable else 'NOT prunable: ' + '; '.join(g.reasons[:3]) + \
                (f' (+{len(g.reasons) - 3} more)' if len(g.reasons) > 3 else '')
            lines.append(f'[{g.index}] {g.name}: {g.size} channels x {g.positions_per_channel} -- {state}')
            lines.append(f'    producers: {", ".join(g.producers)}')
            if g.consumers:
                lines.append(f'    consumers: {", ".join(g.consumers)}')
            if g.norms:
                lines.append(f'    per-channel: {", ".join(g.norms)}')
        for copy, source in self.mirrors:
            lines.append(f'{copy} is kept in step with {source}: it loses the same channels')
        for err in self.skipped:
            lines.append(f'a further forward of the analysis failed and was traced up to the error: {err}')
        if self.unseen:
            lines.append(f'layers no traced forward ran (never shrunk; if another mode runs them, give the '
                         f'analysis that forward too): {", ".join(self.unseen)}')
        for name, source in self.row_level.items():
            if source is not None:
                lines.append(f'rows of {name} are RoIs of {source}: their Fisher is summed per image')
            else:
                lines.append(f'rows of {name} are not images and cannot be mapped to them: '
                             f'its Fisher is squared per row')
        s = self.summary()
        lines.append(f'{s["prunable_groups"]}/{s["groups"]} groups prunable, '
                     f'{s["prunable_layers"]}/{s["layers"]} conv/linear layers prunable '
                     f'({100.0 * s["prunable_layers"] / max(1, s["layers"]):.1f}%), '
                     f'{s["prunable_channels"]}/{s["channels"]} channels, analysed in {s["seconds"]:.2f} s')
        return '\n'.join(lines)


def analyse(model: nn.Module, inputs: Union[Any, Callable[[], Any]] = None, *,
            forward: Optional[Callable[[], Any]] = None, also: Sequence[Callable[[], Any]] = (),
            strict: bool = False, mirrors: Sequence[Tuple[str, str]] = ()) -> CouplingGraph:
    """Find the coupled channel groups of ``model``.

    Args:
        model: any ``nn.Module``. Frozen parameters and eval-mode norms are analysed
            like the others; the model runs in eval mode under ``no_grad`` and its
            training flags are restored afterwards.
        inputs: example input(s) for ``model(*inputs)`` (a tensor or a tuple).
        forward: instead of ``inputs``, a callable that runs the model (e.g.
            ``lambda: det._forward(batch)`` for an mmdet detector).
        also: further forwards to trace (the model's other modes: a detector's loss, which runs
            branches its tensor forward does not): what they couple or taint counts, what they
            cost does not (costs follow ``inputs`` / ``forward``). Layers no forward ran are listed in
            ``graph.unseen``.
        strict: raise :class:`mmfisher.core.trace.AnalysisRuleError` when one of the analysis's own op
            rules fails, instead of leaving the channels it saw unpruned (for tests and the zoo check:
            a bug in a rule must not look like an unsupported model).
        mirrors: ``(copy, source)`` module names of copies kept in step with a source by parameter
            updates the trace cannot see, beyond the averaged copies (EMA / momentum encoders) found
            automatically (:mod:`mmfisher.core.mirrors`): each copy loses its source's channels.
    """
    if forward is None:
        if inputs is None:
            raise ValueError('analyse() needs example inputs or a forward callable')
        args = inputs if isinstance(inputs, tuple) else (inputs,)
        forward = lambda: model(*args)  # noqa: E731
    t0 = time.perf_counter()
    tracer = ChannelTracer(model, strict=strict)
    training = {m: m.training for m in model.modules()}
    if any(training.values()):
        model.eval()
    try:
        tracer.run(forward, also)
    finally:
        for m, flag in training.items():
            if m.training != flag:
                m.training = flag
    pairs, ambiguous = find_mirrors(model)
    pairs += [tuple(p) for p in mirrors if tuple(p) not in pairs]
    tie_mirrors(tracer, model, pairs, ambiguous)
    graph = CouplingGraph(tracer, time.perf_counter() - t0)
    graph.mirrors = pairs
    return graph
