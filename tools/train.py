"""Train (and prune) a model from an mmdet / mmpretrain config, as mmdet's tools/train.py does.

    python tools/train.py CONFIG [--work-dir DIR] [--resume [CHECKPOINT]] [--amp] [--auto-scale-lr]
                          [--cfg-options KEY=VALUE ...] [--launcher {none,pytorch,slurm,mpi}]

mmfisher's modules are registered (FisherPruningHook, SafeCheckpointHook,
type='PrunedModel'), and a SafeCheckpointHook is added when the config has none, so
the checkpoints of the run load under torch's weights_only=True (--resume, load_from).
"""
import argparse
import os
import os.path as osp
import sys

sys.path.insert(0, osp.abspath(osp.join(osp.dirname(__file__), '..')))


def parse_args(argv=None):
    from mmengine.config import DictAction
    p = argparse.ArgumentParser(description='Train a detector or classifier (with mmfisher pruning hooks)')
    p.add_argument('config', help='train config file path')
    p.add_argument('--work-dir', help='the dir to save logs and models')
    p.add_argument('--amp', action='store_true', default=False, help='enable automatic-mixed-precision training')
    p.add_argument('--auto-scale-lr', action='store_true', help='enable automatically scaling LR')
    p.add_argument('--resume', nargs='?', type=str, const='auto',
                   help='resume from the given checkpoint, or from the latest one in the work dir if none is given')
    p.add_argument('--cfg-options', nargs='+', action=DictAction,
                   help='override settings in the config, key=value pairs (xxx=yyy format)')
    p.add_argument('--launcher', choices=['none', 'pytorch', 'slurm', 'mpi'], default='none', help='job launcher')
    p.add_argument('--local_rank', '--local-rank', type=int, default=0)
    args = p.parse_args(argv)
    if 'LOCAL_RANK' not in os.environ:
        os.environ['LOCAL_RANK'] = str(args.local_rank)
    return args


def ensure_safe_checkpoints(cfg) -> None:
    hooks = list(cfg.get('custom_hooks', None) or [])
    if not any(h.get('type') in ('SafeCheckpointHook', 'mmfisher.SafeCheckpointHook') for h in hooks):
        hooks.append(dict(type='SafeCheckpointHook'))
    cfg.custom_hooks = hooks


def setup_cpu_distributed(cfg) -> None:
    """mmengine 0.10's pytorch launcher calls torch.cuda.set_device, which a CPU build of torch lacks:
    on a machine without CUDA, join the process group with gloo here (the runner then skips its own
    init) and let DDP wrap a CPU module (device_ids=None)."""
    import torch
    import torch.distributed as dist
    if cfg.launcher != 'pytorch' or torch.cuda.is_available() or dist.is_initialized():
        return
    dist.init_process_group(backend='gloo')
    cfg.setdefault('env_cfg', {}).setdefault('dist_cfg', {})['backend'] = 'gloo'
    wrapper = cfg.get('model_wrapper_cfg', None) or dict(type='MMDistributedDataParallel')
    wrapper['device_ids'] = None
    cfg.model_wrapper_cfg = wrapper


def main(argv=None):
    args = parse_args(argv)
    from mmengine.config import Config
    from mmengine.registry import RUNNERS
    from mmengine.runner import Runner

    from mmfisher.openmmlab import register_all_modules
    from mmfisher.openmmlab.analysis import default_scope_of

    if not osp.isfile(args.config):
        sys.exit(f'error: config file {args.config!r} does not exist')
    register_all_modules()
    cfg = Config.fromfile(args.config)
    cfg.launcher = args.launcher
    if args.cfg_options is not None:
        cfg.merge_from_dict(args.cfg_options)
    cfg.setdefault('default_scope', default_scope_of(cfg))
    if args.work_dir is not None:
        cfg.work_dir = args.work_dir
    elif cfg.get('work_dir', None) is None:
        cfg.work_dir = osp.join('./work_dirs', osp.splitext(osp.basename(args.config))[0])
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
    setup_cpu_distributed(cfg)
    runner = Runner.from_cfg(cfg) if 'runner_type' not in cfg else RUNNERS.build(cfg)
    runner.train()


if __name__ == '__main__':
    main()
