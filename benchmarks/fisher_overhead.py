"""Per-iteration cost of Group Fisher importance accumulation.

    python benchmarks/fisher_overhead.py [--config CONFIG] [--batch 2] [--shape 320 320] [--rounds 10]

Trains the model (random init, generated batch, SGD; every step restarts from the same
weights) and times full train steps
(forward, loss, backward, optimizer step, and for the pruner ``accumulate()``)
alternately without and with the pruner's hooks attached, in one process, and
prints the median and the mean ratio (the mean includes the periodic cost of
``frozen_every``, which the median hides), for: exact Fisher everywhere
(frozen stages scored on every step: a backward pass through them that plain
training skips), frozen stages scored every 10th step (``frozen_every=10``),
and the latter after removing 10% of the prunable channels (masks active).
Default: RetinaNet-R50-FPN (frozen_stages=1), batch 2, 320x320 -- the setting in
which MMRazor's GroupFisher cost 1.24-1.40x a plain step on this CPU.
"""
import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), '..')))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--config', default=None, help='mmdet/mmpretrain config (default: RetinaNet-R50-FPN)')
    p.add_argument('--batch', type=int, default=2)
    p.add_argument('--shape', type=int, nargs=2, default=(320, 320))
    p.add_argument('--rounds', type=int, default=20, help='timed steps per variant')
    p.add_argument('--threads', type=int, default=None, help='torch threads (default: torch default)')
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from mmfisher.core import analyse
    from mmfisher.core.pruner import GroupFisherPruner
    from mmfisher.openmmlab import build_from_config, example_forward
    from mmfisher.openmmlab.synthetic import loss_of, random_batch

    config = args.config
    if config is None:
        from mmfisher.openmmlab.tools_common import package_config
        config = package_config('retinanet/retinanet_r50_fpn_1x_coco.py')
    torch.manual_seed(0)
    model = build_from_config(config)
    model.train()
    inputs, samples = random_batch(model, args.batch, args.shape)
    params = [q for q in model.parameters() if q.requires_grad]
    opt = torch.optim.SGD(params, lr=1e-5, momentum=0.9)
    graph = analyse(model, forward=example_forward(model, (1, 3) + tuple(args.shape)))
    pruner = GroupFisherPruner(model, graph)

    import copy
    start = (copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict()))

    def step(hooked: bool) -> float:
        # every timed step starts from the same weights: the two variants do the same arithmetic,
        # and alternating masked and unmasked steps cannot drive the weights somewhere odd
        model.load_state_dict(start[0])
        opt.load_state_dict(start[1])
        t0 = time.perf_counter()
        loss = loss_of(model, inputs, samples)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if hooked:
            pruner.accumulate()
        return time.perf_counter() - t0

    def measure(label: str) -> float:
        plain, hooked = [], []
        for _ in range(2):  # warm-up both paths
            pruner.detach()
            step(False)
            pruner.attach()
            step(True)
        for i in range(args.rounds):
            order = (False, True) if i % 2 == 0 else (True, False)
            for h in order:
                if h:
                    pruner.attach()
                    hooked.append(step(True))
                else:
                    pruner.detach()
                    plain.append(step(False))
        mp, mh = statistics.median(plain), statistics.median(hooked)
        ap, ah = statistics.mean(plain), statistics.mean(hooked)
        print(f'{label:<36} median: plain {mp * 1000:7.1f} ms  with pruner {mh * 1000:7.1f} ms  ratio {mh / mp:.3f}'
              f'   mean: ratio {ah / ap:.3f}')
        return mh / mp, ah / ap

    name = os.path.basename(config)
    print(f'{name}, batch {args.batch}, {args.shape[0]}x{args.shape[1]}, {torch.get_num_threads()} threads, '
          f'{args.rounds} timed steps each (median), analysis {graph.seconds:.2f} s')
    r1 = measure('exact (frozen_every=1):')
    pruner.fisher.frozen_every = 10
    r2 = measure('frozen_every=10:')
    pruner.fisher.accum = torch.rand(graph.num_channels, dtype=torch.float64)   # 10% of the channels, at random
    pruner.fisher.evidence[:] = True
    pruner.fisher.valid_passes = max(1, pruner.fisher.valid_passes)
    n = int(0.1 * int(graph.prunable.sum()))
    pruner.step(n)
    r3 = measure(f'frozen_every=10, {n} channels masked:')
    pruner.detach()
    return r1, r2, r3


if __name__ == '__main__':
    main()
