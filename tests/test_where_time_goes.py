"""benchmarks/where_time_goes.py: the parts it times and the multiply-accumulates it counts per part."""
import importlib.util
import os

import torch
import torch.nn as nn

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), '..'))


def _tool():
    spec = importlib.util.spec_from_file_location('where_time_goes',
                                                  os.path.join(ROOT, 'benchmarks', 'where_time_goes.py'))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool


class Backbone(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1)            # 8x8 out
        self.layer1 = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=4), nn.ReLU())

    def forward(self, x):
        return self.layer1(self.stem(x))


class Detector(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = Backbone()
        self.neck = nn.Conv2d(8, 6, 1)
        self.head = nn.Sequential(nn.Linear(6, 5))

    def forward(self, x):
        y = self.neck(self.backbone(x))
        return self.head.forward(y.mean((2, 3)))      # called past its hooks, as mmdet calls its heads


def test_parts_are_the_backbones_children_then_the_neck_and_macs_count_per_part():
    tool = _tool()
    model = Detector()
    parts = tool.parts_of(model)
    assert [n for n, _ in parts] == ['backbone.stem', 'backbone.layer1', 'neck']
    clock = tool.PartClock(model, parts, lambda: None)
    clock.count_macs = True
    with torch.no_grad():
        model(torch.randn(1, 3, 16, 16))
    # by hand: output elements times the inputs each one reads
    assert clock.macs['backbone.stem'] == 8 * 8 * 8 * (3 * 9)
    assert clock.macs['backbone.layer1'] == 8 * 8 * 8 * (2 * 9)
    assert clock.macs['neck'] == 6 * 8 * 8 * 8
    assert clock.macs['rest'] == 5 * 6
    assert all(clock.ms[n] > 0 for n in clock.names)
    assert tool.conv_channels(model, parts) == {'backbone.stem': 8, 'backbone.layer1': 8, 'neck': 6}
