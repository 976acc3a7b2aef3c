"""Where a forward's time goes: torch's profiler on the network in tensor mode, per op, self CPU time.

    python benchmarks/op_profile.py [--config configs/demo/retinanet_r18_shapes_hard.py] [--size 640x640]
                                    [--runs 10] [--rows 12]

Builds the config with random init (time does not depend on the weights), runs the tensor-mode forward
``--runs`` times under ``torch.profiler`` after 5 warm-up runs, and prints every op's self CPU time per
forward and its share. The latency model's norm, activation and pooling tables (mmfisher/core/latency.py)
were added after this showed the stem's max-pooling taking a fifth of the demo detector's forward at 640x640.
Run it alone: other CPU work on the machine changes the times.
"""
import argparse
import os.path as osp
import sys

sys.path.insert(0, osp.abspath(osp.join(osp.dirname(__file__), '..')))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--config', default='configs/demo/retinanet_r18_shapes_hard.py',
                   help="a path, or a path inside mmdet's own config tree")
    p.add_argument('--size', default='640x640', help='HxW')
    p.add_argument('--runs', type=int, default=10)
    p.add_argument('--rows', type=int, default=12, help='ops to print, by self CPU time')
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    from mmfisher.core.latency import hold_freed_memory, roomy_primitive_cache
    roomy_primitive_cache()
    hold_freed_memory()
    import torch
    from torch.profiler import ProfilerActivity, profile

    from mmfisher.openmmlab import build_from_config, example_forward
    from mmfisher.openmmlab.tools_common import analysis_tool_config, package_config
    path = package_config(args.config)
    h, w = (int(v) for v in args.size.lower().split('x'))
    torch.manual_seed(0)
    model = build_from_config(analysis_tool_config(path, None)).eval()
    run = example_forward(model, (1, 3, h, w))
    with torch.no_grad():
        for _ in range(5):
            run()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(args.runs):
                run()
    ops = sorted(((e.key, e.self_cpu_time_total / args.runs / 1000.0, e.count // args.runs)
                  for e in prof.key_averages()), key=lambda r: -r[1])
    total = sum(ms for _, ms, _ in ops)
    print(f'{args.config} at {h}x{w}, batch 1, {torch.get_num_threads()} threads: {total:.1f} ms self CPU time '
          f'per forward (mean of {args.runs})')
    print('| op | ms per forward | share | calls per forward |')
    print('|---|---|---|---|')
    for name, ms, calls in ops[:args.rows]:
        print(f'| {name} | {ms:.2f} | {ms / total:.1%} | {calls} |')
    return ops


if __name__ == '__main__':
    main()
