"""What mmfisher's tools/train.py and tools/test.py share: loading the config, CPU-only DDP."""
from __future__ import annotations

import os.path as osp
import sys


def parse_tool_args(parser, argv=None):
    """Add the options mmdet's train and test tools share (``--cfg-options``, ``--launcher``,
    ``--local-rank``), parse, and export ``LOCAL_RANK`` as the launchers expect."""
    import os

    from mmengine.config import DictAction
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help='override settings in the config, key=value pairs (xxx=yyy format)')
    parser.add_argument('--launcher', choices=['none', 'pytorch', 'slurm', 'mpi'], default='none',
                        help='job launcher')
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)
    args = parser.parse_args(argv)
    os.environ.setdefault('LOCAL_RANK', str(args.local_rank))
    return args


def load_tool_config(config: str, cfg_options, launcher: str, work_dir):
    """The config as mmdet's tools prepare it, with mmfisher's modules registered."""
    from mmengine.config import Config

    from .analysis import default_scope_of, register_all_modules
    if not osp.isfile(config):
        sys.exit(f'error: config file {config!r} does not exist')
    register_all_modules()
    cfg = Config.fromfile(config)
    cfg.launcher = launcher
    if cfg_options is not None:
        cfg.merge_from_dict(cfg_options)
    cfg.setdefault('default_scope', default_scope_of(cfg))
    if work_dir is not None:
        cfg.work_dir = work_dir
    elif cfg.get('work_dir', None) is None:
        cfg.work_dir = osp.join('./work_dirs', osp.splitext(osp.basename(config))[0])
    return cfg


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


def build_runner(cfg):
    from mmengine.registry import RUNNERS
    from mmengine.runner import Runner
    setup_cpu_distributed(cfg)
    return Runner.from_cfg(cfg) if 'runner_type' not in cfg else RUNNERS.build(cfg)


def analysis_tool_config(config: str, cfg_options):
    """The config an analysis tool (print_groups, uniform_spec) reads, with ``--cfg-options`` merged;
    exits with a clear message if the file does not exist."""
    from mmengine.config import Config
    if not osp.isfile(config):
        sys.exit(f'error: config file {config!r} does not exist')
    cfg = Config.fromfile(config)
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    return cfg


def analysis_shape(cfg, shape) -> tuple:
    """``(H, W)`` from a ``--shape H [W]`` argument, else 224x224 for classifiers and 320x320 for detectors."""
    from .analysis import default_scope_of
    if shape is None:
        return (224, 224) if default_scope_of(cfg) == 'mmpretrain' else (320, 320)
    return tuple(shape[:2]) * (2 if len(shape) == 1 else 1)
