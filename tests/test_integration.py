"""A user's whole interaction, through the real tools and mmengine's runner, on generated data:
prune with the hook, resume, fine-tune the compact model and test it."""
import os
import os.path as osp
import subprocess
import sys

import pytest
import torch

ROOT = osp.abspath(osp.join(osp.dirname(__file__), '..'))
DEMO = osp.join(ROOT, 'configs', 'demo', 'retinanet_r18_shapes.py')


def write_config(path, base, data_root, body=''):
    """A config on top of ``base`` that reads the generated data with small CPU-friendly loaders."""
    text = f'''_base_ = [{base!r}]
_root = {data_root!r}
train_dataloader = dict(batch_size=2, num_workers=0, persistent_workers=False, dataset=dict(data_root=_root))
val_dataloader = dict(batch_size=2, num_workers=0, persistent_workers=False, dataset=dict(data_root=_root))
test_dataloader = val_dataloader
val_evaluator = dict(ann_file=_root + 'annotations/instances_val2017.json')
test_evaluator = val_evaluator
load_from = None
{body}
'''
    with open(path, 'w') as f:
        f.write(text)
    return str(path)


def run(args, timeout=600, path=()):
    """``python args...`` from the repository root; ``path``: more directories for PYTHONPATH."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, *map(str, path), os.environ.get('PYTHONPATH', '')]))
    res = subprocess.run([sys.executable] + args, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
    return res


def ok(res):
    assert res.returncode == 0, (res.stdout[-3000:] + '\n' + res.stderr[-5000:])
    return res.stdout + res.stderr


PRUNE = '''
model = dict(test_cfg=dict(score_thr=0.0))   # a barely trained model still predicts boxes to evaluate
train_cfg = dict(max_iters={iters}, val_interval=1000)
default_hooks = dict(checkpoint=dict(interval=4, max_keep_ckpts=10))
custom_hooks = [dict(type='SafeCheckpointHook'),
                dict(type='FisherPruningHook', interval={interval}, target=('flops', {target}),
                     channels_per_step={per_step}, save_ratios={save_ratios})]
'''


SIGKILL_HOOK = '''
import os, signal
from mmengine.hooks import Hook
from mmengine.registry import HOOKS


@HOOKS.register_module()
class SigkillAfter(Hook):
    """Kill this process, as the OOM killer or a pre-empted node would: no handler, no cleanup."""

    def __init__(self, iteration):
        self.iteration = iteration

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        if runner.iter + 1 == self.iteration:
            os.kill(os.getpid(), signal.SIGKILL)
'''


def test_a_run_killed_mid_pruning_and_resumed_ends_like_an_unbroken_one(tmp_path, shapes):
    cfg = write_config(tmp_path / 'prune.py', DEMO, shapes,
                       PRUNE.format(iters=12, interval=2, target=0.3, per_step=20, save_ratios=[]))
    (tmp_path / 'sigkill_hook.py').write_text(SIGKILL_HOOK)
    killed_cfg = tmp_path / 'killed.py'
    killed_cfg.write_text(f"""_base_ = [{cfg!r}]
custom_imports = dict(imports=['sigkill_hook'], allow_failed_imports=False)
custom_hooks = _base_.custom_hooks + [dict(type='SigkillAfter', iteration=7)]
""")
    full, killed = tmp_path / 'full', tmp_path / 'killed'
    ok(run(['tools/train.py', cfg, '--work-dir', str(full)]))
    res = run(['tools/train.py', str(killed_cfg), '--work-dir', str(killed)], path=[tmp_path])
    assert res.returncode == -9, res.stderr[-3000:]       # SIGKILL after iter 7, last checkpoint iter 4
    assert open(killed / 'last_checkpoint').read().strip().endswith('iter_4.pth')
    assert not (killed / 'iter_8.pth').exists()
    # the stock mechanism: --resume without a path takes the work dir's last checkpoint
    out = ok(run(['tools/train.py', cfg, '--work-dir', str(killed), '--resume']))
    assert 'resumed pruning state: 40 channels removed' in out
    a = torch.load(full / 'iter_12.pth', weights_only=True)
    b = torch.load(killed / 'iter_12.pth', weights_only=True)
    pa, pb = a['mmfisher']['pruner'], b['mmfisher']['pruner']
    assert len(pa['history']) == 120
    assert torch.equal(pa['keep'], pb['keep'])
    assert pa['history'] == pb['history']
    for k in a['state_dict']:
        assert torch.equal(a['state_dict'][k], b['state_dict'][k]), k


def test_prune_to_target_then_finetune_and_test_the_compact_model(tmp_path, shapes):
    # with gradient accumulation and clipping, as users configure them
    cfg = write_config(tmp_path / 'prune.py', DEMO, shapes,
                       PRUNE.format(iters=60, interval=1, target=0.7, per_step=40, save_ratios=[0.85]) +
                       'optim_wrapper = dict(accumulative_counts=2, clip_grad=dict(max_norm=5.0))\n')
    work = tmp_path / 'prune'
    work.mkdir()
    (work / 'pruned_flops_0.85.pth').write_text('a file of the user that must survive')
    out = ok(run(['tools/train.py', cfg, '--work-dir', str(work)]))
    assert 'target flops 0.7 reached' in out and 'ending training' in out
    assert (work / 'pruned_flops_0.85.pth').read_text() == 'a file of the user that must survive'
    assert (work / 'pruned_flops_0.85_1.pth').is_file() and (work / 'pruned_flops_0.70.pth').is_file()
    last = open(work / 'last_checkpoint').read().strip()
    assert osp.isfile(last) and int(osp.basename(last)[5:-4]) < 60   # stopped early, final checkpoint saved
    pruned = torch.load(work / 'pruned_flops_0.70.pth', weights_only=True)
    ratios = pruned['meta']['mmfisher']['ratios']
    assert 0.6 < ratios['flops'] <= 0.7

    # fine-tune: an ordinary config whose model is the compact one, weights from the pruned checkpoint
    ft_body = f'''
model = dict(_delete_=True, type='PrunedModel', architecture=_base_.model,
             channel_spec={str(work / 'pruned_flops_0.70.pth')!r})
load_from = {str(work / 'pruned_flops_0.70.pth')!r}
train_cfg = dict(max_iters=4, val_interval=4)
default_hooks = dict(checkpoint=dict(interval=4))
custom_hooks = [dict(type='SafeCheckpointHook')]
'''
    ft_cfg = write_config(tmp_path / 'finetune.py', cfg, shapes, ft_body)
    ft_work = tmp_path / 'finetune'
    out = ok(run(['tools/train.py', ft_cfg, '--work-dir', str(ft_work)]))
    assert 'coco/bbox_mAP' in out
    ckpt = torch.load(ft_work / 'iter_4.pth', weights_only=True)
    n_params = sum(v.numel() for k, v in ckpt['state_dict'].items() if 'running' not in k and 'num_batches' not in k)
    n_pruned = sum(v.numel() for k, v in pruned['state_dict'].items() if 'running' not in k and 'num_batches' not in k)
    assert n_params == n_pruned

    out = ok(run(['tools/test.py', ft_cfg, str(ft_work / 'iter_4.pth'), '--work-dir', str(tmp_path / 'test')]))
    assert 'coco/bbox_mAP' in out

    # a spec that does not fit the architecture is refused, naming the layer
    bad_cfg = write_config(tmp_path / 'bad.py', ft_cfg, shapes, 'model = dict(architecture=dict(neck=dict(out_channels=96), '
                           'bbox_head=dict(in_channels=96)))')
    res = run(['tools/test.py', bad_cfg, str(ft_work / 'iter_4.pth')])
    assert res.returncode != 0
    assert "the spec was made on another architecture: layer 'neck.lateral_convs.0.conv' is" in res.stderr


@pytest.mark.parametrize('hook,needle', [
    ("dict(type='FisherPruningHook', intervall=5)", "unknown option(s) ['intervall']"),
    ("dict(type='FisherPruningHook', target=('flops', 1.5))", 'outside (0, 1)'),
    ("dict(type='FisherPruningHook', target=('flops', 0.5), save_ratios=[0.3])", 'save ratio 0.3 is outside'),
    ("dict(type='FisherPruningHook', target=('params', 0.0001))", 'cannot fall to'),
])
def test_bad_hook_options_fail_before_training(tmp_path, shapes, hook, needle):
    cfg = write_config(tmp_path / 'bad.py', DEMO, shapes,
                       f"train_cfg = dict(max_iters=2, val_interval=1000)\ncustom_hooks = [{hook}]")
    res = run(['tools/train.py', cfg, '--work-dir', str(tmp_path / 'w')])
    assert res.returncode != 0
    assert needle in res.stderr, res.stderr[-3000:]
    assert 'Iter(train)' not in res.stdout + res.stderr


def test_missing_pruned_checkpoint_is_a_clear_error(tmp_path, shapes):
    cfg = write_config(tmp_path / 'ft.py', DEMO, shapes, '''
model = dict(_delete_=True, type='PrunedModel', architecture=_base_.model, channel_spec='no/such/pruned.pth')
''')
    res = run(['tools/train.py', cfg, '--work-dir', str(tmp_path / 'w')])
    assert res.returncode != 0 and "channel spec 'no/such/pruned.pth' does not exist" in res.stderr
