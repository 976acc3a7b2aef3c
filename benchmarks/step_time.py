"""How long one pruning decision takes on RetinaNet-R50-FPN: memory against latency normalisation.

    python benchmarks/step_time.py [--config retinanet/retinanet_r50_fpn_1x_coco.py] [--size 320]
                                   [--channels 8] [--repeats 5] [--profile]

Builds the config with random init, analyses it at ``--size``, measures its latency model (cached, as the hook
does: ``$MMFISHER_CACHE_DIR``), accumulates the Fisher of one backward pass, then times ``pruner.step(channels)``
with memory and with latency normalisation to a FLOPs target of 0.5, each ``--repeats`` times on a fresh
pruner (median). A latency-normalised step removes whole blocks of the device's channel quantum, so it may
remove more than ``--channels``. ``--profile`` prints cProfile's top entries of one step of each.
"""
import argparse
import os.path as osp
import statistics
import sys
import time

sys.path.insert(0, osp.abspath(osp.join(osp.dirname(__file__), '..')))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--config', default='retinanet/retinanet_r50_fpn_1x_coco.py',
                   help="a path, or a path inside mmdet's own config tree")
    p.add_argument('--size', type=int, default=320)
    p.add_argument('--channels', type=int, default=8)
    p.add_argument('--repeats', type=int, default=5)
    p.add_argument('--profile', action='store_true')
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    import warnings

    import torch
    from mmengine.registry import DefaultScope

    from mmfisher.core import analyse
    from mmfisher.core.cost import CostModel
    from mmfisher.core.latency import LatencyModel
    from mmfisher.core.pruner import GroupFisherPruner
    from mmfisher.openmmlab import build_from_config, example_forward, register_all_modules
    from mmfisher.openmmlab.benchmarking import tensor_run
    from mmfisher.openmmlab.tools_common import analysis_tool_config, package_config
    register_all_modules()
    path = package_config(args.config)
    torch.manual_seed(0)
    with DefaultScope.overwrite_default_scope('mmdet'):
        model = build_from_config(analysis_tool_config(path, None))
    shape = (1, 3, args.size, args.size)
    run = tensor_run(model, torch.randn(*shape, generator=torch.Generator().manual_seed(0)))
    graph = analyse(model, forward=run)
    t0 = time.perf_counter()
    lat = LatencyModel.measure(model, graph, lambda m: example_forward(m, shape), cost=CostModel(model, graph))
    print(f'{args.config} at {args.size}x{args.size}: {graph.num_channels} channels in {len(graph.groups)} groups; '
          f'latency model {time.perf_counter() - t0:.1f} s (quantum {lat.quantum})')
    for norm in ('memory', 'latency'):
        kw = dict(latency=lat.state_dict()) if norm == 'latency' else {}
        times, removed = [], 0
        for i in range(args.repeats + 1):
            pruner = GroupFisherPruner(model, graph, normalization=norm, target=('flops', 0.5), **kw).attach()
            model.train()
            out = run()
            loss = sum(o.float().pow(2).mean() for level in out
                       for o in (level if isinstance(level, (list, tuple)) else [level]))
            loss.backward()
            pruner.accumulate()
            with warnings.catch_warnings():
                warnings.simplefilter('ignore')
                if args.profile and i == 0:
                    import cProfile
                    import pstats
                    prof = cProfile.Profile()
                    prof.enable()
                t = time.perf_counter()
                removed = len(pruner.step(args.channels))
                dt = time.perf_counter() - t
                if args.profile and i == 0:
                    prof.disable()
                    pstats.Stats(prof).sort_stats('cumulative').print_stats(12)
            if i:                 # the first is a warm-up
                times.append(dt)
            pruner.detach()
            model.zero_grad(set_to_none=True)
        print(f'  {norm}: step({args.channels}) removes {removed} channels in {statistics.median(times):.3f} s '
              f'(median of {args.repeats})')


if __name__ == '__main__':
    main()
