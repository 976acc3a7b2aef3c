"""The latency model: its arithmetic against obvious references, its cache, its use by the pruner.

How well it predicts measured latency is a benchmark (benchmarks/latency_model.py), not a test:
timings on a shared machine are noise for a unit test."""
import copy
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from mmfisher.core import analyse
from mmfisher.core.cost import CostModel
from mmfisher.core.latency import (LatencyModel, LayerTable, TimingCache, _grid, detect_quantum, fit, interp1, interp2,
                                   monotone)
from mmfisher.core.pruner import GroupFisherPruner
from test_pruner import ResNetish, train

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), '..'))


def test_interpolation_is_exact_at_the_grid_and_linear_between():
    gx = torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64)
    gy = torch.tensor([1.0, 3.0], dtype=torch.float64)
    v = torch.tensor([[1.0, 5.0], [2.0, 8.0], [6.0, 9.0]], dtype=torch.float64)
    for i in range(3):
        for j in range(2):
            assert float(interp2(gx, gy, v, gx[i:i + 1], gy[j:j + 1])) == v[i, j]
    # between grid points: the weighted average of the four corners
    x, y = torch.tensor([3.0], dtype=torch.float64), torch.tensor([2.0], dtype=torch.float64)
    ref = 0.5 * (0.5 * 2.0 + 0.5 * 6.0) + 0.5 * (0.5 * 8.0 + 0.5 * 9.0)
    assert abs(float(interp2(gx, gy, v, x, y)) - ref) < 1e-12
    # beyond the ends: the end segments continue
    assert abs(float(interp1(gx, v[:, 0], torch.tensor([6.0], dtype=torch.float64))) - 10.0) < 1e-12


def test_a_table_never_predicts_fewer_channels_slower():
    """Against the slow reference: each entry is the least time at that many channels or more."""
    g = torch.Generator().manual_seed(0)
    times = torch.rand(4, 5, generator=g, dtype=torch.float64)
    ref = torch.tensor([[min(float(times[a, b]) for a in range(i, 4) for b in range(j, 5)) for j in range(5)]
                        for i in range(4)], dtype=torch.float64)
    assert torch.equal(monotone(times), ref)
    assert torch.equal(monotone(torch.tensor([3.0, 1.0, 2.0, 5.0])), torch.tensor([1.0, 1.0, 2.0, 5.0]))
    table = LayerTable('l', torch.tensor([1.0, 2.0, 4.0, 8.0], dtype=torch.float64),
                       torch.tensor([1.0, 2.0, 3.0, 4.0, 6.0], dtype=torch.float64), times)
    n = torch.linspace(1, 8, 15, dtype=torch.float64)
    for co in (1.0, 2.5, 6.0):
        pred = table.predict(n, torch.full_like(n, co))
        assert (pred[1:] >= pred[:-1] - 1e-15).all()


def test_fit_recovers_the_coefficients_that_generated_the_times():
    S, M = [40.0, 30.0, 21.0, 12.0], [5e5, 4e5, 2.6e5, 1.5e5]
    T = [1.3 * s + 2.5 + 4e-6 * m for s, m in zip(S, M)]
    alpha, a, b = fit({'ms': T, 'layers_ms': S, 'memory': M})
    assert abs(alpha - 1.3) < 1e-9 and abs(a - 2.5) < 1e-9 and abs(b - 4e-6) < 1e-15
    # a negative fixed cost is not physical: the best non-negative terms are used instead
    alpha, a, b = fit({'ms': [2 * s - 1 for s in S], 'layers_ms': S, 'memory': M})
    assert min(alpha, a, b) >= 0


def test_the_fit_solves_least_squares_as_lapack_does_with_the_same_bits_every_time():
    from mmfisher.core.latency import _least_squares
    g = torch.Generator().manual_seed(0)
    for rows, cols in [(5, 3), (5, 2), (8, 3), (3, 3), (4, 1)]:
        A = torch.rand(rows, cols, dtype=torch.float64, generator=g) + 0.1
        b = torch.rand(rows, dtype=torch.float64, generator=g)
        ref = torch.linalg.lstsq(A, b[:, None]).solution.flatten()
        x = _least_squares(A.tolist(), b.tolist())
        assert torch.allclose(torch.tensor(x, dtype=torch.float64), ref, rtol=1e-9, atol=1e-12)
        assert all(_least_squares(A.tolist(), b.tolist()) == x for _ in range(200))
    assert all(v != v for v in _least_squares([[1.0, 2.0], [2.0, 4.0], [3.0, 6.0]], [1.0, 2.0, 3.0]))  # rank 1


@pytest.fixture(scope='module')
def measured(tmp_path_factory):
    torch.manual_seed(0)
    model = ResNetish()
    x = torch.randn(1, 3, 16, 16)
    graph = analyse(model, x)
    cache = TimingCache(str(tmp_path_factory.mktemp('cache') / 'latency.json'))
    lat = LatencyModel.measure(model, graph, lambda m: (lambda: m(x)), cache=cache, repeats=3, quantum=1)
    return model, graph, lat, cache


def test_every_layer_is_timed_at_its_own_channel_counts(measured):
    model, graph, lat, cache = measured
    assert [t.name for t in lat.tables] == ['stem', 'c1', 'dw', 'c2', 'c3', 'gconv', 'head']
    stem = lat.tables[0]
    assert stem.in_grid.tolist() == [3.0] and stem.out_grid.tolist() == [1.0, 2.0, 4.0, 6.0, 8.0]
    dw = lat.tables[2]                       # depthwise: whole groups, one grid
    assert dw.groups.tolist() == [1.0, 2.0, 3.0, 4.0, 6.0] and dw.times.shape == (5,)
    assert (stem.times > 0).all() and cache.measured > 0
    assert lat.measured['widths'] == [1.0, 0.8, 0.75, 0.6, 0.4] and min(lat.alpha, lat.fixed, lat.per_memory) >= 0
    assert all(t.quantum == 1 and t.penalty == (1.0, 1.0, 1.0) for t in lat.tables)


def test_a_second_measurement_comes_from_the_cache(measured):
    model, graph, lat, cache = measured
    again = TimingCache(cache.path)
    lat2 = LatencyModel.measure(model, graph, lambda m: (lambda: m(torch.randn(1, 3, 16, 16))), cache=again,
                                repeats=3, quantum=1)
    assert again.measured == 0
    assert all(torch.equal(a.times, b.times) for a, b in zip(lat.tables, lat2.tables))
    # the whole network's timings too: the same fit, so the same predictions and prunings
    assert lat2.measured['ms'] == lat.measured['ms']
    assert (lat2.alpha, lat2.fixed, lat2.per_memory) == (lat.alpha, lat.fixed, lat.per_memory)


def test_another_input_or_architecture_times_the_network_again(measured, tmp_path):
    from mmfisher.core.latency import network_signature
    model, graph, lat, cache = measured
    sig = network_signature(graph, CostModel(model, graph))
    assert network_signature(graph, CostModel(model, graph)) == sig
    bigger = analyse(model, torch.randn(1, 3, 24, 24))
    assert network_signature(bigger, CostModel(model, bigger)) != sig
    torch.manual_seed(1)
    other = ResNetish()
    other.head = torch.nn.Conv2d(8, 3, 3, padding=1)
    g2 = analyse(other, torch.randn(1, 3, 16, 16))
    assert network_signature(g2, CostModel(other, g2)) != sig
    retrained = ResNetish()          # other weights, the same architecture: the same timings
    g3 = analyse(retrained, torch.randn(1, 3, 16, 16))
    assert network_signature(g3, CostModel(retrained, g3)) == sig


def test_saving_is_the_drop_of_the_total_when_one_channel_goes(measured):
    """Against the slow, obvious computation: predict the network with and without each channel."""
    model, graph, lat, _ = measured
    keep = torch.ones(graph.num_channels, dtype=torch.bool)
    keep[graph.group('c1').offset] = False           # somewhere inside the grid already
    saving = lat.saving(keep)
    now = lat.total(keep)
    for ch in range(graph.num_channels):
        if not keep[ch]:
            continue
        less = keep.clone()
        less[ch] = False
        assert abs(float(saving[ch]) - (now - lat.total(less))) < 1e-9 * max(1.0, now), graph.groups[
            graph.group_index(ch)].name


def test_the_grid_of_a_staircase_device_is_on_multiples_of_its_quantum():
    assert _grid(64, quantum=16) == [1, 16, 32, 48, 64]
    assert _grid(256, quantum=16) == [1, 64, 128, 192, 256]
    assert _grid(8, quantum=16) == [1, 8]                  # a layer narrower than the quantum: its own count
    assert _grid(72, fixed=20, quantum=16) == [21, 32, 48, 64, 72]
    assert _grid(64) == [1, 16, 32, 48, 64] and _grid(10) == [1, 2, 5, 8, 10]   # quantum 1: the fractions


def test_the_quantum_probe_finds_the_step_of_a_timed_staircase(tmp_path):
    """The probe on timings that follow a known staircase (q = 8, every count past a multiple as slow as the
    next multiple): 8, not 16 (its odd multiples 48, 80 ... are steps too) and not 4."""
    cache = TimingCache(str(tmp_path / 'probe.json'))
    for c in range(2, 2000):
        cache.entries[f'dev|probe conv3x3 28x28|channels={c}'] = float((-(-c // 8) * 8) ** 2)
    assert detect_quantum(torch.device('cpu'), 'dev', cache) == 8 and cache.measured == 0
    smooth = TimingCache(str(tmp_path / 'smooth.json'))
    for c in range(2, 2000):
        smooth.entries[f'dev|probe conv3x3 28x28|channels={c}'] = float(c * c)
    assert detect_quantum(torch.device('cpu'), 'dev', smooth) == 1


def staircase_table(quantum=4, penalty=(1.1, 1.3, 1.6)):
    g = torch.tensor([1.0, 4.0, 8.0], dtype=torch.float64)
    times = torch.tensor([[1.0, 2.0, 3.0], [2.0, 5.0, 9.0], [3.0, 8.0, 16.0]], dtype=torch.float64)
    return LayerTable('l', g, g.clone(), times, quantum=quantum, penalty=penalty)


def test_a_staircase_table_predicts_the_multiple_above_times_its_penalty():
    """Against the obvious reference: each count rounded up to a multiple of 4 lands on a grid point; its
    time there, times the penalty for the sides that are off a multiple."""
    t = staircase_table()
    at = {1.0: 0, 4.0: 1, 8.0: 2}
    for ci in range(1, 9):
        for co in range(1, 9):
            up_i, up_o = min(8, -(-ci // 4) * 4), min(8, -(-co // 4) * 4)
            off_i, off_o = up_i != ci, up_o != co
            factor = 1.6 if off_i and off_o else 1.1 if off_i else 1.3 if off_o else 1.0
            ref = float(t.times[at[up_i], at[up_o]]) * factor
            got = float(t.predict(torch.tensor([float(ci)], dtype=torch.float64),
                                  torch.tensor([float(co)], dtype=torch.float64)))
            assert abs(got - ref) < 1e-12, (ci, co)
    # one channel off a full block is slower than the block: that is the staircase, not noise
    eight, seven = (float(t.predict(torch.tensor([8.0], dtype=torch.float64), torch.tensor([v], dtype=torch.float64)))
                    for v in (8.0, 7.0))
    assert seven > eight


def in_times_out_tables(cost, **staircase):
    """Synthetic layer tables: ms = in * out / 1000, timed at 1 and all channels on each side; ``staircase``
    (``quantum``, ``penalty``) goes to every layer but group convs."""
    tables = []
    for L in cost.layers:
        gi = torch.tensor(sorted({1.0, float(L.in_idx.numel())}), dtype=torch.float64)
        go = torch.tensor(sorted({1.0, float(L.out_idx.numel())}), dtype=torch.float64)
        tables.append(LayerTable(L.name, gi, go, gi[:, None] * go[None, :] / 1000, **({} if L.grouped else staircase)))
    return tables


def test_saving_on_a_staircase_is_the_share_of_the_drop_to_the_next_multiple_below(measured):
    """Against the slow computation: for every layer a channel is in, remove as many channels of its group
    as it takes that layer to reach the next multiple of the quantum below, predict the layer with and
    without them, and share the drop among them."""
    model, graph, _, _ = measured
    cost = CostModel(model, graph)
    tables = in_times_out_tables(cost, quantum=4, penalty=(1.2, 1.1, 1.5))
    lat = LatencyModel(cost, tables, (1.0, 0.5, 2e-4), 'synthetic')
    keep = torch.ones(graph.num_channels, dtype=torch.bool)
    stream = graph.group('stem')
    keep[stream.offset + 7] = False                     # the residual stream at 7 of 8: off its multiple
    saving = lat.saving(keep)
    names = [L.name for L in cost.layers]
    for g in graph.groups:
        if not g.prunable:
            continue
        for ch in range(g.offset, g.offset + g.size):
            if not keep[ch]:
                continue
            ref = lat.per_memory * float(cost.saving('memory', keep)[ch])
            now = lat.layer_ms(keep)
            for i, L in enumerate(cost.layers):
                sides = [(L.in_idx, 'in'), (L.out_idx, 'out')]
                counts = [int(keep[idx[idx < graph.num_channels]].sum()) + int((idx >= graph.num_channels).sum())
                          for idx, _ in sides]
                positions = [int((idx == ch).sum()) for idx, _ in sides]     # a channel can span several
                if not any(positions):
                    continue
                if L.grouped:
                    steps = 1
                else:
                    side = 0 if positions[0] else 1
                    n, d = counts[side], positions[side]
                    steps = max(1, (n - max(1, (n - d) // 4 * 4)) // d)
                alive = [c for c in range(g.offset, g.offset + g.size) if keep[c] and c != ch]
                less = keep.clone()
                less[ch] = False
                for c in alive[len(alive) - (steps - 1):] if steps > 1 else []:
                    less[c] = False
                ref += (float(now[i]) - float(lat.layer_ms(less)[i])) / steps
            assert abs(float(saving[ch]) - ref) < 1e-9, (g.name, ch - g.offset, names)


def test_a_latency_model_measured_on_a_staircase_holds_its_quantum_and_penalties(measured, tmp_path):
    model, graph, _, _ = measured
    lat = LatencyModel.measure(model, graph, lambda m: (lambda: m(torch.randn(1, 3, 16, 16))), repeats=1, rounds=1,
                               cache=TimingCache(str(tmp_path / 'q.json')), quantum=4)
    c1 = lat.tables[[t.name for t in lat.tables].index('c1')]
    assert c1.quantum == 4 and c1.in_grid.tolist() == [1.0, 4.0, 8.0] and c1.out_grid.tolist() == [1.0, 4.0, 6.0]
    assert all(0.5 <= p <= 4.0 for p in c1.penalty) and lat.measured['quantum'] == 4
    again = LatencyModel.from_state(CostModel(model, graph), lat.state_dict())
    assert [t.penalty for t in again.tables] == [t.penalty for t in lat.tables]
    with pytest.raises(ValueError, match='quantum=0 must be a positive channel count'):
        LatencyModel.measure(model, graph, lambda m: (lambda: m(torch.randn(1, 3, 16, 16))), quantum=0,
                             cache=TimingCache(str(tmp_path / 'q.json')))


def test_the_state_predicts_the_same_after_a_round_trip(measured, tmp_path):
    model, graph, lat, _ = measured
    torch.save(lat.state_dict(), tmp_path / 'lat.pth')
    state = torch.load(tmp_path / 'lat.pth', weights_only=True)
    again = LatencyModel.from_state(CostModel(model, graph), state)
    keep = torch.rand(graph.num_channels, generator=torch.Generator().manual_seed(0)) > 0.3
    assert again.total(keep) == lat.total(keep) and torch.equal(again.saving(keep), lat.saving(keep))
    other = analyse(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Conv2d(4, 2, 1)), torch.randn(1, 3, 8, 8))
    with pytest.raises(ValueError, match='measured on another architecture'):
        LatencyModel.from_state(CostModel(model, other), state)


def synthetic_latency(model, graph):
    """A latency model with known tables (ms = in * out / 1000 per layer, plus 20% fixed): the pruner's
    use of it is tested without timing noise."""
    cost = CostModel(model, graph)
    tables = in_times_out_tables(cost)
    layers = LatencyModel(cost, tables, (1.0, 0.0, 0.0), 'synthetic').original
    return LatencyModel(cost, tables, (1.0, 0.25 * layers, 0.0), 'synthetic')


def test_the_pruner_needs_a_latency_model_for_latency_and_prunes_to_a_latency_target(measured):
    model, graph, _, _ = measured
    with pytest.raises(ValueError, match=r'need a latency model of this model: latency=LatencyModel\.measure'):
        GroupFisherPruner(model, graph, normalization='latency')
    model = copy.deepcopy(model)
    graph = analyse(model, torch.randn(1, 3, 16, 16))
    lat = synthetic_latency(model, graph)
    target = 0.6                                 # of 1.0: 0.2 fixed, the layers can fall from 0.8 to ~0
    pruner = GroupFisherPruner(model, graph, normalization='latency', target=('latency', target),
                               latency=lat.state_dict()).attach()
    assert pruner.ratios()['latency'] == 1.0
    train(model, pruner, 200, interval=1, per_step=1)
    assert pruner.reached() and pruner.ratios()['latency'] <= target
    state = pruner.state_dict()
    assert state['latency']['tables'] == lat.state_dict()['tables']
    with pytest.raises(ValueError, match='latency cannot fall to 0.010'):
        GroupFisherPruner(model, graph, target=('latency', 0.01), latency=lat)


def test_the_hook_refuses_a_quantum_that_is_not_a_channel_count():
    from mmfisher.openmmlab.hooks import FisherPruningHook
    with pytest.raises(ValueError, match=r'latency_quantum=0 must be a positive channel count \(1: no staircase'):
        FisherPruningHook(normalization='latency', latency_quantum=0)
    assert FisherPruningHook(normalization='latency', latency_quantum=16).latency_quantum == 16


def staircase_latency(model, graph, q=4):
    """Known tables (ms = in * out / 1000) on multiples of ``q``, one channel past a multiple 20% slower."""
    cost = CostModel(model, graph)
    tables = []
    for L in cost.layers:
        n_in, n_out = L.in_idx.numel(), L.out_idx.numel()
        gi = torch.tensor(sorted({1, n_in, *range(q, n_in, q)}), dtype=torch.float64)
        go = torch.tensor(sorted({1, n_out, *range(q, n_out, q)}), dtype=torch.float64)
        t = gi[:, None] * go[None, :] / 1000
        tables.append(LayerTable(L.name, gi, go, t) if L.grouped else
                      LayerTable(L.name, gi, go, t, quantum=q, penalty=(1.2, 1.2, 1.4)))
    return LatencyModel(cost, tables, (1.0, 0.0, 0.0), 'synthetic')


def test_latency_pruning_on_a_staircase_removes_the_block_to_the_next_multiple(measured):
    """The first decision against the slow reference: in every group, the least important channels that
    take it to the next multiple of 4 below; the block with the least summed Fisher over summed saving.
    Then every decision leaves every group on a multiple of 4 (or at its last channel)."""
    from test_pruner import set_fisher
    model, _, _, _ = measured
    model = copy.deepcopy(model)
    graph = analyse(model, torch.randn(1, 3, 16, 16))
    lat = staircase_latency(model, graph)
    assert lat.quantum == 4
    pruner = GroupFisherPruner(model, graph, normalization='latency', latency=lat).attach()
    assert pruner.block_quantum == 4
    assert GroupFisherPruner(model, graph, normalization='memory', latency=lat).block_quantum == 1
    fisher = torch.rand(graph.num_channels, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    c3 = graph.group('c3')
    fisher[c3.offset:c3.offset + c3.size] += 10.0      # its one-channel block would go first otherwise
    set_fisher(pruner, fisher.clone())
    saving = lat.saving(pruner.keep)
    best = None
    for g in graph.groups:
        if not g.prunable:
            continue
        chans = sorted(range(g.offset, g.offset + g.size), key=lambda c: float(fisher[c] / saving[c]))
        block = chans[:g.size - max(1, (g.size - 1) // 4 * 4)]
        score = sum(float(fisher[c]) for c in block) / sum(float(saving[c]) for c in block)
        if best is None or score < best[0]:
            best = (score, sorted(block))
    removed = pruner.step(1)
    assert sorted(e['channel'] for e in removed) == best[1] and len(removed) > 1
    for _ in range(20):
        set_fisher(pruner, fisher.clone())
        pruner.step(1)
        for g in graph.groups:
            if g.prunable:
                n = int(pruner.keep[g.offset:g.offset + g.size].sum())
                assert n == g.size or n % 4 == 0 or n == 1, (g.name, n)
    assert pruner.status == 'exhausted'


def test_the_block_that_reaches_the_target_stops_there(measured):
    from test_pruner import set_fisher
    model, _, _, _ = measured
    model = copy.deepcopy(model)
    graph = analyse(model, torch.randn(1, 3, 16, 16))
    fisher = torch.rand(graph.num_channels, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for target in (0.95, 0.9, 0.85, 0.8, 0.7, 0.6, 0.5):
        pruner = GroupFisherPruner(model, graph, normalization='latency', latency=staircase_latency(model, graph),
                                   target=('flops', target))
        while not pruner.reached():
            set_fisher(pruner, fisher.clone())
            pruner.step(1)
        assert pruner.ratios()['flops'] <= target
        back = pruner.keep.clone()
        back[pruner.history[-1]['channel']] = True          # one channel fewer removed: not there yet
        assert pruner.cost.ratios(back)['flops'] > target, target


def test_timings_keep_freed_memory_so_a_forward_pays_no_page_faults():
    # glibc maps every block over 32 MB afresh: 64 MB freed and allocated again faults in all 16k pages
    # with its defaults; after hold_freed_memory (which every timing calls) the heap keeps it (once the
    # heap has grown to hold it: a few cycles, as a forward's warm-up runs do)
    code = textwrap.dedent('''
        import resource, sys, torch
        from mmfisher.core.latency import hold_freed_memory
        if sys.argv[1] == 'held':
            assert hold_freed_memory()
        def faults():
            f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            x = torch.ones(16 * 1024 * 1024)       # 64 MB, every page written
            del x
            return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
        for _ in range(4):
            faults()
        print(sum(faults() for _ in range(5)))
    ''')
    env = dict(os.environ, PYTHONPATH=ROOT)
    out = {mode: int(subprocess.run([sys.executable, '-c', code, mode], env=env, capture_output=True, text=True,
                                     check=True).stdout.split()[-1]) for mode in ('default', 'held')}
    assert out['default'] > 5 * 8000 and out['held'] < 100, out


class PooledStem(torch.nn.Module):
    """A ResNet stem in miniature: conv, BN, ReLU and max-pool modules, then two convs."""

    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(8)
        self.relu = torch.nn.ReLU(inplace=True)
        self.pool = torch.nn.MaxPool2d(3, 2, 1)
        self.conv2 = torch.nn.Conv2d(8, 6, 3, padding=1)
        self.head = torch.nn.Conv2d(6, 2, 1)

    def forward(self, x):
        return self.head(self.relu(self.conv2(self.pool(self.relu(self.bn(self.conv1(x)))))))


def test_norms_activations_and_poolings_are_costed_on_the_channels_they_carry():
    """The work outside the layers: every call of a norm or of a child-less module on channels, with the
    group its input belongs to. The ReLU module runs twice, on two groups: two entries."""
    model = PooledStem().eval()
    graph = analyse(model, torch.randn(1, 3, 16, 16))
    cost = CostModel(model, graph)
    entries = {C.name: C for C in cost.channelwise}
    assert sorted(entries) == ['bn', 'pool', 'relu', 'relu#1']
    stem, mid = graph.group('conv1'), graph.group('conv2')
    assert entries['pool'].idx.tolist() == list(range(stem.offset, stem.offset + 8))
    assert entries['pool'].in_shape == (1, 8, 16, 16)
    assert entries['relu'].idx.tolist() == list(range(stem.offset, stem.offset + 8))
    assert entries['relu#1'].idx.tolist() == list(range(mid.offset, mid.offset + 6))
    assert entries['relu#1'].in_shape == (1, 6, 16 // 2, 16 // 2)
    # the loss forward's calls are not kept: only the forward the costs follow
    g2 = analyse(model, torch.randn(1, 3, 16, 16), also=[lambda: model(torch.randn(1, 3, 16, 16)).sum()])
    assert len(g2.channelwise) == len(graph.channelwise) == 3


def test_the_total_and_the_saving_count_norms_activations_and_poolings():
    """Against the obvious sums: synthetic tables (a layer: in * out / 1000 ms; a channel-wise call:
    0.1 ms per channel for the pooling, 0.01 otherwise), the total by hand, the saving as the drop of the
    total when one channel goes."""
    from mmfisher.core.latency import ChannelwiseTable
    model = PooledStem().eval()
    graph = analyse(model, torch.randn(1, 3, 16, 16))
    cost = CostModel(model, graph)
    tables = in_times_out_tables(cost)
    per = {C.name: 0.1 if C.name == 'pool' else 0.01 for C in cost.channelwise}
    cw = [ChannelwiseTable(C.name, torch.tensor([1.0, float(C.idx.numel())], dtype=torch.float64),
                           per[C.name] * torch.tensor([1.0, float(C.idx.numel())], dtype=torch.float64))
          for C in cost.channelwise]
    lat = LatencyModel(cost, tables, (1.5, 0.3, 1e-4), 'synthetic', channelwise=cw)
    keep = torch.ones(graph.num_channels, dtype=torch.bool)
    stem, mid = graph.group('conv1'), graph.group('conv2')
    keep[stem.offset + 1] = keep[mid.offset] = False
    n_stem, n_mid = 7, 5
    layers = 3 * n_stem + n_stem * n_mid + n_mid * 2
    by_hand = (1.5 * (layers / 1000 + 0.01 * n_stem + 0.1 * n_stem + 0.01 * n_stem + 0.01 * n_mid) + 0.3
               + 1e-4 * cost.layer_totals(keep)[1])
    assert abs(lat.total(keep) - by_hand) < 1e-12
    saving = lat.saving(keep)
    now = lat.total(keep)
    for ch in range(graph.num_channels):
        if keep[ch] and graph.prunable[ch]:
            less = keep.clone()
            less[ch] = False
            assert abs(float(saving[ch]) - (now - lat.total(less))) < 1e-12
    # a stem channel now saves its pooling's 0.1 ms (x alpha) besides its layers, BN and ReLU
    assert float(saving[stem.offset]) > 1.5 * 0.1


def test_every_norm_activation_and_pooling_call_is_timed_and_saved_with_the_model(tmp_path):
    model = PooledStem().eval()
    graph = analyse(model, torch.randn(1, 3, 16, 16))
    cache = TimingCache(str(tmp_path / 'c.json'))
    lat = LatencyModel.measure(model, graph, lambda m: (lambda: m(torch.randn(1, 3, 16, 16))), cache=cache,
                               repeats=1, rounds=1, quantum=1)
    assert [t.name for t in lat.channelwise] == [C.name for C in lat.cost.channelwise]
    pool = lat.channelwise[[t.name for t in lat.channelwise].index('pool')]
    assert pool.grid.tolist() == [1.0, 2.0, 4.0, 6.0, 8.0] and (pool.times > 0).all()
    again = LatencyModel.from_state(CostModel(model, graph), lat.state_dict())
    keep = torch.rand(graph.num_channels, generator=torch.Generator().manual_seed(1)) > 0.3
    assert again.total(keep) == lat.total(keep)
    # a state saved before these were timed predicts as it did: layers and the fit only
    old = {k: v for k, v in lat.state_dict().items() if k != 'channelwise'}
    assert LatencyModel.from_state(CostModel(model, graph), old).channelwise == []


def test_one_resource_ratio_is_that_entry_of_all_the_ratios(measured):
    """``CostModel.ratio`` (what ``reached`` asks after every channel of a step) against ``ratios``, which
    evaluates every resource, on random keeps; the latency model is asked only for latency."""
    model, _, _, _ = measured
    model = copy.deepcopy(model)
    graph = analyse(model, torch.randn(1, 3, 16, 16))
    lat = synthetic_latency(model, graph)
    cost = lat.cost
    cost.attach_latency(lat)
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        keep = torch.rand(graph.num_channels, generator=g) > 0.3
        every = cost.ratios(keep)
        assert set(every) == {'flops', 'memory', 'params', 'latency'}
        for resource, value in every.items():
            assert cost.ratio(resource, keep) == pytest.approx(value, rel=1e-12)
    calls = []
    total = lat.total
    lat.total = lambda keep: calls.append(1) or total(keep)
    cost.ratio('flops', keep)
    assert not calls
    cost.ratio('latency', keep)
    assert calls == [1]
