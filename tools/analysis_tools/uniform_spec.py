"""Write the channel spec of a uniformly narrower model: the baseline a pruned model must beat.

    python tools/analysis_tools/uniform_spec.py CONFIG (--width 0.7 | --target flops 0.5) --out SPEC.json
                                                [--shape H W] [--cfg-options KEY=VALUE ...]

Every prunable group of the config's model keeps its first ``round(width * size)`` channels
(every coupled width scales by the same factor); ``--target`` finds the width whose FLOPs /
memory / params ratio is nearest (within 2%). Train it from scratch with an ordinary config::

    model = dict(_delete_=True, type='PrunedModel', architecture=_base_.model, channel_spec='SPEC.json')
    # no load_from: the runner initialises the narrow layers with their own fan-in

An existing ``--out`` file is never overwritten.
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), '..', '..')))


def parse_args(argv=None):
    from mmengine.config import DictAction
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('config', help='mmdet or mmpretrain config file')
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument('--width', type=float, help='the factor every prunable width is scaled by, in (0, 1]')
    how.add_argument('--target', nargs=2, metavar=('RESOURCE', 'RATIO'),
                     help='flops, memory or params, and the ratio of the original to keep')
    p.add_argument('--out', required=True, help='the channel spec JSON to write (must not exist)')
    p.add_argument('--shape', type=int, nargs='+', default=None,
                   help='input height and width the cost is measured at (default: 320 320 for detectors; for '
                        'classifiers, the size of the config\'s test pipeline, else 224 224; the channels are '
                        'those of the config\'s data preprocessor)')
    p.add_argument('--cfg-options', nargs='+', action=DictAction, metavar='KEY=VALUE',
                   help='override config keys, as in mmdet tools (mmengine DictAction syntax)')
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    from mmfisher.openmmlab.tools_common import analysis_shape, analysis_tool_config, uniform_channel_spec

    if os.path.exists(args.out):
        sys.exit(f'error: {args.out!r} exists; give another --out (nothing is overwritten)')
    cfg = analysis_tool_config(args.config, args.cfg_options)
    hw = analysis_shape(cfg, args.shape)[1:]
    try:
        spec, width, ratios = uniform_channel_spec(cfg, width=args.width, target=args.target, shape=args.shape)
    except ValueError as e:
        sys.exit(f'error: {e}')
    with open(args.out, 'x') as f:
        json.dump(spec, f)
    print(f'width {width:.4f}: ' + ', '.join(f'{k} {v:.4f}' for k, v in ratios.items()) +
          f' of the original at {hw[0]}x{hw[1]}; wrote {args.out}')
    return width, ratios


if __name__ == '__main__':
    main()
