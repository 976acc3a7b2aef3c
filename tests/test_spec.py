"""A channel spec is used only if it is well formed and fits the model exactly; anything else is one
error naming the first problem. Weights are checked the same way."""
import copy
import json

import pytest
import torch
import torch.nn as nn

from helpers import random_keep
from mmfisher.core import (SpecFormatError, SpecMismatchError, analyse, make_spec, shrink, spec_to_keep,
                           validate_spec, weights_digest)
from mmfisher.core.spec import first_weight_mismatch


class Small(nn.Module):
    def __init__(self, width=8, kernel=3, norm='bn', blocks=1):
        super().__init__()
        self.a = nn.Conv2d(3, width, kernel, padding=kernel // 2)
        self.bn = nn.BatchNorm2d(width) if norm == 'bn' else nn.GroupNorm(2, width)
        self.mid = nn.Sequential(*[nn.Conv2d(width, width, 3, padding=1) for _ in range(blocks)])
        self.b = nn.Conv2d(width, 4, 1)

    def forward(self, x):
        return self.b(self.mid(torch.relu(self.bn(self.a(x)))))


def graph_of(model):
    return analyse(model, torch.randn(1, 3, 8, 8))


def spec_of(model, seed=0):
    graph = graph_of(model)
    return json.loads(json.dumps(make_spec(graph, random_keep(graph, 0.5, seed=seed))))


def test_spec_is_json_and_round_trips():
    graph = graph_of(Small())
    keep = random_keep(graph, 0.5)
    spec = json.loads(json.dumps(make_spec(graph, keep)))
    assert torch.equal(spec_to_keep(graph, spec), keep)
    assert spec['groups']['a'] == {'size': 8, 'keep': keep[:8].nonzero().flatten().tolist()}
    assert set(spec) == {'format', 'groups', 'architecture'}
    assert spec['architecture']['layers']['a'].startswith('Conv2d conv weight[8,3,3,3] bias[8]')


def mutate(spec, path, value):
    s = copy.deepcopy(spec)
    *head, last = path
    d = s
    for k in head:
        d = d[k]
    if value is KeyError:
        del d[last]
    else:
        d[last] = value
    return s


MALFORMED = [
    # (path into the spec, new value, what the error must say)
    (['groups', 'a', 'keep'], [0, 1, 1, 2], 'kept index 1 appears more than once'),
    (['groups', 'a', 'keep'], [0, 8], 'kept index 8 is out of range 0..7'),
    (['groups', 'a', 'keep'], [0, -1], 'kept index -1 is out of range'),
    (['groups', 'a', 'keep'], [0, 1.5], 'kept index 1.5 is not an integer'),
    (['groups', 'a', 'keep'], [0, True], 'kept index True is not an integer'),
    (['groups', 'a', 'keep'], [], 'keeps no channel'),
    (['groups', 'a', 'keep'], '0,1', '"keep" must be a list'),
    (['groups', 'a', 'size'], '8', '"size" must be a positive integer'),
    (['groups', 'a', 'size'], KeyError, "an entry is {\"size\": int, \"keep\": [int, ...]}, got ['keep']"),
    (['groups', 'a'], [0, 1], 'an entry is'),
    (['groups'], KeyError, '"groups" must be an object'),
    (['groups'], [], '"groups" must be an object'),
    (['groups'], {}, '"groups" is empty'),
    (['format'], 'mmfisher.channel_spec/0', "not an mmfisher channel spec"),
    (['grups'], {}, "unknown key 'grups'"),
    (['architecture'], 'resnet', '"architecture" must be an object'),
]


@pytest.mark.parametrize('path,value,needle', MALFORMED, ids=[m[2][:30] for m in MALFORMED])
def test_malformed_spec_is_refused_with_what_is_wrong(path, value, needle):
    graph = graph_of(Small())
    bad = mutate(spec_of(Small()), path, value)
    with pytest.raises(SpecFormatError) as e:
        spec_to_keep(graph, bad)
    assert needle in str(e.value)
    with pytest.raises(SpecFormatError):
        validate_spec(bad)


def test_a_spec_that_is_not_an_object_is_refused():
    with pytest.raises(SpecFormatError, match='not a list'):
        validate_spec([1, 2])


def test_a_spec_names_exactly_the_models_groups():
    graph = graph_of(Small())
    spec = spec_of(Small())
    del spec['architecture']          # group checks stand on their own (specs of older versions)
    missing = mutate(spec, ['groups', 'mid.0'], KeyError)
    with pytest.raises(SpecMismatchError, match="no entry for group 'mid.0'"):
        spec_to_keep(graph, missing)
    extra = mutate(spec, ['groups', 'c'], {'size': 4, 'keep': [0]})
    with pytest.raises(SpecMismatchError, match="names group 'c', which this model does not have"):
        spec_to_keep(graph, extra)
    other = spec_of(Small(16))
    del other['architecture']
    with pytest.raises(SpecMismatchError, match="group 'a' has 8 channels in this model but 16"):
        spec_to_keep(graph, other)


@pytest.mark.parametrize('other,needle', [
    (Small(16), "layer 'a' is \"Conv2d conv weight[8,3,3,3]"),
    (Small(kernel=5), "layer 'a' is \"Conv2d conv weight[8,3,3,3] bias[8] kernel_size=(3, 3)"),
    (Small(norm='gn'), "layer 'bn' is \"BatchNorm2d norm"),
    (Small(blocks=2), "its model had layer 'mid.1'"),
])
def test_a_spec_of_another_architecture_names_the_first_differing_layer(other, needle):
    graph = graph_of(Small())
    with pytest.raises(SpecMismatchError, match='made on another architecture') as e:
        spec_to_keep(graph, spec_of(other))
    assert needle in str(e.value)


def test_a_deeper_model_is_refused_by_the_spec_of_a_shallower_one():
    graph = graph_of(Small(blocks=2))
    with pytest.raises(SpecMismatchError, match="this model has layer 'mid.1'"):
        spec_to_keep(graph, spec_of(Small(blocks=1)))


def test_an_edited_architecture_digest_is_refused():
    graph = graph_of(Small())
    spec = mutate(spec_of(Small()), ['architecture', 'sha256'], '0' * 64)
    with pytest.raises(SpecMismatchError, match='edited or corrupted'):
        spec_to_keep(graph, spec)


def test_spec_cannot_prune_an_unprunable_group():
    graph = graph_of(Small())
    spec = make_spec(graph, torch.ones(graph.num_channels, dtype=torch.bool))
    spec['groups']['b']['keep'] = [0, 1]
    with pytest.raises(SpecMismatchError, match="cannot be pruned"):
        spec_to_keep(graph, spec)


def test_weights_digest_sees_one_changed_value_and_nothing_else():
    sd = Small().state_dict()
    same = {k: v.clone() for k, v in reversed(list(sd.items()))}
    assert weights_digest(sd) == weights_digest(same)
    changed = {k: v.clone() for k, v in sd.items()}
    changed['mid.0.weight'].view(-1)[7] += 1e-6
    assert weights_digest(changed) != weights_digest(sd)
    renamed = {('x' + k if k == 'b.bias' else k): v for k, v in sd.items()}
    assert weights_digest(renamed) != weights_digest(sd)


def test_weights_of_another_spec_are_named_with_both_shapes():
    model = Small()
    graph = graph_of(model)
    a = shrink(copy.deepcopy(model), graph, random_keep(graph, 0.5, seed=0))
    b = shrink(copy.deepcopy(model), graph, random_keep(graph, 0.75, seed=0))
    assert first_weight_mismatch(a.state_dict(), a.state_dict()) is None
    text = first_weight_mismatch(a.state_dict(), b.state_dict())
    assert text.startswith("'a.weight' has shape [6, 3, 3, 3] in the checkpoint but [4, 3, 3, 3] in the model")
    # independent count: every tensor whose shape differs
    n = sum(a.state_dict()[k].shape != v.shape for k, v in b.state_dict().items())
    assert f'({n - 1} more tensor(s) do not fit)' in text
    sd = a.state_dict()
    del sd['b.bias']
    assert first_weight_mismatch(a.state_dict(), sd) == "the checkpoint has no 'b.bias'"
    sd = dict(a.state_dict(), **{'c.weight': torch.zeros(1)})
    assert first_weight_mismatch(a.state_dict(), sd) == "the checkpoint has 'c.weight', which the model does not"
    # under a prefix (a wrapper's 'module.')
    wrapped = {'module.' + k: v for k, v in a.state_dict().items()}
    assert first_weight_mismatch(a.state_dict(), wrapped, 'module.') is None
