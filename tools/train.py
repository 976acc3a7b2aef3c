"""Train (and prune) a model from an mmdet / mmpretrain config, as mmdet's tools/train.py does.

    python tools/train.py CONFIG [--work-dir DIR] [--resume [CHECKPOINT]] [--amp] [--auto-scale-lr]
                          [--cfg-options KEY=VALUE ...] [--launcher {none,pytorch,slurm,mpi}]

mmfisher's modules are registered (FisherPruningHook, SafeCheckpointHook,
type='PrunedModel'), and a SafeCheckpointHook is added when the config has none, so
the checkpoints of the run load under torch's weights_only=True (--resume, load_from).
"""
import argparse
import os.path as osp
import sys

sys.path.insert(0, osp.abspath(osp.join(osp.dirname(__file__), '..')))


def parse_args(argv=None):
    from mmfisher.openmmlab.tools_common import parse_tool_args
    p = argparse.ArgumentParser(description='Train a detector or classifier (with mmfisher pruning hooks)')
    p.add_argument('config', help='train config file path')
    p.add_argument('--work-dir', help='the dir to save logs and models')
    p.add_argument('--amp', action='store_true', default=False, help='enable automatic-mixed-precision training')
    p.add_argument('--auto-scale-lr', action='store_true', help='enable automatically scaling LR')
    p.add_argument('--resume', nargs='?', type=str, const='auto',
                   help='resume from the given checkpoint, or from the latest one in the work dir if none is given')
    return parse_tool_args(p, argv)


def ensure_safe_checkpoints(cfg) -> None:
    hooks = list(cfg.get('custom_hooks', None) or [])
    if not any(h.get('type') in ('SafeCheckpointHook', 'mmfisher.SafeCheckpointHook') for h in hooks):
        hooks.append(dict(type='SafeCheckpointHook'))
    cfg.custom_hooks = hooks


def main(argv=None):
    args = parse_args(argv)
    from mmfisher.openmmlab.tools_common import build_runner, load_tool_config
    cfg = load_tool_config(args.config, args.cfg_options, args.launcher, args.work_dir)
    if args.amp:
        wrapper = cfg.optim_wrapper.get('type', 'OptimWrapper')
        if wrapper == 'AmpOptimWrapper':
            print('AMP training is already enabled in your config.')
        else:
            assert wrapper == 'OptimWrapper', f'`--amp` is only supported with OptimWrapper, not {wrapper}'
            cfg.optim_wrapper.type = 'AmpOptimWrapper'
            cfg.optim_wrapper.loss_scale = 'dynamic'
    if args.auto_scale_lr:
        if 'auto_scale_lr' in cfg and 'enable' in cfg.auto_scale_lr and 'base_batch_size' in cfg.auto_scale_lr:
            cfg.auto_scale_lr.enable = True
        else:
            raise RuntimeError('Can not find "auto_scale_lr" or "auto_scale_lr.enable" or '
                               '"auto_scale_lr.base_batch_size" in your configuration file.')
    if args.resume == 'auto':
        cfg.resume = True
        cfg.load_from = None
    elif args.resume is not None:
        if not osp.isfile(args.resume):
            sys.exit(f'error: checkpoint {args.resume!r} to resume from does not exist')
        cfg.resume = True
        cfg.load_from = args.resume
    ensure_safe_checkpoints(cfg)
    build_runner(cfg).train()


if __name__ == '__main__':
    main()
