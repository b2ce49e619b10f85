"""QLoRA on lowbit formats: peft's LoRA on QuantLinear (``lowbit.integrations.peft``), trained on a
frozen 4-bit base that stays quantized."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

import lowbit
from lowbit.nn import QuantLinear, quantized_linears
from tiny_models import tiny_tokens

peft = pytest.importorskip("peft", reason="peft is in the test extra: pip install -e .[test]")
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training  # noqa: E402

from lowbit.integrations.peft import LoraQuantLinear, register  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _lora(model, **kwargs):
    return get_peft_model(model, register(LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS, **kwargs)))


@pytest.mark.parametrize("scheme", ["nf4-dq", "int4-g128"])
def test_a_lora_training_step_on_a_4_bit_base_reduces_the_loss(tiny_model_dir, scheme):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, quantization_config=lowbit.LowbitConfig(scheme=scheme))
    parts = {name: {p: getattr(m, f"weight_{p}").clone() for p in m.part_names} for name, m in quantized_linears(model).items()}
    model = prepare_model_for_kbit_training(model)  # sees is_loaded_in_4bit: gradient checkpointing on
    assert model.is_gradient_checkpointing
    model = _lora(model)
    layers = [m for m in model.modules() if isinstance(m, LoraQuantLinear)]
    assert len(layers) == len(parts) and all(isinstance(m.base_layer, QuantLinear) for m in layers)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    tokens = tiny_tokens(4, 32)
    model.train()
    losses = []
    for _ in range(5):
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5, losses
    for name, module in quantized_linears(model).items():  # the base is frozen and still packed
        key = name.removeprefix("base_model.model.").removesuffix(".base_layer")
        assert all(torch.equal(getattr(module, f"weight_{p}"), t) for p, t in parts[key].items()), name
        assert not hasattr(module, "weight") and not hasattr(module, "qweight")  # the device anchor is gone


def test_an_adapter_starts_as_the_identity_and_is_not_merged_into_a_quantized_base(tiny_model_dir):
    model = lowbit.quantize(str(tiny_model_dir), "int4-g32", progress=False)
    tokens = tiny_tokens()
    with torch.no_grad():
        before = model(tokens).logits
        wrapped = _lora(model)
        assert torch.equal(wrapped(input_ids=tokens).logits, before)  # lora_B starts at zero
    with pytest.raises(lowbit.LowbitError, match="cannot be merged"):
        wrapped.merge_and_unload()


def test_unsupported_lora_options_are_refused(tiny_model_dir):
    model = lowbit.quantize(str(tiny_model_dir), "int4-g32", progress=False)
    with pytest.raises(lowbit.LowbitError, match="DoRA"):
        _lora(model, use_dora=True)


@pytest.mark.heavy
@pytest.mark.parametrize("scheme", ["nf4-dq", "int4-g128"])
def test_qlora_on_smollm2_reduces_the_loss_on_a_small_text(scheme):
    """Issue 15's proof on the real model: SmolLM2-135M quantized while transformers loads it,
    LoRA on every decoder linear, a few AdamW steps on lowbit's built-in sample text."""
    from lowbit.gguf_cache import entry_directory
    from lowbit.sources import builtin_sample_path, default_model_path

    try:
        lowbit.load("smollm2-135m")  # fills lowbit's cache of the float model
    except lowbit.LowbitError as error:
        pytest.skip(str(error))
    directory = entry_directory(default_model_path())
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(directory, quantization_config=lowbit.LowbitConfig(scheme=scheme))
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(directory)(builtin_sample_path().read_text(), return_tensors="pt")["input_ids"][:, :256].reshape(2, 128)
    model = _lora(prepare_model_for_kbit_training(model))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    model.train()
    losses = []
    for _ in range(4):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses
