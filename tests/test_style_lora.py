"""Style LoRAs beside ddit's adapter: a LoRA loaded with ``pipe.load_lora_weights`` before ``ddit.enable`` stays
unfused; ddit's adapters go into its layers beside its own, and coarse steps run it as base-size steps do. Checked
against the same LoRA fused into the weights, which ddit has always run (the coarse heads and LoRA see the fused
weights), on the tiny stock FLUX.1 pipeline."""

import pytest
import torch
from peft import LoraConfig
from peft.tuners.lora import LoraLayer
from peft.utils import get_peft_model_state_dict
from tiny_pipelines import build, latents

import ddit
from ddit.policies import FixedPolicy

STEPS, ATOL = 4, 1e-5
SCHEDULE = [8, 4, 8, 2]  # coarse and base steps in turn (FLUX.1's base patch is 2): every switch of the LoRA flags
# a style LoRA on layers ddit's LoRA also takes (to_q, to_k) and on layers it does not (the text stream's)
STYLE_TARGETS = ["to_q", "to_k", "add_q_proj", "ff_context.net.2"]


@pytest.fixture(scope="module")
def style_folder(tmp_path_factory):
    """A style LoRA saved as diffusers saves one (random weights, not zero)."""
    folder = tmp_path_factory.mktemp("style")
    pipe, _ = build("flux")
    torch.manual_seed(1)
    pipe.transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=STYLE_TARGETS,
                                            init_lora_weights=False), adapter_name="style")
    type(pipe).save_lora_weights(folder, transformer_lora_layers=get_peft_model_state_dict(pipe.transformer,
                                                                                         adapter_name="style"))
    return folder


@pytest.fixture(scope="module")
def adapter_folder(tmp_path_factory):
    """A ddit adapter whose heads and LoRA are not their initial values (LoRA B is zero at first)."""
    folder = tmp_path_factory.mktemp("adapter")
    pipe, _ = build("flux")
    adapter = ddit.MultiPatchTransformer(pipe.transformer)
    torch.manual_seed(2)
    with torch.no_grad():
        for p in adapter.trainable_parameters():
            p.add_(0.05 * torch.randn_like(p))
    adapter.save_pretrained(folder)
    return folder


def flux(style_folder=None, fused=False, scale=1.0):
    pipe, kwargs = build("flux")
    if style_folder is not None:
        pipe.load_lora_weights(style_folder, adapter_name="style")
        if fused:
            pipe.fuse_lora(lora_scale=scale)
            pipe.unload_lora_weights()
    return pipe, kwargs


def run(pipe, kwargs, **call):
    return latents(pipe(**kwargs(batch=2, steps=STEPS), **call))


def ddit_layers(module):
    return [m for m in module.modules() if isinstance(m, LoraLayer) and {"patch4", "patch8"} & set(m.lora_A)]


def test_baseline_runs_the_styled_stock_pipeline_and_disable_gives_it_back(style_folder, adapter_folder):
    pipe, kwargs = flux(style_folder)
    styled = run(pipe, kwargs)
    assert not torch.allclose(styled, run(*flux()), atol=1e-3)  # the style LoRA changes the output

    ddit.enable(pipe, adapter_folder, policy="baseline")
    assert torch.allclose(run(pipe, kwargs), styled, atol=ATOL, rtol=0)
    ddit.disable(pipe)
    assert not ddit_layers(pipe.transformer) and set(pipe.transformer.peft_config) == {"style"}
    assert torch.allclose(run(pipe, kwargs), styled, atol=ATOL, rtol=0)


@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_coarse_steps_run_an_unfused_style_lora_as_the_same_lora_fused(style_folder, adapter_folder, scale):
    """``joint_attention_kwargs={"scale": s}`` weights the style LoRA at every step and leaves ddit's alone."""
    fused, fused_kwargs = flux(style_folder, fused=True, scale=scale)
    ddit.enable(fused, adapter_folder, policy=FixedPolicy(SCHEDULE))
    expected = run(fused, fused_kwargs)

    pipe, kwargs = flux(style_folder)
    ddit.enable(pipe, adapter_folder, policy=FixedPolicy(SCHEDULE))
    call = {"joint_attention_kwargs": {"scale": scale}} if scale != 1 else {}
    assert torch.allclose(run(pipe, kwargs, **call), expected, atol=1e-4, rtol=0)
    assert sorted({(r["step"], r["patch_size"]) for r in ddit.summary(pipe).records}) == list(enumerate(SCHEDULE))

    plain, plain_kwargs = flux()
    ddit.enable(plain, adapter_folder, policy=FixedPolicy(SCHEDULE))
    assert not torch.allclose(run(plain, plain_kwargs), expected, atol=1e-3)  # the style is there to see


def test_set_adapters_and_disable_lora_while_enabled_reach_coarse_steps(style_folder, adapter_folder):
    expected = {}
    for key, source in (("half", flux(style_folder, fused=True, scale=0.5)), ("off", flux()),
                        ("on", flux(style_folder))):
        ddit.enable(source[0], adapter_folder, policy=FixedPolicy(SCHEDULE))
        expected[key] = run(*source)

    pipe, kwargs = flux(style_folder)
    ddit.enable(pipe, adapter_folder, policy=FixedPolicy(SCHEDULE))
    pipe.set_adapters(["style"], [0.5])
    assert pipe.get_active_adapters() == ["style"]
    assert torch.allclose(run(pipe, kwargs), expected["half"], atol=1e-4, rtol=0)
    pipe.disable_lora()
    assert torch.allclose(run(pipe, kwargs), expected["off"], atol=1e-4, rtol=0)
    pipe.enable_lora()
    pipe.transformer.set_adapters("style", 1.0)  # the transformer's own call, through the wrapper
    assert torch.allclose(run(pipe, kwargs), expected["on"], atol=1e-4, rtol=0)


def test_lora_changes_while_enabled_are_refused_and_a_changed_transformer_needs_its_adapter_again(
        style_folder, adapter_folder):
    pipe, kwargs = flux(style_folder)
    adapter = ddit.MultiPatchTransformer.from_pretrained(pipe.transformer, adapter_folder)
    ddit.enable(pipe, adapter, policy=FixedPolicy(SCHEDULE))
    before = run(pipe, kwargs)
    for change in ("load_lora_weights", "fuse_lora", "unload_lora_weights", "delete_adapters"):
        with pytest.raises(ValueError, match=f"pipe.{change} while ddit is enabled.*ddit.disable"):
            getattr(pipe, change)(style_folder) if change == "load_lora_weights" else getattr(pipe, change)()
    with pytest.raises(ValueError, match="fuse_lora: LoRA layers cannot be .*fused"):
        pipe.transformer.fuse_lora()
    assert torch.allclose(run(pipe, kwargs), before, atol=ATOL, rtol=0)

    ddit.disable(pipe)
    pipe.unload_lora_weights()
    with pytest.raises(ValueError, match=r"changed since it was built or detached \(FluxTransformer2DModel\.transformer_"):
        ddit.enable(pipe, adapter)  # its layers would bring the unloaded style LoRA back
    ddit.enable(pipe, adapter_folder, policy=FixedPolicy(SCHEDULE))
    plain, plain_kwargs = flux()
    ddit.enable(plain, adapter_folder, policy=FixedPolicy(SCHEDULE))
    assert torch.allclose(run(pipe, kwargs), run(plain, plain_kwargs), atol=ATOL, rtol=0)


def test_loras_ddit_cannot_run_beside_are_refused_naming_the_layer(style_folder):
    pipe, _ = flux(style_folder)
    pipe.fuse_lora()
    with pytest.raises(ValueError, match=r"transformer_blocks\.0\.attn\.to_q carries a LoRA .*fused into the "
                                         r"weights but not unloaded.*pipe\.unload_lora_weights"):
        ddit.MultiPatchTransformer(pipe.transformer)
    pipe.unload_lora_weights()
    ddit.MultiPatchTransformer(pipe.transformer)  # fused and unloaded: the adapter's heads copy the fused weights

    pipe, _ = flux()
    pipe.transformer.add_adapter(LoraConfig(r=2, target_modules=["x_embedder"]), adapter_name="embed")
    with pytest.raises(ValueError, match="x_embedder carries a LoRA .*patch embedding or output projection"):
        ddit.MultiPatchTransformer(pipe.transformer)

    pipe, _ = flux()
    pipe.transformer.add_adapter(LoraConfig(r=2, target_modules=["to_q"]), adapter_name="patch4")
    with pytest.raises(ValueError, match=r"LoRA adapters named \['patch4'\], which are ddit's"):
        ddit.MultiPatchTransformer(pipe.transformer)


def test_the_adapter_saves_and_trains_only_its_own_weights(style_folder, adapter_folder, tmp_path):
    pipe, kwargs = flux(style_folder)
    style = {n: p.detach().clone() for n, p in pipe.transformer.named_parameters() if ".style." in n}
    adapter = ddit.MultiPatchTransformer.from_pretrained(pipe.transformer, adapter_folder)
    assert not any(".style." in name for name in adapter.adapter_state_dict())
    trainable = {id(p) for p in adapter.trainable_parameters()}
    assert all(not p.requires_grad and id(p) not in trainable
               for n, p in pipe.transformer.named_parameters() if ".style." in n)
    adapter.save_pretrained(tmp_path)
    ddit.MultiPatchTransformer.from_pretrained(flux()[0].transformer, tmp_path)  # loads on an unstyled one

    ddit.enable(pipe, adapter, policy=FixedPolicy(SCHEDULE))
    with torch.no_grad():
        run(pipe, kwargs, joint_attention_kwargs={"scale": 0.3})
    assert all(torch.equal(p, style[n]) for n, p in adapter.backbone.named_parameters() if ".style." in n)
    layer = next(m for m in adapter.backbone.modules() if isinstance(m, LoraLayer) and "style" in m.scaling)
    assert layer.scaling["style"] == 1.0  # the scale is taken off again after each coarse call


def test_a_detached_adapter_keeps_all_its_weights_and_refuses_a_lora_loaded_into_its_own_layers(
        style_folder, adapter_folder, tmp_path):
    pipe, kwargs = flux(style_folder)
    adapter = ddit.MultiPatchTransformer.from_pretrained(pipe.transformer, adapter_folder)
    ddit.enable(pipe, adapter, policy=FixedPolicy(SCHEDULE))
    pipe.set_adapters(["style"], [0.5])
    assert not any(p.requires_grad for n, p in adapter.backbone.named_parameters() if ".style." in n)
    expected = run(pipe, kwargs)
    state = adapter.adapter_state_dict()
    assert any(".to_q.lora_A.patch4." in name for name in state)  # a layer the style LoRA shares

    ddit.disable(pipe)  # ddit's entries leave the style's layers: saving still finds them
    adapter.save_pretrained(tmp_path)
    assert adapter.adapter_state_dict().keys() == state.keys()
    ddit.enable(pipe, tmp_path, policy=FixedPolicy(SCHEDULE))
    assert torch.allclose(run(pipe, kwargs), expected, atol=ATOL, rtol=0)

    pipe, kwargs = flux()
    adapter = ddit.MultiPatchTransformer.from_pretrained(pipe.transformer, adapter_folder)
    pipe.load_lora_weights(style_folder, adapter_name="style")  # into ddit's own layers, after the adapter
    with pytest.raises(ValueError, match=r"changed since it was built or detached \(FluxTransformer2DModel\."
                                         r"transformer_blocks\.0\.attn\.to_q and 3 more.*load LoRAs before"):
        ddit.enable(pipe, adapter)
