"""The README's main command, as a smoke run: every stage through the stock tools, then the report;
a second run in another work dir gives the same models and the same table (up to the timings)."""
import json
import os
import os.path as osp
import subprocess
import sys

import torch

ROOT = osp.abspath(osp.join(osp.dirname(__file__), '..'))
STAGES = ('data', 'baseline', 'prune', 'finetune', 'uniform', 'evaluate', 'benchmark', 'report')


def demo(tmp_path, name, timeout=1200):
    env = dict(os.environ, PYTHONPATH=ROOT)
    cmd = [sys.executable, 'tools/demo.py', '--quick', '--work-dir', str(tmp_path / name),
           '--data-root', str(tmp_path / 'data')]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)


def untimed(bench):
    """The benchmark's JSON without what depends on the machine's load."""
    return {name: {k: v for k, v in m.items() if k in ('params', 'flops', 'activations', 'source')}
            for name, m in bench['models'].items()}


def test_demo_quick_runs_every_stage_skips_them_the_second_time_and_reproduces(tmp_path):
    res = demo(tmp_path, 'a')
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    for stage in STAGES:
        assert f'===== [demo] {stage} =====' in res.stdout
    a = tmp_path / 'a'
    report = (a / 'report.md').read_text()
    assert 'Speed-up: **' in report and '| bbox mAP |' in report and 'memory normalisation' in report
    assert '| latency 160x160 (ms) |' in report and '| latency 320x320 (ms) |' in report
    assert 'uniform, from scratch' in report
    png = (a / 'channels.png').read_bytes()
    assert png[:8] == b'\x89PNG\r\n\x1a\n'
    bench = json.loads((a / 'benchmark.json').read_text())
    base, uni = bench['models']['baseline'], bench['models']['uniform']
    assert abs(uni['flops'] / base['flops'] - 0.5) < 0.02      # the uniform model matches the FLOPs target
    uniform = json.loads((a / 'uniform' / 'done.json').read_text())
    pruned_iter = torch.load(a / 'prune' / 'pruned_flops_0.50.pth', weights_only=True)['meta']['mmfisher']['iter']
    assert uniform['iters'] == 20 + pruned_iter + 10           # as long as baseline + pruning + fine-tuning

    again = demo(tmp_path, 'a', timeout=600)
    assert again.returncode == 0
    assert again.stdout.count('done already') == len(STAGES) - 1 and 'Iter(train)' not in again.stdout + again.stderr

    other = demo(tmp_path, 'b')                                 # the same data, a fresh work dir
    assert other.returncode == 0, other.stdout[-3000:] + other.stderr[-3000:]
    b = tmp_path / 'b'
    for m in ('baseline', 'pruned', 'uniform'):
        assert json.loads((a / f'metrics_{m}.json').read_text()) == json.loads((b / f'metrics_{m}.json').read_text())
    assert untimed(bench) == untimed(json.loads((b / 'benchmark.json').read_text()))
    for ckpt in ('finetune/iter_10.pth', uniform['checkpoint'][len(str(a)) + 1:]):
        sa = torch.load(a / ckpt, weights_only=True)['state_dict']
        sb = torch.load(b / ckpt, weights_only=True)['state_dict']
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa), ckpt
