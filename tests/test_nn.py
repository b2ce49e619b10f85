"""QuantLinear: parsed format and canonical buffers, forward against float64 dense matmuls,
autograd that keeps no dense weight (QLoRA-style adapters on a frozen 4-bit tiny model),
kernel choice per device, the activation quantizer, the dense cache, and the module helpers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tiny_models import tiny_model, tiny_tokens
from torch import nn

from lowbit import kernels
from lowbit.formats import get_format
from lowbit.kernels import (
    DenseKernel,
    Kernel,
    ReferenceKernel,
    fake_quantize_int8_per_token,
    register_kernel,
)
from lowbit.nn import (
    QuantLinear,
    dense_cache,
    dense_weight,
    is_linear,
    linear_shape,
    quantized_linears,
    set_submodule,
    unique_state_dict,
)
from lowbit.qtensor import QTensor

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def random_weight(shape: tuple[int, int], seed: int = 0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 0.05


def quant_linear(name: str, shape: tuple[int, int], bias: bool = False, seed: int = 0) -> QuantLinear:
    b = torch.randn(shape[0], generator=torch.Generator().manual_seed(seed + 1)) if bias else None
    return QuantLinear.from_qtensor(get_format(name).quantize(random_weight(shape, seed)), b)


def quantize_decoder(model: nn.Module, name: str) -> nn.Module:
    """Swap every decoder linear for a QuantLinear of ``fmt.quantize(weight)`` (no pipeline)."""
    fmt = get_format(name)
    for module_name, module in list(model.model.layers.named_modules(prefix="model.layers")):
        if isinstance(module, nn.Linear):
            set_submodule(model, module_name, QuantLinear.from_qtensor(fmt.quantize(module.weight.data), module.bias))
    return model


def dequantized_copy(model: nn.Module) -> nn.Module:
    """The same model with every QuantLinear replaced by an nn.Linear holding its dequantized weight."""
    import copy

    dense = copy.deepcopy(model)
    for name, module in quantized_linears(dense).items():
        linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
        linear.weight.data = module.dequantize_weight(torch.float32)
        if module.bias is not None:
            linear.bias.data = module.bias.data.clone()
        set_submodule(dense, name, linear)
    return dense


class LoRA(nn.Module):
    """A trainable low-rank adapter beside a frozen base layer (what peft's LoRA adds)."""

    def __init__(self, base: nn.Module, rank: int = 4):
        super().__init__()
        self.base = base
        out_features, in_features = linear_shape(base)
        self.a = nn.Parameter(torch.randn(rank, in_features) * 0.1)
        self.b = nn.Parameter(torch.randn(out_features, rank) * 0.1)

    def forward(self, x):
        return self.base(x) + F.linear(F.linear(x, self.a), self.b)


def add_adapters(model: nn.Module, seed: int = 3) -> nn.Module:
    torch.manual_seed(seed)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    for name, module in list(model.model.layers.named_modules(prefix="model.layers")):
        if isinstance(module, (nn.Linear, QuantLinear)):
            set_submodule(model, name, LoRA(module))
    return model



@pytest.fixture(autouse=True)
def seeded():
    torch.manual_seed(0)

# -- the module ------------------------------------------------------------------------
def test_holds_the_parsed_format_and_canonical_buffers():
    fmt = get_format("int4-g128")
    qtensor = fmt.quantize(random_weight((96, 576)))
    module = QuantLinear.from_qtensor(qtensor, torch.randn(96))
    assert module.format is fmt and module.format_name == "int4-g128"
    assert not isinstance(module, nn.Linear)
    assert set(module.state_dict()) == {"weight_packed", "weight_scale", "weight_zero", "bias"}
    assert [name for name, _ in module.named_parameters()] == ["bias"] and not module.bias.requires_grad
    rebuilt = module.qtensor
    assert isinstance(rebuilt, QTensor) and rebuilt.format is fmt and rebuilt.shape == (96, 576)
    assert all(torch.equal(rebuilt.parts[k], v) for k, v in qtensor.parts.items())
    torch.testing.assert_close(module.dequantize_weight(), fmt.dequantize(qtensor))
    assert module.dequantize_weight(torch.bfloat16).dtype == torch.bfloat16
    assert "format=int4-g128" in repr(module) and "input_quantizer" not in repr(module)
    direct = QuantLinear(576, 96, fmt, qtensor.parts)
    assert direct.format is fmt and direct.bias is None and direct.dequantize_weight().dtype == torch.float32


@pytest.mark.parametrize("name", ("int4-g128", "int3-g128", "nf4-dq", "fp8", "mxfp4", "bf16"))
@pytest.mark.parametrize("lead", ((7,), (2, 5)))
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
def test_forward_matches_a_dense_float64_matmul(name, lead, dtype):
    module = quant_linear(name, (200, 576), bias=True)
    weight64 = get_format(name).dequantize(module.qtensor, torch.float64)
    x = torch.randn(*lead, 576).to(dtype)
    y = module(x)
    assert y.dtype == dtype and y.shape == (*lead, 200)
    expected = x.double() @ weight64.T + module.bias.double()
    tolerance = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(y.double(), expected, rtol=tolerance, atol=tolerance)


# -- autograd --------------------------------------------------------------------------
@pytest.mark.parametrize("shape", ((200, 576), (33, 75)))
@pytest.mark.parametrize("lead", ((6,), (2, 3)))
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
def test_input_gradient_matches_the_dense_weight(shape, lead, dtype):
    module = quant_linear("int4-g32", shape, bias=True)
    x = torch.randn(*lead, shape[1], dtype=dtype, requires_grad=True)
    grad_y = torch.randn(*lead, shape[0], dtype=dtype)
    module(x).backward(grad_y)
    reference_x = x.detach().clone().requires_grad_()
    F.linear(reference_x, module.dequantize_weight(dtype), module.bias.to(dtype)).backward(grad_y)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    assert x.grad.dtype == dtype
    torch.testing.assert_close(x.grad, reference_x.grad, rtol=tolerance, atol=tolerance)
    expected64 = grad_y.double() @ module.dequantize_weight(torch.float64)
    torch.testing.assert_close(x.grad.double(), expected64, rtol=tolerance * 3, atol=tolerance * 3)
    assert module.bias.grad is None and not any(b.requires_grad for b in module.buffers())


def saved_tensors(run) -> list[torch.Tensor]:
    """Every tensor autograd saves for backward while ``run()`` runs forward and backward."""
    saved = []

    def pack(tensor):
        saved.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        run()
    return saved


def unique_bytes(tensors: list[torch.Tensor]) -> int:
    seen = {(t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape)): t for t in tensors}
    return sum(t.numel() * t.element_size() for t in seen.values())


def test_training_adapters_on_a_4bit_base_saves_no_dense_weight():
    tokens = tiny_tokens(samples=1, length=8)
    quantized = add_adapters(quantize_decoder(tiny_model("llama"), "int4-g32"))
    dense = add_adapters(dequantized_copy(quantize_decoder(tiny_model("llama"), "int4-g32")))
    linears = [m.base for m in quantized.modules() if isinstance(m, LoRA)]
    assert len(linears) == 14 and all(isinstance(m, QuantLinear) for m in linears)
    weight_shapes = {(m.out_features, m.in_features) for m in linears}
    weight_bytes = sum(m.out_features * m.in_features * 4 for m in linears)

    def train_step(model):
        return lambda: model(tokens, labels=tokens).loss.backward()

    saved = saved_tensors(train_step(quantized))
    dense_saved = saved_tensors(train_step(dense))

    def weight_like(tensor):
        return tuple(tensor.shape) in weight_shapes or tuple(tensor.shape[::-1]) in weight_shapes

    assert not any(weight_like(tensor) for tensor in saved)
    # the check can see them: the dense model saves every weight whose input needs a gradient,
    # all but layer 0's q, k and v (their input comes from the frozen embedding)
    assert sum(weight_like(tensor) for tensor in dense_saved) == len(linears) - 3
    # the dense model saves those weights (and each input) on top of what the 4-bit one saves,
    # which is far below the dense weights themselves
    dense_weight_bytes = unique_bytes([tensor for tensor in dense_saved if weight_like(tensor)])
    assert unique_bytes(saved) + dense_weight_bytes <= unique_bytes(dense_saved)
    assert unique_bytes(saved) < 0.5 * weight_bytes

    # and the adapters learn exactly what they would on the dequantized dense base
    trained = {name: p.grad for name, p in quantized.named_parameters() if p.grad is not None}
    expected = {name: p.grad for name, p in dense.named_parameters() if p.grad is not None}
    assert trained.keys() == expected.keys() and len(trained) == 2 * len(linears)
    for name, grad in trained.items():
        torch.testing.assert_close(grad, expected[name], rtol=1e-4, atol=1e-6, msg=name)


def test_without_gradients_the_kernel_is_called_directly():
    module = quant_linear("nf4", (96, 576), bias=True)
    x = torch.randn(3, 576)
    expected = F.linear(x, module.dequantize_weight(), module.bias)
    with torch.no_grad():
        assert module(x).grad_fn is None
    with torch.inference_mode():
        torch.testing.assert_close(module(x), expected)
    assert module(x).grad_fn is None  # grad mode, but nothing requires grad
    assert saved_tensors(lambda: module(x.requires_grad_()).sum().backward()) == []


# -- kernels ---------------------------------------------------------------------------
class Float64Kernel(Kernel):
    """Keeps a float64 copy as a non-persistent buffer at prepare time; counts its calls."""

    prepared = 0

    def prepare(self, module):
        type(self).prepared += 1
        module.register_buffer("kernel_weight64", module.dequantize_weight(torch.float64), persistent=False)

    def forward(self, module, x):
        return (x.double() @ module.kernel_weight64.T).to(x.dtype)


@pytest.fixture
def float64_kernel(monkeypatch):
    monkeypatch.setattr(kernels, "KERNELS", {})
    monkeypatch.setattr(Float64Kernel, "prepared", 0)
    register_kernel("int", "cpu")(Float64Kernel)
    return Float64Kernel


def test_kernel_is_chosen_lazily_and_checkpoints_stay_canonical(float64_kernel):
    module = quant_linear("int4-g128", (96, 576), bias=True)
    canonical = {k: v.clone() for k, v in module.state_dict().items()}
    assert float64_kernel.prepared == 0
    x = torch.randn(4, 576)
    y = module(x)
    assert type(module.kernel) is Float64Kernel and float64_kernel.prepared == 1
    module(x)
    assert float64_kernel.prepared == 1  # prepared once per device
    assert "kernel_weight64" in dict(module.named_buffers())
    torch.testing.assert_close(y, x @ module.dequantize_weight().T + module.bias)
    state = module.state_dict()
    assert state.keys() == canonical.keys() and all(torch.equal(state[k], v) for k, v in canonical.items())
    fresh = QuantLinear.from_qtensor(module.qtensor, module.bias)
    fresh.load_state_dict(state, strict=True)
    assert type(quant_linear("nf4", (8, 64)).kernel) is ReferenceKernel  # another family


def test_kernel_is_picked_again_after_moving(float64_kernel):
    module = quant_linear("int4-g128", (96, 576))
    module(torch.randn(2, 576))
    assert type(module.kernel) is Float64Kernel
    module.to("meta")
    assert type(module.kernel) is ReferenceKernel  # nothing registered for meta
    assert "kernel_weight64" not in dict(module.named_buffers())
    assert module(torch.randn(2, 576, device="meta")).device.type == "meta"


def test_loading_new_parts_prepares_the_kernel_again(float64_kernel):
    module = quant_linear("int4-g128", (96, 576), seed=0)
    other = quant_linear("int4-g128", (96, 576), seed=5)
    x = torch.randn(2, 576)
    module(x)
    module.load_state_dict(other.state_dict())
    torch.testing.assert_close(module(x), x @ other.dequantize_weight().T)
    assert float64_kernel.prepared == 2


def test_use_kernel_pins_a_kernel_and_none_goes_back(float64_kernel):
    module = quant_linear("int4-g128", (96, 576))
    module.use_kernel(DenseKernel(torch.float32))
    assert "kernel_dense_weight" in dict(module.named_buffers())  # prepared at once
    assert type(module.kernel) is DenseKernel
    module.use_kernel(None)
    assert [name for name, _ in module.named_buffers()] == ["weight_packed", "weight_scale", "weight_zero"]
    assert type(module.kernel) is Float64Kernel


# -- activation quantizer --------------------------------------------------------------
def test_input_quantizer_is_applied_first():
    module = quant_linear("int8", (96, 576), bias=True)
    assert module.input_quantizer is None
    x = torch.randn(2, 3, 576) * 4
    plain = module(x)
    module.input_quantizer = fake_quantize_int8_per_token
    assert "input_quantizer=fake_quantize_int8_per_token" in repr(module)
    scale = x.abs().amax(-1, keepdim=True) / 127
    x_int8 = torch.round(x / scale).clamp(-128, 127) * scale
    y = module(x)
    torch.testing.assert_close(y, F.linear(x_int8, module.dequantize_weight(), module.bias))
    assert not torch.allclose(y, plain, rtol=0, atol=1e-6)  # the quantizer really ran
    # and gradients pass straight through it
    leaf = x.clone().requires_grad_()
    module(leaf).sum().backward()
    torch.testing.assert_close(leaf.grad, module.dequantize_weight().sum(0).expand_as(x))


# -- the dense cache -------------------------------------------------------------------
@pytest.mark.parametrize("name", ("int4-g128", "nf4-dq"))
def test_dense_cache_gives_the_same_logits_and_frees_on_exit(name):
    model = quantize_decoder(tiny_model("llama"), name)
    tokens = tiny_tokens()
    canonical = set(model.state_dict())
    with torch.no_grad():
        expected = model(tokens).logits
        layers = quantized_linears(model).values()
        with dense_cache(model) as cached_bytes:
            assert cached_bytes == sum(m.out_features * m.in_features * 4 for m in layers)
            assert all(type(m.kernel) is DenseKernel for m in layers)
            assert set(model.state_dict()) == canonical
            assert torch.equal(model(tokens).logits, expected)
        assert all(type(m.kernel) is ReferenceKernel for m in layers)
    assert not any("dense" in name for name, _ in model.named_buffers())
    assert set(model.state_dict()) == canonical


def test_dense_cache_stays_within_its_budget_in_module_order():
    model = quantize_decoder(tiny_model("llama"), "int4-g32")
    layers = list(quantized_linears(model).values())
    sizes = [m.out_features * m.in_features * 4 for m in layers]
    budget = sizes[0] + sizes[1] + sizes[2] + 1  # q, k, v of layer 0 fit; o (96x96) does not
    assert sizes[3] > 1
    tokens = tiny_tokens()
    with torch.no_grad():
        expected = model(tokens).logits
        with dense_cache(model, max_bytes=budget) as cached_bytes:
            kinds = [type(m.kernel) for m in layers]
            assert torch.equal(model(tokens).logits, expected)
    first_fitting = []  # every later layer that still fits is cached too
    left = budget
    for size in sizes:
        first_fitting.append(size <= left)
        left -= size if size <= left else 0
    assert kinds == [DenseKernel if fits else ReferenceKernel for fits in first_fitting]
    assert kinds[:4] == [DenseKernel, DenseKernel, DenseKernel, ReferenceKernel]
    assert cached_bytes == sum(s for s, fits in zip(sizes, first_fitting) if fits)


def test_dense_cache_uses_the_model_dtype_and_restores_a_chosen_kernel():
    model = quantize_decoder(tiny_model("llama"), "int4-g128").to(torch.bfloat16)
    pinned = quantized_linears(model)["model.layers.0.mlp.down_proj"]
    chosen = ReferenceKernel()
    pinned.use_kernel(chosen)
    with dense_cache(model) as cached_bytes:
        assert pinned.kernel_dense_weight.dtype == torch.bfloat16
        assert cached_bytes == sum(m.out_features * m.in_features * 2 for m in quantized_linears(model).values())
    assert pinned.kernel is chosen


# -- helpers ---------------------------------------------------------------------------
def test_linear_helpers():
    from transformers.pytorch_utils import Conv1D

    linear, conv = nn.Linear(75, 33), Conv1D(33, 75)  # Conv1D(nf=out, nx=in) stores (in, out)
    module = quant_linear("int4-g32", (33, 75))
    assert is_linear(linear) and is_linear(conv) and not is_linear(module) and not is_linear(nn.Embedding(3, 4))
    assert torch.equal(dense_weight(linear), linear.weight) and dense_weight(linear).data_ptr() == linear.weight.data_ptr()
    assert not dense_weight(linear).requires_grad
    assert torch.equal(dense_weight(conv), conv.weight.data.t()) and dense_weight(conv).shape == (33, 75)
    assert linear_shape(linear) == linear_shape(conv) == linear_shape(module) == (33, 75)
    with pytest.raises(AttributeError, match="not a linear layer"):
        linear_shape(nn.Embedding(3, 4))


def test_module_helpers():
    model = quantize_decoder(tiny_model("llama"), "int4-g32")  # tied embeddings
    names = list(quantized_linears(model))
    assert len(names) == 14 and names[0] == "model.layers.0.self_attn.q_proj"
    state = unique_state_dict(model)
    assert "model.embed_tokens.weight" in state and "lm_head.weight" not in state
    assert set(state) == set(model.state_dict()) - {"lm_head.weight"}
    replacement = nn.Identity()
    set_submodule(model, "model.layers.1.mlp", replacement)
    assert model.model.layers[1].mlp is replacement
    set_submodule(model, "lm_head", replacement)
    assert model.lm_head is replacement


# -- CUDA ------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ("int4-g128", "nf4-dq", "fp8", "mxfp4"))
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
@pytest.mark.cuda
@needs_cuda
def test_cuda_forward_backward_and_cache_match_the_cpu_reference(name, dtype):
    module = quant_linear(name, (200, 576), bias=True)
    x = torch.randn(2, 3, 576, dtype=dtype)
    grad_y = torch.randn(2, 3, 200, dtype=dtype)
    cpu_x = x.clone().requires_grad_()
    cpu_y = module(cpu_x)
    cpu_y.backward(grad_y)
    module.to("cuda")
    assert module._parts_device().type == "cuda"
    gpu_x = x.cuda().requires_grad_()
    gpu_y = module(gpu_x)
    gpu_y.backward(grad_y.cuda())
    tolerance = 1e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(gpu_y.cpu(), cpu_y.detach(), rtol=tolerance, atol=tolerance)
    torch.testing.assert_close(gpu_x.grad.cpu(), cpu_x.grad, rtol=tolerance, atol=tolerance)
    with dense_cache(module, dtype=dtype) as cached_bytes, torch.no_grad():
        assert cached_bytes == 200 * 576 * dtype.itemsize
        torch.testing.assert_close(module(x.cuda()).cpu(), cpu_y.detach(), rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("cast", ["bfloat16", "half", "double"])
def test_casting_the_model_keeps_the_stored_parts(cast):
    """``model.to(dtype)`` / ``.half()`` cast float parameters, but a QuantLinear's parts keep
    their dtypes and bits (a float16 scale rounded to bfloat16 would change every weight);
    the bias is cast like any parameter, and a device move still moves the parts."""
    weight = torch.randn(6, 70, generator=torch.Generator().manual_seed(5))
    for name in ("int4-g32", "nf4-dq", "fp8", "mxfp4"):
        module = QuantLinear.from_qtensor(get_format(name).quantize(weight), torch.randn(6))
        before = {n: t.clone() for n, t in module.state_dict().items() if n != "bias"}
        getattr(module, cast)() if cast != "bfloat16" else module.to(torch.bfloat16)
        after = module.state_dict()
        for n, tensor in before.items():
            assert after[n].dtype == tensor.dtype and torch.equal(after[n], tensor), (name, n)
        assert module.bias.dtype == {"bfloat16": torch.bfloat16, "half": torch.float16, "double": torch.float64}[cast]
        module.to("meta")
        assert all(t.is_meta for t in module.state_dict().values())


def test_unique_state_dict_of_a_model_still_on_the_meta_device():
    """A lazily loaded model has no storage yet: tied tensors are still counted once, and
    distinct tensors of the same shape are not mistaken for one."""
    model = tiny_model("llama")  # tied embeddings
    expected = {name: (tuple(t.shape), t.dtype) for name, t in unique_state_dict(model).items()}
    model.to("meta")
    model.tie_weights()
    found = {name: (tuple(t.shape), t.dtype) for name, t in unique_state_dict(model).items()}
    assert found == expected
