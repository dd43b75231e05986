"""Compressed Linear / Conv layers run through the packed kernels (conv via im2col GEMMs):
against PyTorch on the dequantised weights (f32 mode) and an exact integer reference (i8 mode),
grouped / depthwise / strided / dilated / Conv1d included, and the real MNIST CNN end to end."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from zoo_model import Zoo

import examples.mnist_cnn as mnist
from spfq_deploy import kernels as K
from spfq_deploy.compress import compress_model
from spfq_deploy.compress.capture import patch_rows
from spfq_deploy.kernel_layers import KernelLayer

torch.manual_seed(0)


def _torch_layer(model, name, layer):
    mod = dict(model.named_modules())[name]
    w = torch.from_numpy(layer.dequantize())
    b = None if layer.bias is None else torch.from_numpy(layer.bias)
    if isinstance(mod, nn.Linear):
        return lambda x: F.linear(x, w, b)
    fn = F.conv2d if isinstance(mod, nn.Conv2d) else F.conv1d
    return lambda x: fn(x, w, b, mod.stride, mod.padding, mod.dilation, mod.groups)


def _inputs(model, calib):
    seen = {}
    hooks = [m.register_forward_pre_hook(lambda m, a, n=n: seen.__setitem__(n, a[0].detach()))
             for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d))]
    with torch.no_grad():
        model(calib)
    for h in hooks:
        h.remove()
    return seen


@pytest.mark.parametrize("bits,sparsity", [(4, 0.0), (1, 0.0), ("ternary", 0.0), (4, 0.5), (8, 0.0)])
def test_every_layer_kind_matches_pytorch_and_integer_reference(bits, sparsity):
    model = Zoo().eval()
    calib = torch.randn(24, 3, 10, 10)
    res = compress_model(model, calib, bits=bits, sparsity=sparsity, method="rtn", progress=False)
    inputs = _inputs(res.reference, calib[:5])
    for name, layer in res.model.layers.items():
        x = inputs[name]
        kl = KernelLayer(layer)
        want = _torch_layer(res.reference, name, layer)(x)
        got = kl(x, "f32")
        assert got.shape == want.shape, name
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()) + 1e-6)
        # i8: activations quantised per patch row, integer sums exact
        rows = patch_rows(x, layer.kind, layer.conv)
        g = rows.shape[0]
        n = layer.rows // g
        got8 = kl(x, "i8")
        for gi in range(g):
            r = np.ascontiguousarray(rows[gi].numpy())
            xq, xs = K.quantize_i8(r)
            w = layer.dequantize().reshape(layer.rows, -1)[gi * n:(gi + 1) * n].astype(np.float64)
            ref = xs[:, None].astype(np.float64) * (xq.astype(np.float64) @ w.T)
            if layer.bias is not None:
                ref += layer.bias[gi * n:(gi + 1) * n]
            flat = got8.movedim(1, -1).reshape(-1, layer.rows) if layer.kind != "linear" \
                else got8.reshape(-1, layer.rows)
            np.testing.assert_allclose(flat[:, gi * n:(gi + 1) * n].numpy(), ref, rtol=1e-5,
                                       atol=1e-5 * np.abs(ref).max() + 1e-6)


def test_wrong_input_channels_is_a_clear_error():
    model = Zoo().eval()
    res = compress_model(model, torch.randn(8, 3, 10, 10), bits=4, method="rtn", progress=False)
    with pytest.raises(K.KernelError, match="expects 3 input"):
        KernelLayer(res.model.layers["c1"])(torch.randn(1, 4, 10, 10))


def test_mnist_cnn_through_kernels_agrees_with_reference():
    model = mnist.build()
    res = compress_model(model, mnist.calibration(256), bits=4, method="gpfq", progress=False)
    x, _ = mnist.load_digits()
    x = x[::10]  # 500 real digits
    with torch.no_grad():
        ref = res.reference(x).argmax(1)
    for mode, min_agree in (("f32", 1.0), ("i8", 0.99)):
        net = mnist.build()
        net.load_state_dict(res.reference.state_dict())
        for name, layer in res.model.layers.items():
            kl = KernelLayer(layer)
            dict(net.named_modules())[name].forward = (lambda inp, kl=kl, mode=mode: kl(inp, mode))
        with torch.no_grad():
            agree = float((net(x).argmax(1) == ref).float().mean())
        assert agree >= min_agree, (mode, agree)
