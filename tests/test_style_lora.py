"""Style LoRAs beside ddit's adapter: a LoRA loaded with ``pipe.load_lora_weights`` before ``ddit.enable`` stays
unfused; ddit's adapters go into its layers beside its own, and coarse steps run it as base-size steps do. Checked
against the same LoRA fused into the weights, which ddit has always run (the coarse heads and LoRA see the fused
weights), on the tiny stock FLUX.1 pipeline."""

import pytest
import torch
from diffusers import FluxTransformer2DModel
from huggingface_hub.errors import HFValidationError
from peft import LoHaConfig, LoraConfig
from peft.tuners.lora import LoraLayer
from peft.utils import get_peft_model_state_dict
from tiny_pipelines import build, latents

import ddit
from ddit.policies import FixedPolicy

STEPS, ATOL = 4, 1e-5
SCHEDULE = [8, 4, 8, 2]  # coarse and base steps in turn (FLUX.1's base patch is 2): every switch of the LoRA flags
# a style LoRA on layers ddit's LoRA also takes (to_q, to_k) and on layers it does not (the text stream's)
STYLE_TARGETS = ["to_q", "to_k", "add_q_proj", "ff_context.net.2"]


def saved_lora(folder, targets, name, seed):
    """A LoRA saved as diffusers saves one (random weights, not zero)."""
    pipe, _ = build("flux")
    torch.manual_seed(seed)
    pipe.transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=targets, init_lora_weights=False),
                                 adapter_name=name)
    type(pipe).save_lora_weights(folder, transformer_lora_layers=get_peft_model_state_dict(pipe.transformer,
                                                                                         adapter_name=name))
    return folder


@pytest.fixture(scope="module")
def style_folder(tmp_path_factory):
    return saved_lora(tmp_path_factory.mktemp("style"), STYLE_TARGETS, "style", 1)


@pytest.fixture(scope="module")
def detail_folder(tmp_path_factory):
    """A second LoRA, on layers only ddit's LoRA takes besides it."""
    return saved_lora(tmp_path_factory.mktemp("detail"), ["to_v", "proj_mlp"], "detail", 3)


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


def test_loras_load_and_unload_while_enabled_and_the_adapter_is_built_again_around_them(
        style_folder, detail_folder, adapter_folder, tmp_path):
    expected = {}
    for key, folders in (("both", (style_folder, detail_folder)), ("style", (style_folder,)), ("none", ())):
        reference, reference_kwargs = flux()
        for folder, name in zip(folders, ("style", "detail")):
            reference.load_lora_weights(folder, adapter_name=name)
        ddit.enable(reference, adapter_folder, policy=FixedPolicy(SCHEDULE))
        expected[key] = run(reference, reference_kwargs)

    pipe, kwargs = flux(style_folder)
    ddit.enable(pipe, adapter_folder, policy=FixedPolicy(SCHEDULE))
    pipe.load_lora_weights(detail_folder, adapter_name="detail")
    assert pipe.get_list_adapters() == {"transformer": ["style", "detail"]}
    assert torch.allclose(run(pipe, kwargs), expected["both"], atol=ATOL, rtol=0)
    pipe.delete_adapters("detail")
    assert torch.allclose(run(pipe, kwargs), expected["style"], atol=ATOL, rtol=0)
    pipe.unload_lora_weights()
    assert torch.allclose(run(pipe, kwargs), expected["none"], atol=ATOL, rtol=0)
    assert sorted({(r["step"], r["patch_size"]) for r in ddit.summary(pipe).records}) == list(enumerate(SCHEDULE))

    pipe.load_lora_weights(style_folder, adapter_name="style")
    for name in ("fuse_lora", "unfuse_lora", "enable_lora_hotswap"):
        with pytest.raises(ValueError, match=f"pipe.{name} while ddit is enabled.*ddit.disable"):
            getattr(pipe, name)()  # hotswapping: after ddit.disable(pipe); fusing: ddit.disable(pipe) first
    with pytest.raises(ValueError, match="fuse_lora: LoRA layers cannot be .*fused.*pipe.load_lora_weights"):
        pipe.transformer.fuse_lora()
    assert torch.allclose(run(pipe, kwargs), expected["style"], atol=ATOL, rtol=0)

    saved_lora(tmp_path, ["x_embedder"], "embed", 4)
    with pytest.raises(ValueError, match="pipeline is disabled .*x_embedder carries an adapter .*patch embedding"):
        pipe.load_lora_weights(tmp_path, adapter_name="embed")
    assert isinstance(pipe.transformer, FluxTransformer2DModel) and "embed" in pipe.transformer.peft_config
    assert not ddit_layers(pipe.transformer) and "set_adapters" not in vars(pipe)


def test_an_adapter_object_enabled_again_refuses_a_transformer_whose_loras_changed(style_folder, adapter_folder):
    pipe, kwargs = flux(style_folder)
    adapter = ddit.MultiPatchTransformer.from_pretrained(pipe.transformer, adapter_folder)
    ddit.enable(pipe, adapter, policy=FixedPolicy(SCHEDULE))
    ddit.disable(pipe)
    pipe.unload_lora_weights()
    with pytest.raises(ValueError, match=r"changed since it was built or detached \(FluxTransformer2DModel\.transf"):
        ddit.enable(pipe, adapter)  # its layers would bring the unloaded style LoRA back
    ddit.enable(pipe, adapter_folder, policy=FixedPolicy(SCHEDULE))
    plain, plain_kwargs = flux()
    ddit.enable(plain, adapter_folder, policy=FixedPolicy(SCHEDULE))
    assert torch.allclose(run(pipe, kwargs), run(plain, plain_kwargs), atol=ATOL, rtol=0)


def test_loras_ddit_cannot_run_beside_are_refused_naming_the_layer(style_folder):
    pipe, _ = flux(style_folder)
    pipe.fuse_lora()
    with pytest.raises(ValueError, match=r"transformer_blocks\.0\.attn\.to_q carries an adapter .*fused into the "
                                         r"weights but not unloaded.*pipe\.unload_lora_weights"):
        ddit.MultiPatchTransformer(pipe.transformer)
    pipe.unload_lora_weights()
    ddit.MultiPatchTransformer(pipe.transformer)  # fused and unloaded: the adapter's heads copy the fused weights

    pipe, _ = flux()
    pipe.transformer.add_adapter(LoraConfig(r=2, target_modules=["x_embedder"]), adapter_name="embed")
    with pytest.raises(ValueError, match="x_embedder carries an adapter .*patch embedding or output projection"):
        ddit.MultiPatchTransformer(pipe.transformer)

    pipe, _ = flux()
    pipe.transformer.add_adapter(LoHaConfig(r=2, target_modules=["to_q"]), adapter_name="loha")
    with pytest.raises(ValueError, match="to_q carries an adapter .*not a LoRA \\(another peft tuner\\)"):
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


def test_a_failed_or_refused_load_while_enabled_leaves_the_pipeline_enabled_as_it_was(style_folder, adapter_folder,
                                                                                      tmp_path):
    pipe, kwargs = flux(style_folder)
    ddit.enable(pipe, adapter_folder, policy=FixedPolicy(SCHEDULE))
    before = run(pipe, kwargs)
    with pytest.raises(HFValidationError):  # diffusers' own error, not ddit's
        pipe.load_lora_weights(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="load_lora_weights while ddit is enabled: .*recompiles"):
        pipe.load_lora_weights(style_folder, adapter_name="style", hotswap=True)
    assert torch.allclose(run(pipe, kwargs), before, atol=ATOL, rtol=0)
    pipe.transformer.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)
    with pytest.raises(ValueError, match="load_lora_weights while ddit is enabled: ddit's adapter could not be built "
                                         "again .*layerwise casting"):
        pipe.load_lora_weights(style_folder, adapter_name="second")
    assert isinstance(pipe.transformer, ddit.pipelines.DynamicPatchTransformer)
    assert set(pipe.transformer.adapter.backbone.peft_config) == {"style"}  # ddit's: out at base-size steps
    assert torch.allclose(run(pipe, kwargs), before, atol=0.5, rtol=0)  # float8 storage rounds the weights


def test_a_lora_loaded_into_both_experts_while_enabled_runs_as_one_loaded_before(tmp_path):
    """Wan 2.2: diffusers loads a LoRA into the second expert too when asked; both adapters are built again."""
    source, _ = build("wan22")
    saved_wan = tmp_path / "lora"
    source.transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "add_k_proj"],
                                              init_lora_weights=False), adapter_name="style")
    type(source).save_lora_weights(saved_wan, transformer_lora_layers=get_peft_model_state_dict(
        source.transformer, adapter_name="style"))
    folders = {}
    torch.manual_seed(0)
    for name in ("transformer", "transformer_2"):
        adapter = ddit.MultiPatchTransformer(getattr(source, name))
        with torch.no_grad():
            for p in adapter.trainable_parameters():
                p.add_(0.01 * torch.randn_like(p))
        adapter.save_pretrained(folders.setdefault(name, tmp_path / name))
    schedule = [4, 4, 2, 4, 4, 2]  # steps 0-2 on the first expert, 3-5 on the second

    reference, kwargs = build("wan22")
    reference.load_lora_weights(saved_wan, adapter_name="style", load_into_transformer_2=True)
    ddit.enable(reference, folders, policy=FixedPolicy(schedule))
    expected = latents(reference(**kwargs(batch=1, steps=6)))

    pipe, kwargs = build("wan22")
    ddit.enable(pipe, folders, policy=FixedPolicy(schedule))
    plain = latents(pipe(**kwargs(batch=1, steps=6)))
    pipe.load_lora_weights(saved_wan, adapter_name="style", load_into_transformer_2=True)
    assert all(isinstance(getattr(pipe, name), ddit.pipelines.DynamicPatchTransformer) for name in folders)
    assert torch.allclose(latents(pipe(**kwargs(batch=1, steps=6))), expected, atol=ATOL, rtol=0)
    assert not torch.allclose(plain, expected, atol=1e-3)


@torch.no_grad()
def test_base_size_calls_run_the_style_lora_whether_ddits_layers_are_in_or_out(style_folder):
    """Distillation's teacher (ddit's layers in the backbone, switched off) and inference's base-size steps (ddit's
    layers out of it) both run the styled transformer."""
    pipe, _ = flux(style_folder)
    ids = torch.zeros(8, 8, 3)
    ids[..., 1], ids[..., 2] = torch.arange(8)[:, None], torch.arange(8)[None]
    torch.manual_seed(3)
    given = dict(hidden_states=torch.randn(2, 64, 64), encoder_hidden_states=torch.randn(2, 5, 32),
                 pooled_projections=torch.randn(2, 32), timestep=torch.tensor([0.3, 0.9]), img_ids=ids.reshape(-1, 3),
                 txt_ids=torch.zeros(5, 3), guidance=torch.tensor([3.5, 3.5]))
    styled = pipe.transformer(**given)[0]
    adapter = ddit.MultiPatchTransformer(pipe.transformer)
    for p in adapter.trainable_parameters():
        p.add_(0.05 * torch.randn_like(p))
    for lean in (False, True):
        adapter.set_lean_base(lean)
        coarse = adapter(**given, patch_size=8)[0]  # a coarse call first: the flags switch back
        assert torch.allclose(adapter(**given)[0], styled, atol=ATOL, rtol=0), lean
        assert not torch.allclose(coarse, styled, atol=1e-3)
