"""Measure two models side by side: params, FLOPs, activations, latency; print the ratios.

    python tools/benchmark.py CONFIG_A CKPT_A CONFIG_B CKPT_B [--shape 640 640] [--batch 1]
                              [--repeats 30] [--warmup 5] [--device cpu] [--threads N] [--json OUT]

CKPT may be ``none`` to time the architecture with its initial weights (speed does not
depend on the weights). Both models run in the same process, in eval mode under
``no_grad``, on the same random input, in 'tensor' mode (the network without
post-processing such as NMS); their timed runs alternate (A, B, A, B, ...) so that a
noisy machine slows both alike, and the median of ``--repeats`` runs after ``--warmup``
runs is reported. FLOPs and activations come from mmengine's complexity analysis
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
    p.add_argument('config_a')
    p.add_argument('ckpt_a', help="checkpoint of model A, or 'none'")
    p.add_argument('config_b')
    p.add_argument('ckpt_b', help="checkpoint of model B, or 'none'")
    p.add_argument('--shape', type=int, nargs=2, default=(640, 640), metavar=('H', 'W'))
    p.add_argument('--batch', type=int, default=1)
    p.add_argument('--repeats', type=int, default=30)
    p.add_argument('--warmup', type=int, default=5)
    p.add_argument('--device', default='cpu')
    p.add_argument('--threads', type=int, default=None, help='torch CPU threads (default: torch default)')
    p.add_argument('--names', nargs=2, default=('A', 'B'), help='labels of the two models in the table')
    p.add_argument('--onnx', action='store_true',
                   help='also export both networks to ONNX and time them with onnxruntime (CPU)')
    p.add_argument('--json', help='also write the measurements to this JSON file')
    return p.parse_args(argv)


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
    """Export both networks and time onnxruntime sessions, alternating, like the PyTorch runs."""
    import tempfile

    import numpy as np

    from mmfisher.openmmlab.onnx_export import export_onnx, onnx_session
    times = [[], []]
    with tempfile.TemporaryDirectory() as tmp:
        sessions = []
        for i, m in enumerate(models):
            path = osp.join(tmp, f'model{i}.onnx')
            export_onnx(m, path, tuple(x.shape))
            sessions.append(onnx_session(path, args.threads or 0))
        feed = {'input': x.cpu().numpy().astype(np.float32)}
        for _ in range(args.warmup):
            for s in sessions:
                s.run(None, feed)
        for _ in range(args.repeats):
            for t, s in zip(times, sessions):
                t0 = time.perf_counter()
                s.run(None, feed)
                t.append(time.perf_counter() - t0)
    la, lb = (1000 * statistics.median(t) for t in times)
    print(f'{"onnxruntime (ms)":<22}{la:>16.1f}{lb:>16.1f}{lb / la:>10.3f}')
    print(f'onnxruntime speed-up of {args.names[1]} over {args.names[0]}: {la / lb:.2f}x')
    return {'latency_ms': [la, lb], 'speedup': la / lb}


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from mmfisher.openmmlab import register_all_modules
    from mmfisher.openmmlab.benchmarking import complexity, interleaved_latency, tensor_run
    register_all_modules()
    models = [build(args.config_a, args.ckpt_a, args.device), build(args.config_b, args.ckpt_b, args.device)]
    torch.manual_seed(0)
    x = torch.randn(args.batch, 3, *args.shape, device=args.device)
    runs = [tensor_run(m, x) for m in models]
    rows = [complexity(m, x, run) for m, run in zip(models, runs)]
    for row, t in zip(rows, interleaved_latency(runs, args.repeats, args.warmup, args.device)):
        row.update(t)
        row['fps'] = args.batch * 1000 / row['latency_ms']
    a, b = rows
    print(f'input {args.batch}x3x{args.shape[0]}x{args.shape[1]} on {args.device} '
          f'({torch.get_num_threads()} threads), median of {args.repeats} alternating runs after {args.warmup} '
          f'warm-up; network in tensor mode (no post-processing)')
    print(f'{"":<22}{args.names[0]:>16}{args.names[1]:>16}{"B/A":>10}')
    print(f'{"params (M)":<22}{a["params"] / 1e6:>16.2f}{b["params"] / 1e6:>16.2f}{b["params"] / a["params"]:>10.3f}')
    print(f'{"FLOPs (G)":<22}{a["flops"] / 1e9:>16.2f}{b["flops"] / 1e9:>16.2f}{b["flops"] / a["flops"]:>10.3f}')
    print(f'{"activations (M)":<22}{a["activations"] / 1e6:>16.2f}{b["activations"] / 1e6:>16.2f}'
          f'{b["activations"] / a["activations"]:>10.3f}')
    print(f'{"latency (ms)":<22}{a["latency_ms"]:>16.1f}{b["latency_ms"]:>16.1f}'
          f'{b["latency_ms"] / a["latency_ms"]:>10.3f}')
    print(f'{"FPS":<22}{a["fps"]:>16.2f}{b["fps"]:>16.2f}{b["fps"] / a["fps"]:>10.3f}')
    print(f'speed-up of {args.names[1]} over {args.names[0]}: {a["latency_ms"] / b["latency_ms"]:.2f}x')
    if a['source'] != 'mmengine' or b['source'] != 'mmengine':
        print(f'FLOPs/activations source: A {a["source"]}; B {b["source"]}')
    result = {'input': [args.batch, 3, *args.shape], 'device': args.device, 'threads': torch.get_num_threads(),
              'repeats': args.repeats, 'models': {}}
    for name, cfg, ckpt, row in zip(args.names, (args.config_a, args.config_b), (args.ckpt_a, args.ckpt_b), rows):
        result['models'][name] = {'config': cfg, 'checkpoint': ckpt,
                                  **row}
    result['speedup'] = a['latency_ms'] / b['latency_ms']
    if args.onnx:
        result['onnx'] = time_onnx(models, x, args)
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == '__main__':
    main()
