"""The pruning study's smoke run: every kind of row is trained, measured and reported; an interrupted run
resumes from its checkpoint; a second run trains nothing (every stage cached, even with the work dir and
data moved elsewhere), and a changed recipe redoes only what depends on it."""
import json
import os
import os.path as osp
import shutil
import subprocess
import sys

ROOT = osp.abspath(osp.join(osp.dirname(__file__), '..'))
ROWS = ['baseline', 'baseline, trained as long', 'fisher-M', 'fisher-F', 'l1-M', 'random-M', 'fisher-L', 'l1-U',
        'fisher-M arch, re-init', 'uniform',
        'fisher-M, one shot']


def study(tmp_path, *extra):
    env = dict(os.environ, PYTHONPATH=ROOT)
    cmd = [sys.executable, 'benchmarks/pruning_study.py', '--quick', '--work-dir', str(tmp_path / 'study'),
           '--data-root', str(tmp_path / 'data'), *extra]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1200, env=env)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res.stdout


def test_study_quick_reports_every_row_caches_its_runs_and_resumes_an_interrupted_one(tmp_path):
    """Every row is trained and reported. A study stopped in the middle of a run (a session limit, a killed
    job) continues that run from its last checkpoint when started again, instead of training it from the
    start: it ends with what the unbroken run ended with, and the runs that depend on it stay cached (same
    key). A second run trains nothing, even with the work dir and data moved elsewhere; a changed recipe
    redoes only what depends on it. (One test: every study run here costs minutes.)"""
    import torch
    every_2 = ('--checkpoint-every', '2')         # outside the cache key, like every option of the machine
    out = study(tmp_path, *every_2)
    report = (tmp_path / 'study' / 'report.md').read_text()
    for row in ROWS:
        assert f'| {row} |' in report, row
    assert (tmp_path / 'study' / 'pruning_study.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    assert 'at equal latency' not in report      # one target: no method has a curve to interpolate on
    table = {(r['method'], r['target']): r for r in json.load(open(tmp_path / 'study' / 'results.json'))['table']}
    base = table[('baseline', 1.0)]
    for (method, target), r in table.items():
        if method != 'baseline':   # FLOPs counted by mmengine, not by mmfisher: the target is met within 2%
            assert abs(r['flops'] / base['flops'] - target) <= 0.02 * target, method
    # every main row trains as long in all (baseline + pruning + fine-tuning, or from scratch) as fisher-M
    for row in ['fisher-F', 'l1-M', 'random-M', 'fisher-L', 'l1-U', 'uniform', 'fisher-M arch, re-init']:
        assert table[(row, 0.5)]['iters'] == table[('fisher-M', 0.5)]['iters'], row
    assert table[('baseline, trained as long', 1.0)]['iters'] == table[('fisher-M', 0.5)]['iters']
    n_runs = out.count('===== [study]') - 1           # every training, and the measuring banner

    # what an interruption of the baseline after its checkpoint of iteration 4 (of 8) leaves: the study's
    # files and that checkpoint
    runs = tmp_path / 'study' / 'runs'
    unbroken = torch.load(runs / 'baseline_s0' / 'iter_8.pth', weights_only=True)['state_dict']
    assert not (runs / 'baseline_s0' / 'iter_6.pth').exists()      # every 2 iterations, the last one kept
    interrupt(runs / 'baseline_s0', at=4)
    resumed = study(tmp_path, *every_2)
    assert '[study] baseline s0: interrupted earlier; resuming from iter_4.pth' in resumed
    assert resumed.count(': cached') == n_runs - 1 and '===== [study] fisher-M' not in resumed
    assert json.load(open(runs / 'baseline_s0' / 'done.json'))['resumed_from'] == 'iter_4.pth'
    weights = torch.load(runs / 'baseline_s0' / 'iter_8.pth', weights_only=True)['state_dict']
    assert weights.keys() == unbroken.keys()
    for k in unbroken:
        assert torch.equal(weights[k], unbroken[k]), k

    moved = tmp_path / 'moved'          # the cache keys hold no absolute path
    moved.mkdir()
    shutil.move(str(tmp_path / 'study'), str(moved / 'study'))
    shutil.move(str(tmp_path / 'data'), str(moved / 'data'))
    again = study(moved)
    assert again.count(': cached') == n_runs and '===== [study] baseline' not in again

    # a longer fine-tuning redoes the fine-tuning runs and what is trained as long; nothing upstream
    third = study(moved, '--ft-iters', '5', '--methods', 'fisher-M', '--controls', 'uniform', '--schedules')
    assert '[study] baseline s0: cached' in third and '[study] fisher-M 0.5 s0 prune: cached' in third
    assert '===== [study] fisher-M 0.5 s0 =====' in third and '===== [study] uniform 0.5 s0 =====' in third


def interrupt(run, at):
    """Leave in ``run`` what a study stopped after the run's checkpoint of iteration ``at`` leaves."""
    for f in run.iterdir():
        if f.name not in ('started.json', 'config.py'):
            shutil.rmtree(f) if f.is_dir() else f.unlink()
    env = dict(os.environ, PYTHONPATH=ROOT)
    res = subprocess.run([sys.executable, 'tools/train.py', str(run / 'config.py'), '--work-dir', str(run),
                          '--cfg-options', f'train_cfg.max_iters={at}'], cwd=ROOT, capture_output=True, text=True,
                         env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert open(run / 'last_checkpoint').read().strip().endswith(f'iter_{at}.pth')


def test_study_quick_on_the_hard_data_trains_the_eight_class_detector(tmp_path):
    study(tmp_path, '--dataset', 'hard', '--methods', 'fisher-M', '--first-target-methods', 'l1-U',
          '--controls', 'uniform', '--schedules')
    report = (tmp_path / 'study' / 'report.md').read_text()
    assert report.startswith('# Pruning study: the demo RetinaNet on the hard generated shapes data')
    assert '--dataset hard' in report and '--first-target-methods l1-U --controls uniform' in report
    for row in ['baseline', 'fisher-M', 'l1-U', 'uniform']:
        assert f'| {row} |' in report, row
    for row in ['l1-M', 'fisher-M, one shot', 'fisher-M arch, re-init', 'baseline, trained as long']:
        assert f'| {row} |' not in report, row
    with open(tmp_path / 'data' / 'annotations' / 'instances_train2017.json') as f:
        assert json.load(f)['info']['mmfisher']['variant'] == 'hard'
    from mmengine.config import Config
    for run in ('baseline_s0', 'fisher-M_0.5_s0', 'uniform_0.5_s0'):   # the detector and the compact models
        cfg = Config.fromfile(str(tmp_path / 'study' / 'runs' / run / 'config.py'))
        model = cfg.model.get('architecture', cfg.model)
        assert model.bbox_head.num_classes == 8, run
        assert len(cfg.train_dataloader.dataset.metainfo.classes) == 8, run


def test_equal_latency_compares_every_pruned_row_with_the_curves_of_methods_run_at_two_targets():
    sys.path.insert(0, osp.join(ROOT, 'benchmarks'))
    from pruning_study import equal_latency, interpolate

    def row(method, target, latency, m):
        return {'method': method, 'target': target, 'mAP': (m, m, m), 'latency@640x640': (latency, latency, latency)}
    table = [row('baseline', 1.0, 90.0, 0.60), row('fisher-M', 0.5, 70.0, 0.55), row('fisher-M', 0.3, 50.0, 0.45),
             row('l1-M', 0.5, 60.0, 0.30), row('fisher-M arch, re-init', 0.5, 70.0, 0.56),
             row('uniform', 0.5, 65.0, 0.50), row('uniform', 0.3, 45.0, 0.40)]
    refs, curves = equal_latency(table, '640x640')
    assert set(curves) == {'fisher-M', 'uniform'}          # l1-M and re-init: one target each, no curve
    assert curves['fisher-M'] == [(50.0, 0.45), (70.0, 0.55)]
    assert [label for label, _ in refs] == ['fisher-M 0.50', 'fisher-M 0.30', 'l1-M 0.50', 'uniform 0.50',
                                            'uniform 0.30']
    # at l1-M's 60 ms: halfway between fisher-M's two rows; uniform's rows span 45-65 ms: 3/4 of the way
    assert abs(interpolate(curves['fisher-M'], 60.0) - 0.50) < 1e-12
    assert abs(interpolate(curves['uniform'], 60.0) - 0.475) < 1e-12
    assert interpolate(curves['uniform'], 70.0) is None    # never extrapolated


def test_width_scales_every_width_of_the_baseline_and_keeps_the_default_runs_apart(tmp_path):
    """``--width 2``: the detector every stage inherits has twice the ResNet base channels (its stages
    follow), FPN and head channels, and the runs go to ``runs_width2/``; a default-width study in the same
    work dir keeps ``runs/`` and the cache key it always had."""
    sys.path.insert(0, osp.join(ROOT, 'benchmarks'))
    import torch
    from pruning_study import Study, parse_args

    from mmengine.config import Config
    from mmfisher.openmmlab import build_from_config
    work = str(tmp_path / 'study')
    wide = Study(parse_args(['--quick', '--dataset', 'hard', '--width', '2', '--work-dir', work]))
    plain = Study(parse_args(['--quick', '--dataset', 'hard', '--work-dir', work]))
    assert wide.runs == osp.join(work, 'runs_width2') and plain.runs == osp.join(work, 'runs')
    assert plain.base_cfg.endswith(osp.join('configs', 'demo', 'retinanet_r18_shapes_hard.py'))
    convs = {}
    for study in (plain, wide):
        model = build_from_config(Config.fromfile(study.base_cfg))
        convs[study.args.width] = {n: m.out_channels for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)}
    assert convs[1.0].keys() == convs[2.0].keys()
    for name, c in convs[1.0].items():   # every conv twice as wide, but the classes and box outputs
        want = c if name.startswith(('bbox_head.retina_cls', 'bbox_head.retina_reg')) else 2 * c
        assert convs[2.0][name] == want, name
    assert Config.fromfile(wide.base_cfg).model.bbox_head.num_classes == 8       # the hard data's classes kept
    assert plain._configs_key() != wide._configs_key()
