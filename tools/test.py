"""Test (evaluate) a model from a config and a checkpoint, as mmdet's tools/test.py does.

    python tools/test.py CONFIG CHECKPOINT [--work-dir DIR] [--out FILE.pkl]
                         [--cfg-options KEY=VALUE ...] [--launcher {none,pytorch,slurm,mpi}]

Works for pruned models (``model = dict(type='PrunedModel', ...)``) like for any
other. The checkpoint is loaded with torch's weights_only=True check.
"""
import argparse
import os.path as osp
import sys

sys.path.insert(0, osp.abspath(osp.join(osp.dirname(__file__), '..')))


def parse_args(argv=None):
    from mmfisher.openmmlab.tools_common import parse_tool_args
    p = argparse.ArgumentParser(description='Test (and eval) a model')
    p.add_argument('config', help='test config file path')
    p.add_argument('checkpoint', help='checkpoint file')
    p.add_argument('--work-dir', help='the directory to save the file containing evaluation metrics')
    p.add_argument('--out', type=str, help='dump predictions to a pickle file for offline evaluation')
    p.add_argument('--metrics-json', help='also write the evaluation metrics to this JSON file')
    return parse_tool_args(p, argv)


def main(argv=None):
    args = parse_args(argv)
    from mmfisher.openmmlab.tools_common import build_runner, load_tool_config
    if not osp.isfile(args.checkpoint):
        sys.exit(f'error: checkpoint {args.checkpoint!r} does not exist')
    cfg = load_tool_config(args.config, args.cfg_options, args.launcher, args.work_dir)
    cfg.load_from = args.checkpoint
    if args.out is not None:
        assert args.out.endswith(('.pkl', '.pickle')), 'The dump file must be a pkl file.'
        evaluators = cfg.test_evaluator if isinstance(cfg.test_evaluator, list) else [cfg.test_evaluator]
        evaluators.append(dict(type='DumpResults', out_file_path=args.out))
        cfg.test_evaluator = evaluators
    metrics = build_runner(cfg).test()
    if args.metrics_json:
        import json
        with open(args.metrics_json, 'w') as f:
            json.dump({k: float(v) if isinstance(v, (int, float)) else str(v) for k, v in metrics.items()}, f,
                      indent=1)
    return metrics


if __name__ == '__main__':
    main()
