"""Every shipped prune config prunes its model for a few iterations, and its fine-tune config trains the
compact model, on generated data (data roots overridden, load_from cleared: nothing is downloaded)."""
import glob
import os.path as osp

import pytest
import torch

ROOT = osp.abspath(osp.join(osp.dirname(__file__), '..'))
PRUNE_CONFIGS = sorted(glob.glob(osp.join(ROOT, 'configs', '*', '*fisher-prune-*.py')))


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    from mmfisher.datasets import make_coco_shapes, make_imagenet_shapes
    base = tmp_path_factory.mktemp('data')
    coco = str(base / 'coco') + '/'
    imagenet = str(base / 'imagenet') + '/'
    make_coco_shapes(coco, num_train=8, num_val=2, size=128)
    make_imagenet_shapes(imagenet, num_train=8, num_val=2, size=64)
    return {'mmdet': coco, 'mmpretrain': imagenet}


def _set_pipeline_scale(pipeline, det: bool):
    for step in pipeline:
        if step['type'] in ('Resize', 'RandomResize') and det:
            step['scale'] = (256, 256)
        elif step['type'] in ('RandomResizedCrop', 'CenterCrop') and not det:
            step.pop('crop_size', None)
            step['scale' if step['type'] == 'RandomResizedCrop' else 'crop_size'] = 56
        elif step['type'] == 'ResizeEdge':
            step['scale'] = 64


def _small(cfg, data, work_dir, name):
    """Generated data, small images, batch 2, no workers, no validation, no download."""
    det = cfg.default_scope == 'mmdet'
    root = data['mmdet' if det else 'mmpretrain']
    cfg.work_dir = str(work_dir)
    cfg.experiment_name = name
    cfg.load_from = None
    for key in ('train_dataloader', 'val_dataloader', 'test_dataloader'):
        loader = cfg[key]
        loader.batch_size = 2
        loader.num_workers = 0
        loader.persistent_workers = False
        loader.dataset.data_root = root
        _set_pipeline_scale(loader.dataset.pipeline, det)
    if det:
        cfg.val_evaluator.ann_file = root + 'annotations/instances_val2017.json'
        cfg.test_evaluator = cfg.val_evaluator
        cfg.train_dataloader.pop('batch_sampler', None)
    cfg.train_cfg = dict(type='EpochBasedTrainLoop', max_epochs=1, val_interval=100)
    cfg.val_cfg = cfg.val_dataloader = cfg.val_evaluator = None   # the 80-class metrics need COCO itself
    cfg.default_hooks.checkpoint = dict(type='CheckpointHook', interval=1)
    cfg.default_hooks.logger = dict(type='LoggerHook', interval=1)
    cfg.env_cfg = dict(cudnn_benchmark=False, mp_cfg=dict(mp_start_method='fork'), dist_cfg=dict(backend='gloo'))
    return cfg


@pytest.mark.parametrize('prune_path', PRUNE_CONFIGS, ids=[osp.basename(p)[:-3] for p in PRUNE_CONFIGS])
def test_prune_then_finetune_config(prune_path, data, tmp_path):
    from mmengine.config import Config
    from mmengine.runner import Runner

    from mmfisher.openmmlab import register_all_modules
    register_all_modules()
    ft_path = glob.glob(osp.join(osp.dirname(prune_path), '*fisher-pruned-flops50*'))[0]

    cfg = Config.fromfile(prune_path)
    assert cfg.load_from.startswith('https://download.openmmlab.com/')
    hook = [h for h in cfg.custom_hooks if h['type'] == 'FisherPruningHook'][0]
    assert hook['target'] == ('flops', 0.5) and hook['normalization'] == 'memory'
    assert hook['interval'] in (10, 25)
    if cfg.default_scope == 'mmdet':
        # the paper's recipe: nothing frozen while pruning; an iteration-based loop that ends at the target
        assert cfg.model.backbone.frozen_stages == -1
        assert cfg.train_cfg.type == 'IterBasedTrainLoop' and cfg.log_processor.by_epoch is False
        assert cfg.default_hooks.checkpoint.by_epoch is False
    name = osp.basename(prune_path)[:-3]
    cfg = _small(cfg, data, tmp_path / 'prune', name)
    hook.update(interval=1, channels_per_step=1000, target=('flops', 0.9), save_ratios=[0.95])
    runner = Runner.from_cfg(cfg)
    runner.train()
    pruned = tmp_path / 'prune' / 'pruned_flops_0.90.pth'
    assert pruned.is_file() and (tmp_path / 'prune' / 'pruned_flops_0.95.pth').is_file()
    meta = torch.load(pruned, weights_only=True)['meta']
    assert meta['mmfisher']['ratios']['flops'] <= 0.9

    ft = Config.fromfile(ft_path)
    assert ft.model.type == 'PrunedModel' and ft.load_from == ft.model.channel_spec
    arch, pruned_model = ft.model.architecture, Config.fromfile(prune_path).model
    for m in (arch, pruned_model):   # the prune config skips the ImageNet init its load_from overrides
        m.backbone.pop('init_cfg', None)
    assert arch == pruned_model
    if ft.default_scope == 'mmdet':
        assert arch.backbone.frozen_stages == -1
    ft = _small(ft, data, tmp_path / 'finetune', name + '_ft')
    ft.model.channel_spec = str(pruned)
    ft.load_from = str(pruned)
    runner = Runner.from_cfg(ft)
    runner.train()
    ckpt = torch.load(tmp_path / 'finetune' / 'epoch_1.pth', weights_only=True)
    compact = torch.load(pruned, weights_only=True)['state_dict']
    assert {k: v.shape for k, v in ckpt['state_dict'].items()} == {k: v.shape for k, v in compact.items()}
