"""How well the latency model predicts measured latency: predicted against measured, side by side.

    python benchmarks/latency_model.py [--config retinanet/retinanet_r50_fpn_1x_coco.py]
                                       [--sizes 320x320 640x640] [--repeats 5] [--rounds 3] [--json OUT]

For every input size: builds the mmdet config with random init (latency does not depend on the
weights), measures its latency model at that size (``LatencyModel.measure``, as the hook does; the
timing cache makes a second run fast), then for a set of networks predicts the latency and measures
it (``time_ms`` of the shrunk model's tensor forward, batch 1, ``--rounds`` rounds in turn over all
networks, the median of the rounds):

* the unpruned model (one of the widths the fit used: in-sample);
* uniformly narrower models at widths 0.9, 0.7, 0.5 (the fit used 1.0, 0.8, 0.6, 0.4);
* non-uniformly pruned models: every prunable group keeps a random share (seeded) drawn from
  [0.7, 1], [0.5, 1], [0.3, 1] and [0.1, 1], which is how pruning leaves a network (deep cuts in some
  groups, none in others) and what the fit never saw; and the same with every group's count rounded
  down to a multiple of the device's channel quantum (what -L pruning leaves on a staircase device).

First it prints the staircase itself: a 3x3 conv at 80x80, as many channels in as out, timed at
40 to 70 channels (``--no-staircase`` skips it).

Prints one table per size with the FLOPs ratio, predicted ms, measured ms (and the range of its rounds:
how far one measurement of the same network moves within the run) and the error, and the largest
error. Run it alone: other CPU work on the machine makes both columns meaningless.
"""
import argparse
import json
import os.path as osp
import statistics
import sys

sys.path.insert(0, osp.abspath(osp.join(osp.dirname(__file__), '..')))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--config', default='retinanet/retinanet_r50_fpn_1x_coco.py',
                   help='a path, or a path inside mmdet\'s own config tree')
    p.add_argument('--sizes', nargs='+', default=['320x320', '640x640'], help='HxW input sizes')
    p.add_argument('--repeats', type=int, default=5, help='timed runs per network and round')
    p.add_argument('--rounds', type=int, default=3)
    p.add_argument('--json', default=None, help='write the rows here')
    p.add_argument('--no-staircase', action='store_true', help='do not print the 3x3 conv staircase first')
    return p.parse_args(argv)


def random_share_keep(graph, low, seed):
    """Every prunable group keeps its first ``round(share * size)`` channels, share ~ U(low, 1)."""
    import torch
    g = torch.Generator().manual_seed(seed)
    keep = torch.ones(graph.num_channels, dtype=torch.bool)
    for grp in graph.groups:
        if grp.prunable:
            share = low + (1 - low) * float(torch.rand(1, generator=g))
            k = max(1, int(round(share * grp.size)))
            keep[grp.offset + k:grp.offset + grp.size] = False
    return keep


def on_quantum(graph, keep, quantum):
    """``keep`` with every prunable group's count rounded down to a multiple of ``quantum`` (at least one)."""
    keep = keep.clone()
    for grp in graph.groups:
        if grp.prunable and quantum > 1:
            k = int(keep[grp.offset:grp.offset + grp.size].sum())
            k = max(quantum, k // quantum * quantum) if grp.size >= quantum else k
            keep[grp.offset:grp.offset + grp.size] = False
            keep[grp.offset:grp.offset + min(k, grp.size)] = True
    return keep


def staircase():
    import torch
    from mmfisher.core.latency import time_ms
    print('3x3 conv, 80x80, batch 1, channels in = out: ms')
    cells = []
    for c in range(40, 71):
        conv = torch.nn.Conv2d(c, c, 3, padding=1).eval()
        x = torch.randn(1, c, 80, 80)
        cells.append(f'{c}: {time_ms(lambda: conv(x), torch.device("cpu"), min_ms=60, min_runs=5):.2f}')
    for k in range(0, len(cells), 8):
        print('  ' + ', '.join(cells[k:k + 8]))


def main(argv=None):
    args = parse_args(argv)
    from mmfisher.core.latency import roomy_primitive_cache
    roomy_primitive_cache()   # before the first conv: many models are timed in turn
    import torch
    from mmfisher.core import copy_model, shrink
    from mmfisher.core.cost import CostModel
    from mmfisher.core.latency import LatencyModel, time_ms
    from mmfisher.core.uniform import uniform_keep
    from mmfisher.openmmlab import analyse_model, build_from_config, example_forward
    from mmfisher.openmmlab.tools_common import analysis_tool_config, package_config

    path = package_config(args.config)
    if not args.no_staircase:
        staircase()
    torch.manual_seed(0)
    model = build_from_config(analysis_tool_config(path, None)).eval()
    device = torch.device('cpu')
    rows, worst = [], 0.0
    for size in args.sizes:
        h, w = (int(v) for v in size.lower().split('x'))
        shape = (1, 3, h, w)
        graph = analyse_model(model, shape)
        cost = CostModel(model, graph)
        lat = LatencyModel.measure(model, graph, lambda m: example_forward(m, shape), cost=cost,
                                   log=lambda s: print(f'  {s}', flush=True))
        full = torch.ones(graph.num_channels, dtype=torch.bool)
        nets = [('unpruned (in the fit)', full)]
        nets += [(f'uniform x{wd:.1f}', uniform_keep(graph, wd)) for wd in (0.9, 0.7, 0.5)]
        nets += [(f'random shares in [{low:.1f}, 1]', random_share_keep(graph, low, seed=k))
                 for k, low in enumerate((0.7, 0.5, 0.3, 0.1))]
        q = lat.quantum
        if q > 1:
            nets += [(f'random shares in [{low:.1f}, 1], counts on multiples of {q}',
                      on_quantum(graph, random_share_keep(graph, low, seed=k), q))
                     for k, low in enumerate((0.7, 0.5, 0.3, 0.1))]
        compact = [(name, keep, model if keep.all() else shrink(copy_model(model), graph, keep).eval())
                   for name, keep in nets]
        times = {name: [] for name, _ in nets}
        for _ in range(args.rounds):
            for name, keep, net in compact:
                times[name].append(time_ms(example_forward(net, shape), device, min_runs=args.repeats,
                                           min_ms=0.0, warmup=2))
        print(f'\n{args.config} at {h}x{w}, batch 1, {torch.get_num_threads()} threads ({lat.device}); '
              f'channel quantum {q}; fit: alpha {lat.alpha:.3f}, fixed {lat.fixed:.1f} ms, '
              f'{lat.per_memory * 1e6:.3f} ms per 1e6 feature-map elements')
        print('| network | FLOPs | predicted ms | measured ms | rounds ms (min-max) | error |')
        print('|---|---|---|---|---|---|')
        for name, keep, _ in compact:
            pred = lat.total(keep)
            meas = statistics.median(times[name])
            err = (pred - meas) / meas
            if not name.startswith('unpruned'):
                worst = max(worst, abs(err))
            flops = cost.ratios(keep)['flops']
            rows.append({'size': size, 'network': name, 'flops': flops, 'predicted_ms': pred, 'measured_ms': meas,
                         'error': err, 'rounds_ms': times[name]})
            lo, hi = min(times[name]), max(times[name])
            print(f'| {name} | {flops:.3f} | {pred:.1f} | {meas:.1f} | {lo:.1f}-{hi:.1f} | {err:+.1%} |')
    print(f'\nlargest error outside the fit: {worst:.1%}')
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(rows, f, indent=1)
    return worst


if __name__ == '__main__':
    main()
