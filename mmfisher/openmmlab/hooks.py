"""mmengine hooks: Group Fisher pruning during a normal training run, and safe checkpoints.

``custom_hooks = [dict(type='FisherPruningHook', interval=10, target=('flops', 0.5))]``
in an mmdet / mmpretrain config (with ``custom_imports = dict(imports=['mmfisher'])``
or mmfisher's ``tools/train.py``) prunes the model while it trains.
"""
from __future__ import annotations

import inspect
import os.path as osp
import time
from typing import Any, Dict, Optional, Sequence, Tuple

import torch
from mmengine.dist import all_reduce, broadcast, broadcast_object_list, get_world_size, is_main_process
from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper
from mmengine.registry import HOOKS

from ..core import weights_digest
from ..core.cost import RESOURCES
from ..core.criteria import build_criterion
from ..core.pruner import NORMALIZATIONS, GroupFisherPruner
from .analysis import analyse_model, example_forward
from .checkpoint import make_plain_in_place, restore_in_place

STATE_KEY = 'mmfisher'


def _unwrap(model):
    return model.module if is_model_wrapper(model) else model


def _by_epoch(loop) -> bool:
    """Whether ``loop`` counts in epochs (its checkpoints are ``epoch_N.pth``)."""
    from mmengine.runner import EpochBasedTrainLoop, IterBasedTrainLoop
    if isinstance(loop, EpochBasedTrainLoop):
        return True
    if isinstance(loop, IterBasedTrainLoop):
        return False
    return hasattr(loop, 'max_epochs') and not hasattr(loop, 'dataloader_iterator')


class _StoppableLoader:
    """The train dataloader of an epoch-based loop, ending the epoch as soon as ``stop`` is set.

    mmengine's ``stop_training`` is only read between epochs; a COCO epoch is thousands of
    iterations. Everything but iteration is the wrapped loader's (``len``, ``sampler``, ``dataset``).
    """

    def __init__(self, loader) -> None:
        self.loader = loader
        self.stop = False

    def __iter__(self):
        for batch in self.loader:
            if self.stop:
                break
            yield batch
            if self.stop:
                break

    def __len__(self) -> int:
        return len(self.loader)

    def __getattr__(self, name):
        return getattr(self.__dict__['loader'], name)


@HOOKS.register_module()
class SafeCheckpointHook(Hook):
    """Make every checkpoint the runner writes loadable with ``torch.load(weights_only=True)``.

    Runs last when a checkpoint is saved (after every hook added its state) and turns
    what is not a tensor or plain Python data (the message hub's ``HistoryBuffer``s, numpy
    values) into a tagged plain form; turns it back when a checkpoint is loaded, before
    mmengine restores the message hub. See :mod:`mmfisher.openmmlab.checkpoint`.
    """

    priority = 'LOWEST'

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        make_plain_in_place(checkpoint)

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        restore_in_place(checkpoint)


def _parse_target(target: Any) -> Tuple[str, float]:
    if isinstance(target, dict):
        if set(target) == {'resource', 'ratio'}:
            target = (target['resource'], target['ratio'])
        elif len(target) == 1:
            target = next(iter(target.items()))
        else:
            raise ValueError(f"target={target!r}: use ('flops', 0.5) or dict(resource='flops', ratio=0.5)")
    if not (isinstance(target, (list, tuple)) and len(target) == 2):
        raise ValueError(f"target={target!r}: use ('flops', 0.5) or dict(resource='flops', ratio=0.5)")
    resource, ratio = str(target[0]), float(target[1])
    if resource not in RESOURCES:
        raise ValueError(f'target resource {resource!r} is not one of {RESOURCES}')
    if not 0.0 < ratio < 1.0:
        raise ValueError(f'target ratio {ratio} is outside (0, 1): it is the fraction of {resource} to keep')
    return resource, ratio


@HOOKS.register_module()
class FisherPruningHook(Hook):
    """Prune channels by Group Fisher importance while the model trains.

    Every ``interval`` iterations the ``channels_per_step`` globally least important
    channels (Fisher / saving) are masked, until ``target`` is reached. The model keeps its
    size during training (masks); at each ratio in ``save_ratios`` (and at the target) a
    *pruned checkpoint* is written: the compact model's weights with the channel spec in its
    meta, named ``pruned_<resource>_<ratio>.pth`` (never overwriting an existing file).

    Args:
        interval: iterations between pruning steps (paper: 10 for detection, 25 for classification).
        target: ``(resource, ratio)`` with resource 'flops', 'memory', 'params' or 'latency', e.g.
            ``('flops', 0.5)``. 'latency' is the latency predicted for the device training runs on.
        normalization: 'memory' (default, the paper's -M), 'flops' (-F), 'latency' (-L) or 'none' (-U).
            With -L or a latency target, a latency model of the network is measured on the training
            device before training starts (:mod:`mmfisher.core.latency`; cached, and stored in every
            checkpoint so a resumed run predicts the same); the pruned checkpoints' meta records the
            predicted latency and the latency measured once on the compact model.
        save_ratios: ratios (of the target resource, above the target) at which to also write a
            pruned checkpoint.
        channels_per_step: channels removed at each pruning step (1 as in the paper), or a fraction in
            (0, 1) of the channels still removable; chosen globally, costs re-measured after each. With -L
            on a staircase device (``latency_quantum`` above 1) a step removes whole blocks, so it may
            remove more than this.
        min_channels: no layer keeps fewer channels.
        stop_at_target: end training (cleanly, through the train loop) once the target is reached.
        internal_only: prune only channels inside blocks (the paper's -I).
        exclude: module-name prefixes whose groups are never pruned.
        frozen_every: score layers of frozen stages on every k-th iteration only (exact: 1;
            default: ``interval``, i.e. once per pruning decision). Scoring them needs a backward
            pass through the frozen stages that plain training skips.
        input_shape: ``(H, W)`` (3 channels) or ``(C, H, W)`` of the example input the analysis and the
            cost model use (default: the shape of the first training sample after the data preprocessor).
        round_to: when writing a pruned checkpoint, round every group's channel count up to a
            multiple of this (8, 16, 32: faster kernels), giving back the last removed channels.
        latency_quantum: the channel quantum of the latency model (-L, latency targets): None (default)
            finds it on the training device with a short probe (16 on this project's CPU: a 3x3 conv with 49
            channels in and out takes about twice as long as with 48), 1 turns the staircase off, another count
            fixes it (a deployment device's known block size). With a quantum above 1, -L decides in blocks
            that end on its multiples (:mod:`mmfisher.core.pruner`). A resumed run keeps its latency model.
        importance: what channels are ranked by: 'fisher' (default, Group Fisher), 'l1' (filter L1
            norm), 'random', or ``dict(type=name, **options)`` of a criterion registered with
            :func:`mmfisher.core.criteria.register_criterion` (e.g. ``dict(type='random', seed=1)``).
            Everything else is the same for every criterion.
    """

    priority = 'NORMAL'

    def __new__(cls, *args, **kwargs):
        # a misspelt option is a clear error naming the valid ones (mmengine builds hooks from dicts)
        allowed = [p for p in inspect.signature(cls.__init__).parameters if p != 'self']
        unknown = sorted(set(kwargs) - set(allowed))
        if unknown:
            raise TypeError(f'{cls.__name__} got unknown option(s) {unknown}; valid options: {allowed}')
        return super().__new__(cls)

    def __init__(self, interval: int = 10, target: Any = ('flops', 0.5), normalization: str = 'memory',
                 save_ratios: Sequence[float] = (), channels_per_step: int = 1, min_channels: int = 1,
                 stop_at_target: bool = True, internal_only: bool = False, exclude: Sequence[str] = (),
                 frozen_every: Optional[int] = None, input_shape: Optional[Sequence[int]] = None,
                 round_to: Optional[int] = None, importance: Any = 'fisher',
                 latency_quantum: Optional[int] = None) -> None:
        if int(interval) < 1:
            raise ValueError(f'interval={interval} must be a positive number of iterations')
        if normalization not in NORMALIZATIONS:
            raise ValueError(f'normalization={normalization!r} is not one of {NORMALIZATIONS}')
        if isinstance(channels_per_step, float) and not channels_per_step.is_integer():
            if not 0.0 < channels_per_step < 1.0:
                raise ValueError(f'channels_per_step={channels_per_step}: a count >= 1 or a fraction in (0, 1)')
        elif int(channels_per_step) < 1:
            raise ValueError(f'channels_per_step={channels_per_step} must be at least 1 (or a fraction in (0, 1))')
        self.interval = int(interval)
        self.target = _parse_target(target)
        self.normalization = normalization
        ratios = sorted({float(r) for r in save_ratios}, reverse=True)
        for r in ratios:
            if not self.target[1] <= r < 1.0:
                raise ValueError(f'save ratio {r} is outside [{self.target[1]}, 1): pruning to the target '
                                 f'{self.target[0]} {self.target[1]} never passes it')
        if self.target[1] not in ratios:
            ratios.append(self.target[1])
        self.save_ratios = ratios
        self.channels_per_step = channels_per_step if isinstance(channels_per_step, float) and \
            not channels_per_step.is_integer() else int(channels_per_step)
        self.min_channels = int(min_channels)
        self.stop_at_target = bool(stop_at_target)
        self.internal_only = bool(internal_only)
        self.exclude = tuple(exclude)
        self.frozen_every = self.interval if frozen_every is None else int(frozen_every)
        if self.frozen_every < 1 or self.interval % self.frozen_every:
            raise ValueError(f'frozen_every={frozen_every} must be a positive divisor of interval={self.interval}: '
                             f'frozen layers are then scored the same number of times in every interval')
        self.input_shape = tuple(input_shape) if input_shape is not None else None
        if round_to is not None and int(round_to) < 1:
            raise ValueError(f'round_to={round_to} must be a positive channel count (e.g. 8, 16, 32)')
        self.round_to = int(round_to) if round_to else None
        if latency_quantum is not None and int(latency_quantum) < 1:
            raise ValueError(f'latency_quantum={latency_quantum} must be a positive channel count (1: no staircase; '
                             f'None: found on the device)')
        self.latency_quantum = None if latency_quantum is None else int(latency_quantum)
        self.importance = build_criterion(importance).options()     # checked now, built per pruner
        self.pruner: Optional[GroupFisherPruner] = None
        self.saved: Dict[str, str] = {}      # '%.4f' % ratio -> file written
        self._resume_state: Optional[dict] = None
        self._stopped = False
        self.option_changes: list = []   # [{'iter', 'changed': {option: [old, new]}}] across resumes

    # ---------------------------------------------------------------- set-up
    def _analysis_input(self, runner) -> Tuple[int, int, int]:
        """``(C, H, W)`` of the analysis input: ``input_shape`` (3 channels when it gives ``(H, W)``), else
        the first training sample's after the data preprocessor (LeNet on MNIST: 1 channel)."""
        if self.input_shape is not None:
            s = [int(v) for v in self.input_shape]
            return (3, s[0], s[-1]) if len(s) < 3 else (s[0], s[1], s[2])
        shape = [None]
        if is_main_process():
            # one sample straight from the dataset: iterating the train dataloader here would close
            # the generator its infinite sampler shares with the train loop
            import random

            import numpy as np
            from mmengine.dataset import pseudo_collate
            states = random.getstate(), np.random.get_state(), torch.get_rng_state()
            try:
                data = pseudo_collate([runner.train_dataloader.dataset[0]])
                with torch.no_grad():
                    data = _unwrap(runner.model).data_preprocessor(data, False)
            finally:
                random.setstate(states[0])
                np.random.set_state(states[1])
                torch.set_rng_state(states[2])
            inputs = data['inputs']
            inputs = inputs[0] if isinstance(inputs, (list, tuple)) else inputs   # a preprocessor that stacks none
            shape = [tuple(int(s) for s in inputs.shape[-3:])]
        broadcast_object_list(shape)
        return shape[0]

    def before_train(self, runner) -> None:
        model = _unwrap(runner.model)
        loop = runner.train_loop
        if self.stop_at_target and _by_epoch(loop) and not isinstance(getattr(loop, 'dataloader', None),
                                                                        _StoppableLoader):
            loop.dataloader = _StoppableLoader(loop.dataloader)
        t0 = time.perf_counter()
        chw = self._analysis_input(runner)
        graph = analyse_model(model, (1,) + tuple(chw))
        self.analysis_channels, self.analysis_shape = chw[0], tuple(chw[1:])
        latency = None
        if self.normalization == 'latency' or self.target[0] == 'latency':
            latency = self._latency_state(runner, model, graph)
        self.pruner = GroupFisherPruner(model, graph, normalization=self.normalization,
                                        min_channels=self.min_channels, internal_only=self.internal_only,
                                        exclude=self.exclude, target=self.target, frozen_every=self.frozen_every,
                                        importance=dict(self.importance), latency=latency)
        s = graph.summary()
        runner.logger.info(
            f'[mmfisher] {s["prunable_groups"]}/{s["groups"]} channel groups prunable '
            f'({s["prunable_channels"]} channels, {s["prunable_layers"]}/{s["layers"]} conv/linear layers), '
            f'analysed on {self.analysis_channels}x{self.analysis_shape[0]}x{self.analysis_shape[1]} in '
            f'{time.perf_counter() - t0:.2f} s; target {self.target[0]} '
            f'{self.target[1]}, {self._criterion_text()} importance, {self.normalization} normalisation, '
            f'{self.channels_per_step} channel(s) every '
            f'{self.interval} iterations')
        for g in graph.groups:
            if not g.prunable and g.reasons != ['model output']:
                runner.logger.info(f'[mmfisher] not pruned: {g.name} ({g.reasons[0]})')
        for copy_name, source in graph.mirrors:
            runner.logger.info(f'[mmfisher] {copy_name} is an averaged copy of {source}: it loses the same channels')
        for err in graph.skipped:
            runner.logger.warning(f'[mmfisher] the analysis\'s loss on a generated batch failed ({err}); '
                                  f'branches only training runs may be missing from the analysis')
        if graph.unseen:
            runner.logger.warning(f'[mmfisher] {len(graph.unseen)} layer(s) ran in neither the tensor forward nor '
                                  f'the loss of the analysis and are never shrunk: {", ".join(graph.unseen[:8])}'
                                  f'{" ..." if len(graph.unseen) > 8 else ""}')
        if self._resume_state is not None:
            self.pruner.load_state_dict(self._resume_state['pruner'])
            self.saved = dict(self._resume_state.get('saved', {}))
            self._resume_options(runner, self._resume_state)
            self._resume_state = None
            runner.logger.info(f'[mmfisher] resumed pruning state: {len(self.pruner.history)} channels removed, '
                               f'{self._ratio_text()}')
        current = self.pruner.ratios()[self.target[0]]
        for r in self.save_ratios:
            if r > current and self._key(r) not in self.saved and r != self.target[1]:
                raise ValueError(f'save ratio {r} is above the current {self.target[0]} ratio {current:.4f} and '
                                 f'no pruned checkpoint was written for it: remove it from save_ratios')
        self.pruner.attach()
        self._publish(runner)
        if self._stopped and self.stop_at_target:
            runner.logger.info(f'[mmfisher] the resumed run had already ended pruning ({self._ratio_text()}): '
                               f'ending training at once')
            self._stop(runner)

    def _latency_state(self, runner, model, graph) -> dict:
        """The latency model's state: the resumed run's, else measured on rank 0 and sent to every rank."""
        resumed = (self._resume_state or {}).get('pruner', {}).get('latency')
        if resumed is not None:
            runner.logger.info(f'[mmfisher] latency model of the resumed run ({resumed["device"]})')
            return resumed
        box = [None]
        if is_main_process():
            from ..core.cost import CostModel
            from ..core.latency import LatencyModel
            t0 = time.perf_counter()
            shape = (1, self.analysis_channels) + tuple(self.analysis_shape)
            lat = LatencyModel.measure(model, graph, lambda m: example_forward(m, shape), cost=CostModel(model, graph),
                                       log=lambda s: runner.logger.info(f'[mmfisher] {s}'),
                                       quantum=self.latency_quantum)
            runner.logger.info(f'[mmfisher] latency model measured in {time.perf_counter() - t0:.0f} s: '
                               f'{lat.original:.1f} ms predicted for the unpruned network, of which {lat.fixed:.1f} '
                               f'ms fixed (layers x{lat.alpha:.2f}, {lat.per_memory * 1e6:.3f} ms per M feature '
                               f'elements)')
            box = [lat.state_dict()]
        broadcast_object_list(box)
        return box[0]

    def _measured_latency(self, compact, keep) -> Dict[str, float]:
        """The latency model's prediction for the kept channels, and the compact and the unpruned model
        measured side by side (tools/benchmark.py's method: tensor mode, the median of interleaved runs). One
        model timed alone follows the machine's speed of the moment (this CPU once timed a 50% model slower
        than the unpruned one minutes before); their ratio, timed in turns, does not."""
        from .benchmarking import interleaved_latency, tensor_run
        lat = self.pruner.cost.latency
        full = self.pruner.model        # the unpruned width: timed with its masks off
        p = next(compact.parameters())
        x = torch.randn(1, self.analysis_channels, *self.analysis_shape, device=p.device)
        attached = bool(self.pruner.consumers._handles)
        modes = (compact.training, full.training)
        self.pruner.detach()
        compact.eval()
        full.eval()
        try:
            m = interleaved_latency([tensor_run(compact, x), tensor_run(full, x)], repeats=20, warmup=3,
                                    device=str(p.device))
        finally:
            compact.train(modes[0])
            full.train(modes[1])
            if attached:
                self.pruner.attach()
        predicted = lat.total(keep)
        return {'predicted_ms': predicted, 'measured_ms': m[0]['latency_ms'],
                'original_predicted_ms': lat.original, 'original_measured_ms': m[1]['latency_ms'],
                'predicted_ratio': predicted / lat.original, 'measured_ratio': m[0]['latency_ms'] / m[1]['latency_ms'],
                'device': lat.device, 'input_shape': [1, self.analysis_channels, *self.analysis_shape]}

    def options(self) -> Dict[str, Any]:
        """The options that shape the pruning run, as plain data (stored in every checkpoint)."""
        return {'interval': self.interval, 'target': [self.target[0], self.target[1]],
                'normalization': self.normalization, 'channels_per_step': self.channels_per_step,
                'min_channels': self.min_channels, 'internal_only': self.internal_only,
                'exclude': list(self.exclude), 'frozen_every': self.frozen_every, 'round_to': self.round_to,
                'stop_at_target': self.stop_at_target, 'importance': dict(self.importance)}

    def _criterion_text(self) -> str:
        extra = ', '.join(f'{k}={v}' for k, v in self.importance.items() if k != 'type')
        return self.importance['type'] + (f' ({extra})' if extra else '')

    def _resume_options(self, runner, state: dict) -> None:
        """Say which options differ from the resumed run's, refuse those the existing masks break,
        and record the change (it goes into every pruned checkpoint's meta)."""
        self.option_changes = [dict(c) for c in state.get('option_changes', [])]
        old = state.get('options')
        if old is None:
            return
        old = dict(old)
        old.setdefault('importance', {'type': 'fisher'})    # states written before criteria were options
        changed = {k: (old.get(k), v) for k, v in self.options().items() if old.get(k) != v}
        if not changed:
            return
        text = ', '.join(f'{k} {a!r} -> {b!r}' for k, (a, b) in changed.items())
        problems = self.pruner.constraint_violations()
        if problems:
            raise ValueError(f'FisherPruningHook: resumed with changed options ({text}), but the channels '
                             f'already removed break them: {problems[0]}' +
                             (f' (and {len(problems) - 1} more)' if len(problems) > 1 else '') +
                             '. Resume with the original options, or start pruning again.')
        runner.logger.warning(f'[mmfisher] resumed with changed options: {text}')
        if 'target' in changed and self._stopped and not self.pruner.reached():
            self._stopped = False      # the old target was reached, the new one not yet: prune on
        self.option_changes.append({'iter': int(runner.iter), 'changed': {k: [a, b] for k, (a, b) in changed.items()}})

    @staticmethod
    def _key(r: float) -> str:
        return f'{r:.4f}'

    def _ratio_text(self) -> str:
        r = self.pruner.ratios()
        return ', '.join(f'{k} {r[k]:.4f}' for k in RESOURCES if k in r)

    def _publish(self, runner) -> None:
        r = self.pruner.ratios()
        hub = runner.message_hub
        hub.update_scalar('train/pruned_channels', float(len(self.pruner.history)))
        hub.update_scalar('train/postponed_steps', float(self.pruner.postponed))
        for k in RESOURCES:
            if k in r:
                hub.update_scalar(f'train/{k}_ratio', float(r[k]))

    # ---------------------------------------------------------------- training
    def after_train_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
        pruner = self.pruner
        pruner.accumulate()
        if self._stopped or pruner.reached():
            pruner.fisher.enabled = False   # the masks stay; no more Fisher to gather
            self._publish(runner)
            return
        if (runner.iter + 1) % self.interval:
            self._publish(runner)
            return
        removed = pruner.step(self._step_size(), reduce=self._reduce)
        self._check_ranks_agree()
        self._publish(runner)
        if pruner.status == 'postponed':
            runner.logger.warning(f'[mmfisher] iter {runner.iter + 1}: pruning step postponed '
                                  f'({pruner.postponed_reason}); {pruner.postponed} postponed so far')
            return
        if removed:
            runner.logger.info(f'[mmfisher] iter {runner.iter + 1}: removed {len(removed)} channel(s) '
                               f'(first: {removed[0]["group"]}[{removed[0]["index"]}]), '
                               f'{len(pruner.history)} in total; {self._ratio_text()}')
        current = pruner.ratios()[self.target[0]]
        for r in self.save_ratios:
            if current <= r and self._key(r) not in self.saved:
                self.saved[self._key(r)] = self._write_pruned(runner, r)
        if pruner.reached() or pruner.status == 'exhausted':
            if pruner.status == 'exhausted':
                runner.logger.warning('[mmfisher] no channel can be removed any more (min_channels)')
            if self.stop_at_target:
                why = f'target {self.target[0]} {self.target[1]} reached' if pruner.reached() else \
                    'nothing left to prune'
                runner.logger.info(f'[mmfisher] {why} at iter {runner.iter + 1}: ending training')
                self._stop(runner)

    def _stop(self, runner) -> None:
        """End the train loop now: after this iteration in an iteration-based loop, and without the
        rest of the epoch in an epoch-based one."""
        loop = runner.train_loop
        loop.stop_training = True
        if isinstance(getattr(loop, 'dataloader', None), _StoppableLoader):
            loop.dataloader.stop = True
        self._stopped = True

    def _step_size(self) -> int:
        """A count, or a fraction of the channels still removable (at least one)."""
        if isinstance(self.channels_per_step, int):
            return self.channels_per_step
        left = int((self.pruner.candidates & self.pruner.keep).sum())
        return max(1, int(round(self.channels_per_step * left)))

    @staticmethod
    def _reduce(importance: torch.Tensor) -> torch.Tensor:
        """Sum over ranks, then rank 0's copy everywhere: every rank takes the same decision."""
        if get_world_size() > 1:
            all_reduce(importance, op='sum')
            broadcast(importance, src=0)
        return importance

    def _check_ranks_agree(self) -> None:
        """Every rank must hold the same masks; anything else is a bug worth stopping for."""
        if get_world_size() <= 1:
            return
        from mmengine.dist import all_gather_object
        mine = (int(self.pruner.keep.sum()), hash(tuple((~self.pruner.keep).nonzero().flatten().tolist())))
        every = all_gather_object(mine)
        if any(o != mine for o in every):
            raise RuntimeError(f'mmfisher: ranks disagree on the pruned channels {every}')

    def _write_pruned(self, runner, ratio: float) -> str:
        resource = self.target[0]
        base = osp.join(runner.work_dir, f'pruned_{resource}_{ratio:.2f}')
        path = base + '.pth'
        if is_main_process():
            n = 1
            while osp.exists(path):
                path = f'{base}_{n}.pth'
                n += 1
        path_box = [path]
        broadcast_object_list(path_box)
        path = path_box[0]
        if is_main_process():
            ema = self._ema_weights(runner)
            compact = self.pruner.export(self.round_to, state_dict=ema)
            keep = self.pruner.export_keep(self.round_to)
            weights = compact.state_dict()
            meta = {
                'channel_spec': self.pruner.channel_spec(self.round_to),
                'mmfisher': {
                    'resource': resource, 'ratio': ratio, 'ratios': self.pruner.cost.ratios(keep),
                    'round_to': self.round_to,
                    'iter': runner.iter + 1, 'channels_removed': len(self.pruner.history),
                    'normalization': self.normalization, 'importance': dict(self.importance),
                    'interval': self.interval,
                    'channels_per_step': self.channels_per_step,
                    'options': self.options(), 'option_changes': [dict(c) for c in self.option_changes],
                    # (H, W), with the channels first when they are not 3 (as input_shape takes it)
                    'analysis_input_shape': ([self.analysis_channels] if self.analysis_channels != 3 else [])
                    + list(self.analysis_shape),
                    'weights': 'ema' if ema is not None else 'running',
                    'weights_sha256': weights_digest(weights),
                },
            }
            if self.pruner.cost.latency is not None:
                meta['mmfisher']['latency'] = self._measured_latency(compact, keep)
            dataset_meta = getattr(getattr(runner.train_dataloader, 'dataset', None), 'metainfo', None)
            if dataset_meta:
                from .checkpoint import to_plain
                meta['dataset_meta'] = to_plain(dataset_meta, 'dataset_meta')
            torch.save({'meta': meta, 'state_dict': weights}, path)
            runner.logger.info(f'[mmfisher] wrote pruned checkpoint {path} ({resource} {ratio:.2f}'
                               f'{", the EMAHook weights" if ema is not None else ""})')
        return path

    def _ema_weights(self, runner) -> Optional[Dict[str, torch.Tensor]]:
        """The weights of an ``EMAHook``'s averaged copy of this model, if the runner has one: what mmengine's
        own checkpoints hold as ``state_dict`` then (for deployment), so the pruned checkpoint holds them too."""
        model = _unwrap(runner.model)
        for h in runner.hooks:
            ema = getattr(h, 'ema_model', None)
            if ema is not None and getattr(h, 'src_model', None) is model and hasattr(ema, 'module'):
                return ema.module.state_dict()
        return None

    def after_train(self, runner) -> None:
        if self.pruner is None:
            return
        self.pruner.detach()
        loop = runner.train_loop
        if isinstance(getattr(loop, 'dataloader', None), _StoppableLoader):
            loop.dataloader = loop.dataloader.loader
        if self._stopped:
            self._save_final_checkpoint(runner)
        if not self.pruner.reached():
            runner.logger.warning(f'[mmfisher] training ended before the target {self.target[0]} '
                                  f'{self.target[1]} was reached ({self._ratio_text()})')

    def _save_final_checkpoint(self, runner) -> None:
        """The loop ended early at the target: the regular checkpoint hook did not save this point."""
        by_epoch = _by_epoch(runner.train_loop)
        name = f'epoch_{runner.epoch}.pth' if by_epoch else f'iter_{runner.iter}.pth'
        path = osp.join(runner.work_dir, name)
        if osp.exists(path) and runner.message_hub.get_info('last_ckpt') == path:
            return      # the checkpoint hook of this run saved this point already
        # after the loop, runner.epoch / runner.iter already count the last (shortened) epoch / iteration
        runner.save_checkpoint(runner.work_dir, name, save_optimizer=True, save_param_scheduler=True,
                               meta=dict(epoch=runner.epoch, iter=runner.iter), by_epoch=by_epoch)
        if is_main_process():
            with open(osp.join(runner.work_dir, 'last_checkpoint'), 'w') as f:
                f.write(path)
        runner.logger.info(f'[mmfisher] saved the final checkpoint {path}')

    # ---------------------------------------------------------------- checkpoints
    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        if self.pruner is not None:
            checkpoint[STATE_KEY] = {'pruner': self.pruner.state_dict(), 'saved': dict(self.saved),
                                     'options': self.options(),
                                     'option_changes': [dict(c) for c in self.option_changes],
                                     'stopped': self._stopped}

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        state = checkpoint.get(STATE_KEY)
        if state is not None and getattr(runner, '_resume', False):
            self._resume_state = state
            self._stopped = bool(state.get('stopped', False))
