"""Export a model (a compact PrunedModel config works like any other) to ONNX and check it.

    python tools/deployment/export_onnx.py CONFIG CHECKPOINT OUT.onnx [--shape 640 640]

Exports the network in 'tensor' mode (no post-processing), runs it with onnxruntime on a
random input and prints the largest difference from PyTorch.
"""
import argparse
import os.path as osp
import sys

import torch

sys.path.insert(0, osp.abspath(osp.join(osp.dirname(__file__), '..', '..')))
sys.path.insert(0, osp.abspath(osp.join(osp.dirname(__file__), '..')))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('config')
    p.add_argument('checkpoint', help="checkpoint, or 'none'")
    p.add_argument('out')
    p.add_argument('--shape', type=int, nargs=2, default=(640, 640))
    p.add_argument('--opset', type=int, default=17)
    args = p.parse_args(argv)
    from benchmark import build
    from mmfisher.openmmlab import register_all_modules
    from mmfisher.openmmlab.onnx_export import TensorModeNetwork, export_onnx, onnx_session
    register_all_modules()
    model = build(args.config, args.checkpoint, 'cpu')
    shape = (1, 3, *args.shape)
    export_onnx(model, args.out, shape, args.opset)
    x = torch.randn(*shape)
    with torch.no_grad():
        ref = TensorModeNetwork(model, shape)(x)
    outs = onnx_session(args.out).run(None, {'input': x.numpy()})
    err = max(float((torch.from_numpy(o) - r).abs().max() / (r.abs().max() + 1e-6)) for o, r in zip(outs, ref))
    print(f'wrote {args.out}: {len(outs)} outputs, max relative difference onnxruntime vs PyTorch {err:.2e}')
    return err


if __name__ == '__main__':
    main()
