"""Step 1 of the pipeline: run the model once and record how channels flow.

``trace_channels(model, forward)`` runs one forward pass under a
:class:`torch.overrides.TorchFunctionMode` plus global module hooks. It does not
trace symbolically (no torch.fx) and does not look at autograd node names: it
sees every torch function and tensor method called from Python on real tensors,
whatever the control flow, and maps what ran to the modules that ran it.

Channel bookkeeping
-------------------
Every channel-indexed dimension of a module parameter (a conv's output and input
channels, a norm's features) is an array of *atoms*: integers allocated once per
module, so a module called several times (a detection head shared by all FPN
levels) keeps one set of atoms. A tensor's :class:`Label` says which of its
dimensions carries channels and which atom sits at each position (``-1``: a
position no module produced, e.g. an image channel).

Operations that force channels to be removed together *union* atoms (a residual
add unions its operands position by position; a group conv ties the channels of
one group together). Operations that mix channels in a way that cannot survive
removing one of them (a reduction over channels, a reshape across the channel
dim, a fixed-size slice, an attention matmul, the model's own outputs) *taint*
the atoms with a reason. :mod:`mmfisher.core.groups` turns the result into
channel groups.
"""
from __future__ import annotations

import math
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode


# --------------------------------------------------------------------------- #
# union-find over atoms
# --------------------------------------------------------------------------- #
class AtomSets:
    """Union-find over integer atoms, each root holding the reasons it cannot be pruned."""

    def __init__(self) -> None:
        self.parent: List[int] = []
        self.reasons: Dict[int, List[str]] = {}

    def alloc(self, n: int) -> torch.Tensor:
        start = len(self.parent)
        self.parent.extend(range(start, start + n))
        return torch.arange(start, start + n, dtype=torch.long)

    def find(self, a: int) -> int:
        parent = self.parent
        root = a
        while parent[root] != root:
            root = parent[root]
        while parent[a] != root:
            parent[a], a = root, parent[a]
        return root

    def union(self, a: int, b: int) -> None:
        if a < 0 or b < 0:
            return
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        if ra > rb:
            ra, rb = rb, ra
        self.parent[rb] = ra
        moved = self.reasons.pop(rb, None)
        if moved:
            self.reasons.setdefault(ra, []).extend(r for r in moved if r not in self.reasons.get(ra, []))

    def union_arrays(self, a: torch.Tensor, b: torch.Tensor) -> None:
        for x, y in zip(a.tolist(), b.tolist()):
            if x != y:
                self.union(x, y)

    def union_all(self, atoms: Iterable[int]) -> None:
        atoms = [a for a in atoms if a >= 0]
        for a in atoms[1:]:
            self.union(atoms[0], a)

    def taint(self, atoms: Iterable[int], reason: str) -> None:
        for a in set(atoms):
            if a < 0:
                continue
            r = self.find(a)
            lst = self.reasons.setdefault(r, [])
            if reason not in lst:
                lst.append(reason)


@dataclass
class Label:
    """Which dim of a tensor holds channels and the atom at each position.

    ``atoms``: LongTensor of shape ``[tensor.shape[dim]]``; -1 marks a position
    no module produced.
    """

    dim: int
    atoms: torch.Tensor


# --------------------------------------------------------------------------- #
# modules the tracer understands as a whole
# --------------------------------------------------------------------------- #
@dataclass
class Call:
    """One call of a recorded module: output elements per channel and the input/output shapes."""

    rows: int        # output elements per channel position (N*H*W for a conv)
    in_shape: Tuple[int, ...]
    out_shape: Tuple[int, ...]


@dataclass
class ModuleRecord:
    """A module whose parameters are indexed by channels.

    ``arrays`` maps a role to the atoms of that channel-indexed dim:
    ``'out'``/``'in'`` for conv and linear layers, ``'feat'`` for norms and other
    channel-wise modules.
    """

    name: str
    module: nn.Module
    kind: str                      # 'conv' | 'linear' | 'norm' | registered handler name
    arrays: Dict[str, torch.Tensor] = field(default_factory=dict)
    calls: List[Call] = field(default_factory=list)


class ModuleHandler:
    """How a whole module moves channels during the trace and how to shrink it.

    Subclass and register with :func:`register_module_handler` to teach the
    analysis a module whose forward is not visible as torch functions (a compiled
    op) or whose attributes must follow the channel count.
    """

    kind = 'custom'

    def trace(self, tracer: 'ChannelTracer', rec: ModuleRecord, args: tuple, output: Any) -> None:
        raise NotImplementedError

    def shrink(self, module: nn.Module, keep: Dict[str, torch.Tensor]) -> None:
        """``keep[role]``: LongTensor of kept positions of that channel array."""
        raise NotImplementedError

    def sample_rows(self, module: nn.Module, args: tuple, output: Any) -> Optional[Tuple[torch.Tensor, int]]:
        """For a module whose output rows are not the samples of the batch (an RoI extractor: one row
        per RoI), ``(sample index of every output row [R] LongTensor, number of samples)``; None if
        its rows are the samples. The Fisher of the layers reading those rows is then summed per
        sample before it is squared."""
        return None

    @classmethod
    def maps_rows(cls) -> bool:
        """Whether this handler overrides :meth:`sample_rows`."""
        return cls.sample_rows is not ModuleHandler.sample_rows


_HANDLERS: List[Tuple[type, ModuleHandler]] = []


def register_module_handler(cls: type, handler: ModuleHandler) -> None:
    """Register ``handler`` for modules of type ``cls`` (subclasses included).

    Later registrations take precedence over earlier ones.
    """
    _HANDLERS.insert(0, (cls, handler))


def handler_for(module: nn.Module) -> Optional[ModuleHandler]:
    for cls, h in _HANDLERS:
        if isinstance(module, cls):
            return h
    return None


# --------------------------------------------------------------------------- #
# torch function classification
# --------------------------------------------------------------------------- #
_POINTWISE = {
    # elementwise, applied channel by channel, broadcasting
    'add', 'sub', 'subtract', 'mul', 'multiply', 'div', 'divide', 'true_divide', 'floor_divide',
    'pow', 'maximum', 'minimum', 'fmax', 'fmin', 'where', 'clamp', 'clip', 'clamp_min', 'clamp_max',
    'relu', 'relu6', 'leaky_relu', 'elu', 'selu', 'celu', 'gelu', 'silu', 'mish', 'sigmoid',
    'hardsigmoid', 'hardswish', 'hardtanh', 'tanh', 'softplus', 'softsign',
    'exp', 'log', 'log1p', 'expm1', 'sqrt', 'rsqrt', 'abs', 'neg', 'negative', 'sign', 'square',
    'reciprocal', 'sin', 'cos', 'floor', 'ceil', 'round', 'trunc', 'frac', 'erf', 'logit',
    'dropout', 'dropout1d', 'dropout2d', 'dropout3d', 'alpha_dropout', 'feature_alpha_dropout',
    'eq', 'ne', 'lt', 'le', 'gt', 'ge', 'logical_and', 'logical_or', 'logical_not', 'isnan',
    'isinf', 'isfinite', 'nan_to_num', 'lerp', 'addcmul', 'addcdiv', 'threshold', 'and', 'or',
    'invert', 'bitwise_and', 'bitwise_or', 'masked_fill', 'hardshrink', 'softshrink',
    'tanhshrink', 'logsigmoid',
    'fill', 'zero', 'copy', 'pos',
}
# same tensor, other dtype/device/storage; a second tensor argument only names the dtype/device
_CAST = {'contiguous', 'clone', 'detach', 'float', 'double', 'half', 'bfloat16', 'to', 'type', 'type_as',
         'cpu', 'cuda', 'requires_grad', 'data', 'zeros_like', 'ones_like', 'full_like', 'empty_like',
         'rand_like', 'randn_like', 'bool', 'long', 'int'}
# change only the non-channel dims (pooling, resampling, padding): label kept when dim sizes allow
_CHANNELWISE = {
    'max_pool1d', 'max_pool2d', 'max_pool3d', 'avg_pool1d', 'avg_pool2d', 'avg_pool3d',
    'adaptive_avg_pool1d', 'adaptive_avg_pool2d', 'adaptive_avg_pool3d', 'adaptive_max_pool1d',
    'adaptive_max_pool2d', 'adaptive_max_pool3d', 'max_pool2d_with_indices', 'lp_pool2d',
    'interpolate', 'upsample', 'upsample_nearest', 'upsample_bilinear', 'pad', 'grid_sample',
    'roll', 'flip', 'fractional_max_pool2d',
}
_RESHAPE = {'view', 'reshape', 'flatten', 'unflatten', 'squeeze', 'unsqueeze', 'view_as', 'reshape_as',
            'ravel', 'atleast_2d', 'atleast_3d'}
_REDUCE = {'sum', 'mean', 'amax', 'amin', 'max', 'min', 'prod', 'std', 'var', 'norm', 'logsumexp',
           'argmax', 'argmin', 'softmax', 'log_softmax', 'cumsum', 'cumprod', 'all', 'any', 'median',
           'topk', 'sort', 'argsort', 'count_nonzero', 'nansum', 'nanmean', 'std_mean', 'var_mean',
           'cummax', 'cummin', 'kthvalue', 'mode', 'softmin'}
_KEEPS_NDIM = {'softmax', 'log_softmax', 'cumsum', 'cumprod', 'sort', 'argsort', 'topk', 'softmin',
               'cummax', 'cummin'}
# inspect a tensor without using its values
_INSPECT = {'size', 'dim', 'ndim', 'ndimension', 'numel', 'shape', 'dtype', 'device', 'is_cuda',
            'is_contiguous', 'stride', 'element_size', 'data_ptr', 'len', 'requires_grad',
            'is_floating_point', 'get_device', 'layout', 'is_sparse', 'grad_fn', 'is_leaf', 'names',
            'storage_offset', 'nelement', 'repr', 'format', 'hash', 'grad', 'is_complex',
            'is_quantized', 'is_meta', 'untyped_storage', '_version', 'output_nr', 'retain_grad',
            'register_hook', 'new_zeros', 'new_ones', 'new_full', 'new_empty', 'new_tensor',
            'is_nested', 'itemsize', 'nbytes', 'is_mkldnn', 'is_sparse_csr', 'has_names'}


_FACTORY = {'new_empty', 'new_zeros', 'new_ones', 'new_full', 'empty', 'zeros', 'ones', 'full', 'empty_like',
            'empty_strided'}


def _fn_name(func: Callable) -> str:
    name = getattr(func, '__name__', None) or ''
    if name in ('__get__', '__set__'):
        name = getattr(getattr(func, '__self__', None), '__name__', name)
    return name


def _normalise(name: str) -> Tuple[str, bool]:
    """Map ``__iadd__``/``add_``/``__radd__`` to ``('add', inplace)``."""
    inplace = False
    if name.startswith('__') and name.endswith('__'):
        name = name[2:-2]
        if name.startswith('i') and name[1:] in _POINTWISE:
            return name[1:], True
        if name.startswith('r') and name[1:] in _POINTWISE:
            return name[1:], False
        if name == 'truediv':
            return 'div', False
        if name == 'rtruediv':
            return 'div', False
        if name == 'itruediv':
            return 'div', True
        if name in ('getitem', 'setitem'):
            return name, name == 'setitem'
    if name.endswith('_') and not name.startswith('_'):
        name, inplace = name[:-1], True
    return name, inplace


def _flat_tensors(obj: Any, out: List[torch.Tensor], depth: int = 0) -> List[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        out.append(obj)
    elif depth < 4 and isinstance(obj, (list, tuple)):
        for o in obj:
            _flat_tensors(o, out, depth + 1)
    elif depth < 4 and isinstance(obj, dict):
        for o in obj.values():
            _flat_tensors(o, out, depth + 1)
    return out


def _arg(args: tuple, kwargs: dict, pos: int, key: str, default: Any = None) -> Any:
    if key in kwargs:
        return kwargs[key]
    if len(args) > pos:
        return args[pos]
    return default


def _dims(d: Any, ndim: int) -> Optional[List[int]]:
    if d is None:
        return None
    if isinstance(d, (list, tuple)):
        return [x % ndim for x in d]
    return [int(d) % ndim]


# --------------------------------------------------------------------------- #
# the tracer
# --------------------------------------------------------------------------- #
class _Mode(TorchFunctionMode):
    def __init__(self, tracer: 'ChannelTracer') -> None:
        super().__init__()
        self.tracer = tracer

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if not self.tracer.inside_leaf():
            self.tracer.on_function(func, args, kwargs, out)
        return out


class AnalysisRuleError(RuntimeError):
    """An op rule of the analysis itself failed (``analyse(..., strict=True)``): a bug, not a model limit."""


class ChannelTracer:
    """Records atoms, unions and taints of one forward pass. See module docstring."""

    def __init__(self, model: nn.Module, strict: bool = False) -> None:
        self.model = model
        self.strict = strict        # raise an op rule's own error instead of making its channels unprunable
        self.sets = AtomSets()
        self.names: Dict[int, str] = {}
        for name, m in model.named_modules(remove_duplicate=False):
            self.names.setdefault(id(m), name or '<root>')
        self.records: Dict[int, ModuleRecord] = {}
        self.order: List[int] = []               # ids of records in first-call order
        # id(tensor) -> (weak reference, label): intermediate tensors are freed as in a plain forward;
        # a recycled id is told apart by its dead reference
        self.labels: Dict[int, Tuple['weakref.ref', Label]] = {}
        # one frame per running module: [module, is_leaf, {id: tensor} of labelled direct tensor args not yet read]
        self.stack: List[list] = []
        self.produced: 'weakref.WeakValueDictionary[int, torch.Tensor]' = weakref.WeakValueDictionary()
        # tensors made by a factory (new_empty, zeros...) that no visible op has written yet: a module
        # returning one filled it with a compiled op
        self.blank: 'weakref.WeakValueDictionary[int, torch.Tensor]' = weakref.WeakValueDictionary()
        self.ops_seen: Dict[str, int] = {}
        self.batch_size: Optional[int] = None   # leading dim of the first layer input

    # ---- labels ---------------------------------------------------------- #
    def label(self, t: Any) -> Optional[Label]:
        if not isinstance(t, torch.Tensor):
            return None
        hit = self.labels.get(id(t))
        if hit is None or hit[0]() is not t:
            return None
        return hit[1]

    def set_label(self, t: Any, lab: Optional[Label]) -> None:
        if not isinstance(t, torch.Tensor):
            return
        if lab is None:
            self.labels.pop(id(t), None)
            return
        if lab.dim < 0 or lab.dim >= t.dim() or t.shape[lab.dim] != lab.atoms.numel():
            self.sets.taint(lab.atoms.tolist(), 'internal: label does not fit tensor shape')
            self.labels.pop(id(t), None)
            return
        self.labels[id(t)] = (weakref.ref(t), lab)

    def taint(self, lab: Optional[Label], reason: str) -> None:
        if lab is not None:
            self.sets.taint(lab.atoms.tolist(), reason)

    def where(self) -> str:
        for m, *_ in reversed(self.stack):
            name = self.names.get(id(m))
            if name is not None:
                return name
        return '<root>'

    def inside_leaf(self) -> bool:
        """Whether a leaf (conv, linear, norm, handled module) is running, at any depth: what runs inside
        it is described by the leaf's own rule (an RoI extractor's RoIAlign, a conv's kernel)."""
        return any(frame[1] for frame in self.stack)

    # ---- module hooks ---------------------------------------------------- #
    def record_for(self, module: nn.Module, kind: str) -> ModuleRecord:
        rec = self.records.get(id(module))
        if rec is None:
            rec = ModuleRecord(self.names.get(id(module), type(module).__name__), module, kind)
            self.records[id(module)] = rec
            self.order.append(id(module))
        return rec

    def atoms_of(self, rec: ModuleRecord, role: str, n: int) -> torch.Tensor:
        if role not in rec.arrays:
            rec.arrays[role] = self.sets.alloc(n)
        return rec.arrays[role]

    def leaf_kind(self, module: nn.Module) -> Optional[str]:
        if id(module) not in self.names:
            return None
        if handler_for(module) is not None:
            return 'handler'
        if isinstance(module, nn.modules.conv._ConvNd):
            return 'conv'
        if isinstance(module, nn.Linear):
            return 'linear'
        if isinstance(module, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm,
                               nn.modules.instancenorm._InstanceNorm)):
            return 'norm'
        if isinstance(module, nn.LayerNorm):
            # a subclass with its own forward (mmpretrain's LayerNorm2d permutes channels first to last)
            # may normalise over other dims than nn.LayerNorm would: trace what it does instead
            return 'layernorm' if type(module).forward is nn.LayerNorm.forward else None
        return None

    def mark_read(self, tensors: Iterable[torch.Tensor]) -> None:
        """Tensors a visible op or a child module reads: enclosing frames stop watching them."""
        for frame in self.stack:
            watch = frame[2]
            if watch:
                for t in tensors:
                    watch.pop(id(t), None)

    def pre_hook(self, module: nn.Module, args: tuple) -> None:
        self.mark_read(_flat_tensors(args, []))
        is_leaf = self.leaf_kind(module) is not None and not self.inside_leaf()
        watch = None
        if not is_leaf and not self.inside_leaf():
            watch = {id(t): t for t in args if isinstance(t, torch.Tensor) and self.label(t) is not None}
        self.stack.append([module, is_leaf, watch])

    def post_hook(self, module: nn.Module, args: tuple, output: Any) -> None:
        _, is_leaf, watch = self.stack.pop()
        if not is_leaf:
            if not self.inside_leaf():
                self.check_visible(module, args, output, watch)
            return
        kind = self.leaf_kind(module)
        self.stack.append([module, True, None])  # names in messages point at this module
        try:
            if kind == 'handler':
                h = handler_for(module)
                rec = self.record_for(module, h.kind)
                h.trace(self, rec, args, output)
            elif kind == 'conv':
                self.trace_conv(module, args, output)
            elif kind == 'linear':
                self.trace_linear(module, args, output)
            elif kind == 'norm':
                self.trace_norm(module, args, output)
            elif kind == 'layernorm':
                self.trace_layernorm(module, args, output)
        finally:
            self.stack.pop()
        for o in _flat_tensors(output, []):
            self.produced[id(o)] = o

    def check_visible(self, module: nn.Module, args: tuple, output: Any, watch: Optional[dict]) -> None:
        """Catch compiled ops: outputs no visible op produced, or labelled inputs nothing visible read."""
        ins = _flat_tensors(args, [])
        in_ids = {id(t) for t in ins}
        outs = _flat_tensors(output, [])
        hidden = [o for o in outs if id(o) not in in_ids and
                  (self.produced.get(id(o)) is not o or self.blank.get(id(o)) is o)]
        unread = [t for t in (watch or {}).values() if all(t is not o for o in outs)]
        if not hidden and not unread:
            return
        name = self.names.get(id(module), type(module).__name__)
        reason = f'{name} ({type(module).__name__}): compiled op, not visible as torch functions'
        for t in (ins if hidden else unread):
            self.taint(self.label(t), reason)
        for o in hidden:
            self.set_label(o, None)
            self.produced[id(o)] = o

    def input_atoms(self, rec: ModuleRecord, role: str, x: Any, dim: int, n: int) -> torch.Tensor:
        """Union the atoms of ``x`` at ``dim`` into ``rec.arrays[role]``; taint untraced input."""
        atoms = self.atoms_of(rec, role, n)
        lab = self.label(x)
        if lab is not None and lab.dim == (dim % x.dim()) and lab.atoms.numel() == n:
            self.sets.union_arrays(atoms, lab.atoms)
            untraced = (lab.atoms < 0).nonzero().flatten()
            if untraced.numel():
                self.sets.taint(atoms[untraced].tolist(), f'{rec.name}: input channels not produced by a module')
        else:
            if lab is not None:
                self.taint(lab, f'{rec.name}: channels arrive on an unexpected dim')
            self.sets.taint(atoms.tolist(), f'{rec.name}: input channels not produced by a module')
        return atoms

    def trace_conv(self, m: nn.modules.conv._ConvNd, args: tuple, out: torch.Tensor) -> None:
        rec = self.record_for(m, 'conv')
        first = 'out' not in rec.arrays
        x = args[0]
        if self.batch_size is None:
            self.batch_size = int(x.shape[0])
        ain = self.input_atoms(rec, 'in', x, 1, m.in_channels)
        aout = self.atoms_of(rec, 'out', m.out_channels)
        if first and m.groups > 1:
            # prune whole groups: group j's input and output channels go together
            ipg, opg = m.in_channels // m.groups, m.out_channels // m.groups
            for j in range(m.groups):
                self.sets.union_all(ain[j * ipg:(j + 1) * ipg].tolist() + aout[j * opg:(j + 1) * opg].tolist())
        rec.calls.append(Call(out.numel() // out.shape[1], tuple(x.shape), tuple(out.shape)))
        self.set_label(out, Label(1, aout))

    def trace_linear(self, m: nn.Linear, args: tuple, out: torch.Tensor) -> None:
        rec = self.record_for(m, 'linear')
        x = args[0]
        if self.batch_size is None:
            self.batch_size = int(x.shape[0]) if x.dim() > 1 else 1
        self.input_atoms(rec, 'in', x, -1, m.in_features)
        aout = self.atoms_of(rec, 'out', m.out_features)
        rec.calls.append(Call(out.numel() // out.shape[-1], tuple(x.shape), tuple(out.shape)))
        self.set_label(out, Label(out.dim() - 1, aout))

    def trace_norm(self, m: nn.Module, args: tuple, out: torch.Tensor) -> None:
        rec = self.record_for(m, 'norm')
        x = args[0]
        n = x.shape[1]
        first = 'feat' not in rec.arrays
        feat = self.input_atoms(rec, 'feat', x, 1, n)
        if first and isinstance(m, nn.GroupNorm):
            # statistics are per GN group: remove whole GN groups only
            per = m.num_channels // m.num_groups
            for j in range(m.num_groups):
                self.sets.union_all(feat[j * per:(j + 1) * per].tolist())
        rec.calls.append(Call(out.numel() // n, tuple(x.shape), tuple(out.shape)))
        self.set_label(out, Label(1, feat))

    def trace_layernorm(self, m: nn.LayerNorm, args: tuple, out: torch.Tensor) -> None:
        x = args[0]
        lab = self.label(x)
        if lab is None:
            return
        if lab.dim >= x.dim() - len(m.normalized_shape):
            self.taint(lab, f'{self.where()}: LayerNorm normalises over channels')
        else:
            self.set_label(out, lab)

    # ---- functions --------------------------------------------------------- #
    def on_function(self, func: Callable, args: tuple, kwargs: dict, out: Any) -> None:
        raw = _fn_name(func)
        name, inplace = _normalise(raw)
        tensors = _flat_tensors(args, []) + _flat_tensors(kwargs, [])
        for o in _flat_tensors(out, []):
            self.produced[id(o)] = o
        if name in _FACTORY and isinstance(out, torch.Tensor):
            self.blank[id(out)] = out
        elif (inplace or 'out' in kwargs) and tensors:
            for t in (tensors[:1] + _flat_tensors(kwargs.get('out'), [])):
                self.blank.pop(id(t), None)
        if name not in _INSPECT:
            self.mark_read(tensors)
        labelled = [(t, self.label(t)) for t in tensors]
        labelled = [(t, lab) for t, lab in labelled if lab is not None]
        if not labelled:
            return
        self.ops_seen[name] = self.ops_seen.get(name, 0) + 1
        where = self.where()
        try:
            rule = self.rule_for(name)
            rule(name, inplace, args, kwargs, out, labelled, where)
        except Exception as e:  # never let the analysis crash the model: be conservative
            if self.strict:
                raise AnalysisRuleError(f'{where}: the rule for {raw} failed ({type(e).__name__}: {e}); with '
                                        f'strict=False its channels would be left unpruned') from e
            for _, lab in labelled:
                self.taint(lab, f'{where}: {raw} not understood ({type(e).__name__}: {e})')

    def rule_for(self, name: str) -> Callable:
        if name in _INSPECT:
            return self.rule_inspect
        if name in _POINTWISE:
            return self.rule_pointwise
        if name in _CAST:
            return self.rule_cast
        if name in _CHANNELWISE:
            return self.rule_channelwise
        if name in _RESHAPE:
            return self.rule_reshape
        if name in _REDUCE:
            return self.rule_reduce
        return {
            'permute': self.rule_permute, 'transpose': self.rule_permute, 'swapaxes': self.rule_permute,
            'movedim': self.rule_permute, 't': self.rule_permute, 'T': self.rule_permute,
            'expand': self.rule_expand, 'expand_as': self.rule_expand, 'broadcast_to': self.rule_expand,
            'repeat': self.rule_expand,
            'cat': self.rule_cat, 'concat': self.rule_cat, 'concatenate': self.rule_cat,
            'stack': self.rule_stack,
            'chunk': self.rule_split, 'split': self.rule_split, 'unbind': self.rule_split,
            'tensor_split': self.rule_split, 'split_with_sizes': self.rule_split,
            'getitem': self.rule_getitem, 'setitem': self.rule_setitem,
        }.get(name, self.rule_unknown)

    # each rule: (name, inplace, args, kwargs, out, labelled, where)
    def rule_unknown(self, name, inplace, args, kwargs, out, labelled, where):
        for _, lab in labelled:
            self.taint(lab, f'{where}: {name} mixes or drops channels')

    def rule_inspect(self, name, inplace, args, kwargs, out, labelled, where):
        if isinstance(out, torch.Tensor) and name in ('data',):
            self.set_label(out, labelled[0][1])

    def rule_cast(self, name, inplace, args, kwargs, out, labelled, where):
        lab = self.label(args[0]) if args else None
        if lab is not None and isinstance(out, torch.Tensor) and out.shape == args[0].shape:
            self.set_label(out, lab)

    def rule_pointwise(self, name, inplace, args, kwargs, out, labelled, where):
        outs = _flat_tensors(out, [])
        if not outs:
            for _, lab in labelled:
                self.taint(lab, f'{where}: {name} turns channels into a Python value')
            return
        o = outs[0]
        tensors = _flat_tensors(args, []) + _flat_tensors(kwargs, [])
        # align on trailing dims (broadcasting)
        ref_t, ref = labelled[0]
        rd = ref_t.dim() - ref.dim
        result: Optional[Label] = None
        ok = True
        for t, lab in labelled:
            if t.dim() - lab.dim != rd:
                ok = False
        if not ok:
            for _, lab in labelled:
                self.taint(lab, f'{where}: {name} combines channels with another dimension')
            return
        full = [lab for t, lab in labelled if lab.atoms.numel() > 1]
        size = max(lab.atoms.numel() for _, lab in labelled)
        for t, lab in labelled:
            if lab.atoms.numel() == 1 and size > 1:
                self.taint(lab, f'{where}: a single channel is broadcast over {size} channels by {name}')
        for t in tensors:
            if self.label(t) is None and t.dim() >= rd and t.shape[t.dim() - rd] == size and size > 1:
                for lab in full:
                    self.taint(lab, f'{where}: {name} with a fixed-size tensor of {size} channels')
        if full:
            for lab in full[1:]:
                self.sets.union_arrays(full[0].atoms, lab.atoms)
            result = full[0]
        else:
            result = labelled[0][1]
        od = o.dim() - rd
        if 0 <= od < o.dim() and o.shape[od] == result.atoms.numel():
            for oo in outs:
                if oo.dim() == o.dim():
                    self.set_label(oo, Label(od, result.atoms))
        else:
            self.taint(result, f'{where}: {name} changes the channel dim')

    def rule_channelwise(self, name, inplace, args, kwargs, out, labelled, where):
        t, lab = labelled[0]
        for t2, lab2 in labelled[1:]:
            self.taint(lab2, f'{where}: {name} uses channels as an extra argument')
        outs = _flat_tensors(out, [])
        if not outs:
            return
        o = outs[0]
        if t is not (args[0] if args else None) or o.dim() != t.dim() or o.shape[lab.dim] != t.shape[lab.dim] \
                or lab.dim == t.dim() - 1 and name in ('pad',):
            self.taint(lab, f'{where}: {name} changes the channel dim')
            return
        self.set_label(o, lab)

    def _reshape_label(self, lab: Label, src: Sequence[int], dst: Sequence[int]) -> Optional[Label]:
        before = math.prod(src[:lab.dim])
        c = src[lab.dim]
        acc = 1
        for e, size in enumerate(dst):
            if acc == before:
                if size == c:
                    return Label(e, lab.atoms)
                # flatten: channel dim merged with the dims after it
                tail, k = 1, lab.dim + 1
                while k < len(src) and size > c * tail:
                    tail *= src[k]
                    k += 1
                if size == c * tail and tail > 1:
                    return Label(e, lab.atoms.repeat_interleave(tail))
            if acc > before:
                break
            acc *= size
        return None

    def rule_reshape(self, name, inplace, args, kwargs, out, labelled, where):
        t, lab = args[0], self.label(args[0])
        if lab is None:
            return
        if not isinstance(out, torch.Tensor):
            return self.rule_unknown(name, inplace, args, kwargs, out, labelled, where)
        new = self._reshape_label(lab, list(t.shape), list(out.shape))
        if new is None:
            self.taint(lab, f'{where}: {name} {tuple(t.shape)}->{tuple(out.shape)} reshapes across the channel dim')
        else:
            self.set_label(out, new)

    def rule_permute(self, name, inplace, args, kwargs, out, labelled, where):
        t, lab = labelled[0]
        nd = t.dim()
        if name == 'permute':
            perm = args[1:] if len(args) > 2 or (len(args) == 2 and isinstance(args[1], int)) else \
                _arg(args, kwargs, 1, 'dims')
            perm = [p % nd for p in perm]
            newdim = perm.index(lab.dim)
        elif name in ('t', 'T'):
            newdim = (nd - 1 - lab.dim) if nd == 2 else lab.dim
        elif name == 'movedim':
            src = _dims(_arg(args, kwargs, 1, 'source'), nd)
            dst = _dims(_arg(args, kwargs, 2, 'destination'), nd)
            order = [d for d in range(nd) if d not in src]
            perm = [None] * nd
            for s, d in zip(src, dst):
                perm[d] = s
            it = iter(order)
            perm = [p if p is not None else next(it) for p in perm]
            newdim = perm.index(lab.dim)
        else:
            a = _arg(args, kwargs, 1, 'dim0') % nd
            b = _arg(args, kwargs, 2, 'dim1') % nd
            newdim = b if lab.dim == a else a if lab.dim == b else lab.dim
        self.set_label(out, Label(newdim, lab.atoms))

    def rule_expand(self, name, inplace, args, kwargs, out, labelled, where):
        t, lab = args[0], self.label(args[0])
        if lab is None:
            return
        shift = out.dim() - t.dim()
        if out.shape[lab.dim + shift] != t.shape[lab.dim]:
            self.taint(lab, f'{where}: {name} repeats channels')
            return
        self.set_label(out, Label(lab.dim + shift, lab.atoms))

    def rule_cat(self, name, inplace, args, kwargs, out, labelled, where):
        tensors = list(_arg(args, kwargs, 0, 'tensors'))
        nd = tensors[0].dim()
        dim = _arg(args, kwargs, 1, 'dim', 0) % nd
        labs = [self.label(t) for t in tensors]
        ldims = {lab.dim for lab in labs if lab is not None}
        if len(ldims) > 1:
            for lab in labs:
                self.taint(lab, f'{where}: {name} of tensors with channels on different dims')
            return
        ldim = ldims.pop()
        if ldim == dim:
            atoms = torch.cat([lab.atoms if lab is not None else torch.full((t.shape[dim],), -1, dtype=torch.long)
                               for t, lab in zip(tensors, labs)])
            self.set_label(out, Label(dim, atoms))
            return
        # concatenated along another dim: every input's channels share positions
        full = [lab for lab in labs if lab is not None]
        if len(full) != len(labs):
            for lab in full:
                self.taint(lab, f'{where}: {name} with a tensor of fixed channels')
            return
        for lab in full[1:]:
            self.sets.union_arrays(full[0].atoms, lab.atoms)
        self.set_label(out, Label(ldim, full[0].atoms))

    def rule_stack(self, name, inplace, args, kwargs, out, labelled, where):
        tensors = list(_arg(args, kwargs, 0, 'tensors'))
        dim = _arg(args, kwargs, 1, 'dim', 0) % (tensors[0].dim() + 1)
        labs = [self.label(t) for t in tensors]
        full = [lab for lab in labs if lab is not None]
        if len(full) != len(labs) or len({lab.dim for lab in full}) != 1:
            for lab in full:
                self.taint(lab, f'{where}: {name} with a tensor of fixed channels')
            return
        for lab in full[1:]:
            self.sets.union_arrays(full[0].atoms, lab.atoms)
        ldim = full[0].dim
        self.set_label(out, Label(ldim + (1 if dim <= ldim else 0), full[0].atoms))

    def rule_split(self, name, inplace, args, kwargs, out, labelled, where):
        t, lab = labelled[0]
        nd = t.dim()
        dim = _arg(args, kwargs, 1, 'dim', 0) if name == 'unbind' else _arg(args, kwargs, 2, 'dim', 0)
        dim = dim % nd
        outs = list(out)
        if dim != lab.dim:
            for o in outs:
                shift = -1 if (name == 'unbind' and dim < lab.dim) else 0
                self.set_label(o, Label(lab.dim + shift, lab.atoms))
            return
        if name == 'unbind':
            self.taint(lab, f'{where}: unbind over channels')
            return
        sizes = [o.shape[dim] for o in outs]
        if name == 'chunk' and len(set(sizes)) == 1:
            # chunk(n) keeps equal parts after pruning if the k-th channel of every part goes together
            parts = lab.atoms.split(sizes)
            for p in parts[1:]:
                self.sets.union_arrays(parts[0], p)
            for o, p in zip(outs, parts):
                self.set_label(o, Label(dim, p))
            return
        self.taint(lab, f'{where}: {name} of channels at fixed sizes {sizes}')

    def _index_walk(self, t: torch.Tensor, idx: Any, lab: Label) -> Tuple[Optional[int], Optional[str]]:
        """Return (dim of channels in the result, problem)."""
        if not isinstance(idx, tuple):
            idx = (idx,)
        n_real = sum(1 for i in idx if i is not None and i is not Ellipsis and not isinstance(i, bool))
        n_real += sum(i.dim() - 1 for i in idx if isinstance(i, torch.Tensor) and i.dtype == torch.bool)
        expanded: List[Any] = []
        for i in idx:
            if i is Ellipsis:
                expanded.extend([slice(None)] * (t.dim() - n_real))
            else:
                expanded.append(i)
        src, dst = 0, 0
        advanced = False
        for i in expanded:
            if i is None:
                dst += 1
                continue
            if isinstance(i, (torch.Tensor, list)) and not (isinstance(i, torch.Tensor) and i.dim() == 0):
                span = i.dim() if isinstance(i, torch.Tensor) and i.dtype == torch.bool else 1
                if src <= lab.dim < src + span:
                    return None, 'indexes channels'
                if src > lab.dim:
                    break
                advanced = True
                src += span
                dst += 1
                continue
            if src == lab.dim:
                if isinstance(i, slice):
                    if i != slice(None) and range(t.shape[src])[i] != range(t.shape[src]):
                        return None, f'slices channels at fixed positions ({i})'
                    if not advanced:
                        return dst, None
                    break
                return None, 'selects a single channel'
            if isinstance(i, slice):
                src += 1
                dst += 1
            else:
                src += 1
        if src <= lab.dim and not advanced:
            return dst + (lab.dim - src), None
        return -1, None  # resolve from the end

    def rule_getitem(self, name, inplace, args, kwargs, out, labelled, where):
        t, lab = labelled[0]
        if t is not args[0] or not isinstance(out, torch.Tensor):
            return self.rule_unknown(name, inplace, args, kwargs, out, labelled, where)
        for t2, lab2 in labelled[1:]:
            self.taint(lab2, f'{where}: channels used as an index')
        d, problem = self._index_walk(t, args[1], lab)
        if problem:
            self.taint(lab, f'{where}: indexing {problem}')
            return
        if d == -1:
            d = out.dim() - (t.dim() - lab.dim)
        if 0 <= d < out.dim() and out.shape[d] == lab.atoms.numel():
            self.set_label(out, Label(d, lab.atoms))
        else:
            self.taint(lab, f'{where}: indexing changes the channel dim')

    def rule_setitem(self, name, inplace, args, kwargs, out, labelled, where):
        target, idx, value = args[0], args[1], args[2]
        tl, vl = self.label(target), self.label(value)
        if tl is None:
            self.taint(vl, f'{where}: channels written into a tensor of fixed size')
            return
        d, problem = self._index_walk(target, idx, tl)
        if problem:
            self.taint(tl, f'{where}: assignment {problem}')
            self.taint(vl, f'{where}: assignment {problem}')
            return
        if vl is None:
            if isinstance(value, torch.Tensor) and value.numel() > 1 and value.dim() >= target.dim() - tl.dim \
                    and value.shape[value.dim() - (target.dim() - tl.dim)] == tl.atoms.numel() > 1:
                self.taint(tl, f'{where}: assignment of a fixed-size tensor across channels')
            return
        if value.dim() - vl.dim != target.dim() - tl.dim or vl.atoms.numel() != tl.atoms.numel():
            self.taint(tl, f'{where}: assignment moves channels')
            self.taint(vl, f'{where}: assignment moves channels')
            return
        self.sets.union_arrays(tl.atoms, vl.atoms)

    def rule_reduce(self, name, inplace, args, kwargs, out, labelled, where):
        t, lab = labelled[0]
        nd = t.dim()
        dim = _arg(args, kwargs, 1, 'dim', None)
        if name in ('topk', 'kthvalue'):
            dim = _arg(args, kwargs, 2, 'dim', -1)
        if name in ('sort', 'argsort', 'softmax', 'log_softmax', 'softmin') and dim is None:
            dim = -1
        if isinstance(dim, (str,)) or (dim is not None and not isinstance(dim, (int, list, tuple))):
            dim = None
        dims = _dims(dim, nd)
        if t is not args[0] or dims is None or lab.dim in dims:
            self.taint(lab, f'{where}: {name} over channels')
            return
        outs = [o for o in _flat_tensors(out, []) if o.dim() > 0]
        for o in outs:
            if o.dim() == nd:
                d = lab.dim
            else:
                d = lab.dim - sum(1 for x in dims if x < lab.dim)
            if 0 <= d < o.dim() and o.shape[d] == lab.atoms.numel():
                self.set_label(o, Label(d, lab.atoms))

    # ---- compiled ops ---------------------------------------------------- #
    def on_autograd_function(self, cls: type, args: tuple, out: Any) -> None:
        if self.inside_leaf():
            return
        for t in _flat_tensors(args, []):
            self.taint(self.label(t), f'{self.where()}: compiled op {cls.__name__} (not visible as torch functions)')
        for o in _flat_tensors(out, []):
            self.set_label(o, None)

    # ---- the whole run ------------------------------------------------------- #
    def _watch_autograd_functions(self) -> List[Tuple[type, Any]]:
        """Wrap the ``forward`` of every custom ``torch.autograd.Function`` (mmcv's deformable convs,
        RoI ops, a user's own): their kernels are invisible as torch functions. ``forward`` is what the
        C++ ``apply`` calls, so module-level aliases such as ``deform_conv2d = DeformConv2dFunction.apply``
        are seen too. Returns what to restore."""
        tracer = self
        saved = []
        todo, seen = list(torch.autograd.Function.__subclasses__()), set()
        while todo:
            cls = todo.pop()
            if cls in seen:
                continue
            seen.add(cls)
            todo.extend(cls.__subclasses__())
            orig = cls.__dict__.get('forward')
            if not isinstance(orig, staticmethod):
                continue

            def forward(*args, _cls=cls, _orig=orig.__func__, **kwargs):
                out = _orig(*args, **kwargs)
                inputs = args[1:] if args and isinstance(args[0], torch.autograd.function.FunctionCtx) else args
                tracer.on_autograd_function(_cls, inputs, out)
                return out

            saved.append((cls, orig))
            cls.forward = staticmethod(forward)
        return saved

    def run(self, forward: Callable[[], Any]) -> Any:
        hooks = [nn.modules.module.register_module_forward_pre_hook(self.pre_hook),
                 nn.modules.module.register_module_forward_hook(self.post_hook)]
        patched = self._watch_autograd_functions()
        try:
            with torch.no_grad(), _Mode(self):
                output = forward()
        finally:
            for cls, orig in patched:
                cls.forward = orig
            for h in hooks:
                h.remove()
            self.stack.clear()
        for t in _flat_tensors(output, [], -8):
            self.taint(self.label(t), 'model output')
        return output
