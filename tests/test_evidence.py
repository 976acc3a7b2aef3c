"""No pruning decision without evidence, through mmengine's runner on generated data.

* a diverged run (lr=1e6: the Fisher of every later pass is NaN/inf) drops those passes whole and postpones
  its steps, instead of removing channels whose Fisher was zeroed, in index order;
* images without boxes give the box-regression branch no gradient at all: its channels have no evidence
  and are not removed (before, they went first, in index order).
"""
import json
import os.path as osp
import shutil

import torch
from mmengine.runner import Runner

from mmfisher.openmmlab import register_all_modules

from helpers import demo_cfg, pruning_hook


def test_a_diverged_interval_postpones_the_step_instead_of_pruning_by_index(tmp_path, shapes, recwarn):
    register_all_modules()
    cfg = demo_cfg(shapes, tmp_path, 8, dict(interval=2, target=('flops', 0.3), channels_per_step=20),
                   optim_wrapper=dict(optimizer=dict(lr=1e6), clip_grad=None))
    runner = Runner.from_cfg(cfg)
    runner.train()
    pruner = pruning_hook(runner).pruner
    # the first interval saw the original weights; every later pass diverged
    assert pruner.postponed >= 2
    assert all(h['importance'] > 0 and torch.isfinite(torch.tensor(h['importance'])) for h in pruner.history)
    assert len(pruner.history) <= 20
    messages = [str(w.message) for w in recwarn]
    assert any('whole pass is dropped' in m for m in messages)
    assert any('pruning step postponed: no pass with a finite Fisher' in m for m in messages)
    state = torch.load(tmp_path / 'iter_8.pth', weights_only=True)['mmfisher']['pruner']
    assert state['postponed'] == pruner.postponed


def test_images_without_boxes_leave_the_regression_branch_alone(tmp_path, shapes):
    register_all_modules()
    empty = str(tmp_path / 'empty') + '/'
    shutil.copytree(shapes, empty)
    ann = osp.join(empty, 'annotations', 'instances_train2017.json')
    with open(ann) as f:
        coco = json.load(f)
    coco['annotations'] = []
    with open(ann, 'w') as f:
        json.dump(coco, f)
    cfg = demo_cfg(empty, tmp_path / 'work', 6, dict(interval=2, target=('flops', 0.3), channels_per_step=40))
    cfg.train_dataloader.dataset.filter_cfg = dict(filter_empty_gt=False)
    runner = Runner.from_cfg(cfg)
    runner.train()
    hook = pruning_hook(runner)
    pruner, graph = hook.pruner, hook.pruner.graph
    assert len(pruner.history) == 120
    reg = [g.name for g in graph.groups if g.name.startswith('bbox_head.reg_convs')]
    assert len(reg) == 2
    assert not [h for h in pruner.history if h['group'] in reg]
    # dead channels (Fisher 0 with a gradient signal at their layer) may go, but no group loses its
    # channels in index order
    for g in graph.groups:
        lost = [h['index'] for h in pruner.history if h['group'] == g.name]
        if len(lost) >= 5:
            assert lost != list(range(len(lost))), g.name
