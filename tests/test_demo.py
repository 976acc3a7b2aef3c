"""The README's main command, as a smoke run: every stage through the stock tools, then the report."""
import os
import os.path as osp
import subprocess
import sys

ROOT = osp.abspath(osp.join(osp.dirname(__file__), '..'))


def test_demo_quick_runs_every_stage_and_skips_them_the_second_time(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT)
    cmd = [sys.executable, 'tools/demo.py', '--quick', '--work-dir', str(tmp_path / 'demo'),
           '--data-root', str(tmp_path / 'data')]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1200, env=env)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    for stage in ('data', 'baseline', 'prune', 'finetune', 'evaluate', 'benchmark', 'report'):
        assert f'===== [demo] {stage} =====' in res.stdout
    report = (tmp_path / 'demo' / 'report.md').read_text()
    assert 'Speed-up: **' in report and '| bbox mAP |' in report and 'memory normalisation' in report
    png = (tmp_path / 'demo' / 'channels.png').read_bytes()
    assert png[:8] == b'\x89PNG\r\n\x1a\n'
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert again.returncode == 0
    assert again.stdout.count('done already') == 6 and 'Iter(train)' not in again.stdout + again.stderr
