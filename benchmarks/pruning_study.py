"""Does pruning pay? Group Fisher against a uniformly narrower model, L1 and random pruning, at equal FLOPs.

    python benchmarks/pruning_study.py [--work-dir work_dirs/pruning_study] [--dataset easy|hard]
                                       [--data-root data/shapes] [--seeds 0 1] [--targets 0.5 0.3]
                                       [--base-iters 400] [--ft-iters 200] [--width 1] [--quick]

On the demo detector (RetinaNet, ResNet-18 at 1/4 width, FPN 64) and generated shapes data of
160x160: the demo's (``--dataset easy``: 800 train / 200 val images, 4 classes) or its hard variant
(``--dataset hard``, ``configs/demo/retinanet_r18_shapes_hard.py``: 2000 / 300 images, 8 classes that
differ in outline only, textured fills, overlaps, clutter), for every seed:

* ``baseline``: trained from scratch for ``--base-iters`` iterations (the demo recipe);
* at every FLOPs target, pruned from that baseline by ``FisherPruningHook`` (8 channels every 2
  iterations, lr 2e-4) and fine-tuned, with the importance criterion
  and normalisation of the row: ``fisher-M`` (the default), ``fisher-F``, ``l1-M`` (filter L1 norm),
  ``random-M`` (seeded by the seed), ``fisher-L`` (latency normalisation, its latency model measured
  on this CPU at the last of ``--sizes``, the deployment size), ``l1-U`` (filter L1 norm, no
  normalisation: the usual L1 baseline); fisher-M is fine-tuned for
  ``--ft-iters`` iterations, every other row for as many as make its total (baseline + pruning +
  fine-tuning) equal to fisher-M's, since criteria reach the target in different numbers of iterations;
* ``uniform``: every prunable width scaled by one factor so that the FLOPs match the target
  (``tools/analysis_tools/uniform_spec.py``), trained from scratch for as many iterations as the
  fisher-M row had in all (baseline + pruning + fine-tuning);
* ``fisher-M arch, re-init``: the architecture fisher-M found, re-initialised and trained from scratch
  as long (Liu et al., "Rethinking the Value of Network Pruning", ICLR 2019);
* ``baseline, trained as long``: the unpruned network trained from scratch for as many iterations as
  fisher-M at the first target had in all (what pruning costs in mAP against an equal training budget);
* at the first target, fisher-M with other schedules: 2 channels every 2 iterations, 32 every 2,
  5% of the removable channels every 2, and one shot (everything after 20 iterations of Fisher);
  the paper's (1 channel every 10 iterations) only when ``--schedules`` names it.

``--methods``, ``--first-target-methods``, ``--controls`` and ``--schedules`` choose the rows (e.g. the
slower criteria at the first target only, or no re-initialised row). ``--width W`` scales the demo
detector's widths (ResNet base channels, FPN and head channels) by ``W`` before anything is trained: the
same study on a wider or narrower baseline, in ``runs_width<W>/`` so that the default width's runs are
kept.

Every training is ``tools/train.py`` in a subprocess (its final validation gives bbox mAP and mAP@50).
Then, in this process, every distinct architecture is built and measured side by side: params,
FLOPs and activations from mmengine's analysis, and CPU latency (batch 1, tensor mode, median of
interleaved runs) at the training size and at 640x640. Writes ``report.md``, ``results.json`` and
``pruning_study.png`` (mAP against latency, the Pareto front drawn) to the work dir. With two or
more targets the report adds mAP at equal latency: each method run at two or more targets has its mAP
interpolated linearly between its own rows at the latency of every pruned or scaled row (never
extrapolated).

Every run is cached in ``runs/<name>``: it is redone only when its config (including the demo configs
it inherits), or the run it starts from, changed; the key does not depend on where the checkout or the
work dir lies. A change to mmfisher's or mmdet's code is not seen: ``--redo`` redoes everything.
A run saves a checkpoint every ``--checkpoint-every`` iterations; a study stopped in the middle of a run
continues that run from its last checkpoint when started again with the same command.
``--quick``: a smoke run on 32 images with a few iterations
(for the tests; the numbers mean nothing).
"""
import argparse
import hashlib
import json
import os
import os.path as osp
import shutil
import subprocess
import sys
import time

ROOT = osp.abspath(osp.join(osp.dirname(__file__), '..'))
sys.path.insert(0, ROOT)
DEMO = osp.join(ROOT, 'configs', 'demo')
METHODS = {                      # name: (importance, normalization)
    'fisher-M': ('fisher', 'memory'),
    'fisher-F': ('fisher', 'flops'),
    'l1-M': ('l1', 'memory'),
    'random-M': ('random', 'memory'),
    'fisher-L': ('fisher', 'latency'),     # latency model measured at the last --sizes (the deployment size)
    'l1-U': ('l1', 'none'),                # the usual L1 baseline: no normalisation (tells criterion from -M)
}
CONTROLS = ['re-init', 'uniform', 'as-long']   # the rows trained from scratch
SCHEDULES = {                    # name: (interval, channels_per_step); 'default' is the main rows'
    'default': (2, 8),
    '2 ch / 2 it': (2, 2),
    '32 ch / 2 it': (2, 32),
    '5% / 2 it': (2, 0.05),
    'one shot': (20, 100000),
    'paper': (10, 1),            # the paper's: 1 channel every 10 iterations (long: not run unless asked)
}
DEFAULT_SCHEDULES = ['2 ch / 2 it', '32 ch / 2 it', '5% / 2 it', 'one shot']
DATASETS = {                     # name: (config every run inherits, default data root, train / val images)
    'easy': ('retinanet_r18_shapes.py', 'data/shapes', (800, 200)),
    'hard': ('retinanet_r18_shapes_hard.py', 'data/shapes_hard', (2000, 300)),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--work-dir', default='work_dirs/pruning_study')
    p.add_argument('--dataset', choices=list(DATASETS), default='easy',
                   help="the generated shapes data: 'easy' (the demo's, 800 / 200 images of 4 classes) or 'hard' "
                        "(2000 / 300 images of 8 classes that differ in outline only, textures, overlaps, clutter)")
    p.add_argument('--data-root', default=None, help='default: data/shapes (easy) or data/shapes_hard (hard)')
    p.add_argument('--seeds', type=int, nargs='+', default=[0, 1])
    p.add_argument('--targets', type=float, nargs='+', default=[0.5, 0.3], help='FLOPs ratios to prune to')
    p.add_argument('--base-iters', type=int, default=None, help='baseline iterations (default 400; --quick 8)')
    p.add_argument('--ft-iters', type=int, default=None, help='fine-tuning iterations (default 200; --quick 4)')
    p.add_argument('--repeats', type=int, default=None,
                   help='timed runs per model and input size (default 30; --quick 3)')
    p.add_argument('--sizes', nargs='+', default=['160x160', '640x640'], help='latency input sizes, HxW')
    p.add_argument('--methods', nargs='+', default=list(METHODS), choices=list(METHODS),
                   help='pruned rows to run at every target (fisher-M always runs: the other rows\' budgets '
                        'follow it)')
    p.add_argument('--first-target-methods', nargs='*', default=[], choices=list(METHODS),
                   help='pruned rows to run at the first target only (after every row of --methods)')
    p.add_argument('--controls', nargs='*', default=CONTROLS, choices=CONTROLS,
                   help='rows trained from scratch: re-init (the fisher-M architecture at every target), '
                        'uniform (at every target), as-long (the unpruned network); default: all three')
    p.add_argument('--schedules', nargs='*', default=DEFAULT_SCHEDULES,
                   choices=[k for k in SCHEDULES if k != 'default'],
                   help='other fisher-M schedules, at the first target (none: give the option no value); '
                        f'default: {", ".join(DEFAULT_SCHEDULES)}'.replace('%', '%%'))
    p.add_argument('--width', type=float, default=1.0,
                   help='scale the baseline detector\'s widths by this factor (default 1: the demo detector)')
    p.add_argument('--checkpoint-every', type=int, default=500,
                   help='save every run\'s checkpoint this often (iterations), so that an interrupted study '
                        'resumes its unfinished run from there (default 500)')
    p.add_argument('--redo', action='store_true', help='run every stage again')
    p.add_argument('--quick', action='store_true', help='smoke run: 32 images, a few iterations')
    return p.parse_args(argv)


# ---------------------------------------------------------------- runs
class Study:
    def __init__(self, args):
        self.args = args
        self.work = osp.abspath(args.work_dir)
        self.runs = osp.join(self.work, 'runs' if args.width == 1 else f'runs_width{args.width:g}')
        self.data = osp.abspath(args.data_root or DATASETS[args.dataset][1]).rstrip('/') + '/'
        self.quick = args.quick
        os.makedirs(self.runs, exist_ok=True)
        self.base_cfg = osp.join(DEMO, DATASETS[args.dataset][0])
        if args.width != 1:
            self.base_cfg = self.scaled_config(args.width)

    def scaled_config(self, width):
        """The dataset's demo config with every width of its detector scaled by ``width`` (rounded): the
        ResNet's base channels (its stages follow), the FPN's input and output channels, the head's input
        and feature channels. Written to ``<runs>/base.py``; returns its path."""
        from mmengine.config import Config
        src = osp.join(DEMO, DATASETS[self.args.dataset][0])
        m = Config.fromfile(src).model

        def w(c):
            return max(1, round(c * width))
        text = f'''_base_ = [{src!r}]
# every width of the demo detector scaled by {width:g}
model = dict(backbone=dict(base_channels={w(m.backbone.base_channels)}),
             neck=dict(in_channels={[w(c) for c in m.neck.in_channels]}, out_channels={w(m.neck.out_channels)}),
             bbox_head=dict(in_channels={w(m.bbox_head.in_channels)}, feat_channels={w(m.bbox_head.feat_channels)}))
'''
        path = osp.join(self.runs, 'base.py')
        with open(path, 'w') as f:
            f.write(text)
        return path

    def data_block(self):
        r = self.data
        workers = 'num_workers=0, persistent_workers=False' if self.quick else 'num_workers=2, persistent_workers=True'
        batch = 4 if self.quick else 16
        return f'''
_r = {r!r}
train_dataloader = dict(batch_size={batch}, {workers}, dataset=dict(data_root=_r))
val_dataloader = dict({workers}, dataset=dict(data_root=_r))
test_dataloader = val_dataloader
val_evaluator = dict(ann_file=_r + 'annotations/instances_val2017.json')
test_evaluator = val_evaluator
'''

    def hooks(self, checkpoint_interval):
        return f"default_hooks = dict(logger=dict(interval=50), checkpoint=dict(by_epoch=False, " \
               f"interval={checkpoint_interval}, max_keep_ckpts=1))\n"

    def schedule(self, iters, warmup, lr, start):
        warmup = min(warmup, max(1, iters // 4))
        return f'''
optim_wrapper = dict(optimizer=dict(lr={lr}))
train_cfg = dict(max_iters={iters}, val_interval={iters})
param_scheduler = [
    dict(type='LinearLR', start_factor={start}, by_epoch=False, begin=0, end={warmup}),
    dict(type='CosineAnnealingLR', by_epoch=False, begin={warmup}, end={iters}, eta_min=1e-5),
]
''' + self.hooks(iters)


    def run(self, name, config_text, deps=(), expect=None):
        """``tools/train.py`` on ``config_text`` in ``runs/<name>``, unless done with the same config and
        inputs. Returns the run directory. ``deps``: files the run reads (their cache keys count).

        A run saves a checkpoint every ``--checkpoint-every`` iterations (not part of the cache key). A run
        that was interrupted (no ``done.json``) with the same key continues from its last checkpoint with
        mmengine's ``--resume``, so a study stopped mid-stage loses at most that many iterations."""
        d = osp.join(self.runs, name.replace(' ', '_').replace('/', '-').replace('%', 'pc'))
        key = hashlib.sha256((self._portable(config_text) + self._configs_key()
                              + ''.join(self._key_of(p) for p in deps)).encode()).hexdigest()
        done = osp.join(d, 'done.json')
        if not self.args.redo and osp.isfile(done):
            with open(done) as f:
                if json.load(f).get('key') == key and (expect is None or osp.exists(osp.join(d, expect))):
                    print(f'[study] {name}: cached', flush=True)
                    return d
        resume_from = None if self.args.redo else self._interrupted_checkpoint(d, key)
        if resume_from is None:
            if osp.isdir(d):
                shutil.rmtree(d)
            os.makedirs(d)
            with open(osp.join(d, 'started.json'), 'w') as f:
                json.dump({'key': key}, f)
        cfg = osp.join(d, 'config.py')
        with open(cfg, 'w') as f:
            f.write(config_text)
        print(f'\n===== [study] {name} =====', flush=True)
        if resume_from is not None:
            print(f'[study] {name}: interrupted earlier; resuming from {osp.basename(resume_from)}', flush=True)
        t0 = time.perf_counter()
        env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get('PYTHONPATH', ''))
        cmd = [sys.executable, 'tools/train.py', cfg, '--work-dir', d,
               '--cfg-options', f'default_hooks.checkpoint.interval={self.args.checkpoint_every}']
        with open(osp.join(d, 'train.log'), 'a' if resume_from else 'w') as log:
            res = subprocess.run(cmd + (['--resume', resume_from] if resume_from else []), cwd=ROOT, env=env,
                                 stdout=log, stderr=subprocess.STDOUT)
        if res.returncode != 0:
            sys.exit(f'[study] {name} failed (exit code {res.returncode}); see {osp.join(d, "train.log")}')
        seconds = time.perf_counter() - t0
        result = {'key': key, 'seconds': seconds, **self._metrics(d)}
        if resume_from is not None:
            result['resumed_from'] = osp.basename(resume_from)   # ``seconds`` then counts the last part only
        with open(done, 'w') as f:
            json.dump(result, f)
        print(f'[study] {name}: {seconds:.0f} s ' + ', '.join(f'{k} {v}' for k, v in result.items()
                                                            if k.startswith('coco')), flush=True)
        return d

    @staticmethod
    def _interrupted_checkpoint(d, key):
        """The last checkpoint of an unfinished run in ``d`` started with cache key ``key``, or None (no
        such run, another key, or no checkpoint written yet)."""
        started, last = osp.join(d, 'started.json'), osp.join(d, 'last_checkpoint')
        if osp.isfile(osp.join(d, 'done.json')) or not (osp.isfile(started) and osp.isfile(last)):
            return None
        with open(started) as f:
            if json.load(f).get('key') != key:
                return None
        with open(last) as f:
            ckpt = osp.join(d, osp.basename(f.read().strip()))
        return ckpt if osp.isfile(ckpt) else None

    def _portable(self, text):
        """``text`` with this checkout's, work dir's and data root's paths replaced by placeholders, so that
        a cache key does not change with where the repository or the work dir lies."""
        for path, name in ((self.work, '<work>'), (self.data.rstrip('/'), '<data>'), (ROOT, '<root>')):
            text = text.replace(path, name)
        return text

    def _configs_key(self):
        """The content of the demo configs every run inherits from (and of the scaled one, with --width)."""
        h = hashlib.sha256()
        for name in sorted(os.listdir(DEMO)):
            if name.endswith('.py'):
                with open(osp.join(DEMO, name), 'rb') as f:
                    h.update(name.encode() + f.read())
        if not self.base_cfg.startswith(DEMO):
            with open(self.base_cfg, 'rb') as f:
                h.update(self._portable(f.read().decode()).encode())
        return h.hexdigest()

    @staticmethod
    def _key_of(path):
        """A run's output: that run's key; any other file: its content."""
        done = osp.join(osp.dirname(path), 'done.json')
        if osp.isfile(done):
            with open(done) as f:
                return json.load(f)['key']
        with open(path, 'rb') as f:
            return hashlib.sha256(f.read()).hexdigest()

    @staticmethod
    def _metrics(d):
        """The last validation's metrics from mmengine's scalars.json of the newest run in ``d``."""
        stamps = sorted(x for x in os.listdir(d) if osp.isfile(osp.join(d, x, 'vis_data', 'scalars.json')))
        out = {}
        if stamps:
            with open(osp.join(d, stamps[-1], 'vis_data', 'scalars.json')) as f:
                for line in f:
                    rec = json.loads(line)
                    if 'coco/bbox_mAP' in rec:
                        out = {k: v for k, v in rec.items() if k.startswith('coco/')}
        return out

    @staticmethod
    def result(d):
        with open(osp.join(d, 'done.json')) as f:
            return json.load(f)

    # ---------------------------------------------------------------- stages
    def baseline(self, seed, iters, name='baseline'):
        text = f"_base_ = [{self.base_cfg!r}]\n" + self.data_block() + \
            self.schedule(iters, 100, 2e-3, 0.01) + f'randomness = dict(seed={seed})\nload_from = None\n' + \
            ("model = dict(test_cfg=dict(score_thr=0.0))\n" if self.quick else '')
        d = self.run(f'{name} s{seed}', text, expect=f'iter_{iters}.pth')
        return osp.join(d, f'iter_{iters}.pth')

    def prune(self, name, baseline, seed, target, importance, normalization, interval, per_step):
        imp = dict(type='random', seed=seed) if importance == 'random' else importance
        shape = ''
        if normalization == 'latency':     # the latency model on this CPU at the deployment size
            h, w = (int(v) for v in self.args.sizes[-1].lower().split('x'))
            shape = f', input_shape=({h}, {w})'
        text = f"_base_ = [{self.base_cfg!r}]\n" + self.data_block() + f'''
load_from = {baseline!r}
optim_wrapper = dict(optimizer=dict(lr=2e-4))     # 1/10 of the baseline's, as in the paper
train_cfg = dict(max_iters=100000, val_interval=100000)
param_scheduler = [dict(type='ConstantLR', factor=1.0, by_epoch=False, begin=0, end=100000)]
{self.hooks(100000)}randomness = dict(seed={seed})
custom_hooks = [
    dict(type='SafeCheckpointHook'),
    dict(type='FisherPruningHook', interval={interval}, target=('flops', {target}), normalization={normalization!r},
         channels_per_step={per_step!r}, importance={imp!r}, save_ratios=[], stop_at_target=True{shape}),
]
'''
        pruned = f'pruned_flops_{target:.2f}.pth'
        d = self.run(name, text, deps=[baseline], expect=pruned)
        return osp.join(d, pruned)

    def finetune(self, name, pruned, seed, iters):
        text = f"_base_ = [{self.base_cfg!r}]\n" + self.data_block() + \
            self.schedule(iters, 50, 1e-3, 0.1) + f'''
model = dict(_delete_=True, type='PrunedModel', channel_spec={pruned!r}, architecture={self.architecture()})
load_from = {pruned!r}
randomness = dict(seed={seed})
'''
        return self.run(name, text, deps=[pruned], expect=f'iter_{iters}.pth')

    def scratch(self, name, spec, seed, iters):
        text = f"_base_ = [{self.base_cfg!r}]\n" + self.data_block() + \
            self.schedule(iters, 100, 2e-3, 0.01) + f'''
model = dict(_delete_=True, type='PrunedModel', channel_spec={spec!r}, architecture={self.architecture()})
load_from = None     # from scratch: the runner initialises the narrow layers with their own fan-in
randomness = dict(seed={seed})
'''
        return self.run(name, text, deps=[spec], expect=f'iter_{iters}.pth')

    def architecture(self):
        """The config expression of the unpruned detector a PrunedModel wraps (a smoke run keeps every box)."""
        return ("dict(_base_.model, test_cfg=dict(_base_.model.test_cfg, score_thr=0.0))" if self.quick
                else "_base_.model")

    def uniform_spec(self, target):
        path = osp.join(self.runs, f'uniform_{target:.2f}.json')
        if not osp.isfile(path) or self.args.redo:
            if osp.isfile(path):
                os.remove(path)
            from mmfisher.openmmlab.tools_common import analysis_tool_config, uniform_channel_spec
            spec, width, ratios = uniform_channel_spec(analysis_tool_config(self.base_cfg, None),
                                                       target=('flops', target), shape=(160,))
            with open(path, 'x') as f:
                json.dump(spec, f)
            print(f'[study] uniform width {width:.4f}: ' + ', '.join(f'{k} {v:.4f}' for k, v in ratios.items())
                  + f' of the baseline at 160x160; wrote {path}', flush=True)
        return path


def pruned_iters(path):
    import torch
    return int(torch.load(path, map_location='cpu', weights_only=True)['meta']['mmfisher']['iter'])


def main(argv=None):
    args = parse_args(argv)
    from mmfisher.core.latency import roomy_primitive_cache
    roomy_primitive_cache()   # before the first conv: many models are timed in turn
    defaults = (8, 4, 3) if args.quick else (400, 200, 30)
    for name, value in zip(('base_iters', 'ft_iters', 'repeats'), defaults):
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.quick:
        args.seeds, args.targets, args.sizes = args.seeds[:1], args.targets[:1], args.sizes[:1]
    methods = {k: v for k, v in METHODS.items() if k == 'fisher-M' or k in args.methods}
    first_only = {k: v for k, v in METHODS.items() if k in args.first_target_methods and k not in methods}
    t_start = time.perf_counter()
    study = Study(args)
    from mmfisher.datasets.shapes import HARD_SHAPES, SHAPES, make_coco_shapes
    n_train, n_val = (32, 8) if args.quick else DATASETS[args.dataset][2]
    make_coco_shapes(study.data, num_train=n_train, num_val=n_val, size=160, variant=args.dataset,
                     names=HARD_SHAPES if args.dataset == 'hard' else SHAPES)
    schedules = {k: v for k, v in SCHEDULES.items() if k == 'default' or k in args.schedules}
    if args.quick:
        schedules = {'default': (1, 40), **({'one shot': (4, 100000)} if args.schedules else {})}

    rows = []   # one per trained model: method, target, seed, run dir, spec, total iterations

    def add(method, target, seed, d, spec, iters):
        r = Study.result(d)
        rows.append({'method': method, 'target': target, 'seed': seed, 'spec': spec, 'iters': iters,
                     'mAP': r.get('coco/bbox_mAP'), 'mAP50': r.get('coco/bbox_mAP_50'), 'run': d,
                     'train_seconds': r['seconds']})

    for seed in args.seeds:
        base = study.baseline(seed, args.base_iters)
        add('baseline', 1.0, seed, osp.dirname(base), None, args.base_iters)
        for target in args.targets:
            for method, (importance, norm) in {**methods, **(first_only if target == args.targets[0] else {})}.items():
                interval, per_step = schedules['default']
                pruned = study.prune(f'{method} {target} s{seed} prune', base, seed, target, importance, norm,
                                     interval, per_step)
                p_iters = pruned_iters(pruned)
                if method == 'fisher-M':     # the first: its total is every other row's at this target
                    total = args.base_iters + p_iters + args.ft_iters
                    fisher_spec = pruned
                ft = max(1, total - args.base_iters - p_iters)
                d = study.finetune(f'{method} {target} s{seed}', pruned, seed, ft)
                add(method, target, seed, d, pruned, args.base_iters + p_iters + ft)
            if 're-init' in args.controls:
                d = study.scratch(f'fisher-M arch re-init {target} s{seed}', fisher_spec, seed, total)
                add('fisher-M arch, re-init', target, seed, d, fisher_spec, total)
            if 'uniform' in args.controls:
                uni = study.uniform_spec(target)
                d = study.scratch(f'uniform {target} s{seed}', uni, seed, total)
                add('uniform', target, seed, d, uni, total)
            if target == args.targets[0]:
                long_total = total
        if 'as-long' in args.controls:
            # the unpruned network trained as long as fisher-M at the first target: what pruning costs in mAP
            d = osp.dirname(study.baseline(seed, long_total, name='baseline as long'))
            add('baseline, trained as long', 1.0, seed, d, None, long_total)
        target = args.targets[0]
        for sched, (interval, per_step) in schedules.items():
            if sched == 'default':
                continue
            pruned = study.prune(f'fisher-M {sched} {target} s{seed} prune', base, seed, target, 'fisher', 'memory',
                                 interval, per_step)
            p_iters = pruned_iters(pruned)
            d = study.finetune(f'fisher-M {sched} {target} s{seed}', pruned, seed, args.ft_iters)
            add(f'fisher-M, {sched}', target, seed, d, pruned, args.base_iters + p_iters + args.ft_iters)

    print('\n===== [study] measuring every architecture side by side =====', flush=True)
    measures = measure(rows, args, study.base_cfg)
    report = write_report(study, rows, measures, args, time.perf_counter() - t_start)
    print(report)
    return rows, measures


def measure(rows, args, base_cfg):
    """Params / FLOPs / activations at the training size and latency at every size, per distinct spec."""
    import torch
    from mmengine.config import Config
    from mmengine.registry import DefaultScope

    from mmfisher.openmmlab import build_from_config, build_pruned_model, register_all_modules
    from mmfisher.openmmlab.benchmarking import complexity, interleaved_latency, tensor_run
    register_all_modules()
    arch = Config.fromfile(base_cfg)
    specs = []
    for r in rows:
        if r['spec'] not in specs:
            specs.append(r['spec'])
    models = {}
    with DefaultScope.overwrite_default_scope('mmdet'):
        for spec in specs:
            m = build_from_config(arch) if spec is None else \
                build_pruned_model(arch.model, spec, input_shape=(160, 160))
            models[spec] = m.eval()
    out = {spec: {} for spec in specs}
    x = torch.randn(1, 3, 160, 160, generator=torch.Generator().manual_seed(0))
    for spec, m in models.items():
        out[spec].update(complexity(m, x, tensor_run(m, x)))
    for size in args.sizes:
        h, w = (int(v) for v in size.lower().split('x'))
        x = torch.randn(1, 3, h, w, generator=torch.Generator().manual_seed(0))
        runs = [tensor_run(models[s], x) for s in specs]
        for spec, t in zip(specs, interleaved_latency(runs, args.repeats, 3)):
            out[spec][f'latency_ms@{size}'] = t['latency_ms']
            out[spec][f'spread_ms@{size}'] = t['spread_ms']
    return {('baseline' if k is None else k): v for k, v in out.items()}


def _stats(values):
    values = [v for v in values if v is not None]
    if not values:
        return None, None, None
    return sum(values) / len(values), min(values), max(values)


def write_report(study, rows, measures, args, seconds):
    import torch
    groups = {}
    for r in rows:
        groups.setdefault((r['method'], r['target']), []).append(r)
    base_m = measures['baseline']
    table = []
    for (method, target), rs in groups.items():
        m = [measures['baseline' if r['spec'] is None else r['spec']] for r in rs]
        row = {'method': method, 'target': target, 'seeds': [r['seed'] for r in rs],
               'mAP': _stats([r['mAP'] for r in rs]), 'mAP50': _stats([r['mAP50'] for r in rs]),
               'iters': _stats([r['iters'] for r in rs])[0],
               'params': _stats([x['params'] for x in m])[0], 'flops': _stats([x['flops'] for x in m])[0],
               'activations': _stats([x['activations'] for x in m])[0]}
        for size in args.sizes:
            row[f'latency@{size}'] = _stats([x[f'latency_ms@{size}'] for x in m])
        table.append(row)

    def cell(s, fmt='{:.3f}'):
        mean, lo, hi = s
        if mean is None:
            return 'n/a'
        if lo == hi:
            return fmt.format(mean)
        return f'{fmt.format(mean)} ({fmt.format(lo)}-{fmt.format(hi)})'

    sizes = args.sizes
    head = ('| model | FLOPs target | bbox mAP | mAP@50 | params (M) | FLOPs (G) | activations (M) | '
            + ' | '.join(f'latency {s} (ms)' for s in sizes) + ' | iterations |')
    lines = [
        f'# Pruning study: the demo RetinaNet' + ('' if args.width == 1 else f' with every width x{args.width:g}')
        + f' on the {args.dataset} generated shapes data',
        '',
        f'`python benchmarks/pruning_study.py' + ('' if args.dataset == 'easy' else f' --dataset {args.dataset}')
        + ('' if args.width == 1 else f' --width {args.width:g}')
        + f' --seeds {" ".join(map(str, args.seeds))} --targets '
        f'{" ".join(map(str, args.targets))} --base-iters {args.base_iters} --ft-iters {args.ft_iters}'
        + ('' if set(args.methods) == set(METHODS) else ' --methods ' + ' '.join(args.methods))
        + (' --first-target-methods ' + ' '.join(args.first_target_methods) if args.first_target_methods else '')
        + ('' if args.controls == CONTROLS else ' --controls' + ''.join(' ' + c for c in args.controls))
        + ('' if args.schedules == DEFAULT_SCHEDULES else ' --schedules ' + ' '.join(f"'{x}'" for x in args.schedules))
        + (' --quick' if args.quick else '') + f'` ({seconds / 60:.0f} min on this machine, torch '
        f'{torch.__version__}, {torch.get_num_threads()} threads).',
        '',
        f'Mean over seeds {args.seeds} (min-max in brackets). FLOPs, params and activations from mmengine\'s '
        f'analysis at 160x160 (the training size); latency: batch 1, network in tensor mode, median of '
        f'{args.repeats} runs of every model in turn in one process. Iterations: in all (baseline + pruning + '
        f'fine-tuning, or from scratch).',
        '',
        head,
        '|' + '---|' * (8 + len(sizes)),
    ]
    for row in table:
        flops_ratio = row['flops'] / base_m['flops']
        lines.append(
            f'| {row["method"]} | {row["target"]:.2f} ({flops_ratio:.3f}) | {cell(row["mAP"])} | '
            f'{cell(row["mAP50"])} | {row["params"] / 1e6:.3f} | {row["flops"] / 1e9:.3f} | '
            f'{row["activations"] / 1e6:.2f} | '
            + ' | '.join(cell(row[f'latency@{s}'], '{:.1f}') for s in sizes) + f' | {row["iters"]:.0f} |')
    refs, curves = equal_latency(table, sizes[-1])
    if curves:      # some method ran at two or more targets
        names = list(curves)
        lines += ['', f'bbox mAP at equal latency ({sizes[-1]}): at the measured latency of each row, '
                  f'every method\'s mean mAP interpolated linearly between its own two rows '
                  f'(FLOPs targets) around that latency; "-" where the latency is outside the range its rows span '
                  f'(no extrapolation).', '',
                  '| at the latency of | ms | ' + ' | '.join(names) + ' |', '|' + '---|' * (2 + len(names))]
        for label, lat in refs:
            cells = [interpolate(curves[n], lat) for n in names]
            lines.append(f'| {label} | {lat:.1f} | ' + ' | '.join('-' if c is None else f'{c:.3f}' for c in cells)
                         + ' |')
    png = osp.join(study.work, 'pruning_study.png')
    plot(table, sizes[-1], png)
    lines += ['', f'![mAP against latency at {sizes[-1]}](pruning_study.png)', '']
    text = '\n'.join(lines) + '\n'
    with open(osp.join(study.work, 'report.md'), 'w') as f:
        f.write(text)
    with open(osp.join(study.work, 'results.json'), 'w') as f:
        json.dump({'rows': rows, 'measures': measures, 'table': table}, f, indent=1, default=str)
    return text


def equal_latency(table, size):
    """The methods pruned (or scaled) to two or more FLOPs targets, each as its (latency, mean mAP) points
    sorted by latency at ``size``, and the reference latencies: those of every pruned or scaled row (a method
    run at one target only is compared there with the curves of the others)."""
    rows = [row for row in table if row['mAP'][0] is not None and not row['method'].startswith('baseline')]
    curves = {}
    for row in rows:
        curves.setdefault(row['method'], []).append((row[f'latency@{size}'][0], row['mAP'][0]))
    curves = {k: sorted(v) for k, v in curves.items() if len(v) >= 2}
    refs = [(f'{row["method"]} {row["target"]:.2f}', row[f'latency@{size}'][0]) for row in rows
            if row['method'] != 'fisher-M arch, re-init']   # that one: fisher-M's latency
    return refs, curves


def interpolate(points, latency):
    """mAP at ``latency`` on the piecewise-linear curve through ``points`` [(latency, mAP)] sorted by
    latency; None outside their range."""
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x0 <= latency <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (latency - x0) / (x1 - x0)
    return None


def plot(table, size, out_png):
    """mAP against latency at ``size``: a point per model (seed range as error bars), the Pareto front."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    pts = [(r[f'latency@{size}'], r['mAP'], f'{r["method"]} {r["target"]:.2f}' if r['method'] != 'baseline'
            else 'baseline') for r in table if r['mAP'][0] is not None]
    fig, ax = plt.subplots(figsize=(9, 6))
    colours = {}
    for (lat, m, label) in pts:
        method = label.rsplit(' ', 1)[0] if label != 'baseline' else label
        colour = colours.setdefault(method, f'C{len(colours) % 10}')
        ax.errorbar(lat[0], m[0], xerr=[[lat[0] - lat[1]], [lat[2] - lat[0]]],
                    yerr=[[m[0] - m[1]], [m[2] - m[0]]], fmt='o', capsize=3, color=colour)
        ax.annotate(label, (lat[0], m[0]), fontsize=7, xytext=(4, 3), textcoords='offset points')
    for method, curve in equal_latency(table, size)[1].items():     # a method's FLOPs targets, joined
        ax.plot([p[0] for p in curve], [p[1] for p in curve], '-', lw=1, alpha=0.5, color=colours[method])
    front, best = [], -1.0
    for lat, m, _ in sorted(pts, key=lambda p: p[0][0]):
        if m[0] > best:
            front.append((lat[0], m[0]))
            best = m[0]
    if front:
        ax.step([p[0] for p in front], [p[1] for p in front], where='post', color='k', alpha=0.4,
                label='Pareto front (no model both faster and better)')
    ax.set_xlabel(f'CPU latency at {size}, batch 1 (ms)')
    ax.set_ylabel('bbox mAP (val)')
    ax.set_title('Pruned, uniformly narrower and re-initialised models')
    ax.legend(loc='lower right', fontsize=8)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)


if __name__ == '__main__':
    main()
