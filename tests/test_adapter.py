"""The multi-patch adapter on a small testbed DiT: base path, init, LoRA switching, saving, errors."""

import copy
import json

import pytest
import torch
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file, save_file

from ddit.adapter import CONFIG_NAME, WEIGHTS_NAME, MultiPatchTransformer
from ddit.backbones import patchify
from ddit.checkpoint import CheckpointError
from ddit.testbed.base_model import build_base_model

TINY = dict(num_layers=2, num_attention_heads=2, attention_head_dim=8)


def backbone(**overrides):
    """A tiny testbed DiT whose zero-initialised layers (adaLN, output) are random, so outputs are not zero."""
    torch.manual_seed(0)
    model = build_base_model(**{**TINY, **overrides})
    for p in model.parameters():
        if not p.any():
            torch.nn.init.normal_(p, std=0.05)
    return model.eval()


def inputs(size=32):
    g = torch.Generator().manual_seed(1)
    return dict(hidden_states=torch.randn(2, 3, size, size, generator=g), timestep=torch.tensor([100.0, 800.0]),
                class_labels=torch.tensor([0, 3]))


def perturb(params):
    """Move parameters away from their initial values, as training would (LoRA starts as a no-op)."""
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in params:
            p.add_(0.05 * torch.randn(p.shape, generator=g))


def run(model, size, **kw):
    with torch.no_grad():
        return model(**{**inputs(), **kw}, patch_size=size, return_dict=False)[0]


def test_wraps_the_testbed_dit_and_passes_its_attributes_through():
    raw = backbone()
    model = MultiPatchTransformer(raw)
    assert model.patch_sizes == (2, 4, 8) and model.base_patch_size == 2
    assert model.config is raw.config and model.dtype == torch.float32 and model.device == raw.device
    assert MultiPatchTransformer(backbone(), patch_sizes=[4]).patch_sizes == (2, 4)


def test_base_path_is_unchanged_after_training_the_adapter():
    reference = backbone()
    model = MultiPatchTransformer(copy.deepcopy(reference))
    perturb(model.trainable_parameters())
    with torch.no_grad():
        expected = reference(**inputs(), return_dict=False)[0]
    for size in (None, 2):
        assert (run(model, size) - expected).abs().max() <= 1e-6
    assert type(model.backbone) is type(reference) and model.backbone.config == reference.config


def test_only_the_new_parameters_train():
    model = MultiPatchTransformer(backbone())
    new = {id(p) for p in model.trainable_parameters()}
    heads = {id(p) for p in model.heads.parameters()}
    lora = {id(p) for n, p in model.backbone.named_parameters() if ".lora_" in n}
    assert new == heads | lora and len(lora) == 2 * 2 * 12  # A and B, per size, per LoRA layer
    assert all(p.requires_grad == (id(p) in new) for p in model.parameters())
    assert set(model.adapter_state_dict()) == {n for n, p in model.named_parameters() if id(p) in new}


def test_heads_start_from_the_base_layers():
    """PPFlow: a coarse token is the mean of the fine tokens it covers; its output the fine one, repeated."""
    model = MultiPatchTransformer(backbone())
    x = inputs()["hidden_states"]
    proj = model.backbone.pos_embed.proj
    fine = proj(x)  # (B, D, 16, 16) fine tokens before positions
    for size, k in ((4, 2), (8, 4)):
        head = model.heads[str(size)]
        mean = torch.nn.functional.avg_pool2d(fine, k).flatten(2).transpose(1, 2)
        assert torch.allclose(head.embed(patchify(x, (size, size))), mean, atol=1e-5)
        token = torch.randn(1, 1, fine.shape[1])
        base_out = model.backbone.proj_out_2(token).reshape(2, 2, 3).permute(2, 0, 1)  # (C, p, p)
        coarse_out = head.unembed(token).reshape(3, size, size)
        assert torch.allclose(coarse_out, base_out.repeat(1, k, k), atol=1e-6)
        assert not head.residual.weight.any()


def test_each_coarse_size_uses_only_its_own_lora():
    model = MultiPatchTransformer(backbone())
    before = {size: run(model, size) for size in (4, 8)}
    perturb([p for n, p in model.backbone.named_parameters() if "lora_B.patch8" in n])
    assert torch.equal(run(model, 4), before[4])
    assert not torch.allclose(run(model, 8), before[8])


def test_a_shared_lora_serves_every_coarse_size_and_survives_saving(tmp_path):
    model = MultiPatchTransformer(backbone(), shared_lora=True)
    lora = [n for n, p in model.backbone.named_parameters() if ".lora_" in n]
    assert len(lora) == 2 * 12 and all(".coarse" in n for n in lora)  # A and B, per LoRA layer
    before = {size: run(model, size) for size in (4, 8)}
    perturb([p for n, p in model.backbone.named_parameters() if "lora_B" in n])
    assert all(not torch.allclose(run(model, size), before[size]) for size in (4, 8))
    model.save_pretrained(tmp_path)
    loaded = MultiPatchTransformer.from_pretrained(backbone(), tmp_path)
    assert loaded.shared_lora and torch.equal(run(loaded, 8), run(model, 8))


def test_save_and_load_round_trip(tmp_path):
    model = MultiPatchTransformer(backbone())
    perturb(model.trainable_parameters())
    model.save_pretrained(tmp_path)
    meta = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert meta["backbone_class"] == "DiTTransformer2DModel" and meta["patch_sizes"] == [2, 4, 8]
    assert (tmp_path / "adapter_config.json").exists()
    loaded = MultiPatchTransformer.from_pretrained(backbone(), tmp_path)
    for size in model.patch_sizes:
        assert torch.equal(run(loaded, size), run(model, size))


def test_adapter_of_another_backbone_is_refused_naming_both(tmp_path):
    MultiPatchTransformer(backbone()).save_pretrained(tmp_path)
    other = backbone(num_layers=3)
    with pytest.raises(CheckpointError, match=r"made for DiTTransformer2DModel \(config \w+\), not for this "
                                              r"DiTTransformer2DModel \(config \w+\)"):
        MultiPatchTransformer.from_pretrained(other, tmp_path)


def test_truncated_adapter_file_is_named(tmp_path):
    MultiPatchTransformer(backbone()).save_pretrained(tmp_path)
    weights = tmp_path / WEIGHTS_NAME
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=str(weights)):
        MultiPatchTransformer.from_pretrained(backbone(), tmp_path)


def test_weights_of_another_layout_are_refused_and_leave_the_backbone_stock(tmp_path):
    MultiPatchTransformer(backbone()).save_pretrained(tmp_path)
    weights = tmp_path / WEIGHTS_NAME
    state = load_file(weights)
    state.pop(sorted(state)[0])
    save_file(state, weights)
    stock = backbone()
    with pytest.raises(CheckpointError, match="do not fit this adapter"):
        MultiPatchTransformer.from_pretrained(stock, tmp_path)
    assert not any(isinstance(m, LoraLayer) for m in stock.modules())


def test_missing_adapter_is_named(tmp_path):
    with pytest.raises(CheckpointError, match=f"no multi-patch adapter at {tmp_path}"):
        MultiPatchTransformer.from_pretrained(backbone(), tmp_path)


def test_patch_size_errors_say_what_would_work():
    model = MultiPatchTransformer(backbone())
    with pytest.raises(ValueError, match="patch size 3 is not a multiple of the base patch size 2; "
                                         "this adapter runs at 2, 4, 8"):
        run(model, 3)
    with pytest.raises(ValueError, match="patch size 16 is not one this adapter was built for; it runs at 2, 4, 8"):
        run(model, 16)
    with pytest.raises(ValueError, match="patch size 8 does not divide the 12x12 latent; sizes that do: 2, 4"):
        run(model, 8, hidden_states=torch.randn(2, 3, 12, 12))
    with pytest.raises(ValueError, match="multiples of the base patch size 2, not \\[3\\]"):
        MultiPatchTransformer(backbone(), patch_sizes=[3, 4])


def test_dit_refuses_a_non_square_latent():
    model = MultiPatchTransformer(backbone())
    for size in (None, 4):
        with pytest.raises(ValueError, match="DiTTransformer2DModel needs a square latent, not 32x16"):
            run(model, size, hidden_states=torch.randn(2, 3, 32, 16))


def test_one_backward_over_several_sizes_reaches_every_size_lora():
    """Distillation sums the sizes' losses before one backward: switching sizes must not freeze the last one."""
    model = MultiPatchTransformer(backbone())
    perturb(model.trainable_parameters())
    loss = sum(model(**inputs(), patch_size=size, return_dict=False)[0].square().mean() for size in (4, 8))
    loss.backward()
    lora = {n: p for n, p in model.backbone.named_parameters() if ".lora_" in n}
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora.values())


def test_detach_gives_the_stock_backbone_and_attach_brings_the_adapter_back():
    reference = backbone()
    model = MultiPatchTransformer(copy.deepcopy(reference))
    perturb(model.trainable_parameters())
    coarse = run(model, 4)
    stock = model.detach()
    assert not any(".lora_" in n or "base_layer" in n for n in stock.state_dict())
    assert not hasattr(stock, "peft_config")
    assert stock.state_dict().keys() == reference.state_dict().keys()
    with pytest.raises(RuntimeError, match="attach"):
        run(model, 4)
    model.attach()
    assert torch.equal(run(model, 4), coarse)


def test_gradient_checkpointing_reaches_the_coarse_path():
    model = MultiPatchTransformer(backbone())
    model.enable_gradient_checkpointing()  # the backbone's own method, through the wrapper
    assert model.backbone.gradient_checkpointing
    calls = []
    model.backbone.transformer_blocks[0].register_forward_pre_hook(lambda *_: calls.append(1))
    out = model(**inputs(), patch_size=4, return_dict=False)[0]
    out.square().mean().backward()
    assert len(calls) == 2  # the forward, and its recomputation in the backward
    assert all(p.grad is not None for p in model.heads["4"].parameters())
