"""Cost of FisherPruningHook per training iteration, through mmengine's runner.

    python benchmarks/hook_overhead.py [--config CONFIG] [--batch 2] [--shape 320 320] [--rounds 20]
                                       [--interval 10] [--frozen-every N] [--frozen-stages 1]

Builds a real mmengine Runner from the config (RetinaNet-R50-FPN by default, random init, on the
generated shapes dataset), lets the real FisherPruningHook run its ``before_train`` (analysis), then
times iterations as the train loop runs them -- ``model.train_step(batch, optim_wrapper)`` followed
by the hook's ``after_train_iter`` (Fisher accumulation, and every ``interval`` iterations a pruning
step) -- alternately with the hook attached and without it, on the same batch, every iteration
restarting from the same weights. Prints the median and mean time of each and their ratios.

``--frozen-stages 1`` (default) freezes the stem and layer1 as mmdet trains RetinaNet (the shipped
prune config freezes nothing, as the paper does): scoring frozen layers costs a backward pass through
them that plain training skips, so this is the setting where the hook costs the most.
"""
import argparse
import copy
import os
import os.path as osp
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, osp.abspath(osp.join(osp.dirname(__file__), '..')))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--config', default=None, help='mmdet config (default: RetinaNet-R50-FPN prune config)')
    p.add_argument('--batch', type=int, default=2)
    p.add_argument('--shape', type=int, nargs=2, default=(320, 320))
    p.add_argument('--rounds', type=int, default=20)
    p.add_argument('--interval', type=int, default=10)
    p.add_argument('--frozen-every', type=int, default=None, help='hook option (default: the interval)')
    p.add_argument('--frozen-stages', type=int, default=1,
                   help="the backbone's frozen_stages (default 1, mmdet's; the shipped prune config uses -1)")
    args = p.parse_args(argv)

    from mmengine.dataset import pseudo_collate

    from mmfisher.datasets import make_coco_shapes
    from mmfisher.openmmlab.hooks import FisherPruningHook
    from mmfisher.openmmlab.tools_common import build_runner, load_tool_config
    root = osp.dirname(osp.dirname(osp.abspath(__file__)))
    config = args.config or osp.join(root, 'configs', 'retinanet', 'retinanet_r50_fpn_fisher-prune-flops50_coco.py')
    tmp = tempfile.mkdtemp(prefix='mmfisher_hook_overhead_')
    data = osp.join(tmp, 'data') + '/'
    make_coco_shapes(data, num_train=args.batch, num_val=1, size=max(args.shape))
    h, w = args.shape
    cfg = load_tool_config(config, {
        'load_from': None, 'train_dataloader.dataset.data_root': data, 'val_dataloader.dataset.data_root': data,
        'test_dataloader.dataset.data_root': data,
        'val_evaluator.ann_file': data + 'annotations/instances_val2017.json',
        'train_dataloader.batch_size': args.batch, 'train_dataloader.num_workers': 0,
        'train_dataloader.persistent_workers': False, 'train_dataloader.dataset.pipeline.2.scale': (w, h),
        'model.backbone.frozen_stages': args.frozen_stages,
        'log_level': 'WARNING'}, 'none', osp.join(tmp, 'work'))
    cfg.custom_hooks = []   # the hook is driven by hand below
    runner = build_runner(cfg)
    runner.optim_wrapper = runner.build_optim_wrapper(runner.optim_wrapper)
    model = runner.model
    model.train()
    batch = pseudo_collate([runner.train_dataloader.dataset[i] for i in range(args.batch)])
    hook = FisherPruningHook(interval=args.interval, target=('flops', 0.5), frozen_every=args.frozen_every,
                             stop_at_target=False)
    hook.before_train(runner)              # the real analysis, then the hook's masks + Fisher hooks
    start = (copy.deepcopy(model.state_dict()), copy.deepcopy(runner.optim_wrapper.state_dict()))
    pruner = hook.pruner

    def step(hooked: bool, it: int) -> float:
        model.load_state_dict(start[0])
        runner.optim_wrapper.load_state_dict(start[1])
        if hooked:
            pruner.attach()
        else:
            pruner.detach()
        t0 = time.perf_counter()
        runner.train_loop._iter = it   # runner.iter, which the hook's interval check reads
        model.train_step(batch, runner.optim_wrapper)
        if hooked:
            hook.after_train_iter(runner, it, batch)
        return time.perf_counter() - t0

    for i in range(2):
        step(False, i)
        step(True, i)
    plain, hooked = [], []
    for i in range(args.rounds):
        for h_ in ((False, True) if i % 2 == 0 else (True, False)):
            (hooked if h_ else plain).append(step(h_, i))
    pruner.detach()
    mp, mh = statistics.median(plain), statistics.median(hooked)
    ap, ah = statistics.mean(plain), statistics.mean(hooked)
    print(f'{osp.basename(config)}: batch {args.batch}, {h}x{w}, {torch.get_num_threads()} threads, '
          f'{args.rounds} iterations each, frozen_stages {args.frozen_stages}, hook interval {args.interval}, '
          f'frozen_every {hook.frozen_every}; '
          f'{len(pruner.history)} channels removed during the timed iterations')
    print(f'median: without hook {mp * 1000:.1f} ms, with hook {mh * 1000:.1f} ms, ratio {mh / mp:.3f}')
    print(f'mean:   without hook {ap * 1000:.1f} ms, with hook {ah * 1000:.1f} ms, ratio {ah / ap:.3f}')
    return mh / mp, ah / ap


if __name__ == '__main__':
    os.environ.setdefault('PYTHONWARNINGS', 'ignore')
    main()
