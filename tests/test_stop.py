"""Pruning ends at the iteration the target is reached, in iteration- and epoch-based loops, and the final
checkpoint carries the name the loop type uses (through mmengine's runner, in-process)."""
import glob
import os.path as osp

import pytest
import torch
from mmengine.runner import Runner

from helpers import demo_cfg, pruning_hook
from mmfisher.openmmlab import register_all_modules
from mmfisher.openmmlab.hooks import _StoppableLoader

HOOK = dict(interval=1, target=('flops', 0.7), channels_per_step=40)


def names(work):
    return sorted(osp.basename(p) for p in glob.glob(osp.join(str(work), '*.pth')))


def last_checkpoint(work):
    with open(osp.join(str(work), 'last_checkpoint')) as f:
        return osp.basename(f.read().strip())


def test_iteration_based_loop_stops_at_the_target_iteration(tmp_path, shapes):
    register_all_modules()
    runner = Runner.from_cfg(demo_cfg(shapes, tmp_path, 40, HOOK))
    runner.train()
    hook = pruning_hook(runner)
    assert hook.pruner.reached() and runner.iter < 40
    stop = runner.iter
    assert names(tmp_path) == sorted(['pruned_flops_0.70.pth', f'iter_{stop}.pth'])
    assert last_checkpoint(tmp_path) == f'iter_{stop}.pth'
    state = torch.load(tmp_path / f'iter_{stop}.pth', weights_only=True)
    assert state['mmfisher']['stopped'] and state['meta']['iter'] == stop


@pytest.mark.parametrize('ckpt_interval', [1, 5])
def test_epoch_based_loop_stops_mid_epoch_and_saves_an_epoch_checkpoint(tmp_path, shapes, ckpt_interval):
    """16 images, batch 2: 8 iterations an epoch; the target is reached within the first epoch. With
    interval=1 the checkpoint hook saves the (shortened) epoch itself; with 5 the pruning hook does."""
    register_all_modules()
    cfg = demo_cfg(shapes, tmp_path, 0, HOOK)
    cfg.train_cfg = dict(type='EpochBasedTrainLoop', max_epochs=3)
    cfg.train_dataloader.sampler = dict(type='DefaultSampler', shuffle=True)
    cfg.default_hooks.checkpoint = dict(type='CheckpointHook', by_epoch=True, interval=ckpt_interval)
    cfg.log_processor = dict(by_epoch=True)
    runner = Runner.from_cfg(cfg)
    runner.train()
    hook = pruning_hook(runner)
    assert hook.pruner.reached()
    assert runner.iter < 8 and runner.epoch == 1        # stopped within the first epoch
    assert names(tmp_path) == ['epoch_1.pth', 'pruned_flops_0.70.pth']
    assert last_checkpoint(tmp_path) == 'epoch_1.pth'
    assert not isinstance(runner.train_loop.dataloader, _StoppableLoader)   # the loop's own loader is back
    state = torch.load(tmp_path / 'epoch_1.pth', weights_only=True)
    assert state['meta']['iter'] == runner.iter and state['meta']['epoch'] == 1


def test_resuming_a_run_that_reached_its_target_ends_at_once(tmp_path, shapes):
    register_all_modules()
    runner = Runner.from_cfg(demo_cfg(shapes, tmp_path / 'a', 40, HOOK))
    runner.train()
    stop = runner.iter
    ckpt = tmp_path / 'a' / f'iter_{stop}.pth'
    cfg = demo_cfg(shapes, tmp_path / 'b', 40, HOOK)
    cfg.resume, cfg.load_from = True, str(ckpt)
    resumed = Runner.from_cfg(cfg)
    resumed.train()
    assert resumed.iter == stop                       # not a single further iteration
    assert torch.equal(pruning_hook(resumed).pruner.keep, pruning_hook(runner).pruner.keep)


def test_a_final_checkpoint_of_an_earlier_run_is_not_taken_for_this_one(tmp_path, shapes):
    """The stop iteration's file exists from another run: this run still saves its own final checkpoint."""
    register_all_modules()
    first = Runner.from_cfg(demo_cfg(shapes, tmp_path, 40, HOOK))
    first.train()
    stop = first.iter
    path = tmp_path / f'iter_{stop}.pth'
    path.write_bytes(b'an older file of the same name')
    (tmp_path / 'last_checkpoint').write_text('somewhere/else.pth')
    again = Runner.from_cfg(demo_cfg(shapes, tmp_path, 40, HOOK))
    again.train()
    assert again.iter == stop and last_checkpoint(tmp_path) == f'iter_{stop}.pth'
    assert torch.load(path, weights_only=True)['meta']['iter'] == stop


RESUME_HOOK = dict(interval=2, target=('flops', 0.3), channels_per_step=40)


def _first_run(tmp_path, shapes):
    cfg = demo_cfg(shapes, tmp_path / 'a', 8, RESUME_HOOK)
    cfg.default_hooks.checkpoint.interval = 4
    Runner.from_cfg(cfg).train()
    return tmp_path / 'a' / 'iter_4.pth'


def _resume(tmp_path, shapes, ckpt, **changes):
    cfg = demo_cfg(shapes, tmp_path / 'b', 8, dict(RESUME_HOOK, **changes))
    cfg.resume, cfg.load_from = True, str(ckpt)
    return Runner.from_cfg(cfg)


def test_resume_says_which_options_changed_and_records_them(tmp_path, shapes):
    register_all_modules()
    ckpt = _first_run(tmp_path, shapes)
    assert torch.load(ckpt, weights_only=True)['mmfisher']['options']['interval'] == 2
    runner = _resume(tmp_path, shapes, ckpt, interval=4, normalization='flops')
    runner.train()
    hook = pruning_hook(runner)
    # frozen_every follows the interval by default, so it changed too
    assert hook.option_changes == [{'iter': 4, 'changed': {'interval': [2, 4], 'normalization': ['memory', 'flops'],
                                                           'frozen_every': [2, 4]}}]
    state = torch.load(tmp_path / 'b' / 'iter_8.pth', weights_only=True)['mmfisher']
    assert state['options']['interval'] == 4 and state['option_changes'] == hook.option_changes


@pytest.mark.parametrize('changes,needle', [
    (dict(exclude=['backbone'], target=('flops', 0.85)), 'may not be pruned under the new options'),
    (dict(min_channels=16), 'fewer than min_channels=16'),
])
def test_resume_with_options_the_masks_break_fails_before_training(tmp_path, shapes, changes, needle):
    register_all_modules()
    ckpt = _first_run(tmp_path, shapes)
    runner = _resume(tmp_path, shapes, ckpt, **changes)
    with pytest.raises(ValueError, match=needle):
        runner.train()
    assert runner.iter == 4          # not one iteration trained
