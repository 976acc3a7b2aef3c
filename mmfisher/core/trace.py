"""Step 1 of the pipeline: run the model once and record how channels flow.

``ChannelTracer(model).run(forward)`` runs one forward pass and watches it three ways:

* :class:`ModuleHooks`: global module hooks. A module with a layer type
  (:mod:`mmfisher.core.layers`: conv, linear, norm, a registered type) is a *leaf*: its layer type
  says how its channels flow, and nothing inside it is looked at. Any other module is looked
  through, and checked for work no visible op did (a compiled op).
* :class:`FunctionWatch`: a :class:`torch.overrides.TorchFunctionMode` that hands every torch
  function and tensor method reading a tensor with channels to its op rule
  (:mod:`mmfisher.core.op_rules`).
* :class:`AutogradFunctionWatch`: every custom ``torch.autograd.Function`` (mmcv's deformable
  convs, RoI ops): their kernels are invisible as torch functions, so what they read is tainted.

It does not trace symbolically (no torch.fx) and does not look at autograd node names: it sees
every call made from Python on real tensors, whatever the control flow. The result is the atoms
of every recorded module (:mod:`mmfisher.core.atoms`) with their unions and taints;
:mod:`mmfisher.core.groups` turns them into channel groups.
"""
from __future__ import annotations

import functools
import weakref
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode

from .atoms import AtomSets, Label, flat_tensors
from .layers import ChannelwiseCall, LayerType, ModuleRecord, layer_type_for
from .op_rules import FACTORY, INSPECT, Op, function_name, normalise, rule_for


def unwatched(method: Callable) -> Callable:
    """Run ``method`` with torch-function dispatch off: the trace's own bookkeeping on atom tensors
    (``numel``, ``arange``, unions) then costs what it costs outside the trace, instead of a round trip
    through :class:`FunctionWatch` per call (which skips it anyway). Module hooks and the layer types'
    ``trace`` run this way; the op rules already do (a mode is off inside its own ``__torch_function__``)."""
    @functools.wraps(method)
    def run(*args, **kwargs):
        with torch._C.DisableTorchFunction():
            return method(*args, **kwargs)
    return run


class AnalysisRuleError(RuntimeError):
    """An op rule of the analysis itself failed (``analyse(..., strict=True)``): a bug, not a model limit."""


class ChannelTracer:
    """The state of one trace: atoms, labels, records, and the module stack. See module docstring.

    Op rules and layer types work through :meth:`label`, :meth:`set_label`, :meth:`taint`,
    :attr:`sets`, :meth:`atoms_of`, :meth:`input_atoms` and :meth:`where`.
    """

    def __init__(self, model: nn.Module, strict: bool = False) -> None:
        self.model = model
        self.strict = strict        # raise an op rule's own error instead of making its channels unprunable
        self.sets = AtomSets()
        self.names: Dict[int, str] = {}
        self.modules: Dict[int, nn.Module] = {}          # id -> module of the model, in named_modules order
        for name, m in model.named_modules(remove_duplicate=False):
            if id(m) not in self.names:
                self.names[id(m)] = name or '<root>'
                self.modules[id(m)] = m
        self._layer_types: Dict[int, Optional[LayerType]] = {}   # id(module) -> its layer type, looked up once
        self.records: Dict[int, ModuleRecord] = {}
        self.order: List[int] = []               # ids of records in first-call order
        self.channelwise: List[ChannelwiseCall] = []   # calls of child-less modules without a layer type
        # id(tensor) -> (weak reference, label): intermediate tensors are freed as in a plain forward;
        # a recycled id is told apart by its dead reference
        self.labels: Dict[int, Tuple['weakref.ref', Label]] = {}
        # one frame per running module: [module, its layer type if it runs as a leaf (else None),
        # {id: tensor} of labelled direct tensor args not yet read (non-leaves)]
        self.stack: List[list] = []
        self.leaf_depth = 0                      # leaves on the stack
        self.ops_seen: Dict[str, int] = {}
        self.batch_size: Optional[int] = None    # leading dim of the first layer input
        self.compiled_calls = 0                  # custom autograd Functions run so far, inside leaves too
        self.skipped: List[str] = []             # errors of the ``also`` forwards (traced up to the error)
        # id(parameter) -> id(module) for the parameters of channel-indexed modules, and the first torch
        # function outside any leaf that read one (CSRA's head divides by the norm of its conv's weight)
        self.param_owners: Dict[int, int] = {}
        for key, m in self.modules.items():
            lt = self.layer_type(m)
            if lt is not None and lt.records:
                for p in m._parameters.values():
                    if p is not None:
                        self.param_owners[id(p)] = key
        self.outside_reads: Dict[int, str] = {}  # id(module) -> what read its parameter outside its forward

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
            self.sets.taint(lab.atoms, 'internal: label does not fit tensor shape')
            self.labels.pop(id(t), None)
            return
        self.labels[id(t)] = (weakref.ref(t), lab)

    def taint(self, lab: Optional[Label], reason: str) -> None:
        if lab is not None:
            self.sets.taint(lab.atoms, reason)

    def where(self) -> str:
        """The innermost running module of the model, for messages."""
        for m, *_ in reversed(self.stack):
            name = self.names.get(id(m))
            if name is not None:
                return name
        return '<root>'

    def inside_leaf(self) -> bool:
        """Whether a leaf (a module with a layer type) is running, at any depth: what runs inside it is
        described by the leaf's own type (an RoI extractor's RoIAlign, a conv's kernel)."""
        return self.leaf_depth > 0

    # ---- records ---------------------------------------------------------- #
    def layer_type(self, module: nn.Module) -> Optional[LayerType]:
        """The layer type of a module of the model (None for modules built during the forward)."""
        key = id(module)
        if key not in self.names:
            return None
        if key not in self._layer_types:
            self._layer_types[key] = layer_type_for(module)
        return self._layer_types[key]

    def record_for(self, module: nn.Module, layer_type: LayerType) -> ModuleRecord:
        rec = self.records.get(id(module))
        if rec is None:
            rec = ModuleRecord(self.names.get(id(module), type(module).__name__), module, layer_type)
            if not layer_type.records:
                return rec
            self.records[id(module)] = rec
            self.order.append(id(module))
        return rec

    def atoms_of(self, rec: ModuleRecord, role: str, n: int) -> torch.Tensor:
        """The atoms of ``rec``'s ``role`` array, allocated on first use: ``[n]`` LongTensor."""
        if role not in rec.arrays:
            rec.arrays[role] = self.sets.alloc(n)
        return rec.arrays[role]

    def input_atoms(self, rec: ModuleRecord, role: str, x: Any, dim: int, n: int) -> torch.Tensor:
        """Union the atoms of ``x`` at ``dim`` into ``rec.arrays[role]``; taint untraced input.

        On the array's first use, when ``x`` carries a whole allocated array (a layer's output, passed on
        as is), that array *is* ``rec.arrays[role]``: the same atoms, so no union to record or solve."""
        lab = self.label(x)
        fits = lab is not None and lab.dim == (dim % x.dim()) and lab.atoms.numel() == n
        if fits and role not in rec.arrays and self.sets.allocated(lab.atoms):
            rec.arrays[role] = lab.atoms
            return lab.atoms
        atoms = self.atoms_of(rec, role, n)
        if fits:
            self.sets.union_arrays(atoms, lab.atoms)
            if not self.sets.allocated(lab.atoms):     # an allocated array has no negative atom
                untraced = (lab.atoms < 0).nonzero().flatten()
                if untraced.numel():
                    self.sets.taint(atoms[untraced], f'{rec.name}: input channels not produced by a module')
        else:
            if lab is not None:
                self.taint(lab, f'{rec.name}: channels arrive on an unexpected dim')
            self.sets.taint(atoms, f'{rec.name}: input channels not produced by a module')
        return atoms

    # ---- the whole run ------------------------------------------------------- #
    def run(self, forward: Callable[[], Any], also: Sequence[Callable[[], Any]] = ()) -> Any:
        """Run ``forward()`` under no_grad with every watch on; the model's outputs are tainted.

        ``also``: further forwards (another mode of the model: its loss, its predict) traced for what
        they couple and taint only; the layer calls they make are not counted (costs follow
        ``forward``), except for layers only they run. One that raises is traced up to the error (what
        ran is still true of the model) and its error kept in :attr:`skipped`. Returns ``forward()``'s output."""
        output = self._run_one(forward)
        counted = {i: len(rec.calls) for i, rec in self.records.items()}
        counted_channelwise = len(self.channelwise)
        for extra in also:
            try:
                self._run_one(extra)
            except AnalysisRuleError:
                raise
            except Exception as e:  # noqa: BLE001  the model's other mode failed on the example: say so
                self.skipped.append(f'{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ""}')
        for i, n in counted.items():
            del self.records[i].calls[n:]
        del self.channelwise[counted_channelwise:]
        self.taint_outside_reads()
        return output

    def note_parameter_reads(self, raw: str, name: str, tensors: List[torch.Tensor]) -> None:
        """Remember the channel-indexed modules whose parameters torch function ``raw`` (outside any leaf)
        reads. A shrink changes such a parameter's shape and content, which the masks do not: the norm of
        a weight over its input channels, a weight used as a matrix elsewhere."""
        if name in INSPECT or name in FACTORY:        # shape, dtype, new_zeros: nothing of the values
            return
        owners = self.param_owners
        for t in tensors:
            key = owners.get(id(t))
            if key is not None and key not in self.outside_reads:
                self.outside_reads[key] = f'{raw} in {self.where()}'

    def taint_outside_reads(self) -> None:
        """Every channel of a recorded module whose parameter a torch function read outside the module's
        own forward (:meth:`note_parameter_reads`) is left unpruned: the masked model and the shrunk one
        would compute different things. A module never called has no record: :meth:`unseen` reports it."""
        for key, what in self.outside_reads.items():
            rec = self.records.get(key)
            if rec is not None and rec.arrays:
                self.sets.taint(torch.cat(list(rec.arrays.values())),
                                f'{rec.name}: its parameters are read outside its own forward ({what})')

    def _run_one(self, forward: Callable[[], Any]) -> Any:
        hooks = ModuleHooks(self)
        functions = FunctionWatch(self, hooks)
        with AutogradFunctionWatch(self), hooks, torch.no_grad(), functions:
            output = forward()
        for t in flat_tensors(output, [], -8):
            self.taint(self.label(t), 'model output')
        return output

    def unseen(self) -> List[str]:
        """Channel-indexed modules with parameters that no traced forward ran: nothing is known of the
        channels they read, and they are never shrunk."""
        out = []
        for key, m in self.modules.items():
            lt = self.layer_type(m)
            if (lt is not None and lt.records and key not in self.records
                    and any(True for _ in m.parameters(recurse=False))):
                out.append(self.names[key])
        return out


class ModuleHooks:
    """Global module hooks: leaves run their layer type; other modules are checked for compiled ops.

    While a non-leaf module runs, its frame watches its labelled direct tensor arguments: one that no
    visible op and no child module read, or an output no visible op produced, means a compiled op did
    the work, and the channels involved are tainted.
    """

    def __init__(self, tracer: ChannelTracer) -> None:
        self.tr = tracer
        # id -> weak reference of tensors some visible op or leaf returned (a dead reference: a recycled id)
        self.produced: Dict[int, 'weakref.ref'] = {}
        # the same for tensors made by a factory (new_empty, zeros...) that no visible op has written yet:
        # a module returning one filled it with a compiled op
        self.blank: Dict[int, 'weakref.ref'] = {}
        self._handles: list = []

    def __enter__(self) -> 'ModuleHooks':
        self._handles = [nn.modules.module.register_module_forward_pre_hook(self.pre_hook),
                         nn.modules.module.register_module_forward_hook(self.post_hook)]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self.tr.stack.clear()
        self.tr.leaf_depth = 0

    def mark_read(self, tensors: Any) -> None:
        """Tensors a visible op or a child module reads (nested in lists, tuples, dicts): enclosing frames
        stop watching them."""
        flat = None
        for frame in self.tr.stack:
            watch = frame[2]
            if watch:
                if flat is None:
                    flat = flat_tensors(tensors, [])
                for t in flat:
                    watch.pop(id(t), None)

    @unwatched
    def pre_hook(self, module: nn.Module, args: tuple) -> None:
        tr = self.tr
        self.mark_read(args)
        if tr.leaf_depth:                               # inside a leaf: its layer type describes all of it
            tr.stack.append([module, None, None])
            return
        lt = tr.layer_type(module)
        watch = None
        if lt is None:
            watch = {id(t): t for t in args if isinstance(t, torch.Tensor) and tr.label(t) is not None}
        else:
            tr.leaf_depth += 1
        tr.stack.append([module, lt, watch])

    @unwatched
    def post_hook(self, module: nn.Module, args: tuple, output: Any) -> None:
        tr = self.tr
        _, lt, watch = tr.stack.pop()
        if lt is None:
            if not tr.leaf_depth:
                self.check_visible(module, args, output, watch)
                self.note_channelwise(module, args)
            return
        tr.stack.append([module, lt, None])  # names in messages point at this module
        try:
            lt.trace(tr, tr.record_for(module, lt), args, output)
        finally:
            tr.stack.pop()
            tr.leaf_depth -= 1
        produced = self.produced
        for o in flat_tensors(output, []):
            produced[id(o)] = weakref.ref(o)

    def note_channelwise(self, module: nn.Module, args: tuple) -> None:
        """A child-less module of the model without a layer type, whose first argument has channels on dim 1:
        keep its call for the latency model (:class:`~mmfisher.core.layers.ChannelwiseCall`)."""
        tr = self.tr
        if not args or not isinstance(args[0], torch.Tensor) or id(module) not in tr.names:
            return
        if next(module.children(), None) is not None:
            return
        lab = tr.label(args[0])
        if lab is not None and lab.dim == 1 and args[0].dim() >= 2:
            tr.channelwise.append(ChannelwiseCall(tr.names[id(module)], module, tuple(args[0].shape), lab.atoms))

    def check_visible(self, module: nn.Module, args: tuple, output: Any, watch: Optional[dict]) -> None:
        """Catch compiled ops: outputs no visible op produced, or labelled inputs nothing visible read."""
        tr = self.tr
        ins = flat_tensors(args, [])
        in_ids = {id(t) for t in ins}
        outs = flat_tensors(output, [])
        hidden = [o for o in outs if id(o) not in in_ids and
                  (not _holds(self.produced, o) or _holds(self.blank, o))]
        unread = [t for t in (watch or {}).values() if all(t is not o for o in outs)]
        if not hidden and not unread:
            return
        name = tr.names.get(id(module), type(module).__name__)
        reason = f'{name} ({type(module).__name__}): compiled op, not visible as torch functions'
        for t in (ins if hidden else unread):
            tr.taint(tr.label(t), reason)
        for o in hidden:
            tr.set_label(o, None)
            self.produced[id(o)] = weakref.ref(o)

    def saw_function(self, name: str, inplace: bool, tensors: List[torch.Tensor], kwargs: dict, out: Any) -> None:
        """Bookkeeping for :meth:`check_visible` after a visible torch function ran."""
        produced = self.produced
        for o in flat_tensors(out, []):
            produced[id(o)] = weakref.ref(o)
        if name in FACTORY and isinstance(out, torch.Tensor):
            self.blank[id(out)] = weakref.ref(out)
        elif (inplace or 'out' in kwargs) and tensors:
            for t in (tensors[:1] + flat_tensors(kwargs.get('out'), [])):
                self.blank.pop(id(t), None)
        if name not in INSPECT:
            self.mark_read(tensors)


def _holds(refs: Dict[int, 'weakref.ref'], t: torch.Tensor) -> bool:
    """Whether ``refs`` holds a live reference to ``t`` itself (not to a dead tensor whose id ``t`` reuses)."""
    r = refs.get(id(t))
    return r is not None and r() is t


class FunctionWatch(TorchFunctionMode):
    """Every torch function outside a leaf goes to the op rule of its name (see :mod:`op_rules`)."""

    def __init__(self, tracer: ChannelTracer, hooks: ModuleHooks) -> None:
        super().__init__()
        self.tr = tracer
        self.hooks = hooks
        self._names: Dict[Any, Tuple[str, str, bool]] = {}   # func -> (its name, normalised name, in place)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if kwargs is None:
            kwargs = {}
        out = func(*args, **kwargs)
        if not self.tr.leaf_depth:              # inside a leaf: its layer type describes all of it
            self.on_function(func, args, kwargs, out)
        return out

    def on_function(self, func: Callable, args: tuple, kwargs: dict, out: Any) -> None:
        tr = self.tr
        try:
            raw, name, inplace = self._names[func]
        except (KeyError, TypeError):        # TypeError: an unhashable callable, named every time
            raw = function_name(func)
            name, inplace = normalise(raw)
            try:
                self._names[func] = raw, name, inplace
            except TypeError:
                pass
        tensors = flat_tensors(args, [])
        if kwargs:
            flat_tensors(kwargs, tensors)
        self.hooks.saw_function(name, inplace, tensors, kwargs, out)
        tr.note_parameter_reads(raw, name, tensors)
        labelled = [(t, lab) for t in tensors for lab in [tr.label(t)] if lab is not None]
        if not labelled:
            return
        tr.ops_seen[name] = tr.ops_seen.get(name, 0) + 1
        where = tr.where()
        try:
            rule_for(name)(tr, Op(name, inplace, args, kwargs, out, labelled, where))
        except Exception as e:  # never let the analysis crash the model: be conservative
            if tr.strict:
                raise AnalysisRuleError(f'{where}: the rule for {raw} failed ({type(e).__name__}: {e}); with '
                                        f'strict=False its channels would be left unpruned') from e
            for _, lab in labelled:
                tr.taint(lab, f'{where}: {raw} not understood ({type(e).__name__}: {e})')


class AutogradFunctionWatch:
    """Wraps the ``forward`` of every custom ``torch.autograd.Function`` subclass while the trace runs.

    ``forward`` is what the C++ ``apply`` calls, so module-level aliases such as
    ``deform_conv2d = DeformConv2dFunction.apply`` are seen too. Outside a leaf, every labelled input
    is tainted (the kernel is invisible) and the outputs lose their labels.
    """

    def __init__(self, tracer: ChannelTracer) -> None:
        self.tr = tracer
        self._saved: List[Tuple[type, Any]] = []

    @unwatched
    def on_call(self, cls: type, args: tuple, out: Any) -> None:
        tr = self.tr
        tr.compiled_calls += 1
        if tr.inside_leaf():
            return
        for t in flat_tensors(args, []):
            tr.taint(tr.label(t), f'{tr.where()}: compiled op {cls.__name__} (not visible as torch functions)')
        for o in flat_tensors(out, []):
            tr.set_label(o, None)

    def __enter__(self) -> 'AutogradFunctionWatch':
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
                self.on_call(_cls, inputs, out)
                return out

            self._saved.append((cls, orig))
            cls.forward = staticmethod(forward)
        return self

    def __exit__(self, *exc) -> None:
        for cls, orig in self._saved:
            cls.forward = orig
        self._saved = []
