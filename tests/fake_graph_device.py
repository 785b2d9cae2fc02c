"""TEST ONLY: a graph-capture device module backed by the CPU, standing in for torch.npu or
torch.xpu where neither device exists, so that kiln's serving runner captures and replays
its bucket graphs through exactly the calls it makes on the hardware (kiln.backends.
cudagraphs.GraphAPI: the graph class, `graph`, `graph_pool_handle`, `synchronize`,
streams, events).

A device graph records the work issued during capture, runs none of it until replayed,
and keeps every host value as it was at capture. The fake does the same through torch's
dispatcher: inside `graph(g)` every ATen or custom operator call is recorded with the very
tensors it used; when the capture ends the floating-point memory it allocated is filled
with NaN (nothing has run yet on a device); `g.replay()` runs the recorded calls again in
order and writes each result into the tensor the capture returned. A replay therefore
computes from what the static inputs hold now, and whatever the captured code decided on
the host stays as it was at capture. Reading a tensor's values on the host during capture
(`.tolist()`, `.item()`, `bool(t)`, ...) raises, as a synchronisation does in a device
capture.

With `host_argument_ops` (npu), `graph(g, auto_dispatch_capture=True)` and `g.update(...)`
behave as torch_npu 2.14.0's (torch_npu/npu/graphs.py and its _npugraph_handlers): the
calls of the operators torch_npu has update handlers for are recorded with their keyword
arguments, `update([{name: value}])` (one dict for each such call, or one for all) sets
those arguments, and a replay of such a graph without an update since the last one raises
(torch_npu's graph waits for the event the update records).
"""
from __future__ import annotations

import contextlib
import types

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

# torch_npu 2.14.0's operators with graph-update handlers (ifa_handler.py, simple_handler.py).
NPU_HOST_ARGUMENT_OPS = frozenset({
    "npu_fused_infer_attention_score.default", "npu_fused_infer_attention_score.out",
    "npu_fused_infer_attention_score_v2.default", "npu_fused_infer_attention_score_v2.out",
    "_npu_paged_attention.default", "npu_multi_head_latent_attention.out"})

# Tensor methods that read values back to the host.
_HOST_READS = frozenset({"tolist", "item", "numpy", "__bool__", "__int__", "__float__",
                         "__index__"})


class CaptureError(RuntimeError):
    """What a device raises for work a graph cannot hold."""


class _Call:
    def __init__(self, func, args, kwargs, out):
        self.func, self.args, self.kwargs, self.out = func, args, kwargs, out


class _Recorder(TorchDispatchMode):
    """Records the operator calls of a capture (and runs them, so the captured code sees
    tensors of the right shapes); rejects host reads outside operator implementations."""

    def __init__(self, graph: "FakeGraph", host_argument_ops: frozenset):
        super().__init__()
        self.graph, self.host_argument_ops = graph, host_argument_ops
        self.inside_op = 0   # > 0 while an operator's own implementation runs

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.ops.aten._local_scalar_dense.default:
            raise CaptureError("a tensor's value was read on the host during graph capture "
                               "(.item(), bool(), int()): a device graph cannot hold it")
        self.inside_op += 1
        try:
            out = func(*args, **kwargs)
        finally:
            self.inside_op -= 1
        call = _Call(func, args, kwargs, out)
        self.graph._calls.append(call)
        if func.__name__ in self.host_argument_ops:
            self.graph._host_argument_calls.append(call)
        return out


class _NoHostReads(TorchFunctionMode):
    def __init__(self, recorder: _Recorder):
        super().__init__()
        self.recorder = recorder

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", None) in _HOST_READS and not self.recorder.inside_op:
            raise CaptureError(f"Tensor.{func.__name__}() during graph capture reads device "
                               f"memory on the host: a device graph cannot hold it")
        return func(*args, **(kwargs or {}))


def _same_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride()
            and a.dtype == b.dtype)


class FakeGraph:
    """The device's graph class (named NPUGraph / XPUGraph by `fake_device_module`)."""

    def __init__(self):
        self._calls: list[_Call] = []
        self._host_argument_calls: list[_Call] = []
        self._auto_dispatch = False
        self._updated = False
        self._grad = self._inference = False
        self.replays = 0
        self.updates: list[list[dict]] = []   # each update's input, in order

    def replay(self) -> None:
        if self._host_argument_calls and not self._updated:
            raise CaptureError("replay of a graph captured with auto_dispatch_capture and no "
                               "update since its last replay: torch_npu's graph would wait "
                               "for the update's event forever")
        self._updated = False
        with torch.inference_mode(self._inference), torch.set_grad_enabled(self._grad):
            for call in self._calls:
                result = call.func(*call.args, **call.kwargs)
                for static, fresh in zip(tree_leaves(call.out), tree_leaves(result)):
                    if isinstance(static, torch.Tensor) and not _same_memory(static, fresh):
                        static.copy_(fresh)
        self.replays += 1

    def update(self, cpu_update_input: list[dict]) -> None:
        if not self._auto_dispatch:
            raise CaptureError("The current graph configuration does not support update: "
                               "capture with auto_dispatch_capture=True")
        calls = self._host_argument_calls
        if len(cpu_update_input) == 1:
            cpu_update_input = [dict(cpu_update_input[0]) for _ in calls]
        if len(cpu_update_input) != len(calls):
            raise CaptureError(f"{len(calls)} recorded operators to update and "
                               f"{len(cpu_update_input)} entries in cpu_update_input")
        for call, values in zip(calls, cpu_update_input):
            for key, value in values.items():
                if key in call.kwargs:
                    call.kwargs[key] = value
        self.updates.append(cpu_update_input)
        self._updated = True


class _Stream:
    def wait_stream(self, other) -> None:
        pass

    def synchronize(self) -> None:
        pass


class _Event:
    def record(self, stream=None) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True


def fake_device_module(graph_class: str, host_argument_ops: frozenset = frozenset()):
    """A module with the capture calls of torch.npu (graph_class "NPUGraph", with
    NPU_HOST_ARGUMENT_OPS) or torch.xpu ("XPUGraph"); its `captures` lists the graphs
    captured, `synchronizes` counts synchronize() calls."""
    module = types.ModuleType(f"fake_{graph_class.lower()}_device")
    module.__dict__[graph_class] = type(graph_class, (FakeGraph,), {})
    module.captures, module.synchronizes = [], 0
    capturing = []
    default_stream = _Stream()

    @contextlib.contextmanager
    def graph(device_graph, pool=None, stream=None, **options):
        auto_dispatch = options.pop("auto_dispatch_capture", False)
        if options or (auto_dispatch and not host_argument_ops):
            raise TypeError(f"graph() got unexpected keyword arguments "
                            f"{sorted(options) or ['auto_dispatch_capture']}")
        device_graph._auto_dispatch = auto_dispatch
        device_graph._grad = torch.is_grad_enabled()
        device_graph._inference = torch.is_inference_mode_enabled()
        recorder = _Recorder(device_graph, host_argument_ops if auto_dispatch else frozenset())
        capturing.append(device_graph)
        try:
            with _NoHostReads(recorder), recorder:
                yield
        finally:
            capturing.pop()
        _poison_allocations(device_graph._calls)
        module.captures.append(device_graph)

    def synchronize() -> None:
        module.synchronizes += 1

    module.graph = graph
    module.graph_pool_handle = object
    module.synchronize = synchronize
    module.Stream = _Stream
    module.Event = _Event
    module.current_stream = lambda: default_stream
    module.stream = lambda stream: contextlib.nullcontext()
    module.is_available = lambda: True
    module.is_current_stream_capturing = lambda: bool(capturing)
    return module


def _poison_allocations(calls: list[_Call]) -> None:
    """NaN in the floating-point tensors the capture allocated (outputs sharing no storage
    with their call's inputs): on a device they hold nothing until the first replay."""
    for call in calls:
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((call.args, call.kwargs))
                  if isinstance(t, torch.Tensor)}
        for out in tree_leaves(call.out):
            if (isinstance(out, torch.Tensor) and out.is_floating_point()
                    and out.untyped_storage().data_ptr() not in inputs):
                out.fill_(float("nan"))
