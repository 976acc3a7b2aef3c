"""Group Fisher importance of every channel.

For channel i with mask m_i shared by all layers and calls that read it, and a
consumer input A (unmasked) / A~ = A * m (masked)::

    g[n, i] = sum over consumer layers and calls, over positions p of channel i,
              over h, w (and over the RoIs of image n) of  A[., p, h, w] * dL/dA~[., p, h, w]
    s[i]    = sum over samples n of g[n, i] ** 2

The sum over layers, calls and RoIs comes before the square (chain rule for a
mask shared by every use of the channel in one image). ``g`` lives in one
``[N, U + 1]`` buffer per backward pass (any batch size; the last column
collects positions outside prunable groups); ``accumulate()`` squares it into
``s`` and is called once per backward pass.

dL/dA~ is taken with a tensor hook on a per-call alias of the consumer's input,
so a tensor read by several layers gives each layer its own gradient. No module
backward hook is used.

Rows that are not images
------------------------
A layer fed by an RoI extractor reads one row per RoI. Modules whose handler
says which image each output row belongs to (:meth:`LayerType.sample_rows`,
mmdet's RoI extractors) record that map when they run; a consumer whose rows
the analysis traced back to such a module adds its RoI rows into the rows of
their images. Rows that cannot be mapped (the analysis report lists them) are
squared one by one, with a warning.

Frozen stages
-------------
A consumer whose input does not require grad in plain training (frozen stages,
and the first trainable layer after them) is scored through a detached leaf that
does, which costs a backward pass through the frozen layers. With
``frozen_every=k`` that happens on every k-th pass only (passes ``k-1, 2k-1,
...``, the last of each interval when k is the pruning interval). A channel that
any such consumer reads ("frozen channel") is folded in only on those passes,
where all of its consumers are observed, and its squared sum is multiplied by k;
on the other passes its partial sums are dropped. Over a window of k passes every
channel thus gets an unbiased estimate of the sum of its k exact per-pass values
(exactly that sum when the k passes see the same batch). Which channels are
frozen is learned on the passes that are not scored (there no leaf changes
which inputs require grad) and kept in the state.

Evidence
--------
A pass whose Fisher is not finite anywhere (a diverged step) is dropped as a
whole; ``valid_passes`` counts the others. ``evidence[i]`` says whether channel i
received a non-zero gradient signal at some consumer in a valid pass (a branch
whose loss is 0, e.g. box regression on images without boxes, gets none); the
pruner decides only among channels with evidence.
"""
from __future__ import annotations

import warnings
from typing import Dict, List, Optional, Tuple

import torch

from .masks import Consumer, ConsumerInputs


class FisherImportance:
    """Accumulates ``accum`` (``[num_channels]`` float64) from the consumers' inputs and gradients.

    Attributes:
        accum: ``[U]`` float64, the summed squared per-sample sums since the last ``reset()``.
        evidence: ``[U]`` bool, channels that got a non-zero gradient signal since the last reset.
        valid_passes: finite passes folded in since the last reset.
        passes: every ``accumulate()`` call so far (it sets the frozen-stage schedule).
        frozen: ``[U]`` bool, channels read by a consumer whose input does not require grad.
    """

    def __init__(self, consumers: ConsumerInputs, frozen_every: int = 1) -> None:
        if int(frozen_every) < 1:
            raise ValueError(f'frozen_every={frozen_every} must be at least 1')
        self.frozen_every = int(frozen_every)
        self.num_channels = U = consumers.num_channels
        self.passes = 0
        self.accum = torch.zeros(U, dtype=torch.float64)
        self.evidence = torch.zeros(U, dtype=torch.bool)
        self.valid_passes = 0
        self.samples = 0
        self.frozen = torch.zeros(U, dtype=torch.bool)
        self.frozen_known = self.frozen_every == 1   # learned on the first unscored pass
        self.enabled = True
        self.row_level = dict(consumers.graph.row_level)   # consumer -> row source (or None)
        self._buffers: Dict[Tuple[int, torch.device], torch.Tensor] = {}
        self._live: Dict[torch.device, torch.Tensor] = {}      # [U + 1] evidence of this pass
        self._pass_frozen = torch.zeros(U + 1, dtype=torch.bool)
        self._row_maps: List[Tuple[torch.Tensor, int]] = []   # (image of each row, images) per row source call
        self._pending: Dict[int, torch.Tensor] = {}
        self._next_key = 0
        self._warned_rows: set = set()
        consumers.observer = self.observe
        consumers.row_observer = self.observe_rows

    # ------------------------------------------------------------------ forward
    def scoring_pass(self) -> bool:
        """Whether the current pass also scores the frozen channels."""
        if self.frozen_every == 1:
            return True
        return self.frozen_known and self.passes % self.frozen_every == self.frozen_every - 1

    def observe_rows(self, rows_to_sample: torch.Tensor, num_samples: int) -> None:
        """A row source (RoI extractor) ran: row r of its output belongs to sample ``rows_to_sample[r]``."""
        if self.enabled and torch.is_grad_enabled():
            self._row_maps.append((rows_to_sample.long(), int(num_samples)))

    def observe(self, c: Consumer, x: torch.Tensor) -> torch.Tensor:
        """Called by the consumer's pre-hook with its (masked) input; returns what the layer reads."""
        if not (self.enabled and torch.is_grad_enabled()):
            return x
        if x.requires_grad:
            x = x.view_as(x)
        else:
            self._pass_frozen[c.index] = True     # both on the CPU, like the graph
            if not self.scoring_pass():
                return x
            x = x.detach().requires_grad_()
        rows = self._rows_for(c, x)
        key = self._next_key
        self._next_key += 1
        self._pending[key] = x
        x.register_hook(lambda g, c=c, key=key, rows=rows: self._on_grad(c, key, g, rows))
        return x

    def _rows_for(self, c: Consumer, x: torch.Tensor) -> Optional[Tuple[torch.Tensor, int]]:
        """The sample of each row of ``x`` for a consumer whose rows are RoIs, else None: from the
        latest row source of this pass that wrote as many rows (an RoI head runs right after its
        extractor, in every stage of a cascade)."""
        if c.name not in self.row_level:
            return None
        for index, n in reversed(self._row_maps):
            if index.numel() == x.shape[0]:
                return index, n
        if c.name not in self._warned_rows:
            self._warned_rows.add(c.name)
            warnings.warn(f'mmfisher: the {x.shape[0]} input rows of {c.name} are not images and could not be '
                          f'mapped to them; its Fisher is squared per row')
        return None

    # ------------------------------------------------------------------ backward
    def _on_grad(self, c: Consumer, key: int, g: torch.Tensor,
                 rows: Optional[Tuple[torch.Tensor, int]]) -> None:
        x = self._pending.pop(key, None)
        if x is None:
            return
        with torch.no_grad():
            if x.dtype in (torch.float16, torch.bfloat16):   # mixed precision: sum in float32
                x, g = x.float(), g.float()
            if c.dim == 1 and x.dim() > 2:      # conv input [N, C, *spatial]: a dot product per channel
                contrib = torch.linalg.vecdot(x.flatten(2), g.flatten(2))
            elif c.dim == 1 or x.dim() <= 2:     # [N, C]
                contrib = x * g
            else:                                # linear input [N, ..., F]
                contrib = (x * g).reshape(x.shape[0], -1, x.shape[-1]).sum(1)
            if contrib.dim() == 1:
                contrib = contrib.unsqueeze(0)
            contrib = contrib.float()
            if rows is not None:                 # RoI rows -> the rows of their images
                index, n = rows
                index = index.to(contrib.device)
                contrib = torch.zeros(n, contrib.shape[1], device=contrib.device).index_add_(0, index, contrib)
            n = contrib.shape[0]
            dev = contrib.device
            buf = self._buffers.get((n, dev))
            if buf is None:
                buf = self._buffers[(n, dev)] = torch.zeros(n, self.num_channels + 1, device=dev)
            index = c.index if c.index.device == dev else c.index.to(dev)
            buf.index_add_(1, index, contrib)
            live = self._live.get(dev)
            if live is None:
                live = self._live[dev] = torch.zeros(self.num_channels + 1, device=dev)
            # the layer got a gradient signal: all of its channels have evidence this pass
            live.index_add_(0, index, contrib.ne(0).any().float().expand(index.numel()))

    def accumulate(self) -> None:
        """Fold the last backward pass into ``accum``: square the per-sample sums, drop it if not finite."""
        scoring = self.scoring_pass()
        U = self.num_channels
        observed = bool(self._buffers)
        if not scoring and observed:
            self.frozen = self._pass_frozen[:U].cpu().clone()
            self.frozen_known = True
        sq = torch.zeros(U, dtype=torch.float64)
        for (n, _), buf in self._buffers.items():
            sq += buf[:, :-1].double().pow(2).sum(0).cpu()
        n_samples = min((n for n, _ in self._buffers), default=0)   # images (unmapped rows aside)
        live = torch.zeros(U, dtype=torch.bool)
        for v in self._live.values():
            live |= v[:U].cpu() > 0
        self._clear_pass()
        self.passes += 1
        if not observed:
            return
        if not bool(torch.isfinite(sq).all()):
            warnings.warn(f'mmfisher: the Fisher of this pass is not finite for {int((~torch.isfinite(sq)).sum())} '
                          f'channels (a diverged step?); the whole pass is dropped')
            return
        if self.frozen_every > 1 and self.frozen.any():
            if scoring:
                sq[self.frozen] *= self.frozen_every
            else:
                sq[self.frozen] = 0
                live &= ~self.frozen
        self.accum += sq
        self.evidence |= live
        self.valid_passes += 1
        self.samples += n_samples

    def _clear_pass(self) -> None:
        self._buffers.clear()
        self._live.clear()
        self._pending.clear()
        self._row_maps.clear()
        self._pass_frozen.zero_()

    def reset(self) -> None:
        """Start a new interval: accumulated Fisher, evidence and counts to zero (the schedule goes on)."""
        self.accum.zero_()
        self.evidence.zero_()
        self.valid_passes = 0
        self.samples = 0
        self._clear_pass()

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        return {'importance': self.accum.clone(), 'evidence': self.evidence.clone(),
                'valid_passes': int(self.valid_passes), 'samples': int(self.samples),
                'passes': int(self.passes), 'frozen': self.frozen.clone(), 'frozen_known': bool(self.frozen_known)}

    def load_state_dict(self, state: dict) -> None:
        self.accum = state['importance'].clone().double()
        self.samples = int(state.get('samples', 0))
        self.passes = int(state.get('passes', 0))
        self.evidence = state['evidence'].clone().bool() if 'evidence' in state else self.accum > 0
        self.valid_passes = int(state.get('valid_passes', self.passes > 0))
        if 'frozen' in state:
            self.frozen = state['frozen'].clone().bool()
            self.frozen_known = bool(state.get('frozen_known', True))
