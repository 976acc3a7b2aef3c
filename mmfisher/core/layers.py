"""The layer types: everything the pipeline knows about one kind of channel-indexed module, in one place.

A *layer type* says, for the modules it matches,

* how the trace maps their input channels to their parameters and output (:meth:`LayerType.trace`);
* whether they *produce* channels (write an output that is one filter per channel: conv, linear):
  groups form around producers, and the L1 criterion scores their filters (:meth:`filter_l1`);
* whether they *consume* channels through a weight (``input_dim``: the input dim a channel mask
  multiplies: 1 for conv, -1 for linear; None: no weight reads channels);
* what they cost (:meth:`geometry` for producers, :meth:`params_per_channel` for per-channel
  arrays such as a norm's affine parameters);
* how they shrink (:meth:`shrink`).

The built-in types: :class:`Conv` (plain, group, depthwise, transposed), :class:`Linear`,
:class:`Norm` (BN/SyncBN, GroupNorm, InstanceNorm) and :class:`LayerNormLastDims` (``nn.LayerNorm``
itself, which records nothing: it passes channels through unless it normalises over them). To teach
the analysis a module whose forward the trace cannot see (a compiled op) or whose attributes follow
its channel count, subclass :class:`LayerType` and :func:`register_layer_type` it; mmfisher's own
:class:`~mmfisher.openmmlab.handlers.RoIExtractorType` is one.

A recorded module's channel arrays are named by *role*: ``'out'``/``'in'`` for producers,
``'feat'`` for per-channel modules.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from .atoms import Label

if TYPE_CHECKING:
    from .trace import ChannelTracer


@dataclass
class Call:
    """One call of a recorded module: output elements per channel and the input/output shapes."""

    rows: int        # output elements per channel position (N*H*W for a conv)
    in_shape: Tuple[int, ...]
    out_shape: Tuple[int, ...]


@dataclass
class ChannelwiseCall:
    """One call of a module of the model without a layer type and without children (an activation, a
    pooling, a scale), on an input whose dim 1 carries channels: work outside the layers whose time
    follows the channel count. The latency model times it alone (:mod:`mmfisher.core.latency`); nothing
    else uses it."""

    name: str
    module: nn.Module
    in_shape: Tuple[int, ...]
    atoms: torch.Tensor      # [in_shape[1]] atoms of the input's channel dim


@dataclass
class ModuleRecord:
    """A module whose parameters are indexed by channels, as the trace saw it.

    ``arrays`` maps a role (``'out'``, ``'in'``, ``'feat'``) to the atoms of that channel-indexed dim.
    """

    name: str
    module: nn.Module
    layer_type: 'LayerType'
    arrays: Dict[str, torch.Tensor] = field(default_factory=dict)
    calls: List[Call] = field(default_factory=list)
    checked: bool = False      # a subclass's own forward was checked (:func:`check_own_forward`)

    @property
    def kind(self) -> str:
        return self.layer_type.kind


@dataclass
class Geometry:
    """What one producing layer computes per sample of the analysed input (see :mod:`cost`)."""

    rows: float          # output positions per sample, summed over calls
    flop_rows: float     # positions the kernel is applied at (input positions for a transposed conv)
    kernel: int          # kernel elements (1 for linear)
    groups: int
    bias: bool


class LayerType:
    """One kind of channel-indexed module. Subclass, set the class attributes, and override what applies."""

    kind = 'custom'                      # recorded in specs' architecture descriptions
    produces = False                     # writes one filter per output channel ('out' and 'in' arrays)
    input_dim: Optional[int] = None      # input dim a channel mask of its weight's input multiplies
    records = True                       # keeps a ModuleRecord (its parameters are channel-indexed)

    def matches(self, module: nn.Module) -> bool:
        """Whether this type describes ``module`` (after the ``isinstance`` check of its registration)."""
        return True

    def trace(self, tracer: 'ChannelTracer', rec: ModuleRecord, args: tuple, output: Any) -> None:
        """Allocate ``rec``'s atoms, union them with the input's, label the output, append a :class:`Call`."""
        raise NotImplementedError

    def shrink(self, module: nn.Module, keep: Dict[str, torch.Tensor]) -> None:
        """Keep only positions ``keep[role]`` (LongTensor) of every channel array, in place."""
        raise NotImplementedError

    def geometry(self, module: nn.Module, rec: ModuleRecord, batch: float) -> Geometry:
        """For a producer: what it computes per sample."""
        raise NotImplementedError

    def params_per_channel(self, module: nn.Module) -> float:
        """Parameters per position of a ``'feat'`` array (a norm's weight and bias: 2)."""
        return 0.0

    def filter_l1(self, module: nn.Module, keep_in: torch.Tensor) -> torch.Tensor:
        """For a producer: ``[out]`` L1 norm of the filter writing each output position, over the input
        positions ``keep_in`` (``[in]`` bool) only."""
        raise NotImplementedError

    def sample_rows(self, module: nn.Module, args: tuple, output: Any) -> Optional[Tuple[torch.Tensor, int]]:
        """For a module whose output rows are not the samples of the batch (an RoI extractor: one row
        per RoI), ``(sample index of every output row [R] LongTensor, number of samples)``; None if
        its rows are the samples. The Fisher of the layers reading those rows is then summed per
        sample before it is squared."""
        return None

    @classmethod
    def maps_rows(cls) -> bool:
        """Whether this type overrides :meth:`sample_rows`."""
        return cls.sample_rows is not LayerType.sample_rows


# --------------------------------------------------------------------------- #
# shrinking helpers
# --------------------------------------------------------------------------- #
def _param(old: torch.Tensor, new: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(new.detach().clone().contiguous(), requires_grad=old.requires_grad)


def index_attr(module: nn.Module, name: str, dim: int, idx: torch.Tensor) -> None:
    """Keep positions ``idx`` of ``module.<name>`` along ``dim`` (a parameter stays a parameter)."""
    t = getattr(module, name, None)
    if t is None:
        return
    new = t.detach().index_select(dim, idx.to(t.device))
    if isinstance(t, nn.Parameter):
        setattr(module, name, _param(t, new))
    else:
        setattr(module, name, new.clone())


# --------------------------------------------------------------------------- #
# a subclass with its own forward: checked once that it prunes like the stock layer
# --------------------------------------------------------------------------- #
_PLAIN_FORWARDS = {nn.Conv1d.forward, nn.Conv2d.forward, nn.Conv3d.forward, nn.ConvTranspose1d.forward,
                   nn.ConvTranspose2d.forward, nn.ConvTranspose3d.forward, nn.Linear.forward}


def register_plain_forward(cls: type) -> None:
    """Declare that ``cls.forward`` computes what the stock conv / linear layer it subclasses computes
    (mmcv's wrappers, which only add an empty-batch path): it is then not checked during the trace."""
    _PLAIN_FORWARDS.add(cls.forward)


def _first_of_groups(n: int, groups: int, drop: int) -> torch.Tensor:
    """Positions kept when the first ``drop`` of ``groups`` equal blocks of ``n`` go: ``[kept]`` LongTensor."""
    per = n // groups
    return torch.arange(drop * per, n)


def check_own_forward(tracer: 'ChannelTracer', rec: ModuleRecord, x: torch.Tensor, out: torch.Tensor,
                      ain: torch.Tensor, aout: torch.Tensor, dim: int) -> None:
    """For a conv / linear subclass whose forward is not the stock one (weight standardisation, adaptive
    padding, a custom kernel): check on this input that removing input channels (zeroing them, as the
    masks do, against dropping them from the weight, as the shrink does) and removing output channels
    give the same result. A side that does not is tainted: the layer is then left unpruned on that side.
    Runs once per module (its first call), on that call's input: a forward that prunes like the stock
    layer on it but not on other inputs is not caught."""
    m = rec.module
    if type(m).forward in _PLAIN_FORWARDS or rec.checked:
        return
    rec.checked = True
    name = f'{rec.name} ({type(m).__name__})'
    # layers of its own inside (SAC's switch and context convs) or a compiled op in its forward: nothing
    # inside is traced, and a shrunk copy could crash the kernel, so it is not run; left unpruned
    nested = next(m.children(), None) is not None
    compiled = tracer.compiled_calls
    if not nested:
        m(x)
    if nested or tracer.compiled_calls != compiled:
        why = 'layers of its own inside' if nested else 'a compiled op inside'
        tracer.sets.taint(torch.cat([ain, aout]), f'{name}: a {type(m).__bases__[0].__name__} subclass with {why}, '
                                                   f'not traced; left unpruned')
        return
    lt = rec.layer_type
    n_in, n_out = int(ain.numel()), int(aout.numel())
    groups = getattr(m, 'groups', 1)
    odim = 1 if dim == 1 else out.dim() - 1

    def shrunk_output(keep_in: torch.Tensor, keep_out: torch.Tensor) -> Optional[torch.Tensor]:
        small = copy.deepcopy(m)
        depth, frames = tracer.leaf_depth, len(tracer.stack)
        try:
            lt.shrink(small, {'in': keep_in, 'out': keep_out})
            return small(x.index_select(dim, keep_in.to(x.device)))
        except Exception:       # a shape error: the module keeps state the stock shrink does not follow
            del tracer.stack[frames:]          # the frames of modules the error left
            tracer.leaf_depth = depth
            return None

    def same(a: Optional[torch.Tensor], b: torch.Tensor) -> bool:
        if a is None or a.shape != b.shape:
            return False
        scale = float(b.abs().max()) if b.numel() else 0.0
        return bool(((a - b).abs() <= 1e-4 * max(scale, 1e-6)).all())

    # input side: the first quarter of the input channels (whole groups for a group conv) removed
    drop_groups = max(1, groups // 4) if groups > 1 else 0
    if groups > 1 and drop_groups < groups:
        keep_in = _first_of_groups(n_in, groups, drop_groups)
        keep_out = _first_of_groups(n_out, groups, drop_groups)
    elif groups == 1 and n_in > 1:
        keep_in, keep_out = torch.arange(max(1, n_in // 4), n_in), torch.arange(n_out)
    else:
        keep_in = None
    if keep_in is not None:
        xm = x.clone()
        gone = torch.ones(n_in, dtype=torch.bool)
        gone[keep_in] = False
        xm.index_fill_(dim % x.dim(), gone.nonzero().flatten().to(x.device), 0.0)
        ref = m(xm).index_select(odim, keep_out.to(out.device))
        if not same(shrunk_output(keep_in, keep_out), ref):
            tracer.sets.taint(ain, f'{name}: its forward gives other outputs once input channels are removed '
                                   f'than with them zeroed (weight standardisation over inputs?); left unpruned')
            if groups > 1:
                tracer.sets.taint(aout, f'{name}: group conv whose forward does not prune like a plain one')
    # output side: the first quarter of the outputs removed, all inputs kept
    if groups == 1 and n_out > 1:
        keep_out = torch.arange(max(1, n_out // 4), n_out)
        ref = out.index_select(odim, keep_out.to(out.device))
        if not same(shrunk_output(torch.arange(n_in), keep_out), ref):
            tracer.sets.taint(aout, f'{name}: its forward gives other outputs once output channels are '
                                    f'removed; left unpruned')


def _batch_of(tracer: 'ChannelTracer', x: torch.Tensor) -> None:
    if tracer.batch_size is None:
        tracer.batch_size = int(x.shape[0]) if x.dim() > 1 else 1


# --------------------------------------------------------------------------- #
# the built-in types
# --------------------------------------------------------------------------- #
class Conv(LayerType):
    """``nn.Conv1d/2d/3d`` and their transposed versions; a group conv loses whole groups."""

    kind = 'conv'
    produces = True
    input_dim = 1

    def trace(self, tracer, rec, args, out):
        m, x = rec.module, args[0]
        ain, aout, _ = self.channel_atoms(tracer, rec, x)
        check_own_forward(tracer, rec, x, out, ain, aout, 1)
        rec.calls.append(Call(out.numel() // out.shape[1], tuple(x.shape), tuple(out.shape)))
        tracer.set_label(out, Label(1, aout))

    @staticmethod
    def channel_atoms(tracer, rec, x) -> Tuple[torch.Tensor, torch.Tensor, bool]:
        """``(in atoms [in], out atoms [out], whether this is the module's first call)`` of a conv-like
        module called on ``x`` (``[N, in, ...]``); a group conv's group j has its inputs and outputs unioned."""
        m = rec.module
        _batch_of(tracer, x)
        first = 'out' not in rec.arrays
        ain = tracer.input_atoms(rec, 'in', x, 1, m.in_channels)
        aout = tracer.atoms_of(rec, 'out', m.out_channels)
        if first and m.groups > 1:
            # prune whole groups: group j's input and output channels go together
            tracer.sets.union_rows(torch.cat([ain.view(m.groups, -1), aout.view(m.groups, -1)], 1))
        return ain, aout, first

    def shrink(self, m, keep):
        keep_out, keep_in = keep['out'], keep['in']
        transposed = getattr(m, 'transposed', False)
        g = m.groups
        if g > 1:
            from .spec import SpecMismatchError
            opg, ipg = m.out_channels // g, m.in_channels // g
            new_g = keep_out.numel() // opg
            if keep_out.numel() % opg or keep_in.numel() != new_g * ipg:
                raise SpecMismatchError(f'group conv {m}: kept channels do not form whole groups')
            index_attr(m, 'weight', 1 if transposed else 0, keep_in if transposed else keep_out)
            m.groups = new_g
        elif transposed:
            index_attr(m, 'weight', 0, keep_in)
            index_attr(m, 'weight', 1, keep_out)
        else:
            index_attr(m, 'weight', 0, keep_out)
            index_attr(m, 'weight', 1, keep_in)
        index_attr(m, 'bias', 0, keep_out)
        m.out_channels, m.in_channels = keep_out.numel(), keep_in.numel()

    def geometry(self, m, rec, batch):
        rows = sum(c.rows for c in rec.calls) / batch
        flop_rows = rows
        if isinstance(m, nn.modules.conv._ConvTransposeNd):
            # every input position meets every kernel element once
            flop_rows = sum(math.prod(c.in_shape) // c.in_shape[1] for c in rec.calls) / batch
        return Geometry(rows, flop_rows, int(math.prod(m.kernel_size)), m.groups, m.bias is not None)

    def weight_of(self, m: nn.Module) -> torch.Tensor:
        """The weight the forward convolves with (a subclass that transforms its weight overrides this)."""
        return m.weight

    def filter_l1(self, m, keep_in):
        w = self.weight_of(m).detach().abs().double()
        g = m.groups
        if getattr(m, 'transposed', False):                                          # [in, out / g, *k]
            per_in = w.flatten(2).sum(2) * keep_in.to(w.device, w.dtype)[:, None]    # [in, out / g]
            ipg = w.shape[0] // g
            return per_in.reshape(g, ipg, -1).sum(1).reshape(-1).cpu()             # [out]
        out, ipg = w.shape[0], w.shape[1]                                         # [out, in / g, *k]
        opg = out // g
        in_index = (torch.arange(out) // opg)[:, None] * ipg + torch.arange(ipg)[None, :]
        mask = keep_in[in_index].to(w.device, w.dtype)                            # [out, in / g]
        return (w.flatten(2).sum(2) * mask).sum(1).cpu()


class Linear(LayerType):
    """``nn.Linear`` on the last dim; a flattened feature map gives one block of inputs per channel."""

    kind = 'linear'
    produces = True
    input_dim = -1

    def trace(self, tracer, rec, args, out):
        m, x = rec.module, args[0]
        _batch_of(tracer, x)
        ain = tracer.input_atoms(rec, 'in', x, -1, m.in_features)
        aout = tracer.atoms_of(rec, 'out', m.out_features)
        check_own_forward(tracer, rec, x, out, ain, aout, -1)
        rec.calls.append(Call(out.numel() // out.shape[-1], tuple(x.shape), tuple(out.shape)))
        tracer.set_label(out, Label(out.dim() - 1, aout))

    def shrink(self, m, keep):
        index_attr(m, 'weight', 0, keep['out'])
        index_attr(m, 'weight', 1, keep['in'])
        index_attr(m, 'bias', 0, keep['out'])
        m.out_features, m.in_features = keep['out'].numel(), keep['in'].numel()

    def geometry(self, m, rec, batch):
        rows = sum(c.rows for c in rec.calls) / batch
        return Geometry(rows, rows, 1, 1, m.bias is not None)

    def filter_l1(self, m, keep_in):
        w = m.weight.detach().abs().double()
        return (w * keep_in.to(w.device, w.dtype)[None, :]).sum(1).cpu()


class Norm(LayerType):
    """Per-channel normalisation on dim 1: BN/SyncBN, InstanceNorm, GroupNorm (whole GN groups go)."""

    kind = 'norm'

    def trace(self, tracer, rec, args, out):
        m, x = rec.module, args[0]
        n = x.shape[1]
        first = 'feat' not in rec.arrays
        feat = tracer.input_atoms(rec, 'feat', x, 1, n)
        if first and isinstance(m, nn.GroupNorm):
            # statistics are per GN group: remove whole GN groups only
            tracer.sets.union_rows(feat.view(m.num_groups, -1))
        rec.calls.append(Call(out.numel() // n, tuple(x.shape), tuple(out.shape)))
        tracer.set_label(out, Label(1, feat))

    def shrink(self, m, keep):
        k = keep['feat']
        n = k.numel()
        if isinstance(m, nn.GroupNorm):
            from .spec import SpecMismatchError
            per = m.num_channels // m.num_groups
            if n % per:
                raise SpecMismatchError(f'{m}: kept channels do not form whole GroupNorm groups')
            m.num_groups, m.num_channels = n // per, n
        else:
            m.num_features = n
        for name in ('weight', 'bias', 'running_mean', 'running_var'):
            index_attr(m, name, 0, k)

    def params_per_channel(self, m):
        return 2.0 if getattr(m, 'weight', None) is not None else 0.0


class LayerNormLastDims(LayerType):
    """``nn.LayerNorm`` itself (not a subclass with its own forward, which may normalise over other
    dims: that one is traced op by op). Normalising over the channel dim taints it; otherwise the
    channels pass through. Nothing is recorded: its parameters are indexed by the normalised dims."""

    kind = 'layernorm'
    records = False

    def matches(self, module):
        return type(module).forward is nn.LayerNorm.forward

    def trace(self, tracer, rec, args, out):
        x = args[0]
        lab = tracer.label(x)
        if lab is None:
            return
        if lab.dim >= x.dim() - len(rec.module.normalized_shape):
            tracer.taint(lab, f'{tracer.where()}: LayerNorm normalises over channels')
        else:
            tracer.set_label(out, lab)


class SplitSize(LayerType):
    """A module attribute that holds the size of the equal parts a ``split`` inside the module's forward
    cuts channels into (mmdet's ``DyReLU``: ``torch.split(coeffs, self.channels, dim=1)``). Recorded by
    the ``split`` rule (:func:`register_split_size`), never a leaf: the ``'size'`` array is the atoms of
    one part, and the shrink sets the attribute to the part's kept count."""

    kind = 'split_size'

    def __init__(self, attr: str) -> None:
        self.attr = attr

    def shrink(self, m, keep):
        setattr(m, self.attr, int(keep['size'].numel()))


_SPLIT_SIZES: List[Tuple[type, str]] = []


def register_split_size(cls: type, attr: str) -> None:
    """Declare that ``module.<attr>`` (an int) is the size of the parts a ``split`` of channels inside
    ``cls.forward`` cuts into, and nothing else depends on it. Such a split, into parts of that size
    only, then prunes as ``chunk`` does (the k-th channel of every part goes together) and the shrink
    updates the attribute; any other split at fixed sizes stays unprunable."""
    _SPLIT_SIZES.insert(0, (cls, attr))


def split_size_owner(stack: List[list], size: int) -> Optional[Tuple[nn.Module, str]]:
    """The innermost running module (frames of the trace's module stack) whose registered split-size
    attribute equals ``size``."""
    for frame in reversed(stack):
        m = frame[0]
        for cls, attr in _SPLIT_SIZES:
            if isinstance(m, cls) and getattr(m, attr, None) == size:
                return m, attr
    return None


# --------------------------------------------------------------------------- #
# the table
# --------------------------------------------------------------------------- #
_TYPES: List[Tuple[type, LayerType]] = [
    (nn.modules.conv._ConvNd, Conv()),
    (nn.Linear, Linear()),
    (nn.modules.batchnorm._BatchNorm, Norm()),
    (nn.GroupNorm, Norm()),
    (nn.modules.instancenorm._InstanceNorm, Norm()),
    (nn.LayerNorm, LayerNormLastDims()),
]


def register_layer_type(cls: type, layer_type: LayerType) -> None:
    """Use ``layer_type`` for modules of type ``cls`` (subclasses included); later registrations
    take precedence over earlier ones and over the built-in types."""
    _TYPES.insert(0, (cls, layer_type))


def layer_type_for(module: nn.Module) -> Optional[LayerType]:
    """The layer type describing ``module``; None for a module traced through its torch functions."""
    for cls, lt in _TYPES:
        if isinstance(module, cls):
            return lt if lt.matches(module) else None
    return None
