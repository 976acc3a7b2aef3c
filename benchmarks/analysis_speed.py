"""How long the coupling analysis takes, against one plain forward of the same model, side by side.

    python benchmarks/analysis_speed.py [--config retinanet/retinanet_r50_fpn_1x_coco.py] [--shape 320 320]
                                        [--repeats 7] [--profile]

Builds the mmdet config with random init (nothing downloaded), then alternates a plain forward
(the same ``example_forward`` callable the analysis runs, under ``no_grad`` in eval mode) with a
full ``analyse`` of that forward (trace plus coupling graph) and with ``analyse_model`` (what the
hook runs: the tensor forward and the loss on a generated batch, which traces training-only
branches), ``--repeats`` times each, and prints the medians and their ratios. ``--profile`` prints
the analysis's top functions by own time (cProfile). The ratio is printed three ways: of the medians, as
the median of the ratios within a round (analysis against the forward run just before it), and of the
fastest runs (noise on a shared machine only adds time).
``--parts`` also times, in the same turns, what the trace is made of: the forward under a
torch-function mode that does nothing, under global module hooks that do nothing, under the wrap of
every custom autograd Function, the trace alone (no coupling graph), and the coupling graph alone.
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
                   help='a path, or a path inside mmdet\'s own config tree')
    p.add_argument('--shape', type=int, nargs=2, default=[320, 320], metavar=('H', 'W'))
    p.add_argument('--repeats', type=int, default=7)
    p.add_argument('--profile', action='store_true')
    p.add_argument('--parts', action='store_true', help='also time the parts of the trace (see above)')
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    import torch
    from mmfisher.core import analyse
    from mmfisher.openmmlab import analyse_model, build_from_config, example_forward
    from mmfisher.openmmlab.tools_common import analysis_tool_config, package_config

    torch.manual_seed(0)
    path = package_config(args.config)
    cfg = analysis_tool_config(path, None)
    model = build_from_config(cfg)
    model.eval()
    forward = example_forward(model, (1, 3) + tuple(args.shape))

    def plain():
        with torch.no_grad():
            forward()

    def analysis():
        analyse(model, forward=forward, strict=True)

    def with_loss():
        analyse_model(model, (1, 3) + tuple(args.shape), strict=True)

    runs = [('forward', plain), ('analyse', analysis), ('with_loss', with_loss)]
    if args.parts:
        runs += trace_parts(model, forward)
    for _, fn in runs:                          # warm-up: lazy imports, allocator, mmcv op loading
        fn()
    times = {name: [] for name, _ in runs}
    for _ in range(args.repeats):
        for name, fn in runs:
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    fwd, ana = statistics.median(times['forward']), statistics.median(times['analyse'])
    full = statistics.median(times['with_loss'])
    graph = analyse(model, forward=forward)
    s = graph.summary()
    print(f'{args.config} at {args.shape[0]}x{args.shape[1]}, batch 1, {torch.get_num_threads()} threads, '
          f'median of {args.repeats} interleaved runs')
    print(f'  plain forward {fwd:.3f} s, analysis {ana:.3f} s: {ana / fwd:.2f}x '
          f'({s["prunable_groups"]}/{s["groups"]} groups prunable)')
    # each round times the forward and then the analysis, a second apart: the ratio within a round is
    # not moved by the machine's speed drifting between rounds (a shared machine drifts by 10-20%)
    rounds = sorted(a / f for a, f in zip(times['analyse'], times['forward']))
    print(f'  per round (analysis / the forward just before it): median {statistics.median(rounds):.2f}x, '
          f'range {rounds[0]:.2f}-{rounds[-1]:.2f}x')
    # noise on a shared machine only adds time: the fastest run of each is the least disturbed estimate
    print(f'  fastest runs: plain forward {min(times["forward"]):.3f} s, analysis {min(times["analyse"]):.3f} s: '
          f'{min(times["analyse"]) / min(times["forward"]):.2f}x')
    print(f'  analyse_model (tensor forward + loss on a generated batch of 1) {full:.3f} s: {full / fwd:.2f}x')
    from mmfisher.core.trace import ChannelTracer
    tracer = ChannelTracer(model)                # what the coupling graph is solved from
    tracer.run(forward)
    print(f'  trace: {tracer.sets.size} channel atoms, {sum(a.numel() for a, _ in tracer.sets._unions)} '
          f'union edges')
    for name, _ in runs[3:]:
        t = statistics.median(times[name])
        if name == 'coupling graph alone':
            print(f'  {name}: {t * 1000:.1f} ms')
        else:
            print(f'  {name}: {t * 1000:.1f} ms, {(t - fwd) * 1000:+.1f} ms over the plain forward')
    if args.profile:
        import cProfile
        import pstats
        prof = cProfile.Profile()
        prof.runcall(analysis)
        pstats.Stats(prof).sort_stats('tottime').print_stats(25)
    return ana / fwd


def trace_parts(model, forward):
    """``(name, callable)`` of the trace's parts, for ``--parts``."""
    import torch

    from mmfisher.core.groups import CouplingGraph
    from mmfisher.core.trace import AutogradFunctionWatch, ChannelTracer

    class NoOpMode(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    def with_mode():
        with torch.no_grad(), NoOpMode():
            forward()

    def with_hooks():
        handles = [torch.nn.modules.module.register_module_forward_pre_hook(lambda m, a: None),
                   torch.nn.modules.module.register_module_forward_hook(lambda m, a, o: None)]
        try:
            with torch.no_grad():
                forward()
        finally:
            for h in handles:
                h.remove()

    def with_autograd_watch():
        with AutogradFunctionWatch(ChannelTracer(model)), torch.no_grad():
            forward()

    def trace_alone():
        ChannelTracer(model, strict=True).run(forward)

    traced = ChannelTracer(model, strict=True)
    traced.run(forward)

    def graph_alone():
        traced.sets.forget_roots()       # solve the classes again, as a fresh analysis does
        CouplingGraph(traced, 0.0)

    return [('forward under a no-op torch-function mode', with_mode),
            ('forward under no-op global module hooks', with_hooks),
            ('forward with custom autograd Functions wrapped', with_autograd_watch),
            ('trace alone (no coupling graph)', trace_alone), ('coupling graph alone', graph_alone)]


if __name__ == '__main__':
    main()
