"""Print the coupled channel groups of the model an mmdet / mmpretrain config builds.

    python tools/analysis_tools/print_groups.py CONFIG [--shape 320 320] [--json OUT]

Every group is printed with its producers, consumers and per-channel layers, its
channel count, and whether it is prunable (or the operations that make it not).
The last line gives the fraction of conv/linear layers that are prunable and the
analysis time. Nothing is downloaded: pretrained ``init_cfg`` weights are skipped.
"""
import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), '..', '..')))


def parse_args(argv=None):
    from mmengine.config import DictAction
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('config', help='mmdet or mmpretrain config file')
    p.add_argument('--shape', type=int, nargs='+', default=None,
                   help='input height and width of the example input (default: 320 320 for '
                        'detectors; for classifiers, the size of the config\'s test pipeline, else 224 224; the '
                        'channels are those of the config\'s data preprocessor)')
    p.add_argument('--batch', type=int, default=1, help='example batch size (default: 1)')
    p.add_argument('--json', help='also write the groups as JSON to this file')
    p.add_argument('--cfg-options', nargs='+', action=DictAction, metavar='KEY=VALUE',
                   help='override config keys, as in mmdet tools (mmengine DictAction syntax)')
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)

    from mmfisher.openmmlab import analyse_model, build_from_config
    from mmfisher.openmmlab.tools_common import analysis_shape, analysis_tool_config

    cfg = analysis_tool_config(args.config, args.cfg_options)
    t0 = time.perf_counter()
    model = build_from_config(cfg)
    t_build = time.perf_counter() - t0
    chw = analysis_shape(cfg, args.shape)
    hw = chw[1:]
    graph = analyse_model(model, (args.batch,) + chw)
    print(graph.report())
    print(f'(model built in {t_build:.2f} s; input {args.batch}x{chw[0]}x{hw[0]}x{hw[1]})')
    if args.json:
        out = {'config': args.config, 'input_shape': [args.batch, *chw], 'summary': graph.summary(),
               'groups': [{'name': g.name, 'channels': g.size, 'positions_per_channel': g.positions_per_channel,
                           'prunable': g.prunable, 'reasons': g.reasons, 'producers': g.producers,
                           'consumers': g.consumers, 'per_channel': g.norms} for g in graph.groups]}
        with open(args.json, 'w') as f:
            json.dump(out, f, indent=1)
    return graph


if __name__ == '__main__':
    main()
