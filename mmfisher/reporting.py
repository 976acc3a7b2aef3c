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
    names = ('baseline', 'pruned', 'uniform')
    metrics = [_load_json(paths[f'metrics_{n}']) or {} for n in names]
    bench = _load_json(paths['benchmark']) or {}
    models = [bench.get('models', {}).get(n, {}) for n in names]
    uniform = _load_json(paths['uniform']) or {}
    sizes = bench.get('sizes', [])

    def cells(values, fmt):
        return ' | '.join('n/a' if v is None else fmt.format(v) for v in values)

    def ratios(values):
        b = values[0]
        return ' | '.join('n/a' if v is None or not b else f'{v / b:.3f}' for v in values[1:])

    def row(label, values, fmt):
        return f'| {label} | {cells(values, fmt)} | {ratios(values)} |'

    def field(key, scale=1.0):
        return [m[key] / scale if key in m else None for m in models]

    def latency(size):
        return [m.get('at', {}).get(size, {}).get('latency_ms') for m in models]

    map_key = 'coco/bbox_mAP'
    maps = [m.get(map_key) for m in metrics]
    maps50 = [m.get('coco/bbox_mAP_50') for m in metrics]

    def delta(values):
        b = values[0]
        return ' | '.join('n/a' if v is None or b is None else f'{v - b:+.3f}' for v in values[1:])

    lines = [
        '# mmfisher demo: RetinaNet (ResNet-18/4, FPN 64) on the generated shapes dataset',
        '',
        f'Pruned by FisherPruningHook: {info["normalization"]} normalisation, {info["channels_per_step"]} '
        f'channel(s) every {info["interval"]} iterations, {info["channels_removed"]} channels removed by '
        f'iteration {info["iter"]}; then fine-tuned (configs/demo/retinanet_r18_shapes_finetune.py). '
        f'Uniform: every prunable width scaled by one factor to the same FLOPs, trained from scratch for '
        f'{uniform.get("iters", "n/a")} iterations, as many as baseline + pruning + fine-tuning '
        f'(configs/demo/retinanet_r18_shapes_uniform.py).',
        '',
        '| | baseline | pruned + fine-tuned | uniform, from scratch | pruned / baseline | uniform / baseline |',
        '|---|---|---|---|---|---|',
        row('params (M)', field('params', 1e6), '{:.2f}'),
        row('FLOPs (G)', field('flops', 1e9), '{:.3f}'),
        row('activations (M)', field('activations', 1e6), '{:.2f}'),
    ]
    for size in sizes:
        lines.append(row(f'latency {size} (ms)', latency(size), '{:.1f}'))
    lines += [
        f'| bbox mAP | {cells(maps, "{:.3f}")} | {delta(maps)} |',
        f'| bbox mAP@50 | {cells(maps50, "{:.3f}")} | {delta(maps50)} |',
        '',
    ]
    if sizes:
        speed = []
        for size in sizes:
            lat = latency(size)
            if None not in lat:
                speed.append(f'{size}: pruned {lat[0] / lat[1]:.2f}x, uniform {lat[0] / lat[2]:.2f}x')
        lines.append(f'Speed-up: **{"; ".join(speed)}** over the baseline ({bench.get("threads")} threads, '
                     f'batch 1, median of {bench.get("repeats")} alternating runs, network in tensor mode; '
                     f'tools/benchmark.py).')
    lines += [
        'Ratios measured by the hook at pruning time: ' + ', '.join(f'{k} {v:.3f}' for k, v in info['ratios'].items())
        + '. mAP deltas are against the baseline.',
        '',
        '![channels kept per layer group](channels.png)',
    ]
    if timings:
        lines += ['', 'Stage times this run: ' + ', '.join(f'{k} {v:.0f} s' for k, v in timings.items()) + '.']
    text = '\n'.join(lines) + '\n'
    with open(osp.join(work, 'report.md'), 'w') as f:
        f.write(text)
    return text
