"""The embedded demo: train, prune, fine-tune, evaluate and compare a small detector on a CPU.

    python tools/demo.py [--work-dir work_dirs/demo] [--data-root data/shapes] [--redo STAGE ...]

Stages (each skipped when its result exists, unless named in ``--redo``; ``--redo all``):

1. ``data``: a generated COCO-format dataset of coloured shapes (800 train / 200 val images
   of 160x160, 4 classes, 1-5 objects each), read through mmdet's CocoDataset.
2. ``baseline``: ``tools/train.py configs/demo/retinanet_r18_shapes.py`` (RetinaNet, ResNet-18
   at 1/4 width, 800 iterations).
3. ``prune``: ``tools/train.py configs/demo/retinanet_r18_shapes_prune.py`` from the baseline:
   FisherPruningHook, memory normalisation, to 50% of the FLOPs.
4. ``finetune``: ``tools/train.py configs/demo/retinanet_r18_shapes_finetune.py`` on the compact
   model (``type='PrunedModel'``), 400 iterations.
5. ``uniform``: what a user gets without pruning: ``tools/analysis_tools/uniform_spec.py`` scales
   every prunable width by one factor to the same FLOPs, and ``tools/train.py
   configs/demo/retinanet_r18_shapes_uniform.py`` trains it from scratch with the baseline's recipe
   for as many iterations as baseline + pruning + fine-tuning took in all.
6. ``evaluate``: ``tools/test.py`` on the three models (COCO bbox mAP).
7. ``benchmark``: ``tools/benchmark.py`` on the three (params, FLOPs, activations; latency at the
   training size 160x160 and at 640x640, where pruning shows its effect).
8. ``report``: ``report.md`` and ``channels.png`` (channels kept per layer) in the work dir, and the
   table printed here.

Every stage is a stock tool run as a subprocess, its log streamed here. Every training is seeded
(``randomness = dict(seed=0)``): two runs give the same table, up to the timings.
"""
import argparse
import json
import os
import os.path as osp
import subprocess
import sys
import time

import torch

ROOT = osp.abspath(osp.join(osp.dirname(__file__), '..'))
sys.path.insert(0, ROOT)
STAGES = ('data', 'baseline', 'prune', 'finetune', 'uniform', 'evaluate', 'benchmark', 'report')
CFG = osp.join(ROOT, 'configs', 'demo')


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--work-dir', default='work_dirs/demo')
    p.add_argument('--data-root', default='data/shapes')
    p.add_argument('--redo', nargs='+', default=[], choices=STAGES + ('all',),
                   help='stages to run again although their results exist')
    p.add_argument('--quick', action='store_true',
                   help='a smoke run: 32 images, a few iterations per stage (for tests; the mAP means nothing)')
    return p.parse_args(argv)


def banner(text: str) -> None:
    print(f'\n===== [demo] {text} =====', flush=True)


def run(cmd) -> None:
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get('PYTHONPATH', ''))
    print('$ ' + ' '.join(cmd), flush=True)
    res = subprocess.run([sys.executable] + cmd, cwd=ROOT, env=env)
    if res.returncode != 0:
        sys.exit(f'[demo] stage failed: {" ".join(cmd)} (exit code {res.returncode})')


def data_options(root: str):
    root = root.rstrip('/') + '/'
    return ['--cfg-options', f'train_dataloader.dataset.data_root={root}', f'val_dataloader.dataset.data_root={root}',
            f'test_dataloader.dataset.data_root={root}',
            f'val_evaluator.ann_file={root}annotations/instances_val2017.json',
            f'test_evaluator.ann_file={root}annotations/instances_val2017.json']


def main(argv=None):
    args = parse_args(argv)
    redo = set(STAGES) if 'all' in args.redo else set(args.redo)
    work = osp.abspath(args.work_dir)
    data_root = osp.abspath(args.data_root)
    os.makedirs(work, exist_ok=True)
    base_iters, ft_iters = (20, 10) if args.quick else (800, 400)
    paths = {
        'baseline': osp.join(work, 'baseline', f'iter_{base_iters}.pth'),
        'pruned': osp.join(work, 'prune', 'pruned_flops_0.50.pth'),
        'finetuned': osp.join(work, 'finetune', f'iter_{ft_iters}.pth'),
        'metrics_baseline': osp.join(work, 'metrics_baseline.json'),
        'metrics_pruned': osp.join(work, 'metrics_pruned.json'),
        'uniform_spec': osp.join(work, 'uniform_flops_0.50.json'),
        'uniform': osp.join(work, 'uniform', 'done.json'),
        'metrics_uniform': osp.join(work, 'metrics_uniform.json'),
        'benchmark': osp.join(work, 'benchmark.json'),
    }
    t_start = time.perf_counter()
    timings = {}

    def stage(name, done_path, fn):
        if osp.exists(done_path) and name not in redo:
            print(f'[demo] {name}: done already ({done_path}); --redo {name} runs it again', flush=True)
            return
        banner(name)
        t0 = time.perf_counter()
        fn()
        timings[name] = time.perf_counter() - t0

    def make_data():
        from mmfisher.datasets.shapes import SHAPES, make_coco_shapes
        n_train, n_val = (32, 8) if args.quick else (800, 200)
        make_coco_shapes(data_root, num_train=n_train, num_val=n_val, size=160, names=SHAPES)

    stage('data', osp.join(data_root, 'annotations', 'instances_val2017.json'), make_data)
    opts = data_options(data_root)
    quick = ['train_dataloader.batch_size=4', 'train_dataloader.num_workers=0',
             'train_dataloader.persistent_workers=False', 'val_dataloader.num_workers=0',
             'val_dataloader.persistent_workers=False', 'test_dataloader.num_workers=0',
             'test_dataloader.persistent_workers=False'] if args.quick else []
    opts = opts + quick
    # a barely trained smoke-run model still predicts boxes to evaluate
    thr = ['model.test_cfg.score_thr=0.0'] if args.quick else []
    thr_pruned = ['model.architecture.test_cfg.score_thr=0.0'] if args.quick else []
    iters = lambda n: [f'train_cfg.max_iters={n}', f'train_cfg.val_interval={n}']  # noqa: E731
    finetune_cfg = osp.join(CFG, 'retinanet_r18_shapes_finetune.py')
    spec_opts = [f'model.channel_spec={paths["pruned"]}', f'load_from={paths["pruned"]}']

    stage('baseline', paths['baseline'], lambda: run(
        ['tools/train.py', osp.join(CFG, 'retinanet_r18_shapes.py'), '--work-dir', osp.join(work, 'baseline')] + opts
        + thr + iters(base_iters)))
    stage('prune', paths['pruned'], lambda: run(
        ['tools/train.py', osp.join(CFG, 'retinanet_r18_shapes_prune.py'), '--work-dir', osp.join(work, 'prune')]
        + opts + [f'load_from={paths["baseline"]}']
        + (['custom_hooks.1.channels_per_step=40', 'custom_hooks.1.interval=1'] if args.quick else [])))
    stage('finetune', paths['finetuned'], lambda: run(
        ['tools/train.py', finetune_cfg, '--work-dir', osp.join(work, 'finetune')] + opts + spec_opts
        + thr_pruned + iters(ft_iters)))

    uniform_cfg = osp.join(CFG, 'retinanet_r18_shapes_uniform.py')
    uniform_opts = [f'model.channel_spec={paths["uniform_spec"]}']

    def train_uniform():
        if osp.exists(paths['uniform_spec']):
            os.remove(paths['uniform_spec'])      # this stage's own output, from an earlier run
        run(['tools/analysis_tools/uniform_spec.py', osp.join(CFG, 'retinanet_r18_shapes.py'), '--target', 'flops',
             '0.5', '--shape', '160', '--out', paths['uniform_spec']])
        meta = torch.load(paths['pruned'], map_location='cpu', weights_only=True)['meta']['mmfisher']
        total = base_iters + int(meta['iter']) + ft_iters
        d = osp.dirname(paths['uniform'])
        run(['tools/train.py', uniform_cfg, '--work-dir', d] + opts + uniform_opts + thr_pruned + iters(total)
            + ([] if args.quick else [f'param_scheduler.1.end={total}']))   # the cosine ends with the run
        with open(paths['uniform'], 'w') as f:
            json.dump({'iters': total, 'checkpoint': osp.join(d, f'iter_{total}.pth')}, f)
    stage('uniform', paths['uniform'], train_uniform)

    def uniform_ckpt():
        with open(paths['uniform']) as f:
            return json.load(f)['checkpoint']

    def evaluate():
        run(['tools/test.py', osp.join(CFG, 'retinanet_r18_shapes.py'), paths['baseline'],
             '--work-dir', osp.join(work, 'test_baseline'), '--metrics-json', paths['metrics_baseline']] + opts + thr)
        run(['tools/test.py', finetune_cfg, paths['finetuned'], '--work-dir', osp.join(work, 'test_pruned'),
             '--metrics-json', paths['metrics_pruned']] + opts + spec_opts + thr_pruned)
        run(['tools/test.py', uniform_cfg, uniform_ckpt(), '--work-dir', osp.join(work, 'test_uniform'),
             '--metrics-json', paths['metrics_uniform']] + opts + uniform_opts + thr_pruned)
    stage('evaluate', paths['metrics_uniform'], evaluate)

    def model_cfg(name, base, spec):
        # the benchmark tool reads config files: each pointing at this run's spec
        path = osp.join(work, f'{name}_model.py')
        with open(path, 'w') as f:
            f.write(f"_base_ = [{base!r}]\nmodel = dict(channel_spec={spec!r})\n")
        return path

    stage('benchmark', paths['benchmark'], lambda: run(
        ['tools/benchmark.py', osp.join(CFG, 'retinanet_r18_shapes.py'), paths['baseline'],
         model_cfg('pruned', finetune_cfg, paths['pruned']), paths['finetuned'],
         model_cfg('uniform', uniform_cfg, paths['uniform_spec']), uniform_ckpt(),
         '--sizes', '160x160', '320x320' if args.quick else '640x640', '--repeats', '5' if args.quick else '50',
         '--names', 'baseline', 'pruned', 'uniform', '--json', paths['benchmark']]))

    banner('report')
    from mmfisher.reporting import write_demo_report
    report = write_demo_report(work, paths, timings)
    print(report)
    print(f'[demo] finished in {time.perf_counter() - t_start:.0f} s; report: {osp.join(work, "report.md")}, '
          f'plot: {osp.join(work, "channels.png")}')


if __name__ == '__main__':
    main()
