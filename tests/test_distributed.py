"""Two CPU processes (gloo) launched like mmdet's dist_train.sh take identical pruning decisions."""
import os
import subprocess

import torch

from test_integration import DEMO, PRUNE, ROOT, write_config

DUMP_HOOK = '''
import os.path as osp
import torch
from mmengine.dist import get_rank
from mmengine.hooks import Hook
from mmengine.registry import HOOKS


@HOOKS.register_module()
class DumpRankState(Hook):
    """Test helper: every rank writes its masks and weights after training."""
    priority = 'LOWEST'

    def after_train(self, runner):
        fisher = [h for h in runner.hooks if type(h).__name__ == 'FisherPruningHook'][0]
        model = runner.model.module if hasattr(runner.model, 'module') else runner.model
        torch.save({'keep': fisher.pruner.keep.clone(), 'history': fisher.pruner.history,
                    'weights': {k: v.detach().clone() for k, v in model.named_parameters()}},
                   osp.join(runner.work_dir, f'rank{get_rank()}.pth'))
'''


def test_two_ranks_hold_identical_masks(tmp_path, shapes):
    (tmp_path / 'dump_rank_state.py').write_text(DUMP_HOOK)
    body = PRUNE.format(iters=6, interval=2, target=0.3, per_step=20, save_ratios=[]) + '''
custom_imports = dict(imports=['mmfisher', 'dump_rank_state'], allow_failed_imports=False)
custom_hooks = [dict(type='SafeCheckpointHook'),
                dict(type='FisherPruningHook', interval=2, target=('flops', 0.3), channels_per_step=20),
                dict(type='DumpRankState')]
'''
    cfg = write_config(tmp_path / 'ddp.py', DEMO, shapes, body)
    work = tmp_path / 'work'
    env = dict(os.environ, PORT='29561',
               PYTHONPATH=os.pathsep.join([ROOT, str(tmp_path), os.environ.get('PYTHONPATH', '')]))
    res = subprocess.run(['bash', 'tools/dist_train.sh', cfg, '2', '--work-dir', str(work)], cwd=ROOT,
                         capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    r0 = torch.load(work / 'rank0.pth', weights_only=True)
    r1 = torch.load(work / 'rank1.pth', weights_only=True)
    assert len(r0['history']) == 60
    assert torch.equal(r0['keep'], r1['keep']) and r0['history'] == r1['history']
    # gradients are still averaged over the ranks: the parameters agree too (BN statistics are per rank)
    for k in r0['weights']:
        assert torch.allclose(r0['weights'][k].float(), r1['weights'][k].float(), atol=1e-6), k
