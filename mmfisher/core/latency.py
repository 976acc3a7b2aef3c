"""What a model costs in latency on the device it runs on, and what removing one channel saves.

The latency model of a network (``LatencyModel.measure``):

* every producing layer (conv, linear) is timed alone on the device, with the input shape of each
  of its calls in the analysis, at a grid of channel counts around its own: input and output
  positions at 1, 1/4, 1/2, 3/4 and all of the layer's (a group conv: whole groups, on the
  diagonal). ``T_L(n_in, n_out)`` interpolates the grid (bilinear; linear for a group conv), whose
  times are first made non-decreasing in the channel counts (:func:`monotone`: timing noise never
  makes fewer channels look slower);
* the whole network is timed at several uniform widths (``uniform_keep``), and
  ``T(keep) = alpha * sum_L T_L(n_in, n_out) + a + b * memory(keep)`` is fitted to those times: the
  layers measured alone (``alpha``: how their sum compares with the network's), a fixed cost
  (``a``: Python, dispatch, post-processing-free heads) and the per-channel work outside the
  layers (``b``: norms, activations, adds, resampling, which scale with the feature maps).

Removing channel ``c`` saves ``T(keep) - T(keep without c)``: the interpolated drop of every layer
that reads or writes it plus ``b`` times its feature-map elements (:meth:`LatencyModel.saving`).
Timings are cached per device, torch version, thread count and layer shape
(``~/.cache/mmfisher/latency.json``, or ``$MMFISHER_CACHE_DIR``), so a second run measures nothing.
On CUDA, every timed run is bracketed by ``torch.cuda.synchronize()``.

Everything here is deterministic given the measured tables: a run that saves
:meth:`LatencyModel.state_dict` and restores it predicts the same, and a distributed job measures
on one rank and hands the same state to every rank.
"""
from __future__ import annotations

import copy
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
WIDTHS = (1.0, 0.8, 0.6, 0.4)          # uniform widths the whole network is timed at


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


def time_ms(run: Callable[[], Any], device: torch.device, min_ms: float = 20.0, min_runs: int = 3,
            max_runs: int = 50, warmup: int = 1) -> float:
    """Median milliseconds of ``run()`` under ``no_grad``: at least ``min_runs`` runs and ``min_ms`` in all."""
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


# --------------------------------------------------------------------------- #
# one layer's table
# --------------------------------------------------------------------------- #
@dataclass
class LayerTable:
    """``times[i, j]``: ms of one layer (summed over its calls) with ``in_grid[i]`` input and
    ``out_grid[j]`` output positions. A group conv has one grid, ``groups`` (its own group count at
    each point), and ``times`` of shape ``[len(groups)]``."""

    name: str
    in_grid: torch.Tensor          # [I] float64, ascending
    out_grid: torch.Tensor         # [O]
    times: torch.Tensor            # [I, O] or [G]
    groups: Optional[torch.Tensor] = None   # [G] group counts (group convs)
    opg: int = 1                   # output positions per group

    def __post_init__(self) -> None:
        self.times = monotone(self.times)

    def predict(self, n_in: torch.Tensor, n_out: torch.Tensor) -> torch.Tensor:
        """ms at ``n_in`` input and ``n_out`` output positions (float64 tensors of one shape)."""
        if self.groups is not None:
            return interp1(self.groups, self.times, n_out / self.opg)
        return interp2(self.in_grid, self.out_grid, self.times, n_in, n_out)

    def state(self) -> Dict[str, Any]:
        return {'name': self.name, 'in_grid': self.in_grid.tolist(), 'out_grid': self.out_grid.tolist(),
                'times': self.times.tolist(), 'groups': None if self.groups is None else self.groups.tolist(),
                'opg': self.opg}

    @classmethod
    def from_state(cls, s: Dict[str, Any]) -> 'LayerTable':
        t = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
        return cls(s['name'], t(s['in_grid']), t(s['out_grid']), t(s['times']),
                   None if s['groups'] is None else t(s['groups']), int(s['opg']))


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


def _grid(n: int, fixed: int = 0, unit: int = 1) -> List[int]:
    """Counts to time a side of ``n`` positions at, ``fixed`` of which are never pruned: the GRID fractions
    of ``n``, in whole units, and the fewest it can keep (one unit besides the fixed ones)."""
    if fixed >= n:
        return [n]
    units, low = max(1, n // unit), max(1, -(-fixed // unit) + (1 if fixed % unit == 0 else 0))
    return sorted({max(low, int(round(f * units))) * unit for f in GRID} | {low * unit})


# --------------------------------------------------------------------------- #
# the network
# --------------------------------------------------------------------------- #
class LatencyModel:
    """Predicted latency (ms) of a model whose channels follow a keep vector. See module docstring."""

    def __init__(self, cost: CostModel, tables: Sequence[LayerTable], coef: Sequence[float],
                 device: str, measured: Optional[Dict[str, Any]] = None) -> None:
        self.cost = cost
        self.tables = list(tables)
        if len(self.tables) != len(cost.layers):
            raise ValueError(f'{len(self.tables)} latency tables for {len(cost.layers)} layers: this latency '
                             f'model was measured on another architecture')
        for t, L in zip(self.tables, cost.layers):
            if t.name != L.name:
                raise ValueError(f'latency table for {t.name!r} where the model has layer {L.name!r}: this latency '
                                 f'model was measured on another architecture')
        self.alpha, self.fixed, self.per_memory = (float(c) for c in coef)
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

    def total(self, keep: torch.Tensor) -> float:
        """Predicted ms of the network with only ``keep`` channels."""
        layers = float(self.layer_ms(keep).sum())
        memory = self.cost.layer_totals(keep)[1]
        return self.alpha * layers + self.fixed + self.per_memory * memory

    def saving(self, keep: torch.Tensor) -> torch.Tensor:
        """``[num_channels]`` float64: the predicted ms that removing each channel alone saves now."""
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
            # a channel on both sides (a whole group of a group conv) loses both at once
            after = t.predict(n_in - d_in[touched], n_out - d_out[touched])
            now = t.predict(n_in.view(1), n_out.view(1))
            out.index_add_(0, touched, self.alpha * (now - after))
        return out[:U] + self.per_memory * self.cost.saving('memory', keep)

    # ---- state --------------------------------------------------------- #
    def state_dict(self) -> Dict[str, Any]:
        """Plain data (loads with ``torch.load(weights_only=True)`` and JSON)."""
        return {'device': self.device, 'coef': [self.alpha, self.fixed, self.per_memory],
                'tables': [t.state() for t in self.tables], 'measured': self.measured}

    @classmethod
    def from_state(cls, cost: CostModel, state: Dict[str, Any]) -> 'LatencyModel':
        return cls(cost, [LayerTable.from_state(s) for s in state['tables']], state['coef'], state['device'],
                   state.get('measured'))

    # ---- measuring ----------------------------------------------------- #
    @classmethod
    def measure(cls, model: nn.Module, graph: CouplingGraph, forward_of: Callable[[nn.Module], Callable[[], Any]],
                cost: Optional[CostModel] = None, device: Optional[torch.device] = None,
                cache: Optional[TimingCache] = None, log: Callable[[str], None] = lambda s: None,
                widths: Sequence[float] = WIDTHS, repeats: int = 3, rounds: int = 3) -> 'LatencyModel':
        """Time every layer alone and the network at ``widths`` (``rounds`` interleaved rounds of ``repeats``
        runs each, the median of the rounds), then fit (see module docstring).

        ``forward_of(m)``: a callable running the network ``m`` (the same architecture, possibly shrunk)
        on the analysis input, e.g. ``lambda m: example_forward(m, (1, 3, 320, 320))``.
        """
        from .shrink import shrink
        from .uniform import uniform_keep
        if device is None:
            p = next(model.parameters(), None)
            device = p.device if p is not None else torch.device('cpu')
        device = torch.device(device)
        cost = cost or CostModel(model, graph)
        cache = cache or TimingCache()
        dev = device_name(device)
        t0 = time.perf_counter()
        tables = []
        for k, L in enumerate(cost.layers):
            rec = graph.records[L.name]
            tables.append(_measure_layer(rec, L, graph.prunable, device, dev, cache))
            if (k + 1) % 10 == 0 or k + 1 == len(cost.layers):
                log(f'latency model: {k + 1}/{len(cost.layers)} layers timed on {dev} '
                    f'({cache.measured} new timings, {time.perf_counter() - t0:.0f} s)')
        # the network at several uniform widths, timed in interleaved rounds (the median of each network's
        # rounds): timed one after another, this CPU's drift of 10-20% between minutes went into the fit
        # (at 640x640 the full network once measured 1070 ms and width 0.8 1037 ms)
        measured = {'widths': [], 'ms': [], 'layers_ms': [], 'memory': []}
        full = torch.ones(graph.num_channels, dtype=torch.bool)
        provisional = cls(cost, tables, (1.0, 0.0, 0.0), dev)
        was_training = model.training
        model.eval()
        try:
            nets = []
            for w in widths:
                keep = full if w >= 1.0 else uniform_keep(graph, w)
                nets.append((float(w), keep, model if w >= 1.0 else shrink(copy.deepcopy(model), graph, keep).eval()))
            rounds_ms: List[List[float]] = [[] for _ in nets]
            for r in range(max(1, int(rounds))):
                for k, (_, _, net) in enumerate(nets):
                    rounds_ms[k].append(time_ms(forward_of(net), device, min_runs=repeats, min_ms=0.0,
                                                warmup=2 if r == 0 else 1))
            for (w, keep, _), times in zip(nets, rounds_ms):
                ms = statistics.median(times)
                measured['widths'].append(w)
                measured['ms'].append(ms)
                measured['layers_ms'].append(float(provisional.layer_ms(keep).sum()))
                measured['memory'].append(cost.layer_totals(keep)[1])
                log(f'latency model: the network at width {w:.2f}: {ms:.1f} ms measured (median of '
                    f'{len(times)} rounds), {measured["layers_ms"][-1]:.1f} ms in its layers alone')
        finally:
            model.train(was_training)
        cache.save()
        return cls(cost, tables, fit(measured), dev, measured)


def fit(measured: Dict[str, List[float]]) -> Tuple[float, float, float]:
    """``(alpha, a, b)`` of ``ms = alpha * layers_ms + a + b * memory``, least squares, all >= 0."""
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
        sol = torch.linalg.lstsq(A, T[:, None]).solution.flatten()
        if (sol < 0).any():
            continue
        err = float(((A @ sol) - T).pow(2).sum())
        if best is None or err < best[0] - 1e-12:
            best = (err, dict(zip(use, sol.tolist())))
    coef = best[1] if best else {'alpha': 1.0}
    return coef.get('alpha', 0.0), coef.get('a', 0.0), coef.get('b', 0.0) / m_scale


def _measure_layer(rec, L, prunable: torch.Tensor, device: torch.device, dev: str, cache: TimingCache) -> LayerTable:
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
    gi, go = _grid(n_in, fixed_in), _grid(n_out, fixed_out)
    times = [[timed(ci, co, 1) for co in go] for ci in gi]
    return LayerTable(L.name, torch.tensor(gi, dtype=torch.float64), torch.tensor(go, dtype=torch.float64),
                      torch.tensor(times, dtype=torch.float64))


__all__ = ['LatencyModel', 'LayerTable', 'TimingCache', 'time_ms', 'device_name', 'interp1', 'interp2', 'fit', 'monotone']
