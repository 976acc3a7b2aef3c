"""Nothing silently wrong: every bad input a user can hand the tools is one clear error before work starts,
and the faults that already behave stay covered. Through mmfisher's and mmdet's own tools, on generated data.

One pruning run (module fixture) writes two pruned checkpoints, at 85% and 70% of the FLOPs; the cases
below build fine-tune / test configs on top of them.
"""
import importlib.util
import json
import os.path as osp

import pytest
import torch

from test_integration import DEMO, PRUNE, ROOT, ok, run, write_config


def tool(rel):
    """A tool script as a module, to run its ``main(argv)`` in this process (as ``python tools/...``)."""
    spec = importlib.util.spec_from_file_location(rel.replace('/', '_')[:-3], osp.join(ROOT, rel))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope='module')
def pruned(tmp_path_factory, shapes):
    """``(prune config, work dir)`` of a run pruned to 70% of the FLOPs, with a checkpoint at 85% too."""
    tmp = tmp_path_factory.mktemp('pruned')
    cfg = write_config(tmp / 'prune.py', DEMO, shapes,
                       PRUNE.format(iters=60, interval=1, target=0.7, per_step=40, save_ratios=[0.85]))
    work = tmp / 'prune'
    ok(run(['tools/train.py', cfg, '--work-dir', str(work)]))
    assert (work / 'pruned_flops_0.85.pth').is_file() and (work / 'pruned_flops_0.70.pth').is_file()
    return cfg, work


def compact_config(tmp_path, shapes, prune_cfg, spec, extra='', architecture='_base_.model'):
    """A test config: the compact model of ``spec`` on the prune config's architecture."""
    return write_config(tmp_path / 'test_cfg.py', prune_cfg, shapes, f'''
model = dict(_delete_=True, type='PrunedModel', architecture={architecture}, channel_spec={str(spec)!r})
{extra}
''')


def evaluate(cfg, checkpoint, work_dir):
    return tool('tools/test.py').main([cfg, str(checkpoint), '--work-dir', str(work_dir)])


def test_the_pruned_checkpoint_evaluates_with_its_own_spec(tmp_path, shapes, pruned):
    prune_cfg, work = pruned
    cfg = compact_config(tmp_path, shapes, prune_cfg, work / 'pruned_flops_0.70.pth')
    metrics = evaluate(cfg, work / 'pruned_flops_0.70.pth', tmp_path / 'w')
    assert 'coco/bbox_mAP' in metrics


def test_weights_of_another_ratio_are_refused_naming_the_tensor_and_both_shapes(tmp_path, shapes, pruned):
    prune_cfg, work = pruned
    a = torch.load(work / 'pruned_flops_0.85.pth', weights_only=True)['state_dict']
    b = torch.load(work / 'pruned_flops_0.70.pth', weights_only=True)['state_dict']
    first = next(k for k in a if a[k].shape != b[k].shape)   # the reference: first differing tensor
    cfg = compact_config(tmp_path, shapes, prune_cfg, work / 'pruned_flops_0.85.pth')
    with pytest.raises(ValueError) as e:
        evaluate(cfg, work / 'pruned_flops_0.70.pth', tmp_path / 'w')
    assert (f"{first!r} has shape {list(b[first].shape)} in the checkpoint but {list(a[first].shape)} in the model"
            in str(e.value))
    assert 'pruned_flops_0.85.pth' in str(e.value)


def test_fine_tuning_from_weights_of_another_ratio_fails_before_the_first_iteration(tmp_path, shapes, pruned):
    prune_cfg, work = pruned
    cfg = compact_config(tmp_path, shapes, prune_cfg, work / 'pruned_flops_0.70.pth',
                         f"load_from = {str(work / 'pruned_flops_0.85.pth')!r}\n"
                         "train_cfg = dict(max_iters=2, val_interval=1000)\ncustom_hooks = []")
    with pytest.raises(ValueError, match='the checkpoint does not fit the pruned model'):
        tool('tools/train.py').main([cfg, '--work-dir', str(tmp_path / 'ft')])
    assert not list((tmp_path / 'ft').glob('*.pth'))


def test_a_spec_with_a_repeated_index_is_refused_naming_the_file(tmp_path, shapes, pruned):
    prune_cfg, work = pruned
    spec = torch.load(work / 'pruned_flops_0.70.pth', weights_only=True)['meta']['channel_spec']
    name = next(n for n, g in spec['groups'].items() if len(g['keep']) < g['size'])
    spec['groups'][name]['keep'][1] = spec['groups'][name]['keep'][0]
    path = tmp_path / 'spec.json'
    path.write_text(json.dumps(spec))
    cfg = compact_config(tmp_path, shapes, prune_cfg, path)
    with pytest.raises(ValueError) as e:
        evaluate(cfg, work / 'pruned_flops_0.70.pth', tmp_path / 'w')
    assert str(path) in str(e.value)
    assert f"group {name!r}: kept index {spec['groups'][name]['keep'][0]} appears more than once" in str(e.value)


def test_a_deeper_backbone_than_the_spec_was_made_on_is_refused(tmp_path, shapes, pruned):
    prune_cfg, work = pruned
    cfg = compact_config(tmp_path, shapes, prune_cfg, work / 'pruned_flops_0.70.pth',
                      'model.update(architecture=dict(_base_.model, backbone=dict(_base_.model.backbone, depth=34)))')
    with pytest.raises(ValueError, match="made on another architecture: this model has layer 'backbone.layer1.2"):
        evaluate(cfg, work / 'pruned_flops_0.70.pth', tmp_path / 'w')


def test_a_corrupted_pruned_checkpoint_is_refused(tmp_path, shapes, pruned):
    prune_cfg, work = pruned
    ckpt = torch.load(work / 'pruned_flops_0.70.pth', weights_only=True)
    key = next(k for k in ckpt['state_dict'] if k.endswith('conv1.weight'))
    ckpt['state_dict'][key].view(-1)[0] += 0.5
    bad = tmp_path / 'pruned_flops_0.70.pth'
    torch.save(ckpt, bad)
    cfg = compact_config(tmp_path, shapes, prune_cfg, bad)
    with pytest.raises(ValueError, match=r"pruned checkpoint '.*pruned_flops_0.70.pth' is corrupted"):
        evaluate(cfg, bad, tmp_path / 'w')


def _spec(work):
    return torch.load(work / 'pruned_flops_0.70.pth', weights_only=True)['meta']['channel_spec']


MALFORMED_FILES = [
    ('not json', lambda s: '{"format": "mmfisher.channel_spec/1", "groups": {', 'is not valid JSON'),
    ('a list', lambda s: json.dumps([s]), 'not a list'),
    ('no groups', lambda s: json.dumps({'format': s['format']}), '"groups" must be an object'),
    ('empty groups', lambda s: json.dumps({'format': s['format'], 'groups': {}}), '"groups" is empty'),
    ('no size', lambda s: json.dumps(dict(s, groups={k: {'keep': v['keep']} for k, v in s['groups'].items()})),
     'an entry is'),
    ('a group missing', lambda s: json.dumps(dict(s, groups=dict(list(s['groups'].items())[1:]))),
     'has no entry for group'),
]


@pytest.mark.parametrize('case,text,needle', MALFORMED_FILES, ids=[m[0] for m in MALFORMED_FILES])
def test_a_malformed_spec_file_is_one_error_naming_the_file(tmp_path, pruned, case, text, needle):
    from mmfisher.openmmlab import build_pruned_model
    from mmengine.config import Config
    prune_cfg, work = pruned
    path = tmp_path / 'spec.json'
    path.write_text(text(_spec(work)))
    with pytest.raises(ValueError) as e:
        build_pruned_model(Config.fromfile(prune_cfg).model, str(path))
    assert str(path) in str(e.value) and needle in str(e.value)


def test_mmdets_stock_test_tool_evaluates_the_pruned_model_and_refuses_wrong_weights(tmp_path, shapes, pruned):
    import mmdet
    stock = osp.join(osp.dirname(mmdet.__file__), '.mim', 'tools', 'test.py')
    prune_cfg, work = pruned
    cfg = compact_config(tmp_path, shapes, prune_cfg, work / 'pruned_flops_0.70.pth',
                         "custom_imports = dict(imports=['mmfisher'], allow_failed_imports=False)")
    out = ok(run([stock, cfg, str(work / 'pruned_flops_0.70.pth'), '--work-dir', str(tmp_path / 'w')]))
    assert 'coco/bbox_mAP' in out
    res = run([stock, cfg, str(work / 'pruned_flops_0.85.pth'), '--work-dir', str(tmp_path / 'w2')])
    assert res.returncode != 0
    assert 'CheckpointMismatchError: the checkpoint does not fit the pruned model' in res.stderr
    assert 'coco/bbox_mAP' not in res.stdout + res.stderr


def test_every_checkpoint_a_run_writes_loads_with_weights_only(pruned):
    _, work = pruned
    files = sorted(p for p in work.iterdir() if p.suffix == '.pth')
    assert len(files) >= 3
    for p in files:
        torch.load(p, weights_only=True)


def train_in_process(cfg):
    from mmengine.runner import Runner

    from helpers import pruning_hook
    from mmfisher.openmmlab import register_all_modules
    register_all_modules()
    runner = Runner.from_cfg(cfg)
    runner.train()
    return pruning_hook(runner)


def test_batch_size_one_prunes_on_evidence(tmp_path, shapes):
    from helpers import demo_cfg
    cfg = demo_cfg(shapes, tmp_path, 6, dict(interval=2, target=('flops', 0.5), channels_per_step=5),
                   **{'train_dataloader.batch_size': 1})
    hook = train_in_process(cfg)
    assert len(hook.pruner.history) == 15 and hook.pruner.postponed == 0
    fisher = torch.tensor([h['importance'] for h in hook.pruner.history])
    # a channel that is zero after its ReLU on the one image has Fisher exactly 0: it may go; nothing else
    assert torch.isfinite(fisher).all() and (fisher >= 0).all() and (fisher > 0).any()


def test_a_short_last_batch_of_an_epoch_is_scored_like_the_others(tmp_path, shapes):
    """16 images, batch 3: five full batches and one of a single image (DefaultSampler, no drop_last)."""
    from helpers import demo_cfg
    cfg = demo_cfg(shapes, tmp_path, 0, dict(interval=3, target=('flops', 0.5), channels_per_step=5))
    cfg.train_cfg = dict(type='EpochBasedTrainLoop', max_epochs=1)
    cfg.train_dataloader.update(batch_size=3, sampler=dict(type='DefaultSampler', shuffle=False))
    cfg.default_hooks.checkpoint = dict(type='CheckpointHook', by_epoch=True, interval=1)
    cfg.log_processor = dict(by_epoch=True)
    hook = train_in_process(cfg)
    # steps after iterations 3 and 6 (the short one): both decided, on finite scores
    assert len(hook.pruner.history) == 10 and hook.pruner.postponed == 0
    fisher = torch.tensor([h['importance'] for h in hook.pruner.history])
    assert torch.isfinite(fisher).all() and (fisher > 0).any()
