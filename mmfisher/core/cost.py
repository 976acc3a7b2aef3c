"""What a model costs under a keep vector, and what removing one channel saves.

Counted per input sample of the analysed shape (the example input's batch is
divided out):

* FLOPs: multiply-accumulates of conv and linear layers,
  ``positions * kernel * out * in / groups`` per call (``positions``: output positions; input
  positions for a transposed conv, whose every input position meets every kernel element once).
* memory: feature-map elements written by conv and linear layers (the paper's
  memory cost: n*h*w per producing layer and channel).
* params: all parameters of the model; conv/linear weights and biases and norm
  affine parameters shrink with their channels.

* latency: with a :class:`~mmfisher.core.latency.LatencyModel` attached (:meth:`CostModel.attach_latency`),
  the predicted milliseconds on the device it was measured on.

``CostModel.saving(kind, keep)`` returns, for every flat channel, what removing
it alone would save now; it is re-measured after every removal because the
FLOPs a channel costs depend on how many channels its neighbours still have.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Tuple

import torch
import torch.nn as nn

from .groups import CouplingGraph

RESOURCES = ('flops', 'memory', 'params', 'latency')


@dataclass
class _Layer:
    name: str                  # the module
    out_idx: torch.Tensor      # [out] flat channel of each output position (U = untracked)
    in_idx: torch.Tensor       # [in]
    rows: float                # output positions per sample, summed over calls
    flop_rows: float           # positions the kernel is applied at (input positions for a transposed conv)
    kernel: int                # kernel elements (1 for linear)
    ipg: int                   # input channels per group
    grouped: bool
    bias: bool
    out_u: torch.Tensor        # unique prunable channels among outputs, with their position counts
    out_n: torch.Tensor
    in_u: torch.Tensor
    in_n: torch.Tensor


@dataclass
class _Channelwise:
    """Work outside the layers whose time follows a channel count: one call of a norm or of a child-less
    module without a layer type (:class:`~mmfisher.core.layers.ChannelwiseCall`). Only the latency model
    uses it (FLOPs, memory and params are the layers')."""
    name: str                  # the module, and the call's index when it has several
    module: nn.Module
    in_shape: Tuple[int, ...]
    idx: torch.Tensor          # [in_shape[1]] flat channel of each position (U = untracked)
    unit: int                  # positions that go together (a GroupNorm group: channels per group)
    shrink: object             # None, or the layer type whose shrink gives the module fewer channels
    u: torch.Tensor            # unique prunable channels among the positions, with their position counts
    n: torch.Tensor


class CostModel:
    """FLOPs / memory / params of a model whose channels follow a keep vector."""

    def __init__(self, model: nn.Module, graph: CouplingGraph) -> None:
        U = graph.num_channels
        self.num_channels = U
        self.latency = None               # a LatencyModel, once attached
        batch = float(graph.batch_size or 1)
        self.layers: List[_Layer] = []
        self.norms: List[Tuple[torch.Tensor, float]] = []   # per-channel arrays: (channel index, params each)
        for name, rec in graph.records.items():
            m, lt = rec.module, rec.layer_type
            if lt.produces and 'out' in rec.arrays:
                out_idx = self._ext(graph.arrays[(name, 'out')].channel, U)
                in_idx = self._ext(graph.arrays[(name, 'in')].channel, U)
                geo = lt.geometry(m, rec, batch)
                ou, on = self._counts(out_idx, U)
                iu, inn = self._counts(in_idx, U)
                self.layers.append(_Layer(name, out_idx, in_idx, geo.rows, geo.flop_rows, geo.kernel,
                                          in_idx.numel() // geo.groups, geo.groups > 1, geo.bias, ou, on, iu, inn))
            elif 'feat' in rec.arrays and lt.params_per_channel(m):
                self.norms.append((self._ext(graph.arrays[(name, 'feat')].channel, U), lt.params_per_channel(m)))
        self.channelwise: List[_Channelwise] = []
        for name, rec in graph.records.items():
            if rec.layer_type.produces or 'feat' not in rec.arrays or not rec.calls:
                continue
            idx = self._ext(graph.arrays[(name, 'feat')].channel, U)
            unit = rec.module.num_channels // rec.module.num_groups if isinstance(rec.module, nn.GroupNorm) else 1
            for k, c in enumerate(rec.calls):
                if len(c.in_shape) >= 2 and c.in_shape[1] == idx.numel():
                    self._add_channelwise(name if len(rec.calls) == 1 else f'{name}#{k}', rec.module, c.in_shape,
                                          idx, unit, rec.layer_type)
        seen_calls: Dict[str, int] = {}
        for call, chan in graph.channelwise:
            k = seen_calls[call.name] = seen_calls.get(call.name, -1) + 1
            self._add_channelwise(f'{call.name}#{k}' if k else call.name, call.module, call.in_shape,
                                  self._ext(chan, U), 1, None)
        seen = set()
        self.total_params = 0
        for p in model.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                self.total_params += p.numel()
        full = torch.ones(U, dtype=torch.bool)
        self._layer_params0 = self.layer_totals(full)[2]
        self.original = self.totals(full)
        # memory saved by a channel does not depend on the others: compute once
        self._memory = torch.zeros(U + 1, dtype=torch.float64)
        for L in self.layers:
            self._memory.index_add_(0, L.out_u, L.out_n * L.rows)
        self._memory = self._memory[:U]

    def _add_channelwise(self, name, module, in_shape, idx, unit, shrink) -> None:
        u, n = self._counts(idx, self.num_channels)
        self.channelwise.append(_Channelwise(name, module, tuple(in_shape), idx, unit, shrink, u, n))

    def attach_latency(self, latency) -> None:
        """Count ``latency`` (a :class:`~mmfisher.core.latency.LatencyModel` built on this cost model) as a
        resource: ``totals`` / ``ratios`` gain ``'latency'`` (ms) and ``saving('latency', keep)`` works."""
        if latency.cost is not self:
            raise ValueError('the latency model was built on another CostModel')
        self.latency = latency

    def resources(self):
        """The resources this cost model counts: flops, memory, params, and latency once attached."""
        return RESOURCES if self.latency is not None else RESOURCES[:3]

    @staticmethod
    def _ext(chan: torch.Tensor, U: int) -> torch.Tensor:
        c = chan.clone()
        c[c < 0] = U
        return c

    @staticmethod
    def _counts(idx: torch.Tensor, U: int):
        u, n = torch.unique(idx, return_counts=True)
        return u, n.double()

    def alive(self, keep: torch.Tensor) -> torch.Tensor:
        """``[num_channels + 1]`` float64: 1 for a kept channel, 0 for a removed one; the last entry (1)
        stands for every position outside the groups (the ``-1`` entries of the layers' indices)."""
        return torch.cat([keep.double(), torch.ones(1, dtype=torch.float64)])

    def layer_totals(self, keep: torch.Tensor) -> Tuple[float, float, float]:
        """``(flops, memory, params)`` of the recorded layers alone with only ``keep`` channels (the
        parameters of unrecorded modules are not in it; :meth:`totals` adds them)."""
        alive = self.alive(keep)
        flops = memory = params = 0.0
        for L in self.layers:
            n_out = float(alive[L.out_idx].sum())
            per_out = L.ipg if L.grouped else float(alive[L.in_idx].sum())
            flops += L.flop_rows * L.kernel * n_out * per_out
            memory += L.rows * n_out
            params += L.kernel * n_out * per_out + (n_out if L.bias else 0.0)
        for idx, per in self.norms:
            params += per * float(alive[idx].sum())
        return flops, memory, params

    def totals(self, keep: torch.Tensor) -> Dict[str, float]:
        """``{'flops', 'memory', 'params'}`` (and ``'latency'`` in ms, if attached) of the model with only
        ``keep`` channels."""
        out = self._static_totals(keep)
        if self.latency is not None:
            out['latency'] = self.latency.total(keep)
        return out

    def ratio(self, resource: str, keep: torch.Tensor) -> float:
        """``ratios(keep)[resource]`` alone: the latency model (the dearest to evaluate, some 35 ms on
        RetinaNet-R50-FPN) is asked only for ``'latency'``."""
        if resource == 'latency':
            if self.latency is None:
                raise ValueError("resource 'latency' needs a latency model (attach_latency)")
            return self.latency.total(keep) / self.latency.original
        if resource not in RESOURCES[:3]:
            raise ValueError(f'resource {resource!r} is not one of {RESOURCES}')
        now = self._static_totals(keep)[resource]
        return now / self.original[resource] if self.original[resource] else 1.0

    def _static_totals(self, keep: torch.Tensor) -> Dict[str, float]:
        """``{'flops', 'memory', 'params'}`` with only ``keep`` channels (``params`` with the unrecorded modules')."""
        flops, memory, layer_params = self.layer_totals(keep)
        params = float(self.total_params) - (self._layer_params0 - layer_params)
        return {'flops': flops, 'memory': memory, 'params': params}

    def ratios(self, keep: torch.Tensor) -> Dict[str, float]:
        now = self.totals(keep)
        ratios = {k: now[k] / self.original[k] if self.original[k] else 1.0 for k in RESOURCES[:3]}
        if self.latency is not None:
            ratios['latency'] = now['latency'] / self.latency.original
        return ratios

    def saving(self, kind: str, keep: torch.Tensor) -> torch.Tensor:
        """``[num_channels]`` float64: what removing each channel alone saves now."""
        U = self.num_channels
        if kind == 'memory':
            return self._memory.clone()
        if kind == 'none':
            return torch.ones(U, dtype=torch.float64)
        if kind == 'latency':
            if self.latency is None:
                raise ValueError("cost 'latency' needs a latency model: CostModel.attach_latency(LatencyModel."
                                 "measure(...))")
            return self.latency.saving(keep)
        if kind not in ('flops', 'params'):
            raise ValueError(f'unknown cost {kind!r}: use memory, flops, params, latency or none')
        alive = self.alive(keep)
        out = torch.zeros(U + 1, dtype=torch.float64)
        for L in self.layers:
            scale = (L.flop_rows if kind == 'flops' else 1.0) * L.kernel
            if L.grouped:
                out.index_add_(0, L.out_u, L.out_n * (scale * L.ipg))
            else:
                n_out = float(alive[L.out_idx].sum())
                n_in = float(alive[L.in_idx].sum())
                out.index_add_(0, L.out_u, L.out_n * (scale * n_in))
                out.index_add_(0, L.in_u, L.in_n * (scale * n_out))
                # a channel on both sides of one layer is counted once for the product
                both = torch.isin(L.out_u, L.in_u)
                if both.any() and L.out_u[both].max() < U:
                    a = torch.zeros(U + 1, dtype=torch.float64).index_add_(0, L.out_u, L.out_n)
                    b = torch.zeros(U + 1, dtype=torch.float64).index_add_(0, L.in_u, L.in_n)
                    out -= scale * a * b
            if kind == 'params' and L.bias:
                out.index_add_(0, L.out_u, L.out_n)
        if kind == 'params':
            for idx, per in self.norms:
                out.index_add_(0, idx, torch.full((idx.numel(),), per, dtype=torch.float64))
        return out[:U]
