"""What mmfisher's tools/train.py and tools/test.py share: loading the config, CPU-only DDP."""
from __future__ import annotations

import os.path as osp
import sys
from typing import Optional, Tuple


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


def package_config(config: str, package: str = 'mmdet') -> str:
    """``config`` if it is a file, else the same path in ``package``'s own config tree (``.mim/configs``):
    what the benchmarks accept, ``retinanet/retinanet_r50_fpn_1x_coco.py`` for mmdet's RetinaNet."""
    if osp.isfile(config):
        return config
    return osp.join(osp.dirname(__import__(package).__file__), '.mim', 'configs', config)


def uniform_channel_spec(cfg, width: Optional[float] = None, target: Optional[Tuple[str, float]] = None,
                         shape=None):
    """The channel spec of the uniformly narrower version of ``cfg``'s model: every prunable group keeps
    its first ``round(width * size)`` channels, or, with ``target=(resource, ratio)``, the width whose
    FLOPs / memory / params ratio is nearest ``ratio`` (within 2%; ValueError if none is). Costs at
    ``shape`` (see :func:`analysis_shape`). Returns ``(spec, width, ratios)``: the spec as
    :func:`mmfisher.core.make_spec` writes it and every resource's ratio to the original."""
    from ..core import make_spec
    from ..core.cost import CostModel
    from ..core.uniform import uniform_keep, uniform_keep_for
    from .analysis import analyse_model, build_from_config
    if (width is None) == (target is None):
        raise ValueError('give either a width or a target')
    model = build_from_config(cfg)
    graph = analyse_model(model, (1,) + tuple(analysis_shape(cfg, shape)))
    cost = CostModel(model, graph)
    if width is not None:
        keep = uniform_keep(graph, width)
    else:
        width, keep, _ = uniform_keep_for(graph, cost, target[0], float(target[1]))
    return make_spec(graph, keep), width, cost.ratios(keep)


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


def input_channels(cfg) -> int:
    """The image channels the config's model reads: as many as its data preprocessor normalises (the length
    of its ``mean``: 1 for LeNet on MNIST), else 3."""
    model = cfg.get('model') or {}
    dp = model.get('data_preprocessor') if hasattr(model, 'get') else None
    dp = dp or cfg.get('data_preprocessor') or {}
    mean = dp.get('mean') if hasattr(dp, 'get') else None
    return len(mean) if isinstance(mean, (list, tuple)) and mean else 3


# the transforms of a classifier's test pipeline that set the image's size, and the key that holds it
_SIZE_KEYS = {'CenterCrop': 'crop_size', 'RandomCrop': 'crop_size', 'RandomResizedCrop': 'scale',
              'Resize': 'scale', 'ResizeEdge': 'scale'}


def pipeline_size(cfg) -> Optional[Tuple[int, int]]:
    """``(H, W)`` of the images the config's own test (else val, else train) pipeline hands a classifier: the
    size its last resizing or cropping transform sets (swin-v2 256, LeNet 32, CSRA 448), or None when the
    pipeline sets none."""
    for key in ('test_dataloader', 'val_dataloader', 'train_dataloader'):
        loader = cfg.get(key) or {}
        dataset = loader.get('dataset') or {} if hasattr(loader, 'get') else {}
        pipeline = dataset.get('pipeline') if hasattr(dataset, 'get') else None
        if not pipeline:
            continue
        size = None
        for t in pipeline:
            kind = str(t.get('type', '')).split('.')[-1] if hasattr(t, 'get') else ''
            value = t.get(_SIZE_KEYS[kind]) if kind in _SIZE_KEYS else None
            if isinstance(value, int):
                size = (value, value)
            elif isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, int) for v in value):
                size = (value[1], value[0]) if kind in ('Resize', 'ResizeEdge') else tuple(value)  # (w, h) scales
        if size is not None:
            return size
    return None


def analysis_shape(cfg, shape) -> tuple:
    """``(C, H, W)`` of the analysis input: ``H, W`` from a ``--shape H [W]`` argument, else, for classifiers,
    the size the config's own test pipeline makes (:func:`pipeline_size`; 224x224 if it sets none), and
    320x320 for detectors; ``C`` from the config's data preprocessor (:func:`input_channels`)."""
    from .analysis import default_scope_of
    if shape is None:
        classifier = default_scope_of(cfg) == 'mmpretrain'
        hw = (pipeline_size(cfg) or (224, 224)) if classifier else (320, 320)
    else:
        hw = tuple(shape[:2]) * (2 if len(shape) == 1 else 1)
    return (input_channels(cfg),) + tuple(int(v) for v in hw)
