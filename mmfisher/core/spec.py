"""The channel spec: which channels of every group a compact model keeps, checked in full.

A *channel spec* is plain JSON::

    {"format": "mmfisher.channel_spec/1",
     "groups": {"backbone.conv1": {"size": 64, "keep": [0, 2, 3, ...]}, ...},
     "architecture": {"sha256": "...", "layers": {"backbone.conv1": "Conv2d w[64,3,7,7] k(7,7) ...", ...}}}

``groups`` names every group of the analysed model (unprunable ones keep all their
channels). ``architecture`` describes every channel-indexed layer of the model the spec
was made on (type, parameter shapes, kernel, stride, padding, dilation, groups), so a
spec applied to another architecture is refused by name, even where the group names and
sizes happen to agree (another kernel size, a BN in place of a GN).

:func:`spec_to_keep` refuses, with one message naming the first problem, every spec that
is malformed (:class:`SpecFormatError`) or does not fit the model (:class:`SpecMismatchError`):
non-integer, repeated or out-of-range indices, a group that keeps nothing, a group
missing from the spec or unknown to the model, another size, another architecture.
:func:`weights_digest` is the SHA-256 of a state dict's tensors; the pruned checkpoints
store it so that a corrupted file is refused on load.
"""
from __future__ import annotations

import hashlib
from typing import Any, Dict, Mapping, Optional

import torch
import torch.nn as nn

from .groups import CouplingGraph

SPEC_FORMAT = 'mmfisher.channel_spec/1'
_TOP_KEYS = ('format', 'groups', 'architecture')


class SpecError(ValueError):
    """A channel spec that cannot be used."""


class SpecFormatError(SpecError):
    """A channel spec that is not well formed."""


class SpecMismatchError(SpecError):
    """A well-formed channel spec that does not fit the analysed architecture."""


# ---------------------------------------------------------------- architecture
def _layer_text(module: nn.Module, kind: str) -> str:
    """What a channel-indexed layer is, in one line: its class, parameter shapes and geometry."""
    parts = [type(module).__name__, kind]
    for name, p in module.named_parameters(recurse=False):
        parts.append(f'{name}[{",".join(str(s) for s in p.shape)}]')
    for attr in ('kernel_size', 'stride', 'padding', 'dilation', 'groups', 'num_groups', 'transposed'):
        v = getattr(module, attr, None)
        if isinstance(v, (int, bool, tuple, str)):
            parts.append(f'{attr}={v}')
    return ' '.join(parts)


def architecture(graph: CouplingGraph) -> Dict[str, Any]:
    """``{'sha256', 'layers': {module name: one-line description}}`` of every recorded layer."""
    layers = {name: _layer_text(rec.module, rec.kind) for name, rec in graph.records.items()}
    digest = hashlib.sha256(repr(sorted(layers.items())).encode()).hexdigest()
    return {'sha256': digest, 'layers': layers}


def _check_architecture(graph: CouplingGraph, saved: Mapping[str, Any]) -> None:
    mine = architecture(graph)
    if saved.get('sha256') == mine['sha256']:
        return
    theirs = saved.get('layers', {})
    for name, text in mine['layers'].items():
        if name not in theirs:
            raise SpecMismatchError(f'the spec was made on another architecture: this model has layer {name!r} '
                                    f'({text}), which the spec\'s model did not have')
        if theirs[name] != text:
            raise SpecMismatchError(f'the spec was made on another architecture: layer {name!r} is '
                                    f'"{text}" here but was "{theirs[name]}"')
    extra = [n for n in theirs if n not in mine['layers']]
    if extra:
        raise SpecMismatchError(f'the spec was made on another architecture: its model had layer {extra[0]!r} '
                                f'({theirs[extra[0]]}), which this model does not have')
    raise SpecMismatchError('the spec\'s architecture digest does not match its layer list: the file was edited '
                            'or corrupted')


# ---------------------------------------------------------------- format
def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def validate_spec(spec: Any) -> None:
    """Raise :class:`SpecFormatError` naming the first malformed part of ``spec`` (shape only, no model)."""
    if not isinstance(spec, Mapping):
        raise SpecFormatError(f'a channel spec is a JSON object with "format" and "groups", not a '
                              f'{type(spec).__name__}')
    if spec.get('format') != SPEC_FORMAT:
        raise SpecFormatError(f'not an mmfisher channel spec: "format" is {spec.get("format")!r}, expected '
                              f'{SPEC_FORMAT!r}')
    unknown = [k for k in spec if k not in _TOP_KEYS]
    if unknown:
        raise SpecFormatError(f'unknown key {unknown[0]!r} in the channel spec; its keys are {list(_TOP_KEYS)}')
    groups = spec.get('groups')
    if not isinstance(groups, Mapping):
        raise SpecFormatError(f'"groups" must be an object mapping group names to {{"size", "keep"}}, '
                              f'not {type(groups).__name__}')
    if not groups:
        raise SpecFormatError('"groups" is empty: a spec names every group of the model (an unpruned group keeps '
                              'all its channels)')
    for name, entry in groups.items():
        where = f'group {name!r}'
        if not isinstance(entry, Mapping) or set(entry) != {'size', 'keep'}:
            got = sorted(entry) if isinstance(entry, Mapping) else type(entry).__name__
            raise SpecFormatError(f'{where}: an entry is {{"size": int, "keep": [int, ...]}}, got {got}')
        size, keep = entry['size'], entry['keep']
        if not _is_int(size) or size < 1:
            raise SpecFormatError(f'{where}: "size" must be a positive integer, not {size!r}')
        if not isinstance(keep, (list, tuple)):
            raise SpecFormatError(f'{where}: "keep" must be a list of channel indices, not {type(keep).__name__}')
        if not keep:
            raise SpecFormatError(f'{where} keeps no channel: every layer needs at least one')
        bad = next((i for i in keep if not _is_int(i)), None)
        if bad is not None:
            raise SpecFormatError(f'{where}: kept index {bad!r} is not an integer')
        out = next((i for i in keep if not 0 <= i < size), None)
        if out is not None:
            raise SpecFormatError(f'{where}: kept index {out} is out of range 0..{size - 1}')
        if len(set(keep)) != len(keep):
            seen = set()
            dup = next(i for i in keep if i in seen or seen.add(i))
            raise SpecFormatError(f'{where}: kept index {dup} appears more than once')
    arch = spec.get('architecture')
    if arch is not None and not (isinstance(arch, Mapping) and isinstance(arch.get('sha256'), str)
                                 and isinstance(arch.get('layers'), Mapping)):
        raise SpecFormatError('"architecture" must be an object with "sha256" and "layers"')


# ---------------------------------------------------------------- spec <-> keep
def make_spec(graph: CouplingGraph, keep: torch.Tensor) -> Dict[str, Any]:
    """Channel spec from a ``[num_channels]`` bool/0-1 vector of kept channels."""
    keep = keep.bool()
    groups = {}
    for g in graph.groups:
        k = keep[g.offset:g.offset + g.size].nonzero().flatten().tolist()
        groups[g.name] = {'size': g.size, 'keep': k}
    return {'format': SPEC_FORMAT, 'groups': groups, 'architecture': architecture(graph)}


def spec_to_keep(graph: CouplingGraph, spec: Any) -> torch.Tensor:
    """``[num_channels]`` bool vector from a spec, checked in full (see the module docstring)."""
    validate_spec(spec)
    if spec.get('architecture') is not None:
        _check_architecture(graph, spec['architecture'])
    groups = spec['groups']
    by_name = {g.name: g for g in graph.groups}
    extra = [n for n in groups if n not in by_name]
    if extra:
        raise SpecMismatchError(
            f'the spec names group {extra[0]!r}, which this model does not have'
            + (f' (and {len(extra) - 1} more)' if len(extra) > 1 else '') +
            f': it was made for another architecture (this model starts with groups '
            f'{[x.name for x in graph.groups[:3]]})')
    missing = [g.name for g in graph.groups if g.name not in groups]
    if missing:
        raise SpecMismatchError(
            f'the spec has no entry for group {missing[0]!r}' +
            (f' (and {len(missing) - 1} more)' if len(missing) > 1 else '') +
            ': it was made for another architecture, or edited (a spec names every group; an unpruned one '
            'keeps all its channels)')
    keep = torch.ones(graph.num_channels, dtype=torch.bool)
    for g in graph.groups:
        entry = groups[g.name]
        if entry['size'] != g.size:
            raise SpecMismatchError(
                f'group {g.name!r} has {g.size} channels in this model but {entry["size"]} in the channel spec: '
                f'layer {g.producers[0]!r} does not match the architecture the spec was made on')
        if not g.prunable and len(entry['keep']) != g.size:
            raise SpecMismatchError(f'group {g.name!r} cannot be pruned ({g.reasons[0]}) but the spec removes '
                                    f'{g.size - len(entry["keep"])} of its channels')
        k = torch.zeros(g.size, dtype=torch.bool)
        k[torch.tensor(entry['keep'], dtype=torch.long)] = True
        keep[g.offset:g.offset + g.size] = k
    return keep


# ---------------------------------------------------------------- weights
def weights_digest(state_dict: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over the names, dtypes, shapes and bytes of a state dict's tensors (sorted by name)."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name]
        if not isinstance(t, torch.Tensor):
            continue
        t = t.detach().cpu().contiguous()
        h.update(f'{name}|{t.dtype}|{tuple(t.shape)}|'.encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def first_weight_mismatch(expected: Mapping[str, torch.Tensor], given: Mapping[str, Any],
                          prefix: str = '') -> Optional[str]:
    """The first way ``given`` (a state dict, keys under ``prefix``) fails to fill ``expected``
    exactly, as a sentence with a count of the others; ``None`` if every tensor is there in its shape."""
    wrong, missing = [], []
    for name, t in expected.items():
        v = given.get(prefix + name)
        if v is None:
            missing.append(name)
        elif isinstance(v, torch.Tensor) and tuple(v.shape) != tuple(t.shape):
            wrong.append((name, tuple(v.shape), tuple(t.shape)))
    extra = [k[len(prefix):] for k in given if k.startswith(prefix) and k[len(prefix):] not in expected]
    problems = len(wrong) + len(missing) + len(extra)
    if not problems:
        return None
    more = f' ({problems - 1} more tensor(s) do not fit)' if problems > 1 else ''
    if wrong:
        name, theirs, mine = wrong[0]
        return f'{name!r} has shape {list(theirs)} in the checkpoint but {list(mine)} in the model{more}'
    if missing:
        return f'the checkpoint has no {missing[0]!r}{more}'
    return f'the checkpoint has {extra[0]!r}, which the model does not{more}'
