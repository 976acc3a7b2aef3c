"""Measuring models side by side: complexity and latency, the way ``tools/benchmark.py`` reports them.

``complexity(model, x, run)``: FLOPs and activations of one forward from mmengine's own
analysis (an independent count: not mmfisher's cost model), falling back to mmfisher's
cost model where mmengine cannot trace the model (the result says which).
``interleaved_latency(runs, repeats, warmup)``: every model's median latency in ms, timed in
turns (A, B, C, A, B, C, ...) in one process, so that a noisy machine slows all alike.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable, Dict, List, Sequence

import torch
import torch.nn as nn


def tensor_run(model: nn.Module, x: torch.Tensor) -> Callable[[], object]:
    """The network on ``x`` in 'tensor' mode (no post-processing such as NMS)."""
    from .analysis import example_samples, tensor_forward
    samples = example_samples(model, tuple(x.shape))
    return lambda: tensor_forward(model, x, samples)


def complexity(model: nn.Module, x: torch.Tensor, run: Callable[[], object]) -> Dict[str, object]:
    """``{'flops', 'activations', 'params', 'source'}`` of one forward of ``run`` on ``x`` (per batch)."""
    params = float(sum(p.numel() for p in model.parameters()))
    try:
        from mmengine.analysis import ActivationAnalyzer, FlopAnalyzer

        class Wrapped(nn.Module):
            def __init__(self, m):
                super().__init__()
                self.m = m

            def forward(self, inp):
                return run()
        wrapped = Wrapped(model)
        with torch.no_grad():
            flops = FlopAnalyzer(wrapped, (x,)).unsupported_ops_warnings(False).uncalled_modules_warnings(False)
            acts = ActivationAnalyzer(wrapped, (x,)).unsupported_ops_warnings(False).uncalled_modules_warnings(False)
            return {'flops': float(flops.total()), 'activations': float(acts.total()), 'params': params,
                    'source': 'mmengine'}
    except Exception as e:  # noqa: BLE001  (tracing fails on some models: say so and count ourselves)
        from ..core import analyse
        from ..core.cost import CostModel
        graph = analyse(model, forward=run)
        c = CostModel(model, graph).original
        batch = x.shape[0]
        return {'flops': c['flops'] * batch, 'activations': c['memory'] * batch, 'params': params,
                'source': f'mmfisher cost model ({type(e).__name__} in mmengine analysis)'}


def interleaved_latency(runs: Sequence[Callable[[], object]], repeats: int = 30, warmup: int = 5,
                        device: str = 'cpu') -> List[Dict[str, float]]:
    """Per run: ``{'latency_ms'`` (median), ``'spread_ms'`` (interquartile range)``}``, timed in turns, with
    freed memory kept (``mmfisher.core.latency.hold_freed_memory``: a time that does not depend on what the
    process ran before)."""
    from ..core.latency import hold_freed_memory
    hold_freed_memory()
    sync = torch.cuda.synchronize if str(device).startswith('cuda') else (lambda: None)
    times: List[List[float]] = [[] for _ in runs]
    with torch.no_grad():
        for _ in range(warmup):
            for run in runs:
                run()
        sync()
        for _ in range(repeats):
            for t, run in zip(times, runs):
                t0 = time.perf_counter()
                run()
                sync()
                t.append(time.perf_counter() - t0)
    out = []
    for t in times:
        q = statistics.quantiles(t, n=4) if len(t) >= 2 else [t[0]] * 3
        out.append({'latency_ms': 1000 * statistics.median(t), 'spread_ms': 1000 * (q[2] - q[0])})
    return out
