"""Models that wrap a detector: a semi-supervised detector (a student and an averaged teacher) and a
tracker whose only network is its detector. Each is analysed, pruned and run as a whole."""
import copy

import torch
from mmengine.config import Config

from helpers import config_path, masked_and_shrunk, max_rel_err, random_keep, randomise_norms
from mmfisher.openmmlab import analyse_model, build_from_config
from mmfisher.openmmlab.synthetic import loss_of, one_frame_video, random_batch


def _small_soft_teacher():
    """mmdet's soft teacher config with a ResNet-18 in place of the ResNet-50 (the same wrapper, faster)."""
    cfg = Config.fromfile(config_path('mmdet', 'soft_teacher/soft-teacher_faster-rcnn_r50-caffe_fpn_180k_semi-0.1-'
                                               'coco.py'))
    cfg.model.detector.backbone.depth = 18
    cfg.model.detector.neck.in_channels = [64, 128, 256, 512]
    torch.manual_seed(0)
    model = build_from_config(cfg)
    randomise_norms(model)
    return model.eval()


def test_a_semi_supervised_teacher_loses_the_channels_its_student_loses():
    from mmdet.engine.hooks import MeanTeacherHook
    model = _small_soft_teacher()
    graph = analyse_model(model, (1, 3, 128, 128), strict=True)
    assert ('teacher', 'student') in graph.mirrors and not graph.unseen and not graph.skipped
    # every student layer has its teacher copy in the same group (the tensor forward runs the teacher,
    # the loss the student: both were traced)
    group_of = {n: g.index for g in graph.groups for n in g.producers}
    students = [n for n in group_of if n.startswith('student.')]
    assert students and all(group_of['teacher.' + n[len('student.'):]] == group_of[n] for n in students)
    assert any(g.prunable and any(p.startswith('student.backbone') for p in g.producers) for g in graph.groups)
    keep = random_keep(graph, 0.6)
    x = torch.randn(1, 3, 128, 128, generator=torch.Generator().manual_seed(1))
    samples = random_batch(model, 1, (128, 128))[1]
    ref, out, compact = masked_and_shrunk(model, graph, keep, lambda m: m._forward(x, copy.deepcopy(samples)))
    assert max_rel_err(ref, out) < 1e-4
    s_params = dict(compact.student.named_parameters())
    assert sum(p.numel() for p in s_params.values()) < sum(p.numel() for p in model.student.parameters())
    assert all(p.shape == s_params[n].shape for n, p in compact.teacher.named_parameters())
    # what training runs: the three-branch loss, then mmdet's own hook averages the student into the teacher
    inputs, batch = random_batch(compact, 2, (128, 128))
    compact.train()
    loss_of(compact, inputs, batch).backward()
    MeanTeacherHook().momentum_update(compact, 0.5)


def _small_ocsort():
    cfg = Config.fromfile(config_path('mmdet', 'ocsort/ocsort_yolox_x_8xb4-amp-80e_crowdhuman-mot17halftrain_test-'
                                               'mot17halfval.py'))
    cfg.model.detector.backbone.update(deepen_factor=0.33, widen_factor=0.25)
    cfg.model.detector.neck.update(in_channels=[64, 128, 256], out_channels=64, num_csp_blocks=1)
    cfg.model.detector.bbox_head.update(in_channels=64, feat_channels=64)
    torch.manual_seed(0)
    model = build_from_config(cfg)
    randomise_norms(model)
    return model.eval()


def test_a_tracker_is_pruned_through_its_detector_and_tracks_with_the_compact_one():
    model = _small_ocsort()
    graph = analyse_model(model, (1, 3, 128, 128), strict=True)
    alone = analyse_model(copy.deepcopy(model.detector), (1, 3, 128, 128), strict=True)
    # the same groups as the detector analysed on its own, under the tracker's names
    assert sorted(sorted(g.producers) for g in graph.groups) == \
        sorted(sorted('detector.' + p for p in g.producers) for g in alone.groups)
    assert graph.summary()['prunable_groups'] == alone.summary()['prunable_groups'] > 0
    keep = random_keep(graph, 0.6)
    x = torch.randn(1, 3, 128, 128, generator=torch.Generator().manual_seed(1))
    ref, out, compact = masked_and_shrunk(model, graph, keep, lambda m: m.detector._forward(x))
    assert max_rel_err(ref, out) < 1e-4
    inputs, samples = random_batch(compact, 2, (128, 128))
    compact.train()
    loss_of(compact, inputs, samples).backward()        # the tracker's loss is its detector's
    compact.eval()
    with torch.no_grad():
        video = compact.predict(*one_frame_video(inputs[:1], samples[0]))[0]
    assert len(video) == 1 and 'pred_track_instances' in video[0]


def _video_model(rel, **detector):
    cfg = Config.fromfile(config_path('mmdet', rel))
    for key, value in detector.items():
        cfg.model.detector[key].update(value)
    torch.manual_seed(0)
    model = build_from_config(cfg)
    randomise_norms(model)
    return model.eval()


def test_a_video_model_trains_on_a_key_and_a_reference_frame_and_is_pruned_with_its_track_head():
    """QDTrack: the tensor forward is its detector's, the loss adds the track head across two frames."""
    model = _video_model('qdtrack/qdtrack_faster-rcnn_r50_fpn_8xb2-4e_mot17halftrain_test-mot17halfval.py',
                         backbone=dict(depth=18, init_cfg=None), neck=dict(in_channels=[64, 128, 256, 512]))
    inputs, videos = random_batch(model, 2, (128, 128))
    assert inputs.shape == (2, 2, 3, 128, 128) and all(len(v) == 2 for v in videos)
    assert [v.key_frames_inds for v in videos] == [[0], [0]]
    graph = analyse_model(model, (1, 3, 128, 128), strict=True)
    assert not graph.unseen and not graph.skipped
    # the track head (run by the loss only) reads the detector's FPN channels: one group with the neck
    fpn = graph.group('detector.neck.fpn_convs.0.conv')
    assert fpn.prunable and any(c.startswith('track_head.') for c in fpn.consumers)
    keep = random_keep(graph, 0.6)
    x = torch.randn(1, 3, 128, 128, generator=torch.Generator().manual_seed(1))
    frames = random_batch(model.detector, 1, (128, 128))[1]
    ref, out, compact = masked_and_shrunk(model, graph, keep, lambda m: m.detector._forward(x, copy.deepcopy(frames)))
    assert max_rel_err(ref, out) < 1e-4
    compact.train()
    loss_of(compact, inputs, copy.deepcopy(videos)).backward()
    compact.eval()
    with torch.no_grad():
        tracked = compact.predict(inputs[:1], copy.deepcopy(videos[:1]))[0]
    assert [f.frame_id for f in tracked] == [0, 1] and all('pred_track_instances' in f for f in tracked)


def test_a_video_model_without_a_detector_is_traced_through_its_backbone_and_track_head():
    """Mask2Former-VIS has no tensor mode: the analysis runs its backbone and track head on one video."""
    cfg = Config.fromfile(config_path('mmdet', 'mask2former_vis/mask2former_r50_8xb2-8e_youtubevis2019.py'))
    cfg.model.backbone.update(depth=18, init_cfg=None)
    cfg.model.track_head.in_channels = [64, 128, 256, 512]
    torch.manual_seed(0)
    model = build_from_config(cfg)
    randomise_norms(model)
    graph = analyse_model(model.eval(), (1, 3, 64, 64), strict=True)
    assert not graph.skipped
    assert graph.group('backbone.layer1.0.conv1').prunable
    assert any(g.prunable and any(p.startswith('track_head.') for p in g.producers) for g in graph.groups)
    keep = random_keep(graph, 0.6)
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    ref, out, compact = masked_and_shrunk(model, graph, keep, lambda m: m.track_head(m.backbone(x), None))
    assert max_rel_err(ref, out) < 1e-4
    inputs, videos = random_batch(compact, 1, (64, 64))
    compact.train()
    loss_of(compact, inputs, copy.deepcopy(videos)).backward()
