"""Reports of a pruning run: the demo's side-by-side table (markdown) and the channels-kept plot (PNG)."""
from __future__ import annotations

import json
import os.path as osp
from typing import Dict, List, Optional

import torch


def _load_json(path: str) -> Optional[dict]:
    if not osp.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def plot_channels(spec: dict, out_png: str, title: str = 'Channels kept per layer') -> None:
    """Bar chart: every group (named after its first layer), original vs kept channels."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    names: List[str] = list(spec['groups'].keys())
    sizes = [spec['groups'][n]['size'] for n in names]
    kept = [len(spec['groups'][n]['keep']) for n in names]
    fig, ax = plt.subplots(figsize=(max(8.0, 0.32 * len(names)), 5.0))
    xs = range(len(names))
    ax.bar(xs, sizes, color='#d0d0d0', label='original')
    ax.bar(xs, kept, color='#2a7ab9', label='kept')
    ax.set_xticks(list(xs))
    ax.set_xticklabels(names, rotation=90, fontsize=7)
    ax.set_ylabel('channels')
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)


def write_demo_report(work: str, paths: Dict[str, str], timings: Dict[str, float]) -> str:
    """Write ``report.md`` and ``channels.png`` in ``work``; returns the markdown."""
    pruned = torch.load(paths['pruned'], map_location='cpu', weights_only=True)
    meta = pruned['meta']
    info = meta['mmfisher']
    plot_channels(meta['channel_spec'], osp.join(work, 'channels.png'),
                  f'Channels kept per layer group ({info["resource"]} -> {info["ratio"]:.2f})')
    mb, mp = _load_json(paths['metrics_baseline']) or {}, _load_json(paths['metrics_pruned']) or {}
    bench = _load_json(paths['benchmark']) or {}
    models = bench.get('models', {})
    b, p = models.get('baseline', {}), models.get('pruned', {})

    def cell(d, k, scale=1.0, fmt='{:.2f}'):
        return fmt.format(d[k] / scale) if k in d else 'n/a'

    def ratio(k):
        return f'{p[k] / b[k]:.3f}' if k in b and k in p and b[k] else 'n/a'

    map_key = 'coco/bbox_mAP'
    lines = [
        '# mmfisher demo: RetinaNet (ResNet-18/4, FPN 64) on the generated shapes dataset',
        '',
        f'Pruned by FisherPruningHook: {info["normalization"]} normalisation, {info["channels_per_step"]} '
        f'channel(s) every {info["interval"]} iterations, {info["channels_removed"]} channels removed by '
        f'iteration {info["iter"]}; then fine-tuned (configs/demo/retinanet_r18_shapes_finetune.py).',
        '',
        '| | baseline | pruned + fine-tuned | pruned / baseline |',
        '|---|---|---|---|',
        f'| params (M) | {cell(b, "params", 1e6)} | {cell(p, "params", 1e6)} | {ratio("params")} |',
        f'| FLOPs (G) | {cell(b, "flops", 1e9, "{:.3f}")} | {cell(p, "flops", 1e9, "{:.3f}")} | {ratio("flops")} |',
        f'| activations (M) | {cell(b, "activations", 1e6)} | {cell(p, "activations", 1e6)} | '
        f'{ratio("activations")} |',
        f'| latency (ms) | {cell(b, "latency_ms", 1, "{:.1f}")} | {cell(p, "latency_ms", 1, "{:.1f}")} | '
        f'{ratio("latency_ms")} |',
        f'| bbox mAP | {cell(mb, map_key, 1, "{:.3f}")} | {cell(mp, map_key, 1, "{:.3f}")} | '
        f'{(f"{mp[map_key] - mb[map_key]:+.3f}" if map_key in mb and map_key in mp else "n/a")} |',
        f'| bbox mAP@50 | {cell(mb, "coco/bbox_mAP_50", 1, "{:.3f}")} | {cell(mp, "coco/bbox_mAP_50", 1, "{:.3f}")} '
        f'| |',
        '',
        f'Speed-up: **{bench.get("speedup", float("nan")):.2f}x** (input {bench.get("input")}, '
        f'{bench.get("threads")} threads, median of {bench.get("repeats")} alternating runs, network in tensor '
        f'mode; tools/benchmark.py). Ratios measured by the hook at pruning time: '
        + ', '.join(f'{k} {v:.3f}' for k, v in info['ratios'].items()) + '.',
        '',
        '![channels kept per layer group](channels.png)',
    ]
    if timings:
        lines += ['', 'Stage times this run: ' + ', '.join(f'{k} {v:.0f} s' for k, v in timings.items()) + '.']
    text = '\n'.join(lines) + '\n'
    with open(osp.join(work, 'report.md'), 'w') as f:
        f.write(text)
    return text
