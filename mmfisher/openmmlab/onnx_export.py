"""Export a (compact) mmdet / mmpretrain model's network to ONNX and run it with onnxruntime.

The exported graph is the network in 'tensor' mode (for detectors: the per-level class and box
maps, without post-processing), traced with torch.onnx's TorchScript exporter (``dynamo=False``:
the torch.export-based default needs the onnxscript package).
"""
from __future__ import annotations

from typing import List, Sequence

import torch
import torch.nn as nn

from ..core.atoms import flat_tensors
from .analysis import example_samples, tensor_forward


class TensorModeNetwork(nn.Module):
    """``forward(x)`` returns the model's tensor-mode outputs as a flat tuple."""

    def __init__(self, model: nn.Module, shape: Sequence[int]):
        super().__init__()
        self.model = model
        self._samples = example_samples(model, shape)

    def forward(self, x):
        return tuple(flat_tensors(tensor_forward(self.model, x, self._samples), [], -8))


def export_onnx(model: nn.Module, path: str, shape: Sequence[int] = (1, 3, 640, 640), opset: int = 17) -> List[str]:
    """Write ``path``; returns the output names."""
    net = TensorModeNetwork(model.eval(), shape).eval()
    x = torch.randn(*shape)
    with torch.no_grad():
        n_out = len(net(x))
    names = [f'out{i}' for i in range(n_out)]
    torch.onnx.export(net, (x,), path, input_names=['input'], output_names=names, opset_version=opset,
                      dynamo=False)
    return names


def onnx_session(path: str, threads: int = 0):
    import onnxruntime as ort
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    return ort.InferenceSession(path, opts, providers=['CPUExecutionProvider'])
