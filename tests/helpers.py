"""Shared helpers for the specification tests (no download, random init)."""
import copy
import os

import torch
import torch.nn as nn

from mmfisher.core import ConsumerInputs, shrink
from mmfisher.core.atoms import flat_tensors
from mmfisher.core.uniform import random_keep  # noqa: F401  (used by the tests)
from mmfisher.openmmlab.synthetic import randomise_norms  # noqa: F401  (used by the tests)


def config_path(package: str, rel: str) -> str:
    mod = __import__(package)
    return os.path.join(os.path.dirname(mod.__file__), '.mim', 'configs', rel)


def masked_and_shrunk(model, graph, keep, run):
    """Outputs of ``run(model)`` with masks installed and ``run(compact)``; returns (ref, out, compact).
    The compact run replays the masked run's top-k / sort / NMS choices (RPN proposals whose scores
    tie to 1e-7 would otherwise make the outputs incomparable): see mmfisher.openmmlab.decisions."""
    from mmfisher.openmmlab.decisions import SameDecisions
    model.eval()
    masks = ConsumerInputs(model, graph)
    masks.set_keep(keep)
    masks.attach()
    with torch.no_grad(), SameDecisions() as decisions:
        ref = flat_tensors(run(model), [], -8)
    masks.detach()
    compact = shrink(copy.deepcopy(model), graph, keep)
    with torch.no_grad(), SameDecisions(decisions):
        out = flat_tensors(run(compact), [], -8)
    return ref, out, compact


def max_rel_err(ref, out) -> float:
    assert len(ref) == len(out) and ref
    return max(float((a - b).abs().max() / (a.abs().max() + 1e-6)) for a, b in zip(ref, out))


DEMO = os.path.abspath(os.path.join(os.path.dirname(__file__), '..', 'configs', 'demo', 'retinanet_r18_shapes.py'))


def demo_cfg(data_root, work_dir, iters, hook, **overrides):
    """The demo RetinaNet on generated data for an in-process runner: batch 2, no workers, no validation,
    an iteration-based loop of ``iters``, one checkpoint at the end, the pruning ``hook`` options."""
    from mmengine.config import Config
    cfg = Config.fromfile(DEMO)
    cfg.work_dir = str(work_dir)
    cfg.load_from = None
    for key in ('train_dataloader', 'val_dataloader', 'test_dataloader'):
        cfg[key].update(batch_size=2, num_workers=0, persistent_workers=False)
        cfg[key].dataset.data_root = data_root
    cfg.val_cfg = cfg.val_dataloader = cfg.val_evaluator = None
    cfg.test_cfg = cfg.test_dataloader = cfg.test_evaluator = None
    cfg.train_cfg = dict(type='IterBasedTrainLoop', max_iters=iters)
    cfg.param_scheduler = None
    cfg.default_hooks.checkpoint = dict(type='CheckpointHook', by_epoch=False, interval=iters)
    cfg.default_hooks.logger = dict(type='LoggerHook', interval=1)
    cfg.custom_hooks = [dict(type='SafeCheckpointHook'), dict(type='FisherPruningHook', **hook)]
    cfg.merge_from_dict(overrides)
    return cfg


def pruning_hook(runner):
    return next(h for h in runner.hooks if type(h).__name__ == 'FisherPruningHook')
