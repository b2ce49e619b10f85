"""Kernels: the registry, the torch reference against float64 matmuls, the dense kernel,
and the per-token INT8 activation quantizer against a numpy reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lowbit import kernels
from lowbit.formats import get_format
from lowbit.kernels import (
    DenseKernel,
    Kernel,
    ReferenceKernel,
    available_memory,
    fake_quantize_int8_per_token,
    kernel_for,
    register_kernel,
)
from lowbit.nn import QuantLinear

# families covered, with shapes that leave partial groups (576 % 128 = 64, 200 % 64 = 8, 75 odd)
FORMATS = ("int4-g128", "int3-g128", "int8", "nf4-dq", "nf4", "fp8", "mxfp4", "bf16")
SHAPES = ((96, 576), (40, 200), (33, 75))


def quant_linear(name: str, shape: tuple[int, int], bias: bool = False, seed: int = 0) -> QuantLinear:
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(shape, generator=generator) * 0.05
    b = torch.randn(shape[0], generator=generator) if bias else None
    return QuantLinear.from_qtensor(get_format(name).quantize(weight), b)


@pytest.fixture
def empty_registry(monkeypatch):
    monkeypatch.setattr(kernels, "KERNELS", {})


class CodesKernel(Kernel):
    """A test kernel that 'repacks' at prepare time: it keeps the dense float64 weight as a
    non-persistent buffer and counts its calls."""

    def __init__(self):
        self.calls = 0

    def prepare(self, module):
        module.register_buffer("kernel_weight64", module.dequantize_weight(torch.float64), persistent=False)

    def forward(self, module, x):
        self.calls += 1
        return (x.double() @ module.kernel_weight64.T).to(x.dtype)



@pytest.fixture(autouse=True)
def seeded():
    torch.manual_seed(0)

# -- registry --------------------------------------------------------------------------
def test_unregistered_family_gets_the_reference(empty_registry):
    for name in FORMATS:
        assert type(kernel_for(get_format(name), "cpu")) is ReferenceKernel
        assert type(kernel_for(get_format(name), torch.device("meta"))) is ReferenceKernel


def test_registered_kernel_is_chosen_by_family_and_device_type(empty_registry):
    register_kernel("int", "cpu")(CodesKernel)
    assert type(kernel_for(get_format("int4-g128"), "cpu")) is CodesKernel
    assert type(kernel_for(get_format("int8"), torch.device("cpu"))) is CodesKernel
    assert type(kernel_for(get_format("nf4"), "cpu")) is ReferenceKernel  # other family
    assert type(kernel_for(get_format("int4-g128"), "meta")) is ReferenceKernel  # other device


def test_kernel_that_does_not_support_a_format_falls_back(empty_registry):
    @register_kernel("int", "cpu")
    class FourBitOnly(CodesKernel):
        @classmethod
        def supports(cls, fmt):
            return fmt.bits == 4

    assert type(kernel_for(get_format("int4-g32"), "cpu")) is FourBitOnly
    assert type(kernel_for(get_format("int3-g128"), "cpu")) is ReferenceKernel


def test_registering_twice_is_refused(empty_registry):
    register_kernel("nf4", "cuda")(CodesKernel)
    with pytest.raises(ValueError, match="already registered"):
        register_kernel("nf4", "cuda")(ReferenceKernel)


def test_every_format_family_is_a_registry_key():
    families = {get_format(name).family for name in FORMATS}
    assert families == {"int", "nf4", "fp8", "mxfp4", "float"}


# -- the reference kernel ----------------------------------------------------------------
@pytest.mark.parametrize("name", FORMATS)
@pytest.mark.parametrize("shape", SHAPES)
def test_reference_forward_and_backward_match_float64(name, shape):
    module = quant_linear(name, shape)
    weight64 = get_format(name).dequantize(module.qtensor, torch.float64)
    x = torch.randn(3, 5, shape[1])
    y = ReferenceKernel().forward(module, x)
    assert y.dtype == torch.float32 and y.shape == (3, 5, shape[0])
    torch.testing.assert_close(y.double(), x.double() @ weight64.T, rtol=1e-5, atol=1e-5)
    grad_y = torch.randn(3, 5, shape[0])
    grad_x = ReferenceKernel().backward_input(module, grad_y)
    torch.testing.assert_close(grad_x.double(), grad_y.double() @ weight64, rtol=1e-5, atol=1e-5)


def test_reference_forward_in_bfloat16():
    module = quant_linear("int4-g128", (96, 576))
    x = torch.randn(7, 576).bfloat16()
    y = ReferenceKernel().forward(module, x)
    assert y.dtype == torch.bfloat16
    expected = x.double() @ module.dequantize_weight(torch.bfloat16).double().T
    torch.testing.assert_close(y.double(), expected, rtol=2e-2, atol=2e-2)


# -- the dense kernel ---------------------------------------------------------------------
@pytest.mark.parametrize("name", ("int4-g128", "nf4-dq", "mxfp4"))
def test_dense_kernel_matches_the_reference_and_keeps_checkpoints_canonical(name):
    module = quant_linear(name, (96, 576), bias=True)
    state = {k: v.clone() for k, v in module.state_dict().items()}
    x = torch.randn(4, 576)
    expected = ReferenceKernel().forward(module, x)
    kernel = DenseKernel(torch.float32)
    kernel.prepare(module)
    assert module.kernel_dense_weight.shape == (96, 576)
    assert torch.equal(kernel.forward(module, x), expected)
    grad_y = torch.randn(4, 96)
    assert torch.equal(kernel.backward_input(module, grad_y), ReferenceKernel().backward_input(module, grad_y))
    assert module.state_dict().keys() == state.keys()
    assert all(torch.equal(module.state_dict()[k], v) for k, v in state.items())


def test_available_memory():
    assert available_memory(torch.device("cpu")) > 0
    assert available_memory(torch.device("meta")) == 0


# -- per-token INT8 activation fake quantization -----------------------------------------
def int8_per_token_numpy(x: np.ndarray) -> np.ndarray:
    """Independent reference, one token at a time in float32 (np.round rounds half to even)."""
    rows = x.reshape(-1, x.shape[-1]).astype(np.float32)
    out = np.zeros_like(rows)
    for i, row in enumerate(rows):
        scale = np.abs(row).max() / np.float32(127)
        if scale > 0:
            out[i] = np.clip(np.round(row / scale), -128, 127) * scale
    return out.reshape(x.shape)


@pytest.mark.parametrize("shape", ((3, 5, 576), (1, 200), (7, 75)))
def test_int8_per_token_matches_numpy(shape):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0)) * torch.logspace(-3, 2, shape[-1])  # outlier channels, as in real activations
    x[..., 0, :] = 0.0  # an all-zero token
    y = fake_quantize_int8_per_token(x)
    assert y.dtype == x.dtype and y.shape == x.shape
    np.testing.assert_array_equal(y.numpy(), int8_per_token_numpy(x.numpy()))
    assert torch.all(y[..., 0, :] == 0)
    # at most 256 distinct levels per token, and the token's absmax is kept exactly
    token = y.reshape(-1, shape[-1])[-1]
    assert token.unique().numel() <= 256
    torch.testing.assert_close(token.abs().max(), x.reshape(-1, shape[-1])[-1].abs().max())


def test_int8_per_token_rounds_half_to_even():
    x = torch.tensor([[127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.49]])  # scale is exactly 1
    y = fake_quantize_int8_per_token(x)
    assert y.tolist() == [[127.0, 0.0, 2.0, 2.0, -0.0, -2.0, -2.0, 3.0]]


@pytest.mark.parametrize("seed", range(5))
def test_int8_per_token_bfloat16_and_straight_through_gradient(seed):
    x = (torch.randn(4, 96, generator=torch.Generator().manual_seed(seed)) * 3).bfloat16()
    y = fake_quantize_int8_per_token(x)
    assert y.dtype == torch.bfloat16  # computed in float32, rounded to bfloat16 at the end
    assert torch.equal(y, torch.from_numpy(int8_per_token_numpy(x.float().numpy())).to(torch.bfloat16))
    leaf = x.float().requires_grad_()
    out = fake_quantize_int8_per_token(leaf)
    assert torch.equal(out.detach(), fake_quantize_int8_per_token(leaf.detach()))
    out.mul(torch.arange(96.0)).sum().backward()
    assert torch.equal(leaf.grad, torch.arange(96.0).expand(4, 96))
