"""How much faster is RetinaNet-R50-FPN pruned to 50% FLOPs, by normalisation? (-M, -F, -L, uniform)

    python benchmarks/retinanet_speed.py [--work-dir work_dirs/speed] [--sizes 640x640 800x1333]
                                         [--repeats 10] [--channels-per-step 100] [--latency-target 0.6]

1. Prunes the stock RetinaNet-R50-FPN (random init: speed does not depend on the weights'
   quality) with the shipped prune config and FisherPruningHook to 50% of its FLOPs, on the
   generated shapes dataset (COCO class names, 320x320 training images, batch 2): with memory
   normalisation (-M; compact checkpoints also at 75% and 60%), FLOPs normalisation (-F), and
   latency normalisation (-L) once per deployment size of ``--sizes`` (the hook's ``input_shape``:
   its latency model is measured on this CPU at that size). Because one channel every 10
   iterations would take tens of thousands of CPU iterations, each decision removes
   ``--channels-per-step`` channels (still chosen globally, costs re-measured after each removal).
2. Prunes once more with -L to a latency target: ``target=('latency', --latency-target)`` at the
   first size; the question is how many FLOPs it keeps against -M at the same measured latency.
3. Writes more variants: -M with every group's channel count rounded up to a multiple of 8 and of 16
   (this CPU's channel quantum), and the uniformly narrower model with 50% of the FLOPs
   (``tools/analysis_tools/uniform_spec.py``).
4. Runs ``tools/benchmark.py`` once with all of them (unpruned first), side by side in one process,
   batch 1, timed in turns at every size, and writes ``speed.md`` with the table to the work dir.

Stages whose results exist are skipped (``--redo`` runs everything again).
"""
import argparse
import json
import os
import os.path as osp
import subprocess
import sys

ROOT = osp.abspath(osp.join(osp.dirname(__file__), '..'))
sys.path.insert(0, ROOT)
PRUNE_CFG = osp.join(ROOT, 'configs', 'retinanet', 'retinanet_r50_fpn_fisher-prune-flops50_coco.py')
FT_CFG = osp.join(ROOT, 'configs', 'retinanet', 'retinanet_r50_fpn_fisher-pruned-flops50_finetune-1x_coco.py')


def run(cmd, capture=False):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get('PYTHONPATH', ''))
    print('$ ' + ' '.join(cmd), flush=True)
    res = subprocess.run([sys.executable] + cmd, cwd=ROOT, env=env, capture_output=capture, text=True)
    if res.returncode != 0:
        if capture:
            print(res.stdout[-3000:], res.stderr[-3000:])
        sys.exit(f'failed: {" ".join(cmd)}')
    return res.stdout if capture else ''


def prune(work, data_root, name, normalization, per_step, redo, target=('flops', 0.5), input_shape=None,
          save_ratios=()):
    """One pruning run of the hook into ``work/prune_<name>``; returns (its dir, its pruned checkpoint)."""
    out = osp.join(work, f'prune_{name}')
    pruned = osp.join(out, f'pruned_{target[0]}_{target[1]:.2f}.pth')
    if osp.isfile(pruned) and not redo:
        return out, pruned
    r = data_root.rstrip('/') + '/'
    extra = [f'custom_hooks.1.input_shape=({input_shape[0]},{input_shape[1]})'] if input_shape else []
    run(['tools/train.py', PRUNE_CFG, '--work-dir', out, '--cfg-options', 'load_from=None',
         f'train_dataloader.dataset.data_root={r}', f'val_dataloader.dataset.data_root={r}',
         f'test_dataloader.dataset.data_root={r}', f'val_evaluator.ann_file={r}annotations/instances_val2017.json',
         'train_dataloader.batch_size=2', 'train_dataloader.num_workers=0',
         'train_dataloader.persistent_workers=False', 'train_dataloader.dataset.pipeline.2.scale=(320,320)',
         'train_cfg.max_iters=100000', 'train_cfg.val_interval=100000',
         'default_hooks.checkpoint.interval=100000', 'default_hooks.logger.interval=10',
         'custom_hooks.1.interval=1', f'custom_hooks.1.channels_per_step={per_step}',
         f'custom_hooks.1.normalization={normalization}', f'custom_hooks.1.target=({target[0]},{target[1]})',
         f'custom_hooks.1.save_ratios=[{",".join(str(x) for x in save_ratios)}]', *extra])
    return out, pruned


def latency_meta(pruned):
    """The latency the hook predicted and measured for a pruned checkpoint (None without a latency model)."""
    import torch
    meta = torch.load(pruned, map_location='cpu', weights_only=True)['meta']['mmfisher']
    return meta.get('latency')


def rounded_spec(prune_dir, divisor, out_json):
    """Re-export the -M run with channel counts rounded to ``divisor``, from its last checkpoint's state."""
    import torch

    from mmfisher.core import analyse
    from mmfisher.core.pruner import GroupFisherPruner
    from mmfisher.openmmlab import build_from_config, example_forward
    last = open(osp.join(prune_dir, 'last_checkpoint')).read().strip()
    state = torch.load(last, map_location='cpu', weights_only=True)['mmfisher']['pruner']
    pruned = torch.load(osp.join(prune_dir, 'pruned_flops_0.50.pth'), map_location='cpu', weights_only=True)
    # the last checkpoint is the one written when the target was reached: its pruner state is the 50% one
    shape = pruned['meta']['mmfisher']['analysis_input_shape']
    model = build_from_config(PRUNE_CFG)
    graph = analyse(model, forward=example_forward(model, (1, 3, *shape)))
    pruner = GroupFisherPruner(model, graph, normalization=state['normalization'])
    pruner.load_state_dict(state)
    with open(out_json, 'w') as f:
        json.dump(pruner.channel_spec(divisor), f)
    return pruner.cost.ratios(pruner.export_keep(divisor))


def variant_config(work, name, spec):
    path = osp.join(work, f'{name}.py')
    with open(path, 'w') as f:
        f.write(f'_base_ = [{FT_CFG!r}]\nmodel = dict(channel_spec={spec!r})\nload_from = None\n')
    return path


def uniform_variant(work, ratio=0.5):
    """The uniformly narrower model with ``ratio`` of the FLOPs (at the 320x320 analysis size)."""
    spec = osp.join(work, f'spec_uniform_flops{ratio:.2f}.json')
    if not osp.isfile(spec):
        run(['tools/analysis_tools/uniform_spec.py', PRUNE_CFG, '--target', 'flops', str(ratio), '--out', spec,
             '--shape', '320', '320'])
    return spec


def main(argv=None):
    from mmfisher.core.latency import roomy_primitive_cache
    roomy_primitive_cache()   # before the first conv: many models are timed in turn
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--work-dir', default='work_dirs/speed')
    p.add_argument('--sizes', nargs='+', default=['640x640', '800x1333'])
    p.add_argument('--repeats', type=int, default=10)
    p.add_argument('--channels-per-step', type=int, default=100)
    p.add_argument('--latency-target', type=float, default=0.6,
                   help="ratio of the predicted latency (at the first size) the -L latency-target run prunes to")
    p.add_argument('--redo', action='store_true')
    args = p.parse_args(argv)
    work = osp.abspath(args.work_dir)
    os.makedirs(work, exist_ok=True)
    from mmfisher.datasets import make_coco_shapes
    data_root = osp.join(work, 'data')
    make_coco_shapes(data_root, num_train=64, num_val=4, size=320)
    sizes = [tuple(int(v) for v in s.split('x')) for s in args.sizes]
    per_step = args.channels_per_step

    variants = {}            # name -> (config, checkpoint)
    meta = {}                # name -> the hook's latency record
    m_dir, m_pruned = prune(work, data_root, 'memory', 'memory', per_step, args.redo, save_ratios=(0.75, 0.6))
    for r in (0.75, 0.6):
        path = osp.join(m_dir, f'pruned_flops_{r:.2f}.pth')
        variants[f'-M, {r:.0%} FLOPs'] = (variant_config(work, f'pruned_memory_{int(r * 100)}', path), 'none')
    variants['-M'] = (variant_config(work, 'pruned_memory', m_pruned), 'none')
    _, f_pruned = prune(work, data_root, 'flops', 'flops', per_step, args.redo)
    variants['-F'] = (variant_config(work, 'pruned_flops', f_pruned), 'none')
    for h, w in sizes:
        tag = f'{h}x{w}'
        _, l_pruned = prune(work, data_root, f'latency_{tag}', 'latency', per_step, args.redo, input_shape=(h, w))
        variants[f'-L ({tag})'] = (variant_config(work, f'pruned_latency_{tag}', l_pruned), 'none')
        meta[f'-L ({tag})'] = latency_meta(l_pruned)
    h, w = sizes[0]
    tag = f'{h}x{w}'
    _, t_pruned = prune(work, data_root, f'latency_target_{tag}', 'latency', per_step, args.redo,
                        target=('latency', args.latency_target), input_shape=(h, w))
    lt_name = f'-L to {args.latency_target:.0%} latency ({tag})'
    variants[lt_name] = (variant_config(work, f'pruned_latency_target_{tag}', t_pruned), 'none')
    meta[lt_name] = latency_meta(t_pruned)
    spec8 = osp.join(work, 'spec_memory_round8.json')
    ratios8 = rounded_spec(m_dir, 8, spec8)
    variants['-M, rounded to 8'] = (variant_config(work, 'pruned_memory_round8', spec8), 'none')
    spec16 = osp.join(work, 'spec_memory_round16.json')
    ratios16 = rounded_spec(m_dir, 16, spec16)
    variants['-M, rounded to 16'] = (variant_config(work, 'pruned_memory_round16', spec16), 'none')
    variants['uniform'] = (variant_config(work, 'uniform_flops50', uniform_variant(work)), 'none')

    out_json = osp.join(work, 'bench_' + '_'.join(args.sizes) + f'_r{args.repeats}.json')
    variants = {('Fisher' + n if n.startswith('-') else n): v for n, v in variants.items()}   # no leading '-':
    meta = {'Fisher' + n: v for n, v in meta.items()}                                        # argparse values
    lt_name = 'Fisher' + lt_name
    names = ['unpruned'] + list(variants)
    if not osp.isfile(out_json) or args.redo:
        pairs = [PRUNE_CFG, 'none'] + [x for cfg_ckpt in variants.values() for x in cfg_ckpt]
        run(['tools/benchmark.py', *pairs, '--sizes', *args.sizes, '--repeats', str(args.repeats), '--warmup', '2',
             '--names', *names, '--json', out_json])
    with open(out_json) as f:
        res = json.load(f)
    rows = res['models']
    base = rows['unpruned']
    lines = ['# RetinaNet-R50-FPN pruned by normalisation: speed on this CPU', '',
             f'`python benchmarks/retinanet_speed.py --sizes {" ".join(args.sizes)} --repeats {args.repeats} '
             f'--channels-per-step {per_step} --latency-target {args.latency_target}`: one `tools/benchmark.py` run, '
             f'every model side by side in one process, batch 1, timed in turns, median of {args.repeats} runs '
             f'after 2 warm-up runs, network in tensor mode; params / FLOPs / activations over the unpruned '
             f'model\'s (FLOPs and activations at {args.sizes[0]}, from {base["source"]}).', '',
             '| model | params | FLOPs | activations | ' + ' | '.join(f'ms {s} | speed-up {s}' for s in args.sizes)
             + ' |', '|---|---|---|---|' + '---|---|' * len(args.sizes)]
    for n in names:
        r = rows[n]
        cells = ' | '.join(f'{r["at"][s]["latency_ms"]:.0f} | {base["at"][s]["latency_ms"] / r["at"][s]["latency_ms"]:.2f}x'
                           for s in args.sizes)
        lines.append(f'| {n} | {r["params"] / base["params"]:.3f} | {r["flops"] / base["flops"]:.3f} | '
                     f'{r["activations"] / base["activations"]:.3f} | {cells} |')
    lines += ['', 'The -L runs\' latency model (measured by the hook on this CPU at its size, before pruning) '
              'against the latency the hook measured on the compact model at the end:', '',
              '| run | predicted unpruned (ms) | predicted pruned (ms) | measured pruned (ms) | error |',
              '|---|---|---|---|---|']
    for n, m in meta.items():
        if m:
            lines.append(f'| {n} | {m["original_predicted_ms"]:.0f} | {m["predicted_ms"]:.0f} | '
                         f'{m["measured_ms"]:.0f} | {m["predicted_ms"] / m["measured_ms"] - 1:+.1%} |')
    # -M's FLOPs at the latency-target model's measured latency: interpolated between -M's three points
    s0 = args.sizes[0]
    pts = sorted((rows[n]['at'][s0]['latency_ms'], rows[n]['flops'] / base['flops'])
                 for n in ('Fisher-M', 'Fisher-M, 60% FLOPs', 'Fisher-M, 75% FLOPs'))
    lt = rows[lt_name]
    t = lt['at'][s0]['latency_ms']
    m_flops = None
    for (t1, f1), (t2, f2) in zip(pts, pts[1:]):
        if t1 <= t <= t2 and t2 > t1:
            m_flops = f1 + (f2 - f1) * (t - t1) / (t2 - t1)
    lines += ['', f'Latency target at {s0}: the -L model pruned to {args.latency_target:.0%} of its predicted latency '
              f'runs in {t:.0f} ms ({t / base["at"][s0]["latency_ms"]:.3f} of unpruned) and keeps '
              f'{lt["flops"] / base["flops"]:.3f} of the FLOPs; '
              + (f'-M, interpolated between its 75%, 60% and 50% FLOPs models, keeps {m_flops:.3f} of the FLOPs '
                 f'at that measured latency.' if m_flops is not None else
                 f'that latency is outside the range of -M\'s three models ({pts[0][0]:.0f}-{pts[-1][0]:.0f} ms), '
                 f'so no -M FLOPs figure is interpolated.'),
              '', f'Rounding up to multiples of 8 or 16 gives back channels: FLOPs ratio of the rounded -M models by '
              f'the pruner\'s cost model {ratios8["flops"]:.3f} and {ratios16["flops"]:.3f}.']
    text = '\n'.join(lines) + '\n'
    with open(osp.join(work, 'speed.md'), 'w') as f:
        f.write(text)
    print(text)


if __name__ == '__main__':
    main()
