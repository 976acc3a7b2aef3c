"""Each event of mmfisher's hooks on a runner built in-process, in the style of mmengine's own hook tests
(``mmengine.testing.RunnerTestCase``): a small conv net with a residual add, on random images."""
import copy
import io
import os
import os.path as osp

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from mmengine.logging import HistoryBuffer
from mmengine.model import BaseModel
from mmengine.registry import DATASETS, MODELS
from mmengine.testing import RunnerTestCase
from torch.utils.data import Dataset

import mmfisher.openmmlab  # noqa: F401  (registers the hooks)
from mmfisher.core import shrink
from mmfisher.openmmlab.hooks import STATE_KEY, SafeCheckpointHook


class ToyResNet(BaseModel):
    """conv1 -> bn1 -> (+ conv2 -> bn2) -> pool -> linear: conv1 and conv2 form one residual stream."""

    def __init__(self, data_preprocessor=None, in_channels=3):
        super().__init__(data_preprocessor=data_preprocessor)
        self.conv1 = nn.Conv2d(in_channels, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(16)
        self.conv3 = nn.Conv2d(16, 24, 3, padding=1)
        self.head = nn.Linear(24, 2)

    def forward(self, inputs, data_samples=None, mode='tensor'):
        x = torch.stack(inputs) if isinstance(inputs, list) else inputs
        x = F.relu(self.bn1(self.conv1(x)))
        x = x + F.relu(self.bn2(self.conv2(x)))
        logits = self.head(F.relu(self.conv3(x)).mean((2, 3)))
        if mode == 'loss':
            labels = torch.stack(data_samples) if isinstance(data_samples, list) else data_samples
            return dict(loss=F.cross_entropy(logits, labels))
        return logits


class ToyImages(Dataset):
    images = torch.randn(12, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(12) % 2
    metainfo = {}

    def __len__(self):
        return 12

    def __getitem__(self, i):
        return dict(inputs=self.images[i], data_samples=self.labels[i])


class ToyGrayImages(ToyImages):
    """One channel, as MNIST's."""
    images = torch.randn(12, 1, 8, 8, generator=torch.Generator().manual_seed(0))


HOOK = dict(type='FisherPruningHook', interval=2, target=('flops', 0.6), channels_per_step=2, input_shape=(8, 8))


class TestFisherPruningHook(RunnerTestCase):

    def setUp(self):
        super().setUp()
        MODELS.register_module(module=ToyResNet, force=True)
        DATASETS.register_module(module=ToyImages, force=True)
        DATASETS.register_module(module=ToyGrayImages, force=True)
        cfg = self.iter_based_cfg
        cfg.model = dict(type='ToyResNet')
        for key in ('train_dataloader', 'val_dataloader', 'test_dataloader'):
            cfg[key].dataset = dict(type='ToyImages')
        cfg.train_cfg = dict(by_epoch=False, max_iters=40, val_interval=1000)
        cfg.custom_hooks = [dict(type='SafeCheckpointHook'), dict(HOOK)]

    def tearDown(self):
        MODELS.module_dict.pop('ToyResNet', None)
        DATASETS.module_dict.pop('ToyImages', None)
        DATASETS.module_dict.pop('ToyGrayImages', None)
        super().tearDown()

    def runner_and_hook(self, cfg=None):
        runner = self.build_runner(copy.deepcopy(cfg or self.iter_based_cfg))
        hook = next(h for h in runner.hooks if type(h).__name__ == 'FisherPruningHook')
        runner.optim_wrapper = runner.build_optim_wrapper(runner.optim_wrapper)
        return runner, hook

    def train_iters(self, runner, hook, iters):
        """What IterBasedTrainLoop.run_iter does around the hook: one train step, then after_train_iter."""
        loader = runner.train_loop.dataloader_iterator    # the loop's own iterator over its infinite sampler
        for _ in range(iters):
            data = next(loader)
            outputs = runner.model.train_step(data, runner.optim_wrapper)
            hook.after_train_iter(runner, runner.iter, data, outputs)
            runner.train_loop._iter += 1

    def test_before_train_analyses_the_model_and_publishes_the_ratios(self):
        runner, hook = self.runner_and_hook()
        hook.before_train(runner)
        groups = {g.name: g for g in hook.pruner.graph.groups}
        self.assertEqual(groups['conv1'].producers, ['conv1', 'conv2'])   # the residual add couples them
        self.assertTrue(groups['conv1'].prunable and groups['conv3'].prunable)
        self.assertFalse(groups['head'].prunable)                         # the model output
        self.assertEqual(hook.analysis_shape, (8, 8))
        self.assertTrue(hook.pruner.consumers._handles)                   # masks installed
        hub = runner.message_hub
        self.assertEqual(hub.get_scalar('train/pruned_channels').current(), 0)
        self.assertEqual(hub.get_scalar('train/flops_ratio').current(), 1.0)

    def test_a_one_channel_model_is_analysed_with_the_channels_its_data_has(self):
        for shape in (None, (1, 8, 8)):      # from the first training sample, or given as (C, H, W)
            cfg = copy.deepcopy(self.iter_based_cfg)
            cfg.model = dict(type='ToyResNet', in_channels=1)
            for key in ('train_dataloader', 'val_dataloader', 'test_dataloader'):
                cfg[key].dataset = dict(type='ToyGrayImages')
            cfg.custom_hooks[1].input_shape = shape
            runner, hook = self.runner_and_hook(cfg)
            hook.before_train(runner)
            self.assertEqual((hook.analysis_channels, hook.analysis_shape), (1, (8, 8)))
            self.assertTrue(hook.pruner.graph.group('conv1').prunable)
            self.train_iters(runner, hook, 4)
            self.assertGreater(len(hook.pruner.history), 0)

    def test_after_train_iter_removes_channels_at_every_interval_only(self):
        runner, hook = self.runner_and_hook()
        hook.before_train(runner)
        removed = []
        for _ in range(6):
            self.train_iters(runner, hook, 1)
            removed.append(len(hook.pruner.history))
        self.assertEqual(removed, [0, 2, 2, 4, 4, 6])
        self.assertEqual(runner.message_hub.get_scalar('train/pruned_channels').current(), 6)
        self.assertLess(runner.message_hub.get_scalar('train/flops_ratio').current(), 1.0)

    def test_checkpoint_events_carry_the_state_to_a_resumed_run(self):
        runner, hook = self.runner_and_hook()
        hook.before_train(runner)
        self.train_iters(runner, hook, 4)
        checkpoint = {}
        hook.before_save_checkpoint(runner, checkpoint)
        state = checkpoint[STATE_KEY]
        self.assertEqual(state['options'], hook.options())
        self.assertEqual(len(state['pruner']['history']), 4)

        other, hook2 = self.runner_and_hook()
        other._resume = True
        hook2.after_load_checkpoint(other, copy.deepcopy(checkpoint))
        hook2.before_train(other)
        self.assertTrue(torch.equal(hook2.pruner.keep, hook.pruner.keep))
        self.assertEqual(hook2.pruner.history, hook.pruner.history)
        # load_from (no resume) starts pruning afresh
        fresh, hook3 = self.runner_and_hook()
        hook3.after_load_checkpoint(fresh, copy.deepcopy(checkpoint))
        hook3.before_train(fresh)
        self.assertEqual(hook3.pruner.history, [])

    def test_after_train_removes_the_masks(self):
        runner, hook = self.runner_and_hook()
        hook.before_train(runner)
        self.train_iters(runner, hook, 2)
        hook.after_train(runner)
        self.assertFalse(hook.pruner.consumers._handles)
        self.assertFalse(any(m._forward_pre_hooks or m._forward_hooks for m in runner.model.modules()))

    def test_a_whole_run_stops_at_the_target_and_writes_the_compact_model(self):
        runner = self.build_runner(copy.deepcopy(self.iter_based_cfg))
        runner.train()
        hook = next(h for h in runner.hooks if type(h).__name__ == 'FisherPruningHook')
        self.assertTrue(hook.pruner.reached())
        self.assertLess(runner.iter, 40)
        path = hook.saved['0.6000']
        ckpt = torch.load(path, weights_only=True)
        compact = ToyResNet()
        shrink(compact, hook.pruner.graph, ckpt['meta']['channel_spec'])
        compact.load_state_dict(ckpt['state_dict'], strict=True)
        self.assertLessEqual(ckpt['meta']['mmfisher']['ratios']['flops'], 0.6)

    def test_a_latency_run_records_the_compact_and_the_unpruned_model_timed_side_by_side(self):
        cfg = copy.deepcopy(self.iter_based_cfg)
        cfg.custom_hooks = [dict(type='SafeCheckpointHook'),
                            dict(HOOK, normalization='latency', latency_quantum=1)]    # to 60% of the FLOPs
        os.environ['MMFISHER_CACHE_DIR'] = osp.join(self.temp_dir.name, 'cache')
        try:
            runner = self.build_runner(cfg)
            runner.train()
        finally:
            os.environ.pop('MMFISHER_CACHE_DIR')
        hook = next(h for h in runner.hooks if type(h).__name__ == 'FisherPruningHook')
        lat = torch.load(hook.saved['0.6000'], weights_only=True)['meta']['mmfisher']['latency']
        # never above 1 (the tables are monotone, the fit's terms non-negative); whether below 1 depends on
        # this run's timings: a noisy fit may keep only the constant term, and then predicts no saving
        self.assertLessEqual(lat['predicted_ratio'], 1.0)
        if hook.pruner.cost.latency.per_memory > 0:        # memory falls with every channel removed
            self.assertLess(lat['predicted_ratio'], 1.0)
        self.assertAlmostEqual(lat['predicted_ratio'], lat['predicted_ms'] / lat['original_predicted_ms'])
        self.assertGreater(lat['original_measured_ms'], 0)
        self.assertAlmostEqual(lat['measured_ratio'], lat['measured_ms'] / lat['original_measured_ms'])
        self.assertFalse(any(m._forward_pre_hooks or m._forward_hooks for m in runner.model.modules()))

    def test_with_an_ema_hook_the_compact_model_holds_the_averaged_weights(self):
        """mmengine's EMAHook keeps its average outside the model, and its checkpoints hold the average as
        ``state_dict``: so does the pruned checkpoint, the average shrunk to the kept channels."""
        cfg = copy.deepcopy(self.iter_based_cfg)
        cfg.custom_hooks = [dict(type='SafeCheckpointHook'), dict(type='EMAHook', momentum=0.5), dict(HOOK)]
        runner = self.build_runner(cfg)
        runner.train()
        hook = next(h for h in runner.hooks if type(h).__name__ == 'FisherPruningHook')
        ema = next(h for h in runner.hooks if type(h).__name__ == 'EMAHook')
        ckpt = torch.load(hook.saved['0.6000'], weights_only=True)
        self.assertEqual(ckpt['meta']['mmfisher']['weights'], 'ema')
        spec = ckpt['meta']['channel_spec']
        averaged, running = ToyResNet(), ToyResNet()
        averaged.load_state_dict(ema.ema_model.module.state_dict())
        running.load_state_dict(runner.model.state_dict())
        for model in (averaged, running):
            shrink(model, hook.pruner.graph, spec)
        for k, v in ckpt['state_dict'].items():
            self.assertTrue(torch.equal(v, averaged.state_dict()[k]), k)
        self.assertFalse(all(torch.equal(v, running.state_dict()[k]) for k, v in ckpt['state_dict'].items()))

    def test_other_criteria_run_the_same_schedule_and_are_recorded(self):
        for importance in ('l1', dict(type='random', seed=3)):
            with self.subTest(importance=importance):
                cfg = copy.deepcopy(self.iter_based_cfg)
                cfg.custom_hooks = [dict(type='SafeCheckpointHook'), dict(HOOK, importance=importance)]
                runner, hook = self.runner_and_hook(cfg)
                hook.before_train(runner)
                self.train_iters(runner, hook, 4)
                self.assertEqual(len(hook.pruner.history), 4)
                self.assertEqual(hook.pruner.fisher.valid_passes, 0)      # no Fisher gathered
                checkpoint = {}
                hook.before_save_checkpoint(runner, checkpoint)
                want = {'type': 'l1'} if importance == 'l1' else importance
                self.assertEqual(checkpoint[STATE_KEY]['options']['importance'], want)

    def test_an_unknown_criterion_is_refused_when_the_hook_is_built(self):
        cfg = copy.deepcopy(self.iter_based_cfg)
        cfg.custom_hooks = [dict(HOOK, importance='taylor')]
        with self.assertRaisesRegex(ValueError, "importance='taylor' is not a registered criterion"):
            self.build_runner(cfg)


class TestSafeCheckpointHook(RunnerTestCase):

    def test_before_save_makes_the_message_hub_plain_and_after_load_restores_it(self):
        runner = self.build_runner(copy.deepcopy(self.iter_based_cfg))
        hook = SafeCheckpointHook()
        runner.message_hub.update_scalar('train/loss', 0.5)
        checkpoint = {'message_hub': runner.message_hub.state_dict(), 'meta': {'x': np.float64(2)}}
        with self.assertRaises(Exception):          # what mmengine writes, the stock loader refuses
            # (pickling also leaves HistoryBuffer's statistics functions in its __dict__: they must not
            # reach the checkpoint)
            buf = io.BytesIO()
            torch.save(checkpoint, buf)
            buf.seek(0)
            torch.load(buf, weights_only=True)
        hook.before_save_checkpoint(runner, checkpoint)
        buf = io.BytesIO()
        torch.save(checkpoint, buf)
        buf.seek(0)
        loaded = torch.load(buf, weights_only=True)       # the stock safe loader reads it
        hook.after_load_checkpoint(runner, loaded)
        buffer = loaded['message_hub']['log_scalars']['train/loss']
        self.assertIsInstance(buffer, HistoryBuffer)
        self.assertEqual(buffer.current(), 0.5)
        self.assertEqual(buffer.statistics('mean'), 0.5)
        self.assertEqual(type(loaded['meta']['x']).__name__, 'float64')
