"""Analyse, prune (Group Fisher) and shrink a model built from a config, on generated data.

    python tools/prune_example.py [CONFIG] [--target flops 0.7] [--iters 40] [--interval 1]
                                  [--channels-per-step 64] [--normalization memory] [--work-dir DIR]

A self-contained run of the core pipeline on any mmdet / mmpretrain config
(default: RetinaNet-R50-FPN, random init, nothing downloaded): coupling analysis
-> training steps on generated batches with Fisher accumulation -> global
removal of the least important channels every ``interval`` iterations until the
target -> compact model. It checks that the compact model's outputs equal the
masked model's, prints the ratios and the channels kept per group, and writes
the compact weights and the channel spec to the work dir.
"""
import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), '..')))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('config', nargs='?', default=None, help='mmdet/mmpretrain config (default: RetinaNet-R50-FPN)')
    p.add_argument('--target', nargs=2, default=['flops', '0.7'], metavar=('RESOURCE', 'RATIO'),
                   help='stop when RESOURCE (flops, memory, params) falls to RATIO of the original')
    p.add_argument('--iters', type=int, default=40, help='training iterations at most')
    p.add_argument('--interval', type=int, default=1, help='iterations between pruning steps')
    p.add_argument('--channels-per-step', type=int, default=64, help='channels removed per pruning step')
    p.add_argument('--normalization', default='memory', choices=['memory', 'flops', 'none'])
    p.add_argument('--batch', type=int, default=2)
    p.add_argument('--shape', type=int, nargs=2, default=(320, 320))
    p.add_argument('--lr', type=float, default=1e-4)
    p.add_argument('--work-dir', default='work_dirs/prune_example')
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)

    from mmfisher.core.pruner import GroupFisherPruner
    from mmfisher.core.atoms import flat_tensors
    from mmfisher.openmmlab import analyse_model, build_from_config
    from mmfisher.openmmlab.analysis import example_samples, tensor_forward
    from mmfisher.openmmlab.synthetic import loss_of, random_batch

    config = args.config
    if config is None:
        from mmfisher.openmmlab.tools_common import package_config
        config = package_config('retinanet/retinanet_r50_fpn_1x_coco.py')
    if not os.path.isfile(config):
        sys.exit(f'error: config file {config!r} does not exist')
    target = (args.target[0], float(args.target[1]))
    torch.manual_seed(0)
    model = build_from_config(config)
    n_params = sum(p.numel() for p in model.parameters())
    shape = (1, 3) + tuple(args.shape)
    graph = analyse_model(model, shape)
    s = graph.summary()
    print(f'[analyse] {os.path.basename(config)}: {s["prunable_groups"]}/{s["groups"]} groups prunable, '
          f'{s["prunable_channels"]} prunable channels, {s["seconds"]:.2f} s')
    for g in graph.groups:
        if not g.prunable:
            print(f'          not prunable: {g.name} ({g.reasons[0]})')
    # checks the target before any training
    pruner = GroupFisherPruner(model, graph, normalization=args.normalization, target=target).attach()

    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=args.lr, momentum=0.9)
    t0 = time.perf_counter()
    for it in range(args.iters):
        inputs, samples = random_batch(model, args.batch, args.shape, seed=it)
        loss = loss_of(model, inputs, samples)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 35.0)
        opt.step()
        pruner.accumulate()
        if (it + 1) % args.interval == 0:
            removed = pruner.step(args.channels_per_step)
            r = pruner.ratios()
            print(f'[prune] iter {it + 1:3d} loss {loss.item():9.3f}  removed {len(removed):3d} '
                  f'(total {len(pruner.history):5d})  flops {r["flops"]:.3f}  memory {r["memory"]:.3f}  '
                  f'params {r["params"]:.3f}  {time.perf_counter() - t0:6.1f} s', flush=True)
        if pruner.reached():
            break

    # the compact model computes what the masked model computes
    model.eval()
    x = torch.randn(*shape)
    samples = example_samples(model, shape)
    with torch.no_grad():
        masked = flat_tensors(tensor_forward(model, x, samples), [], -8)
    compact = pruner.export()
    compact.eval()
    pruner.detach()
    with torch.no_grad():
        out = flat_tensors(tensor_forward(compact, x, samples), [], -8)
    err = max(float((a - b).abs().max() / (a.abs().max() + 1e-6)) for a, b in zip(masked, out))

    r = pruner.ratios()
    c_params = sum(p.numel() for p in compact.parameters())
    print(f'[result] target {target[0]} {target[1]} {"reached" if pruner.reached() else "NOT reached"} '
          f'after {len(pruner.history)} channels removed in {pruner.steps} steps')
    print(f'[result] flops {r["flops"]:.3f}  memory {r["memory"]:.3f}  params {r["params"]:.3f} '
          f'({n_params / 1e6:.2f} M -> {c_params / 1e6:.2f} M)  compact vs masked max rel. error {err:.1e}')
    print('[result] channels kept per group (most pruned first):')
    rows = sorted(((int(pruner.keep[g.offset:g.offset + g.size].sum()), g) for g in graph.groups if g.prunable),
                  key=lambda kg: kg[0] / kg[1].size)
    for kept, g in rows[:15]:
        print(f'          {g.name:<45} {kept:4d}/{g.size:<4d} ({len(g.producers)} producers)')
    os.makedirs(args.work_dir, exist_ok=True)
    spec_path = os.path.join(args.work_dir, 'channel_spec.json')
    with open(spec_path, 'w') as f:
        json.dump(pruner.channel_spec(), f)
    ckpt_path = os.path.join(args.work_dir, 'compact.pth')
    torch.save({'state_dict': compact.state_dict(), 'meta': {'channel_spec': pruner.channel_spec()}}, ckpt_path)
    print(f'[result] wrote {spec_path} and {ckpt_path}')
    if err > 1e-4:
        sys.exit(f'error: compact model differs from the masked model (max rel. error {err:.1e})')
    return pruner


if __name__ == '__main__':
    main()
