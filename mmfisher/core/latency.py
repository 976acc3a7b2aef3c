"""What a model costs in latency on the device it runs on, and what removing one channel saves.

The latency model of a network (``LatencyModel.measure``):

* the device's channel quantum ``q`` (:func:`detect_quantum`): CPU and GPU kernels work on blocks
  of channels, so a layer's time is a staircase in its channel counts. On the 2-core AMD EPYC this
  project is developed on, a 3x3 conv at 80x80 takes 1.7 ms with 48 channels in and out and 3.2-4.0 ms
  with 49 to 63 (``benchmarks/latency_model.py`` prints this staircase): ``q = 16``. A short probe
  (a 3x3 conv timed at ``c`` and ``c + 1`` channels for odd multiples ``c`` of each candidate) finds
  the smallest ``q`` at whose multiples the time jumps; ``q = 1`` where no step shows;
* every producing layer (conv, linear) is timed alone on the device, with the input shape of each
  of its calls in the analysis, at a grid of channel counts: input and output positions at 1, 1/4,
  1/2, 3/4 and all of the layer's, snapped to multiples of ``q`` (a group conv: whole groups, on the
  diagonal, ``q = 1``), and once more one channel off the multiple of ``q`` nearest half its width on
  the input side, the output side and both (the staircase's penalty, ``LayerTable.penalty``).
  ``T_L(n_in, n_out)`` interpolates the grid (bilinear; linear for a group conv) at the counts
  rounded up to multiples of ``q``, times the penalty where a count is off a multiple; the grid's
  times are first made non-decreasing in the channel counts (:func:`monotone`: timing noise never
  makes fewer channels look slower);
* every call of a norm, and of a module without children and without a layer type (an activation, a
  pooling) on channels (``CostModel.channelwise``), is timed alone the same way at 1, 1/4, 1/2, 3/4 and
  all of its channels (``ChannelwiseTable``, linear between): one per-element coefficient cannot hold
  them (on the demo detector at 640x640 the stem's one max-pooling call takes about 10 ms of a 63 ms
  forward, more than all of its ReLUs and BNs together: ``benchmarks/op_profile.py``);
* the whole network is timed at several uniform widths (``WIDTHS``: aligned and not), and
  ``T(keep) = alpha * (sum_L T_L(n_in, n_out) + sum_C T_C(n)) + a + b * memory(keep)`` is fitted to those
  times in relative error: the modules measured alone (``alpha``: how their sum compares with the
  network's), a fixed cost (``a``: Python, dispatch, post-processing-free heads) and the per-channel
  work of the functional ops outside them (``b``: adds, resampling, which scale with the feature maps).

Removing channel ``c`` saves, in every layer that reads or writes it, the layer's predicted drop
from its count now to the next multiple of ``q`` below, shared by the channels that must go to get
there (with ``q = 1``: exactly the drop of the total when ``c`` alone goes), plus ``b`` times its
feature-map elements, plus the drop of every norm, activation and pooling call it is in
(:meth:`LatencyModel.saving`). One channel off a full block saves nothing on a
staircase; the amortised saving lets the greedy decision see the block that removing it starts.
Timings are cached per device, torch version, thread count and layer shape, the whole network's per
architecture and input (:func:`network_signature`) (``~/.cache/mmfisher/latency.json``, or
``$MMFISHER_CACHE_DIR``), so a second run measures nothing and fits the same model: with the same seed
it prunes the same channels. Delete the file to measure again.
On CUDA, every timed run is bracketed by ``torch.cuda.synchronize()``.

Everything here is deterministic given the measured tables: a run that saves
:meth:`LatencyModel.state_dict` and restores it predicts the same, and a distributed job measures
on one rank and hands the same state to every rank.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import os.path as osp
import platform
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from .cost import CostModel
from .groups import CouplingGraph

GRID = (0.25, 0.5, 0.75, 1.0)         # fractions of a layer's own channel counts (plus 1 position)
WIDTHS = (1.0, 0.8, 0.75, 0.6, 0.4)    # uniform widths the whole network is timed at (0.75: on the quantum)
QUANTA = (2, 4, 8, 16, 32, 64)         # channel quanta the probe tries, smallest first
JUMP = 1.2                             # a step: one channel past a multiple costs this factor more


# --------------------------------------------------------------------------- #
# timing
# --------------------------------------------------------------------------- #
def device_name(device: torch.device) -> str:
    """What the timings are valid for: the device model, the torch version and the thread count."""
    if device.type == 'cuda':
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or platform.machine()
        try:
            with open('/proc/cpuinfo') as f:
                for line in f:
                    if line.startswith('model name'):
                        name = line.split(':', 1)[1].strip()
                        break
        except OSError:
            pass
        name += f' x{torch.get_num_threads()} threads'
    return f'{device.type}: {name}; torch {torch.__version__}'


PRIMITIVE_CACHE = 16384     # oneDNN primitives kept (its default, 1024, is less than a study's models use)


def roomy_primitive_cache(capacity: int = PRIMITIVE_CACHE) -> None:
    """Let oneDNN (PyTorch's CPU conv library) keep ``capacity`` compiled primitives, one per conv shape,
    unless ``ONEDNN_PRIMITIVE_CACHE_CAPACITY`` is set already. Call it before the process's first conv:
    oneDNN reads the variable once. Its default keeps 1024; timing some 20 models in turn (each conv
    shape its own primitive, at two input sizes) exceeds that, and every conv call then compiles its
    kernel again. In ``benchmarks/pruning_study.py`` the 50% uniform model timed 66.9 ms at 640x640
    with the default (as slow as the unpruned 66.4 ms) and 54.9 ms with room for 16384.
    """
    os.environ.setdefault('ONEDNN_PRIMITIVE_CACHE_CAPACITY', str(int(capacity)))


_HELD: Optional[bool] = None


def hold_freed_memory() -> bool:
    """Make glibc's malloc keep the memory this process frees, for the rest of the process: no ``mmap`` for
    large blocks, no trimming of the heap (``mallopt``). Returns whether it applies (False off glibc).

    With glibc's defaults, large blocks go back to the kernel when freed and fresh pages are mapped for
    the next ones, with a threshold that moves with what the process allocated before; a forward's time
    then depends on the process's history. ``benchmarks/page_faults.py`` times the demo detector at
    eight widths in fresh processes: with the defaults, the same network measured 25.3 ms in one run and
    35.3 ms in the next (and the full-width one paid up to 3,200 page faults per forward); with freed
    memory kept, every network agreed within 6% across the two runs, with no page faults. A serving
    process in steady state reuses its memory too (as jemalloc and tcmalloc do), so every timing here (:func:`time_ms`,
    ``interleaved_latency``, ``tools/benchmark.py``) calls this first. The process then keeps what it
    freed until it exits (a training run whose hook measures a latency model included).
    """
    global _HELD
    if _HELD is None:
        _HELD = False
        try:
            import ctypes
            import ctypes.util
            if platform.system() == 'Linux' and platform.libc_ver()[0] == 'glibc':
                libc = ctypes.CDLL(ctypes.util.find_library('c') or 'libc.so.6')
                M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
                no_mmap = bool(libc.mallopt(M_MMAP_MAX, 0))     # both asked for, whatever the first answers
                no_trim = bool(libc.mallopt(M_TRIM_THRESHOLD, 1 << 30))
                _HELD = no_mmap and no_trim
        except (OSError, AttributeError):
            _HELD = False
    return _HELD


def time_ms(run: Callable[[], Any], device: torch.device, min_ms: float = 20.0, min_runs: int = 3,
            max_runs: int = 50, warmup: int = 1) -> float:
    """Median milliseconds of ``run()`` under ``no_grad``: at least ``min_runs`` runs and ``min_ms`` in all,
    with freed memory kept (:func:`hold_freed_memory`)."""
    hold_freed_memory()
    sync = torch.cuda.synchronize if device.type == 'cuda' else (lambda: None)
    times: List[float] = []
    with torch.no_grad():
        for _ in range(warmup):
            run()
        sync()
        while len(times) < min_runs or (sum(times) < min_ms and len(times) < max_runs):
            t0 = time.perf_counter()
            run()
            sync()
            times.append(1000.0 * (time.perf_counter() - t0))
    return statistics.median(times)


class TimingCache:
    """Measured milliseconds by ``(device, layer signature)``, kept in one JSON file."""

    def __init__(self, path: Optional[str] = None) -> None:
        if path is None:
            root = os.environ.get('MMFISHER_CACHE_DIR') or osp.join(osp.expanduser('~'), '.cache', 'mmfisher')
            path = osp.join(root, 'latency.json')
        self.path = path
        self.entries: Dict[str, float] = {}
        self.measured = 0                  # timings made (not found in the cache) since construction
        if osp.isfile(path):
            try:
                with open(path) as f:
                    self.entries = {str(k): float(v) for k, v in json.load(f).items()}
            except (OSError, ValueError):
                self.entries = {}          # a damaged cache is measured again, not trusted

    def get(self, key: str, measure: Callable[[], float]) -> float:
        if key not in self.entries:
            self.entries[key] = float(measure())
            self.measured += 1
        return self.entries[key]

    def save(self) -> None:
        os.makedirs(osp.dirname(self.path) or '.', exist_ok=True)
        tmp = f'{self.path}.{os.getpid()}.part'
        with open(tmp, 'w') as f:
            json.dump(self.entries, f)
        os.replace(tmp, self.path)


def _plain_layer(m: nn.Module, n_in: int, n_out: int, groups: int) -> nn.Module:
    """A stock torch layer of ``m``'s geometry with ``n_in`` / ``n_out`` channels (what is timed)."""
    if isinstance(m, nn.Linear):
        return nn.Linear(n_in, n_out, bias=m.bias is not None)
    dims = len(m.kernel_size)
    kw = dict(kernel_size=m.kernel_size, stride=m.stride, padding=m.padding, dilation=m.dilation, groups=groups,
              bias=m.bias is not None)
    if getattr(m, 'transposed', False):
        cls = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}[dims]
        return cls(n_in, n_out, output_padding=m.output_padding, **kw)
    cls = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
    padding_mode = getattr(m, 'padding_mode', 'zeros')
    return cls(n_in, n_out, padding_mode=padding_mode, **kw)


def _signature(m: nn.Module) -> str:
    if isinstance(m, nn.Linear):
        return f'linear bias={m.bias is not None}'
    return (f'{"convT" if getattr(m, "transposed", False) else "conv"}{len(m.kernel_size)}d k={tuple(m.kernel_size)} '
            f's={tuple(m.stride)} p={m.padding} d={tuple(m.dilation)} bias={m.bias is not None} '
            f'mode={getattr(m, "padding_mode", "zeros")}')


def detect_quantum(device: torch.device, dev: str, cache: 'TimingCache', size: int = 28, pairs: int = 3) -> int:
    """The device's channel quantum: the smallest ``q`` in :data:`QUANTA` such that a 3x3 conv (``size`` x
    ``size``, as many channels in as out) with one channel more than an odd multiple of ``q`` takes at least
    :data:`JUMP` times as long (median of ``pairs`` odd multiples from 40 channels on); 1 if none does.

    Odd multiples, so that a device with ``q = 16`` is not taken for 32 (32 and 96 are multiples of 16
    too) nor for 8 (40, 56 and 72 are not)."""
    def t(c: int) -> float:
        def run_it():
            conv = nn.Conv2d(c, c, 3, padding=1).to(device).eval()
            x = torch.randn(1, c, size, size, device=device)
            return time_ms(lambda: conv(x), device, min_ms=30.0, min_runs=5)
        return cache.get(f'{dev}|probe conv3x3 {size}x{size}|channels={c}', run_it)

    for q in QUANTA:
        odd = [q * k for k in range(1, 64, 2) if q * k >= 40][:pairs]
        jumps = [t(c + 1) / t(c) for c in odd]
        if statistics.median(jumps) >= JUMP:
            return q
    return 1


# --------------------------------------------------------------------------- #
# one layer's table
# --------------------------------------------------------------------------- #
@dataclass
class LayerTable:
    """``times[i, j]``: ms of one layer (summed over its calls) with ``in_grid[i]`` input and
    ``out_grid[j]`` output positions. A group conv has one grid, ``groups`` (its own group count at
    each point), and ``times`` of shape ``[len(groups)]``.

    ``quantum``: the device's channel quantum the grid is on (see :func:`detect_quantum`); a count
    between multiples is predicted at the multiple above it times ``penalty``, the measured factor for
    the input count, the output count or both being off a multiple."""

    name: str
    in_grid: torch.Tensor          # [I] float64, ascending
    out_grid: torch.Tensor         # [O]
    times: torch.Tensor            # [I, O] or [G]
    groups: Optional[torch.Tensor] = None   # [G] group counts (group convs)
    opg: int = 1                   # output positions per group
    quantum: int = 1
    penalty: Tuple[float, float, float] = (1.0, 1.0, 1.0)   # (input off, output off, both off)

    def __post_init__(self) -> None:
        self.times = monotone(self.times)

    def _snap(self, grid: torch.Tensor, n: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``n`` rounded up to a multiple of the quantum (at most the layer's full count), and where it moved."""
        up = torch.minimum(torch.ceil(n / self.quantum) * self.quantum, grid[-1])
        return up, up != n

    def predict(self, n_in: torch.Tensor, n_out: torch.Tensor) -> torch.Tensor:
        """ms at ``n_in`` input and ``n_out`` output positions (float64 tensors of one shape)."""
        if self.groups is not None:
            return interp1(self.groups, self.times, n_out / self.opg)
        if self.quantum <= 1:
            return interp2(self.in_grid, self.out_grid, self.times, n_in, n_out)
        p_in, off_in = self._snap(self.in_grid, n_in)
        p_out, off_out = self._snap(self.out_grid, n_out)
        base = interp2(self.in_grid, self.out_grid, self.times, p_in, p_out)
        pi, po, pb = (torch.tensor(v, dtype=torch.float64) for v in self.penalty)
        one = torch.ones((), dtype=torch.float64)
        factor = torch.where(off_in & off_out, pb, torch.where(off_in, pi, torch.where(off_out, po, one)))
        return base * factor

    def steps_to_quantum(self, n_in: torch.Tensor, n_out: torch.Tensor, d_in: torch.Tensor,
                         d_out: torch.Tensor) -> torch.Tensor:
        """How many removals of ``(d_in, d_out)`` positions take the layer from ``(n_in, n_out)`` to the next
        multiple of the quantum below on a side it touches (at least 1; the lowest grid count bounds it);
        all ones with ``quantum = 1`` and for group convs."""
        k = torch.ones_like(d_in)
        if self.quantum <= 1 or self.groups is not None:
            return k
        inf = torch.full_like(d_in, float('inf'))
        for n, d, grid in ((n_in, d_in, self.in_grid), (n_out, d_out, self.out_grid)):
            target = torch.clamp(torch.floor((n - d) / self.quantum) * self.quantum, min=float(grid[0]))
            side = torch.where(d > 0, torch.floor((n - target) / d.clamp_min(1)), inf)
            inf = torch.minimum(inf, side)
        return torch.where(torch.isfinite(inf), inf, k).clamp_min(1)

    def state(self) -> Dict[str, Any]:
        return {'name': self.name, 'in_grid': self.in_grid.tolist(), 'out_grid': self.out_grid.tolist(),
                'times': self.times.tolist(), 'groups': None if self.groups is None else self.groups.tolist(),
                'opg': self.opg, 'quantum': self.quantum, 'penalty': list(self.penalty)}

    @classmethod
    def from_state(cls, s: Dict[str, Any]) -> 'LayerTable':
        t = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
        return cls(s['name'], t(s['in_grid']), t(s['out_grid']), t(s['times']),
                   None if s['groups'] is None else t(s['groups']), int(s['opg']), int(s.get('quantum', 1)),
                   tuple(float(v) for v in s.get('penalty', (1.0, 1.0, 1.0))))


@dataclass
class ChannelwiseTable:
    """``times[i]``: ms of one call of a norm, an activation or a pooling (a
    :class:`~mmfisher.core.cost.CostModel` channel-wise entry) alone with ``grid[i]`` channels; linear
    between and beyond the grid. All zero where the module could not be run alone: its work is then left
    to the fit's per-element term."""

    name: str
    grid: torch.Tensor             # [G] float64, ascending
    times: torch.Tensor            # [G]

    def __post_init__(self) -> None:
        self.times = monotone(self.times)

    def predict(self, n: torch.Tensor) -> torch.Tensor:
        """ms at ``n`` channels (float64 tensor)."""
        return interp1(self.grid, self.times, n)

    def state(self) -> Dict[str, Any]:
        return {'name': self.name, 'grid': self.grid.tolist(), 'times': self.times.tolist()}

    @classmethod
    def from_state(cls, s: Dict[str, Any]) -> 'ChannelwiseTable':
        t = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
        return cls(s['name'], t(s['grid']), t(s['times']))


def monotone(times: torch.Tensor) -> torch.Tensor:
    """``times`` (``[I, O]`` or ``[G]``, grids ascending) made non-decreasing along every axis: each entry
    becomes the least time measured at that many channels or more. A layer with fewer channels is never
    predicted slower than one with more, so one noisy timing (a page fault, another process) cannot make
    a cut look expensive or a pruned network look slower than the whole one."""
    out = times.flip(list(range(times.dim())))
    for d in range(times.dim()):
        out = out.cummin(d).values
    return out.flip(list(range(times.dim())))


def _bracket(grid: torch.Tensor, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Index of the grid segment holding every ``x`` (the first / last one outside: extrapolated)
    and the position in it (0 at its left end, 1 at its right end)."""
    i = torch.searchsorted(grid, x.contiguous(), right=True) - 1
    i = i.clamp(0, grid.numel() - 2)
    lo, hi = grid[i], grid[i + 1]
    return i, (x - lo) / (hi - lo)


def interp1(grid: torch.Tensor, values: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Piecewise-linear ``values`` over ascending ``grid`` at ``x`` (linear beyond the ends)."""
    if grid.numel() == 1:
        return values.expand_as(x) * x / grid
    i, w = _bracket(grid, x)
    return values[i] * (1 - w) + values[i + 1] * w


def interp2(gx: torch.Tensor, gy: torch.Tensor, values: torch.Tensor, x: torch.Tensor,
            y: torch.Tensor) -> torch.Tensor:
    """Bilinear ``values[i, j]`` over the ascending grids ``gx`` x ``gy`` at ``(x, y)``."""
    if gx.numel() == 1:
        return interp1(gy, values[0], y) * x / gx[0]
    if gy.numel() == 1:
        return interp1(gx, values[:, 0], x) * y / gy[0]
    i, wx = _bracket(gx, x)
    j, wy = _bracket(gy, y)
    return (values[i, j] * (1 - wx) * (1 - wy) + values[i + 1, j] * wx * (1 - wy)
            + values[i, j + 1] * (1 - wx) * wy + values[i + 1, j + 1] * wx * wy)


def _grid(n: int, fixed: int = 0, unit: int = 1, quantum: int = 1) -> List[int]:
    """Counts to time a side of ``n`` positions at, ``fixed`` of which are never pruned: the GRID fractions
    of ``n``, in whole units, snapped to multiples of ``quantum`` (see :func:`detect_quantum`), and the
    fewest it can keep (one unit besides the fixed ones)."""
    if fixed >= n:
        return [n]
    units, low = max(1, n // unit), max(1, -(-fixed // unit) + (1 if fixed % unit == 0 else 0))
    if quantum > 1 and unit == 1:
        snapped = {max(low, quantum, quantum * int(round(f * n / quantum))) for f in GRID}
        return sorted({min(c, n) for c in snapped} | {low, n})
    return sorted({max(low, int(round(f * units))) * unit for f in GRID} | {low * unit})


def _mid(grid: List[int], quantum: int) -> Optional[int]:
    """The multiple of ``quantum`` in ``grid`` nearest half its largest count that has room for one
    channel fewer (where a layer's staircase penalty is timed); None on a side with one count."""
    options = [c for c in grid if c % quantum == 0 and c - 1 >= grid[0] and c > grid[0]]
    return min(options, key=lambda c: (abs(c - grid[-1] / 2), c)) if len(grid) > 1 and options else None


# --------------------------------------------------------------------------- #
# the network
# --------------------------------------------------------------------------- #
class LatencyModel:
    """Predicted latency (ms) of a model whose channels follow a keep vector. See module docstring."""

    def __init__(self, cost: CostModel, tables: Sequence[LayerTable], coef: Sequence[float],
                 device: str, measured: Optional[Dict[str, Any]] = None,
                 channelwise: Optional[Sequence[ChannelwiseTable]] = None) -> None:
        self.cost = cost
        self.tables = list(tables)
        # one per cost.channelwise entry; None (a state saved before they were measured): none counted
        self.channelwise = list(channelwise) if channelwise is not None else []
        self._channelwise_given = channelwise is not None
        if len(self.tables) != len(cost.layers) or (channelwise is not None
                                                    and len(self.channelwise) != len(cost.channelwise)):
            raise ValueError(f'{len(self.tables)} latency tables for {len(cost.layers)} layers, '
                             f'{len(self.channelwise)} for {len(cost.channelwise)} norms, activations and poolings: '
                             f'this latency model was measured on another architecture')
        for t, L in list(zip(self.tables, cost.layers)) + list(zip(self.channelwise, cost.channelwise)):
            if t.name != L.name:
                raise ValueError(f'latency table for {t.name!r} where the model has layer {L.name!r}: this latency '
                                 f'model was measured on another architecture')
        self.alpha, self.fixed, self.per_memory = (float(c) for c in coef)
        self.quantum = max((t.quantum for t in self.tables), default=1)   # the device's channel step
        self.device = device
        self.measured = measured or {}      # the network timings the fit used
        self.original = self.total(torch.ones(cost.num_channels, dtype=torch.bool))

    # ---- prediction ------------------------------------------------------ #
    def layer_ms(self, keep: torch.Tensor) -> torch.Tensor:
        """``[layers]`` float64: every layer's predicted ms at ``keep``."""
        alive = self.cost.alive(keep)
        out = []
        for t, L in zip(self.tables, self.cost.layers):
            n_out = alive[L.out_idx].sum()
            n_in = alive[L.in_idx].sum()
            out.append(t.predict(n_in.view(1), n_out.view(1)))
        return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)

    def channelwise_ms(self, keep: torch.Tensor) -> torch.Tensor:
        """``[len(self.channelwise)]`` float64: every norm, activation and pooling call's predicted ms at ``keep``."""
        alive = self.cost.alive(keep)
        out = [t.predict(alive[C.idx].sum().view(1)) for t, C in zip(self.channelwise, self.cost.channelwise)]
        return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)

    def modules_ms(self, keep: torch.Tensor) -> float:
        """The predicted ms of every timed module alone (layers, norms, activations, poolings), summed."""
        return float(self.layer_ms(keep).sum()) + float(self.channelwise_ms(keep).sum())

    def total(self, keep: torch.Tensor) -> float:
        """Predicted ms of the network with only ``keep`` channels."""
        memory = self.cost.layer_totals(keep)[1]
        return self.alpha * self.modules_ms(keep) + self.fixed + self.per_memory * memory

    def saving(self, keep: torch.Tensor) -> torch.Tensor:
        """``[num_channels]`` float64: the predicted ms that removing each channel saves now: with quantum 1,
        what removing it alone saves; on a staircase, its share of the drop to the next multiple of the
        quantum below in every layer it is in (see module docstring)."""
        U = self.cost.num_channels
        alive = self.cost.alive(keep)
        out = torch.zeros(U + 1, dtype=torch.float64)
        for t, L in zip(self.tables, self.cost.layers):
            n_out = alive[L.out_idx].sum()
            n_in = alive[L.in_idx].sum()
            d_out = torch.zeros(U + 1, dtype=torch.float64).index_add_(0, L.out_u, L.out_n)
            d_in = torch.zeros(U + 1, dtype=torch.float64).index_add_(0, L.in_u, L.in_n)
            touched = torch.unique(torch.cat([L.out_u, L.in_u]))
            touched = touched[touched < U]
            if not touched.numel():
                continue
            # a channel on both sides (a whole group of a group conv) loses both at once; on a staircase
            # (quantum > 1) the drop to the next multiple below is shared by the k channels it takes
            di, do = d_in[touched], d_out[touched]
            k = t.steps_to_quantum(n_in, n_out, di, do)
            after = t.predict(n_in - k * di, n_out - k * do)
            now = t.predict(n_in.view(1), n_out.view(1))
            out.index_add_(0, touched, self.alpha * (now - after) / k)
        for t, C in zip(self.channelwise, self.cost.channelwise):
            inside = C.u < U
            if not inside.any():
                continue
            n = alive[C.idx].sum()
            out.index_add_(0, C.u[inside], self.alpha * (t.predict(n.view(1)) - t.predict(n - C.n[inside])))
        return out[:U] + self.per_memory * self.cost.saving('memory', keep)

    # ---- state --------------------------------------------------------- #
    def state_dict(self) -> Dict[str, Any]:
        """Plain data (loads with ``torch.load(weights_only=True)`` and JSON)."""
        return {'device': self.device, 'coef': [self.alpha, self.fixed, self.per_memory],
                'tables': [t.state() for t in self.tables], 'measured': self.measured,
                'channelwise': [t.state() for t in self.channelwise] if self._channelwise_given else None}

    @classmethod
    def from_state(cls, cost: CostModel, state: Dict[str, Any]) -> 'LatencyModel':
        cw = state.get('channelwise')
        return cls(cost, [LayerTable.from_state(s) for s in state['tables']], state['coef'], state['device'],
                   state.get('measured'), None if cw is None else [ChannelwiseTable.from_state(s) for s in cw])

    # ---- measuring ----------------------------------------------------- #
    @classmethod
    def measure(cls, model: nn.Module, graph: CouplingGraph, forward_of: Callable[[nn.Module], Callable[[], Any]],
                cost: Optional[CostModel] = None, device: Optional[torch.device] = None,
                cache: Optional[TimingCache] = None, log: Callable[[str], None] = lambda s: None,
                widths: Sequence[float] = WIDTHS, repeats: int = 3, rounds: int = 3,
                quantum: Optional[int] = None) -> 'LatencyModel':
        """Find the device's channel quantum (unless given: ``quantum=1`` turns the staircase off), time every
        layer alone and the network at ``widths`` (``rounds`` interleaved rounds of ``repeats`` runs each, the
        median of the rounds), then fit (see module docstring).

        ``forward_of(m)``: a callable running the network ``m`` (the same architecture, possibly shrunk)
        on the analysis input, e.g. ``lambda m: example_forward(m, (1, 3, 320, 320))``.
        """
        from .shrink import copy_model, shrink
        from .uniform import uniform_keep
        if device is None:
            p = next(model.parameters(), None)
            device = p.device if p is not None else torch.device('cpu')
        device = torch.device(device)
        cost = cost or CostModel(model, graph)
        cache = cache or TimingCache()
        dev = device_name(device)
        t0 = time.perf_counter()
        if quantum is None:
            quantum = detect_quantum(device, dev, cache)
            log(f'latency model: channel quantum of {dev}: {quantum} (a 3x3 conv slows by {JUMP:.2f}x or more one '
                f'channel past its multiples)' if quantum > 1 else
                f'latency model: no channel quantum on {dev} (times are smooth in the channel counts)')
        if int(quantum) < 1:
            raise ValueError(f'quantum={quantum} must be a positive channel count (1: no staircase)')
        quantum = int(quantum)
        tables = []
        for k, L in enumerate(cost.layers):
            rec = graph.records[L.name]
            tables.append(_measure_layer(rec, L, graph.prunable, device, dev, cache, quantum))
            if (k + 1) % 10 == 0 or k + 1 == len(cost.layers):
                log(f'latency model: {k + 1}/{len(cost.layers)} layers timed on {dev} '
                    f'({cache.measured} new timings, {time.perf_counter() - t0:.0f} s)')
        cw_tables = [_measure_channelwise(C, graph.prunable, device, dev, cache) for C in cost.channelwise]
        if cw_tables:
            alone = sum(1 for t in cw_tables if not float(t.times.max()) > 0)
            log(f'latency model: {len(cw_tables)} calls of norms, activations and poolings timed on {dev} '
                f'({cache.measured} new timings, {time.perf_counter() - t0:.0f} s)'
                + (f'; {alone} could not run alone and count in the per-element term' if alone else ''))
        # the network at several uniform widths, timed in interleaved rounds (the median of each network's
        # rounds): timed one after another, this CPU's drift of 10-20% between minutes went into the fit
        # (at 640x640 the full network once measured 1070 ms and width 0.8 1037 ms)
        measured = {'widths': [], 'ms': [], 'layers_ms': [], 'memory': [], 'quantum': quantum}
        full = torch.ones(graph.num_channels, dtype=torch.bool)
        provisional = cls(cost, tables, (1.0, 0.0, 0.0), dev, channelwise=cw_tables)
        was_training = model.training
        model.eval()
        try:
            # cached like the layers, all widths together: re-timed, this CPU's noise (the unpruned network
            # at 61.1, 41.6 and 43.5 ms in three runs) gave three fits, and three prunings of one seed
            arch = network_signature(graph, cost)
            keys = [f'{dev}|network {arch}|width={float(w):.4f}' for w in widths]
            keeps = [full if w >= 1.0 else uniform_keep(graph, w) for w in widths]
            cached = all(k in cache.entries for k in keys)
            if not cached:
                nets = [model if w >= 1.0 else shrink(copy_model(model), graph, keep).eval()
                        for w, keep in zip(widths, keeps)]
                rounds_ms: List[List[float]] = [[] for _ in nets]
                for r in range(max(1, int(rounds))):
                    for k, net in enumerate(nets):
                        rounds_ms[k].append(time_ms(forward_of(net), device, min_runs=repeats, min_ms=0.0,
                                                    warmup=2 if r == 0 else 1))
                for key, times in zip(keys, rounds_ms):
                    cache.entries[key] = float(statistics.median(times))
                cache.measured += len(keys)
            for w, keep, key in zip(widths, keeps, keys):
                ms = cache.entries[key]
                measured['widths'].append(float(w))
                measured['ms'].append(ms)
                measured['layers_ms'].append(provisional.modules_ms(keep))
                measured['memory'].append(cost.layer_totals(keep)[1])
                how = 'from the timing cache' if cached else f'measured, median of {max(1, int(rounds))} rounds'
                log(f'latency model: the network at width {float(w):.2f}: {ms:.1f} ms ({how}), '
                    f'{measured["layers_ms"][-1]:.1f} ms in its modules alone')
        finally:
            model.train(was_training)
        cache.save()
        return cls(cost, tables, fit(measured), dev, measured, cw_tables)


def network_signature(graph: CouplingGraph, cost: CostModel) -> str:
    """A digest of what a network's forward time depends on besides the device: its groups, and every
    timed layer and norm / activation / pooling call with its module's geometry and its input shapes (so the
    analysis input too). Weights do not enter: the same architecture retrained times the same."""
    desc = {'groups': [[g.name, g.size, bool(g.prunable)] for g in graph.groups],
            'layers': [[L.name, _signature(graph.records[L.name].module),
                        [list(c.in_shape) for c in graph.records[L.name].calls]] for L in cost.layers],
            'channelwise': [[C.name, repr(C.module), list(C.in_shape)] for C in cost.channelwise]}
    return hashlib.sha1(json.dumps(desc, sort_keys=True).encode()).hexdigest()[:16]


def _least_squares(rows: List[List[float]], b: List[float]) -> List[float]:
    """``argmin_x |A x - b|`` for a small full-rank ``A`` (rows), by modified Gram-Schmidt in plain Python:
    the same bits every run. (``torch.linalg.lstsq`` is not: on this CPU, 3000 solves of one 5x3 system gave
    4 different last bits, so two fits of the same timings differed and could prune differently.)"""
    n = len(rows[0])
    q = [[r[j] for r in rows] for j in range(n)]          # columns
    R = [[0.0] * n for _ in range(n)]
    for j in range(n):
        for i in range(j):
            R[i][j] = sum(a * c for a, c in zip(q[i], q[j]))
            q[j] = [c - R[i][j] * a for a, c in zip(q[i], q[j])]
        R[j][j] = sum(c * c for c in q[j]) ** 0.5
        if R[j][j] == 0.0:
            return [float('nan')] * n                      # rank deficient: no unique fit with these terms
        q[j] = [c / R[j][j] for c in q[j]]
    y = [sum(a * c for a, c in zip(q[j], b)) for j in range(n)]
    x = [0.0] * n
    for j in reversed(range(n)):
        x[j] = (y[j] - sum(R[j][k] * x[k] for k in range(j + 1, n))) / R[j][j]
    return x


def fit(measured: Dict[str, List[float]]) -> Tuple[float, float, float]:
    """``(alpha, a, b)`` of ``ms = alpha * layers_ms + a + b * memory``, least squares in relative error (a
    narrow network's 10% counts as much as the full one's), all >= 0."""
    T = torch.tensor(measured['ms'], dtype=torch.float64)
    S = torch.tensor(measured['layers_ms'], dtype=torch.float64)
    M = torch.tensor(measured['memory'], dtype=torch.float64)
    m_scale = float(M.max()) or 1.0
    cols = {'alpha': S, 'a': torch.ones_like(S), 'b': M / m_scale}
    names = list(cols)
    best = None
    # every subset of the three terms, the largest non-negative least-squares solution with the least error
    for mask in range(1, 8):
        use = [n for k, n in enumerate(names) if mask >> k & 1]
        if len(use) > T.numel():
            continue
        A = torch.stack([cols[n] for n in use], 1)
        sol = torch.tensor(_least_squares((A / T[:, None]).tolist(), [1.0] * T.numel()), dtype=torch.float64)
        if not bool(torch.isfinite(sol).all()) or (sol < 0).any():
            continue
        err = float(((A @ sol) / T - 1).pow(2).sum())
        if best is None or err < best[0] - 1e-12:
            best = (err, dict(zip(use, sol.tolist())))
    coef = best[1] if best else {'alpha': 1.0}
    return coef.get('alpha', 0.0), coef.get('a', 0.0), coef.get('b', 0.0) / m_scale


def _measure_layer(rec, L, prunable: torch.Tensor, device: torch.device, dev: str, cache: TimingCache,
                   quantum: int = 1) -> LayerTable:
    """Time one layer alone at its grid of channel counts, with the input shape of each of its calls in
    the analysis (the network is timed on the same input), summed over the calls."""
    m = rec.module
    n_in, n_out = int(L.in_idx.numel()), int(L.out_idx.numel())
    linear = isinstance(m, nn.Linear)
    sig = _signature(m)
    shapes = [list(c.in_shape) for c in rec.calls]

    def timed(ci: int, co: int, groups: int) -> float:
        total = 0.0
        for shape in shapes:
            key = f'{dev}|{sig}|in={ci} out={co} groups={groups}|input={shape}'

            def run_it(shape=shape):
                layer = _plain_layer(m, ci, co, groups).to(device).eval()
                s = list(shape)
                s[-1 if linear else 1] = ci
                x = torch.randn(*s, device=device)
                return time_ms(lambda: layer(x), device)
            total += cache.get(key, run_it)
        return total

    U = prunable.numel()
    ext = torch.cat([prunable, torch.zeros(1, dtype=torch.bool)])
    fixed_in = int((~ext[L.in_idx.clamp(max=U)]).sum())
    fixed_out = int((~ext[L.out_idx.clamp(max=U)]).sum())
    if L.grouped:
        g = m.groups
        ipg, opg = n_in // g, n_out // g
        counts = _grid(g, fixed_out // opg)
        times = [timed(k * ipg, k * opg, k) for k in counts]
        t = torch.tensor(counts, dtype=torch.float64)
        return LayerTable(L.name, t * ipg, t * opg, torch.tensor(times, dtype=torch.float64), t, opg)
    gi, go = _grid(n_in, fixed_in, quantum=quantum), _grid(n_out, fixed_out, quantum=quantum)
    times = [[timed(ci, co, 1) for co in go] for ci in gi]
    penalty = (1.0, 1.0, 1.0)
    mi, mo = _mid(gi, quantum), _mid(go, quantum)
    if quantum > 1 and (mi or mo):
        # one channel off the multiple, on each side and on both: what the staircase charges for it
        ci, co = mi or gi[-1], mo or go[-1]
        base = timed(ci, co, 1)
        clamp = lambda r: min(4.0, max(0.5, r))  # noqa: E731
        p_in = clamp(timed(ci - 1, co, 1) / base) if mi else 1.0
        p_out = clamp(timed(ci, co - 1, 1) / base) if mo else 1.0
        p_both = clamp(timed(ci - 1, co - 1, 1) / base) if mi and mo else max(p_in, p_out)
        penalty = (p_in, p_out, p_both)
    return LayerTable(L.name, torch.tensor(gi, dtype=torch.float64), torch.tensor(go, dtype=torch.float64),
                      torch.tensor(times, dtype=torch.float64), quantum=quantum, penalty=penalty)


def _measure_channelwise(C, prunable: torch.Tensor, device: torch.device, dev: str,
                         cache: TimingCache) -> ChannelwiseTable:
    """Time one norm, activation or pooling call alone (a copy of the module in eval mode, with fewer
    channels where it has channel-indexed parameters) at the grid of its channel counts."""
    m = C.module
    U = prunable.numel()
    ext = torch.cat([prunable, torch.zeros(1, dtype=torch.bool)])
    n = int(C.idx.numel())
    fixed = int((~ext[C.idx.clamp(max=U)]).sum())
    counts = _grid(n, fixed, unit=C.unit)
    sig = f'{type(m).__module__}.{type(m).__qualname__} {m!r}'.replace('\n', ' ')

    def timed(c: int) -> float:
        def run_it():
            mod = copy.deepcopy(m).to(device).eval()
            if C.shrink is not None and c < n:
                C.shrink.shrink(mod, {'feat': torch.arange(c, device=device)})
            s = list(C.in_shape)
            s[1] = c
            x = torch.randn(*s, device=device)
            return time_ms(lambda: mod(x), device)
        return cache.get(f'{dev}|{sig}|channels={c}|input={list(C.in_shape)}', run_it)

    try:
        times = [timed(c) for c in counts]
    except Exception:  # noqa: BLE001  a module that cannot run alone on a random input: left to the fit
        times = [0.0] * len(counts)
    return ChannelwiseTable(C.name, torch.tensor(counts, dtype=torch.float64), torch.tensor(times, dtype=torch.float64))


__all__ = ['LatencyModel', 'LayerTable', 'ChannelwiseTable', 'TimingCache', 'time_ms', 'hold_freed_memory', 'roomy_primitive_cache',
           'device_name', 'detect_quantum', 'interp1',
           'interp2', 'fit', 'monotone']
