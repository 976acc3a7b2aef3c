"""What glibc's default malloc adds to measured latency: page faults that depend on the process's history.

    python benchmarks/page_faults.py [--config configs/demo/retinanet_r18_shapes.py] [--size 640x640]
                                     [--widths 1.0 0.9 0.8 0.7 0.6 0.5 0.4 0.3] [--repeats 10] [--rounds 2]

Builds the config with random init and uniformly narrower copies of it at ``--widths`` (every prunable
width scaled, ``mmfisher.core.uniform.uniform_keep``), and times them in turn (A, B, C, A, B, C, ...)
in a fresh process, batch 1, tensor mode, counting the minor page faults of every forward
(``getrusage``). Twice per round, in separate processes: with glibc's defaults (large blocks mapped
and unmapped, a threshold that moves with what was allocated before) and with freed memory kept
(``mmfisher.core.latency.hold_freed_memory``, what every mmfisher timing does). Prints per network
the median ms and page faults per forward of both, and the ratio. Run it alone on the machine.
"""
import argparse
import json
import os.path as osp
import resource
import statistics
import subprocess
import sys
import time

ROOT = osp.abspath(osp.join(osp.dirname(__file__), '..'))
sys.path.insert(0, ROOT)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--config', default=osp.join(ROOT, 'configs', 'demo', 'retinanet_r18_shapes.py'))
    p.add_argument('--size', default='640x640', help='HxW')
    p.add_argument('--widths', type=float, nargs='+', default=[1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3])
    p.add_argument('--repeats', type=int, default=10)
    p.add_argument('--rounds', type=int, default=2)
    p.add_argument('--worker', choices=['default', 'held'], help=argparse.SUPPRESS)
    return p.parse_args(argv)


def worker(args):
    """Time every width in turn in this process; print one JSON line."""
    if args.worker == 'held':
        from mmfisher.core.latency import hold_freed_memory
        assert hold_freed_memory(), 'not glibc: nothing to compare'

    import torch
    from mmengine.config import Config
    from mmengine.registry import DefaultScope

    from mmfisher.core import copy_model, shrink
    from mmfisher.core.uniform import uniform_keep
    from mmfisher.openmmlab import analyse_model, build_from_config, register_all_modules
    from mmfisher.openmmlab.benchmarking import tensor_run
    register_all_modules()
    h, w = (int(v) for v in args.size.lower().split('x'))
    torch.manual_seed(0)
    cfg = Config.fromfile(args.config)
    with DefaultScope.overwrite_default_scope(cfg.get('default_scope', 'mmdet')):
        model = build_from_config(cfg).eval()
        graph = analyse_model(model, (1, 3, h, w))
        nets = [model if wd >= 1 else shrink(copy_model(model), graph, uniform_keep(graph, wd)).eval()
                for wd in args.widths]
    x = torch.randn(1, 3, h, w, generator=torch.Generator().manual_seed(0))
    runs = [tensor_run(m, x) for m in nets]
    ms = [[] for _ in runs]
    faults = [[] for _ in runs]
    with torch.no_grad():
        for run in runs:
            run()
            run()
        for _ in range(args.repeats):
            for k, run in enumerate(runs):
                f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                t0 = time.perf_counter()
                run()
                ms[k].append(1000 * (time.perf_counter() - t0))
                faults[k].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
    print(json.dumps({'ms': [statistics.median(v) for v in ms],
                      'faults': [statistics.median(v) for v in faults]}))


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        return worker(args)
    results = {'default': [], 'held': []}
    for _ in range(args.rounds):
        for mode in ('default', 'held'):
            cmd = [sys.executable, __file__, '--worker', mode, '--config', args.config, '--size', args.size,
                   '--repeats', str(args.repeats), '--widths', *map(str, args.widths)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            results[mode].append(json.loads(out.strip().splitlines()[-1]))
    print(f'{osp.basename(args.config)} at {args.size}, batch 1, median of {args.repeats} forwards in turn, '
          f'{args.rounds} rounds of a fresh process per mode (the median of the rounds)')
    print('| width | default ms | faults / forward | freed memory kept ms | faults / forward | default / kept |')
    print('|---|---|---|---|---|---|')
    rows = []
    for k, wd in enumerate(args.widths):
        d = statistics.median(r['ms'][k] for r in results['default'])
        df = statistics.median(r['faults'][k] for r in results['default'])
        kept = statistics.median(r['ms'][k] for r in results['held'])
        kf = statistics.median(r['faults'][k] for r in results['held'])
        rows.append((wd, d, df, kept, kf))
        print(f'| {wd:.1f} | {d:.1f} | {df:.0f} | {kept:.1f} | {kf:.0f} | {d / kept:.2f} |')
    return rows


if __name__ == '__main__':
    main()
