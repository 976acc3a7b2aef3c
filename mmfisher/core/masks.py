"""Channel masks on the inputs of the consuming layers.

The mask of a removed channel zeroes it at the input of every conv/linear layer
that reads it. Every other use of the channel is either per-channel (norms,
activations, pooling, adds within the group) or made the group unprunable by
the analysis, so the masked model computes exactly what the compact model does.

:class:`ConsumerInputs` holds, for every consuming module, which flat channel
each input position belongs to, and installs the forward pre-hooks that apply
the mask and, when asked, hand the masked input to the importance estimator.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch
import torch.nn as nn

from .groups import CouplingGraph


@dataclass
class Consumer:
    """A module reading channels: ``index[p]`` is the flat channel of input position p
    (``num_channels`` for positions outside every prunable group); ``dim`` is the input dim
    of the positions (1 for conv, -1 for linear)."""

    name: str
    module: nn.Module
    index: torch.Tensor
    dim: int


class ConsumerInputs:
    """Mask (and observe) the inputs of every layer that consumes prunable channels."""

    def __init__(self, model: nn.Module, graph: CouplingGraph) -> None:
        self.graph = graph
        self.num_channels = graph.num_channels
        modules = dict(model.named_modules())
        self.consumers: List[Consumer] = []
        prunable_ext = torch.cat([graph.prunable, torch.zeros(1, dtype=torch.bool)])
        for name, rec in graph.records.items():
            if rec.layer_type.input_dim is None or 'in' not in rec.arrays:
                continue
            chan = graph.arrays[(name, 'in')].channel.clone()
            chan[chan < 0] = self.num_channels
            if not prunable_ext[chan].any():
                continue
            chan[~prunable_ext[chan]] = self.num_channels
            self.consumers.append(Consumer(name, modules.get(name, rec.module), chan, rec.layer_type.input_dim))
        # [num_channels + 1]: the last entry (always 1) serves positions outside prunable groups
        self.mask = torch.ones(self.num_channels + 1)
        self._position_masks: Dict[str, Optional[torch.Tensor]] = {}
        # modules whose output rows are not samples (RoI extractors): they tell which sample each row is
        self.row_sources = [(modules.get(name, graph.records[name].module), graph.records[name].layer_type)
                            for name in graph.row_sources]
        self._handles: list = []
        self.observer: Optional[Callable[[Consumer, torch.Tensor], torch.Tensor]] = None
        self.row_observer: Optional[Callable[[torch.Tensor, int], None]] = None

    def set_keep(self, keep: torch.Tensor) -> None:
        """``keep``: ``[num_channels]`` bool/0-1 vector."""
        self.mask[:-1] = keep.float()
        self._position_masks.clear()

    def position_mask(self, c: Consumer, x: torch.Tensor) -> Optional[torch.Tensor]:
        """The mask of ``c``'s input positions shaped to broadcast over ``x``, or None if all kept."""
        if c.name not in self._position_masks:
            m = self.mask[c.index]
            self._position_masks[c.name] = None if bool((m > 0).all()) else m
        m = self._position_masks[c.name]
        if m is None:
            return None
        if m.device != x.device or m.dtype != x.dtype:
            m = m.to(device=x.device, dtype=x.dtype)
            self._position_masks[c.name] = m
        if c.dim == 1:
            return m.view(1, -1, *([1] * (x.dim() - 2)))
        return m

    def attach(self) -> 'ConsumerInputs':
        self.detach()
        for c in self.consumers:
            self._handles.append(c.module.register_forward_pre_hook(self._hook(c)))
        for module, layer_type in self.row_sources:
            self._handles.append(module.register_forward_hook(self._rows_hook(layer_type)))
        return self

    def _rows_hook(self, layer_type):
        def hook(module, args, output):
            if self.row_observer is not None:
                rows = layer_type.sample_rows(module, args, output)
                if rows is not None:
                    self.row_observer(rows[0], rows[1])
        return hook

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def _hook(self, c: Consumer):
        def pre_hook(module, args):
            x = args[0]
            m = self.position_mask(c, x)
            if m is not None:
                x = x * m
            if self.observer is not None:
                x = self.observer(c, x)
            elif m is None:
                return None
            return (x,) + tuple(args[1:])
        return pre_hook
