"""Where a detector's latency goes, part by part, for several widths of it side by side.

    python benchmarks/where_time_goes.py --specs fisher-M=work_dirs/x/pruned.json uniform=0.5 \\
        [--config configs/demo/retinanet_r18_shapes_hard.py] [--size 640x640] [--repeats 30]

Two pruned models with the same FLOPs can run at different speeds: FLOPs in one part of a network do not
cost the same time as FLOPs in another. This prints, for the unpruned model and every ``--specs`` entry
(``NAME=PATH`` of a channel spec JSON, or ``NAME=R``: every prunable width scaled so that the FLOPs are
``R`` of the unpruned model's, as ``tools/analysis_tools/uniform_spec.py`` does), per part of the network
(the backbone's children, each in turn: stem layers, ``layer1`` ... ; the neck; the rest, i.e. the head
and the detector's own code):

* the output channels its convs keep, as a share of the unpruned model's;
* its multiply-accumulates (conv and linear layers, counted by forward hooks) at ``--size``;
* its time (median over ``--repeats`` forwards, the models run in turns, batch 1, tensor mode) and the
  time per GMAC.

The time of a part is taken by forward hooks on the part's module (CPU ops are synchronous; on CUDA the
hooks synchronise); the rest is the whole forward minus the timed parts. Random weights: time does not
depend on them. Run it alone on the machine.
"""
import argparse
import json
import math
import os.path as osp
import statistics
import sys
import time

sys.path.insert(0, osp.abspath(osp.join(osp.dirname(__file__), '..')))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--config', default='configs/demo/retinanet_r18_shapes_hard.py')
    p.add_argument('--specs', nargs='+', default=[], metavar='NAME=PATH|NAME=RATIO',
                   help='models to compare with the unpruned one')
    p.add_argument('--size', default='640x640', help='HxW')
    p.add_argument('--analysis-size', default='160x160', help='HxW the specs were analysed at')
    p.add_argument('--repeats', type=int, default=30)
    p.add_argument('--json', default=None, help='also write the table here')
    args = p.parse_args(argv)
    for s in args.specs:
        if '=' not in s:
            p.error(f'--specs {s!r}: give NAME=PATH (a channel spec JSON) or NAME=RATIO (a uniform width)')
    return args


def parts_of(model):
    """``[(name, module)]``: the backbone's children, then the neck (detectors without one: the backbone's)."""
    parts = []
    backbone = getattr(model, 'backbone', None)
    if backbone is not None:
        kids = list(backbone.named_children())
        parts += [(f'backbone.{n}', m) for n, m in kids] if kids else [('backbone', backbone)]
    if getattr(model, 'neck', None) is not None:
        parts.append(('neck', model.neck))
    return parts


def owners(parts):
    """``{module: the name of the part it is in}`` for every module inside ``parts``."""
    return {sub: name for name, m in parts for sub in m.modules()}


class PartClock:
    """Forward hooks that add up, per part, the time between its entry and exit, and its MACs."""

    def __init__(self, model, parts, sync):
        import torch.nn as nn
        self.names = [n for n, _ in parts]
        self.ms = {n: 0.0 for n in self.names}
        self.macs = {n: 0 for n in self.names + ['rest']}
        self.count_macs = False
        self._t0 = {}
        self.handles = []
        self.sync = sync
        for name, m in parts:
            self.handles.append(m.register_forward_pre_hook(self._enter(name)))
            self.handles.append(m.register_forward_hook(self._leave(name)))
        owner = owners(parts)
        for sub in model.modules():
            if isinstance(sub, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
                self.handles.append(sub.register_forward_hook(self._mac(owner.get(sub, 'rest'))))

    def _enter(self, name):
        def hook(m, args):
            self.sync()
            self._t0[name] = time.perf_counter()
        return hook

    def _leave(self, name):
        def hook(m, args, out):
            self.sync()
            self.ms[name] += 1000.0 * (time.perf_counter() - self._t0.pop(name))
        return hook

    def _mac(self, name):
        import torch.nn as nn

        def hook(m, args, out):
            if not self.count_macs:
                return
            if isinstance(m, nn.Linear):
                self.macs[name] += out.numel() * m.in_features
            else:
                per_out = (m.in_channels // m.groups) * math.prod(m.kernel_size)
                self.macs[name] += out.numel() * per_out
        return hook

    def reset(self):
        for n in self.names:
            self.ms[n] = 0.0


def conv_channels(model, parts):
    """``{part: output channels of its conv layers, summed}`` (the rest under 'rest')."""
    import torch.nn as nn
    owner = owners(parts)
    out = {}
    for sub in model.modules():
        if isinstance(sub, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            k = owner.get(sub, 'rest')
            out[k] = out.get(k, 0) + sub.out_channels
    return out


def main(argv=None):
    args = parse_args(argv)
    from mmfisher.core.latency import hold_freed_memory, roomy_primitive_cache
    roomy_primitive_cache()
    hold_freed_memory()
    import torch
    from mmengine.config import Config
    from mmengine.registry import DefaultScope

    from mmfisher.openmmlab import build_from_config, build_pruned_model, register_all_modules
    from mmfisher.openmmlab.benchmarking import tensor_run
    from mmfisher.openmmlab.tools_common import uniform_channel_spec
    register_all_modules()
    cfg = Config.fromfile(args.config)
    h, w = (int(v) for v in args.size.lower().split('x'))
    ah, aw = (int(v) for v in args.analysis_size.lower().split('x'))
    named = [('unpruned', None)] + [tuple(s.split('=', 1)) for s in args.specs]
    models = {}
    with DefaultScope.overwrite_default_scope('mmdet'):
        for name, src in named:
            torch.manual_seed(0)
            if src is None:
                models[name] = build_from_config(cfg).eval()
                continue
            try:
                ratio = float(src)
            except ValueError:
                ratio = None
            if ratio is not None:
                src = uniform_channel_spec(cfg, target=('flops', ratio), shape=(ah, aw))[0]
            models[name] = build_pruned_model(cfg.model, src, input_shape=(ah, aw)).eval()
    x = torch.randn(1, 3, h, w, generator=torch.Generator().manual_seed(0))
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    runs, clocks, parts = {}, {}, {}
    for name, m in models.items():
        parts[name] = parts_of(m)
        clocks[name] = PartClock(m, parts[name], sync)
        runs[name] = tensor_run(m, x)
    times = {name: {p: [] for p in clocks[name].names + ['rest', 'total']} for name in models}
    with torch.no_grad():
        for name in models:                       # warm-up, and the MAC count
            clocks[name].count_macs = True
            runs[name]()
            clocks[name].count_macs = False
            for _ in range(3):
                runs[name]()
        for _ in range(args.repeats):
            for name in models:
                c = clocks[name]
                c.reset()
                t0 = time.perf_counter()
                runs[name]()
                sync()
                total = 1000.0 * (time.perf_counter() - t0)
                for p in c.names:
                    times[name][p].append(c.ms[p])
                times[name]['rest'].append(total - sum(c.ms[p] for p in c.names))
                times[name]['total'].append(total)
    base_ch = conv_channels(models['unpruned'], parts['unpruned'])
    table = {}
    for name in models:
        ch = conv_channels(models[name], parts[name])
        rows = {}
        for p in clocks[name].names + ['rest', 'total']:
            ms = statistics.median(times[name][p])
            macs = sum(clocks[name].macs.values()) if p == 'total' else clocks[name].macs.get(p, 0)
            kept = (sum(ch.values()) / max(sum(base_ch.values()), 1) if p == 'total'
                    else (ch.get(p, 0) / base_ch[p] if base_ch.get(p) else None))
            rows[p] = {'ms': ms, 'gmacs': macs / 1e9, 'channels_kept': kept}
        table[name] = rows
    print(f'{args.config} at {h}x{w}, batch 1, {torch.get_num_threads()} threads, median of {args.repeats} '
          f'forwards per model, models in turns')
    names = list(models)
    print('| part | ' + ' | '.join(f'{n}: channels / GMACs / ms / ms per GMAC' for n in names) + ' |')
    print('|---|' + '---|' * len(names))
    for p in table['unpruned']:
        cells = []
        for n in names:
            r = table[n].get(p)
            if r is None:
                cells.append('-')
                continue
            kept = '-' if r['channels_kept'] is None else f"{r['channels_kept']:.2f}"
            per = f"{r['ms'] / r['gmacs']:.1f}" if r['gmacs'] > 1e-6 else '-'
            cells.append(f"{kept} / {r['gmacs']:.3f} / {r['ms']:.1f} / {per}")
        print(f'| {p} | ' + ' | '.join(cells) + ' |')
    if args.json:
        with open(args.json, 'w') as f:
            json.dump({'config': args.config, 'size': args.size, 'repeats': args.repeats, 'models': table}, f,
                      indent=1)


if __name__ == '__main__':
    main()
