"""Measure models side by side: params, FLOPs, activations, latency; print the ratios to the first.

    python tools/benchmark.py CONFIG_A CKPT_A CONFIG_B CKPT_B [CONFIG_C CKPT_C ...] [--shape 640 640]
                              [--sizes 160x160 640x640] [--batch 1] [--repeats 30] [--warmup 5]
                              [--device cpu] [--threads N] [--names A B ...] [--json OUT]

CKPT may be ``none`` to time the architecture with its initial weights (speed does not
depend on the weights). All models run in the same process, in eval mode under
``no_grad``, on the same random input, in 'tensor' mode (the network without
post-processing such as NMS); their timed runs alternate (A, B, C, A, B, C, ...) so that a
noisy machine slows all alike, and the median of ``--repeats`` runs after ``--warmup``
runs is reported, at every input size of ``--sizes`` (default: the one ``--shape``).
FLOPs and activations come from mmengine's complexity analysis
(``mmengine.analysis.get_model_complexity_info``); where it cannot trace a model, mmfisher's
own cost model (conv/linear multiply-accumulates, conv/linear output elements) is used and
the table says so.
"""
import argparse
import json
import os.path as osp
import statistics
import sys
import time

import torch

sys.path.insert(0, osp.abspath(osp.join(osp.dirname(__file__), '..')))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('models', nargs='+', metavar='CONFIG CKPT',
                   help="pairs of a config and its checkpoint (or 'none'); the first is the reference")
    p.add_argument('--shape', type=int, nargs=2, default=(640, 640), metavar=('H', 'W'))
    p.add_argument('--batch', type=int, default=1)
    p.add_argument('--repeats', type=int, default=30)
    p.add_argument('--warmup', type=int, default=5)
    p.add_argument('--device', default='cpu')
    p.add_argument('--threads', type=int, default=None, help='torch CPU threads (default: torch default)')
    p.add_argument('--sizes', nargs='+', default=None, metavar='HxW',
                   help='input sizes to time at (FLOPs etc. at the first); default: --shape')
    p.add_argument('--names', nargs='+', default=None, help='labels of the models in the table (default A, B, ...)')
    p.add_argument('--onnx', action='store_true',
                   help='also export both networks to ONNX and time them with onnxruntime (CPU)')
    p.add_argument('--json', help='also write the measurements to this JSON file')
    args = p.parse_args(argv)
    if len(args.models) < 2 or len(args.models) % 2:
        p.error(f'give pairs of CONFIG CKPT (at least two models); got {len(args.models)} arguments')
    args.pairs = list(zip(args.models[0::2], args.models[1::2]))
    if args.names is None:
        args.names = [chr(ord('A') + i) for i in range(len(args.pairs))]
    if len(args.names) != len(args.pairs):
        p.error(f'--names: {len(args.names)} names for {len(args.pairs)} models')
    try:
        args.sizes = [tuple(int(v) for v in s.lower().split('x')) for s in args.sizes] if args.sizes \
            else [tuple(args.shape)]
        assert all(len(s) == 2 for s in args.sizes)
    except (ValueError, AssertionError):
        p.error(f'--sizes: give input sizes as HxW, e.g. 640x640; got {args.sizes}')
    return args


def build(config: str, ckpt: str, device: str):
    from mmengine.config import Config
    from mmengine.runner import load_checkpoint

    from mmfisher.openmmlab import build_from_config
    if not osp.isfile(config):
        sys.exit(f'error: config file {config!r} does not exist')
    model = build_from_config(Config.fromfile(config))
    if ckpt.lower() != 'none':
        if not osp.isfile(ckpt):
            sys.exit(f'error: checkpoint {ckpt!r} does not exist')
        load_checkpoint(model, ckpt, map_location='cpu', strict=True)
    return model.to(device).eval()


def time_onnx(models, x, args) -> dict:
    """Export every network and time onnxruntime sessions, alternating, like the PyTorch runs."""
    import tempfile

    import numpy as np

    from mmfisher.openmmlab.onnx_export import export_onnx, onnx_session
    times = [[] for _ in models]
    with tempfile.TemporaryDirectory() as tmp:
        sessions = []
        for i, m in enumerate(models):
            path = osp.join(tmp, f'model{i}.onnx')
            export_onnx(m, path, tuple(x.shape))
            sessions.append(onnx_session(path, args.threads or 0))
        feed = {'input': x.cpu().numpy().astype(np.float32)}
        from mmfisher.core.latency import hold_freed_memory
        hold_freed_memory()      # as for the PyTorch timings
        for _ in range(args.warmup):
            for s in sessions:
                s.run(None, feed)
        for _ in range(args.repeats):
            for t, s in zip(times, sessions):
                t0 = time.perf_counter()
                s.run(None, feed)
                t.append(time.perf_counter() - t0)
    lat = [1000 * statistics.median(t) for t in times]
    print(f'{"onnxruntime (ms)":<22}' + ''.join(f'{v:>16.1f}' for v in lat))
    for name, v in zip(args.names[1:], lat[1:]):
        print(f'onnxruntime speed-up of {name} over {args.names[0]}: {lat[0] / v:.2f}x')
    return {'latency_ms': lat, 'speedup': lat[0] / lat[1]}


def _row(label, values, fmt, ref=True):
    """One table line: a value per model, then each one's ratio to the first."""
    cells = ''.join(f'{fmt.format(v):>16}' for v in values)
    ratios = ''.join(f'{v / values[0]:>10.3f}' for v in values[1:]) if ref and values[0] else ''
    return f'{label:<22}{cells}{ratios}'


def main(argv=None):
    args = parse_args(argv)
    from mmfisher.core.latency import roomy_primitive_cache
    roomy_primitive_cache()   # before the first conv: many models are timed in turn
    if args.threads:
        torch.set_num_threads(args.threads)
    from mmfisher.openmmlab import register_all_modules
    from mmfisher.openmmlab.benchmarking import complexity, interleaved_latency, tensor_run
    register_all_modules()
    models = [build(cfg, ckpt, args.device) for cfg, ckpt in args.pairs]
    names = args.names
    torch.manual_seed(0)
    inputs = {size: torch.randn(args.batch, 3, *size, device=args.device) for size in args.sizes}
    first = args.sizes[0]
    rows = [complexity(m, inputs[first], tensor_run(m, inputs[first])) for m in models]
    for size, x in inputs.items():
        runs = [tensor_run(m, x) for m in models]
        for row, t in zip(rows, interleaved_latency(runs, args.repeats, args.warmup, args.device)):
            key = f'{size[0]}x{size[1]}'
            row.setdefault('at', {})[key] = {**t, 'fps': args.batch * 1000 / t['latency_ms']}
            if size == first:
                row.update(t)
                row['fps'] = args.batch * 1000 / row['latency_ms']
    print(f'batch {args.batch} on {args.device} ({torch.get_num_threads()} threads), median of {args.repeats} '
          f'alternating runs after {args.warmup} warm-up; network in tensor mode (no post-processing); '
          f'params, FLOPs and activations at {first[0]}x{first[1]}')
    print(f'{"":<22}' + ''.join(f'{n:>16}' for n in names) + ''.join(f'{n + "/" + names[0]:>10}' for n in names[1:]))
    print(_row('params (M)', [r['params'] / 1e6 for r in rows], '{:.2f}'))
    print(_row('FLOPs (G)', [r['flops'] / 1e9 for r in rows], '{:.3f}'))
    print(_row('activations (M)', [r['activations'] / 1e6 for r in rows], '{:.2f}'))
    for size in args.sizes:
        key = f'{size[0]}x{size[1]}'
        print(_row(f'latency {key} (ms)', [r['at'][key]['latency_ms'] for r in rows], '{:.1f}'))
    for size in args.sizes:
        key = f'{size[0]}x{size[1]}'
        lat = [r['at'][key]['latency_ms'] for r in rows]
        print(f'speed-up over {names[0]} at {key}: ' + ', '.join(f'{n} {lat[0] / v:.2f}x'
                                                              for n, v in zip(names[1:], lat[1:])))
    odd = [f'{n} {r["source"]}' for n, r in zip(names, rows) if r['source'] != 'mmengine']
    if odd:
        print('FLOPs/activations source: ' + '; '.join(odd))
    result = {'input': [args.batch, 3, *first], 'sizes': [f'{h}x{w}' for h, w in args.sizes],
              'device': args.device, 'threads': torch.get_num_threads(), 'repeats': args.repeats, 'models': {}}
    for name, (cfg, ckpt), row in zip(names, args.pairs, rows):
        result['models'][name] = {'config': cfg, 'checkpoint': ckpt, **row}
    result['speedup'] = rows[0]['latency_ms'] / rows[1]['latency_ms']     # of the second model over the first
    if args.onnx:
        result['onnx'] = time_onnx(models, inputs[first], args)
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == '__main__':
    main()
