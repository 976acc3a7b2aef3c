"""Group Fisher importance of every channel.

For channel i with mask m_i shared by all layers and calls that read it, and a
consumer input A (unmasked) / A~ = A * m (masked)::

    g[n, i] = sum over consumer layers and calls, over positions p of channel i,
              over h, w of  A[n, p, h, w] * dL/dA~[n, p, h, w]
    s[i]    = sum over samples n of g[n, i] ** 2

The sum over layers and calls comes before the square (chain rule for a shared
mask). ``g`` lives in one ``[N, U + 1]`` buffer per backward pass (any batch
size; the last column collects positions outside prunable groups); ``accumulate()``
squares it into ``s`` and is called once per backward.

dL/dA~ is taken with a tensor hook on a per-call alias of the consumer's input,
so a tensor read by several layers gives each layer its own gradient. No module
backward hook is used. Inputs that do not require grad (frozen stages) get a
detached leaf that does, so frozen layers are scored too. That costs a backward
pass through the frozen layers; ``frozen_every=k`` scores them on every k-th
backward pass only, their contributions scaled by sqrt(k) so that the expected
squared sum stays the same.
"""
from __future__ import annotations

import warnings
from typing import Dict, Tuple

import torch

from .masks import Consumer, ConsumerInputs


class FisherImportance:
    """Accumulates ``s`` (``[num_channels]`` float64) from the consumers' inputs and gradients."""

    def __init__(self, consumers: ConsumerInputs, frozen_every: int = 1) -> None:
        if int(frozen_every) < 1:
            raise ValueError(f'frozen_every={frozen_every} must be at least 1')
        self.frozen_every = int(frozen_every)
        self.passes = 0          # backward passes folded in so far
        self.num_channels = consumers.num_channels
        self.accum = torch.zeros(self.num_channels, dtype=torch.float64)
        self.samples = 0
        self.enabled = True
        self._buffers: Dict[Tuple[int, torch.device], torch.Tensor] = {}
        self._pending: Dict[int, torch.Tensor] = {}
        self._next_key = 0
        consumers.observer = self.observe

    def observe(self, c: Consumer, x: torch.Tensor) -> torch.Tensor:
        """Called by the consumer's pre-hook with its (masked) input; returns what the layer reads."""
        if not (self.enabled and torch.is_grad_enabled()):
            return x
        scale = 1.0
        if x.requires_grad:
            x = x.view_as(x)
        elif self.passes % self.frozen_every == 0:
            x = x.detach().requires_grad_()
            scale = self.frozen_every ** 0.5
        else:
            return x
        key = self._next_key
        self._next_key += 1
        self._pending[key] = x
        x.register_hook(lambda g, c=c, key=key, scale=scale: self._on_grad(c, key, g, scale))
        return x

    def _on_grad(self, c: Consumer, key: int, g: torch.Tensor, scale: float = 1.0) -> None:
        x = self._pending.pop(key, None)
        if x is None:
            return
        with torch.no_grad():
            if x.dtype in (torch.float16, torch.bfloat16):   # mixed precision: sum in float32
                x, g = x.float(), g.float()
            if scale != 1.0:
                g = g * scale
            if c.dim == 1 and x.dim() > 2:      # conv input [N, C, *spatial]: a dot product per channel
                contrib = torch.linalg.vecdot(x.flatten(2), g.flatten(2))
            elif c.dim == 1 or x.dim() <= 2:     # [N, C]
                contrib = x * g
            else:                                # linear input [N, ..., F]
                contrib = (x * g).reshape(x.shape[0], -1, x.shape[-1]).sum(1)
            if contrib.dim() == 1:
                contrib = contrib.unsqueeze(0)
            contrib = contrib.float()
            n = contrib.shape[0]
            buf = self._buffers.get((n, contrib.device))
            if buf is None:
                buf = torch.zeros(n, self.num_channels + 1, device=contrib.device)
                self._buffers[(n, contrib.device)] = buf
            index = c.index if c.index.device == contrib.device else c.index.to(contrib.device)
            buf.index_add_(1, index, contrib)

    def accumulate(self) -> None:
        """Square the per-sample sums of the last backward pass into ``accum``."""
        self._pending.clear()
        self.passes += 1
        for (n, _), buf in self._buffers.items():
            sq = buf[:, :-1].double().pow(2).sum(0).cpu()
            bad = ~torch.isfinite(sq)
            if bad.any():
                warnings.warn(f'mmfisher: {int(bad.sum())} channels got a NaN/inf Fisher value this '
                              f'iteration; it is skipped for them')
                sq[bad] = 0
            self.accum += sq
            self.samples += n
        self._buffers.clear()

    def reset(self) -> None:
        self.accum.zero_()
        self.samples = 0
        self._buffers.clear()
        self._pending.clear()
