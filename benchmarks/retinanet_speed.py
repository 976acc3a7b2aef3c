"""How much faster is RetinaNet-R50-FPN pruned to 50% FLOPs? (-M vs -F, with and without rounding)

    python benchmarks/retinanet_speed.py [--work-dir work_dirs/speed] [--sizes 640x640 800x1333]
                                         [--repeats 10] [--channels-per-step 100]

1. Prunes the stock RetinaNet-R50-FPN (random init: speed does not depend on the weights'
   quality) with the shipped prune config and FisherPruningHook to 50% of its FLOPs, on the
   generated shapes dataset (COCO class names, 320x320 training images, batch 2), once with
   memory normalisation (-M) and once with FLOPs normalisation (-F). Because one channel every
   10 iterations would take tens of thousands of CPU iterations, each decision removes
   ``--channels-per-step`` channels (still chosen globally by normalised Fisher, costs
   re-measured after each removal).
2. Exports a third variant: -M with every group's channel count rounded up to a multiple of 8.
3. Runs ``tools/benchmark.py`` (unpruned vs each variant, side by side in one process, batch 1)
   at every size, and writes ``speed.md`` with the tables to the work dir.

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


def prune(work, data_root, normalization, per_step, redo):
    out = osp.join(work, f'prune_{normalization}')
    pruned = osp.join(out, 'pruned_flops_0.50.pth')
    if osp.isfile(pruned) and not redo:
        return out, pruned
    r = data_root.rstrip('/') + '/'
    run(['tools/train.py', PRUNE_CFG, '--work-dir', out, '--cfg-options', 'load_from=None',
         f'train_dataloader.dataset.data_root={r}', f'val_dataloader.dataset.data_root={r}',
         f'test_dataloader.dataset.data_root={r}', f'val_evaluator.ann_file={r}annotations/instances_val2017.json',
         'train_dataloader.batch_size=2', 'train_dataloader.num_workers=0',
         'train_dataloader.persistent_workers=False', 'train_dataloader.dataset.pipeline.2.scale=(320,320)',
         'train_cfg.max_iters=100000', 'train_cfg.val_interval=100000',
         'default_hooks.checkpoint.interval=100000', 'default_hooks.logger.interval=10',
         'custom_hooks.1.interval=1', f'custom_hooks.1.channels_per_step={per_step}',
         f'custom_hooks.1.normalization={normalization}', 'custom_hooks.1.save_ratios=[]'])
    return out, pruned


def rounded_spec(prune_dir, divisor, out_json):
    """Re-export the -M run with channel counts rounded to ``divisor``, from its last checkpoint's state."""
    import torch

    from mmfisher.core import analyse
    from mmfisher.core.pruner import GroupFisherPruner
    from mmfisher.openmmlab import build_from_config, example_forward
    last = open(osp.join(prune_dir, 'last_checkpoint')).read().strip()
    state = torch.load(last, map_location='cpu', weights_only=True)['mmfisher']['pruner']
    pruned = torch.load(osp.join(prune_dir, 'pruned_flops_0.50.pth'), map_location='cpu', weights_only=True)
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


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--work-dir', default='work_dirs/speed')
    p.add_argument('--sizes', nargs='+', default=['640x640', '800x1333'])
    p.add_argument('--repeats', type=int, default=10)
    p.add_argument('--channels-per-step', type=int, default=100)
    p.add_argument('--redo', action='store_true')
    args = p.parse_args(argv)
    work = osp.abspath(args.work_dir)
    os.makedirs(work, exist_ok=True)
    from mmfisher.datasets import make_coco_shapes
    data_root = osp.join(work, 'data')
    make_coco_shapes(data_root, num_train=64, num_val=4, size=320)

    variants = {}
    for norm, tag in (('memory', 'M'), ('flops', 'F')):
        out, pruned = prune(work, data_root, norm, args.channels_per_step, args.redo)
        variants[f'-{tag}'] = (variant_config(work, f'pruned_{norm}', pruned), pruned)
    spec8 = osp.join(work, 'spec_memory_round8.json')
    ratios8 = rounded_spec(osp.join(work, 'prune_memory'), 8, spec8)
    variants['-M, rounded to 8'] = (variant_config(work, 'pruned_memory_round8', spec8), 'none')

    base_cfg = osp.join(ROOT, 'configs', 'retinanet', 'retinanet_r50_fpn_fisher-prune-flops50_coco.py')
    lines = ['# RetinaNet-R50-FPN pruned to 50% FLOPs: speed on this CPU', '',
             f'`python benchmarks/retinanet_speed.py --sizes {" ".join(args.sizes)} --repeats {args.repeats} '
             f'--channels-per-step {args.channels_per_step}`; each row is one `tools/benchmark.py` run '
             f'(unpruned and pruned side by side, batch 1, median of {args.repeats} alternating runs, network '
             f'in tensor mode).', '',
             '| variant | input | params | FLOPs | activations | latency unpruned (ms) | latency pruned (ms) | '
             'speed-up |', '|---|---|---|---|---|---|---|---|']
    results = {}
    for size in args.sizes:
        h, w = size.split('x')
        for name, (cfg, ckpt) in variants.items():
            out_json = osp.join(work, f'bench_{name.strip("-").replace(", ", "_").replace(" ", "_")}_{size}.json')
            if not osp.isfile(out_json) or args.redo:
                run(['tools/benchmark.py', base_cfg, 'none', cfg, 'none', '--shape', h, w, '--repeats',
                     str(args.repeats), '--warmup', '2', '--names', 'unpruned', 'pruned', '--json', out_json])
            with open(out_json) as f:
                r = json.load(f)
            results[(name, size)] = r
            a, b = r['models']['unpruned'], r['models']['pruned']
            lines.append(f'| {name} | {h}x{w} | {b["params"] / a["params"]:.3f} | {b["flops"] / a["flops"]:.3f} | '
                         f'{b["activations"] / a["activations"]:.3f} | {a["latency_ms"]:.0f} | '
                         f'{b["latency_ms"]:.0f} | {r["speedup"]:.2f}x |')
    lines += ['', 'params / FLOPs / activations are pruned over unpruned (FLOPs and activations from '
              "mmengine's complexity analysis, or mmfisher's cost model where the table of the run says so). "
              f'Rounding to multiples of 8 gives back channels: FLOPs ratio of the rounded -M model by the '
              f'pruner\'s cost model {ratios8["flops"]:.3f}.']
    text = '\n'.join(lines) + '\n'
    with open(osp.join(work, 'speed.md'), 'w') as f:
        f.write(text)
    print(text)


if __name__ == '__main__':
    main()
