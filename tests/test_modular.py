"""``ddit.enable`` inside diffusers' modular pipelines: FLUX.1, SD3, Wan, Qwen-Image, and FLUX.3 (base and
flow-map distilled), which diffusers 0.42 runs in modular pipelines only.

Each is the family's stock auto blocks with only the denoise step kept, given a tiny transformer; prompts come as
embeddings. One FLUX.1 pipeline is loaded whole from a tiny complete folder and runs from text.
"""

import inspect
import json
import os

import pytest
import torch
from diffusers import ClassifierFreeGuidance, FlowMatchEulerDiscreteScheduler, Flux3Transformer2DModel
from diffusers.modular_pipelines import (
    ComponentsManager,
    Flux3AutoBlocks,
    Flux3DistilledAutoBlocks,
    FluxAutoBlocks,
    ModularPipeline,
    QwenImageAutoBlocks,
    StableDiffusion3AutoBlocks,
    WanBlocks,
)
from diffusers.modular_pipelines import components_manager as cm_module
from diffusers.modular_pipelines.components_manager import CustomOffloadHook
from tiny_pipelines import build

import ddit
from ddit.caches import TeaCache
from ddit.policies import FixedPolicy, PatchPolicy
from ddit.tiny_pipelines import save_tiny_pipeline

STEPS = 4
EARLY_COARSE = [4, 4, 2, 2]  # patch 4 on a base of 2: a quarter of the tokens
ATOL = 1e-5
DEVICE = torch.device(os.environ.get("DDIT_TEST_DEVICE", "cpu"))
BLOCKS = {"flux": FluxAutoBlocks, "sd3": StableDiffusion3AutoBlocks, "wan": WanBlocks,
          "qwenimage": QwenImageAutoBlocks, "flux3": Flux3AutoBlocks, "flux3-distilled": Flux3DistilledAutoBlocks}


def _flux3(flow_map: bool) -> Flux3Transformer2DModel:
    torch.manual_seed(0)
    return Flux3Transformer2DModel(in_channels=16, cond_in_channels=16, num_layers=1, num_single_layers=2,
                                   attention_head_dim=16, num_attention_heads=2, joint_attention_dim=16,
                                   timestep_channels=32, mlp_ratio=2.0, axes_dims_rope=(4, 4, 4, 4),
                                   flow_map=flow_map).eval()


def modular(name: str):
    """The stock modular pipeline of ``name``'s denoise step, and ``call(**overrides)`` running it on two samples
    with guidance where the family guides (latents out; fresh generators every call)."""
    blocks = BLOCKS[name]()
    for step in list(blocks.sub_blocks):
        if step != "denoise":
            blocks.sub_blocks.pop(step)
    pipe = blocks.init_pipeline()
    expected = {c.name for c in blocks.expected_components}
    guider = {"guider": ClassifierFreeGuidance(guidance_scale=4.0)} if "guider" in expected else {}
    inputs = {i.name for i in blocks.inputs}
    if name.startswith("flux3"):
        pipe.update_components(transformer=_flux3(flow_map=name == "flux3-distilled").to(DEVICE),
                               scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), **guider)
        text = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(1)).to(DEVICE)
        given = dict(prompt_embeds=text, height=128, width=64, num_inference_steps=STEPS)
        if guider:
            given["negative_prompt_embeds"] = torch.zeros_like(text)
    else:
        stock, call_kwargs = build(name)
        pipe.update_components(transformer=stock.transformer, scheduler=stock.scheduler, **guider)
        given = {k: v for k, v in call_kwargs(batch=2, steps=STEPS).items() if k in inputs and k != "generator"}
        if name == "wan":  # modular Wan reads the latent's channels from its VAE (none here): 4, given as noise
            given["latents"] = torch.randn(2, 4, 2, 16, 16, generator=torch.Generator().manual_seed(2)).to(DEVICE)

    def call(**overrides):
        kw = {**given, **overrides}
        return pipe(**kw, generator=[torch.Generator().manual_seed(s) for s in range(2)], output="latents")

    pipe.set_progress_bar_config(disable=True)
    return pipe, call


def image_block(transformer):
    """The first block that sees the image tokens alone."""
    if isinstance(transformer, Flux3Transformer2DModel):
        return transformer.mode_blocks["image"][0]
    return (getattr(transformer, "transformer_blocks", None) or transformer.blocks)[0]


@pytest.fixture(params=list(BLOCKS))
def name(request):
    return request.param


def test_the_baseline_is_the_stock_modular_pipeline_and_disable_restores_it(name):
    pipe, call = modular(name)
    stock, original = call(), pipe.transformer
    ddit.enable(pipe, ddit.MultiPatchTransformer(original), policy="baseline")
    assert torch.allclose(call(), stock, atol=ATOL, rtol=0)
    ddit.disable(pipe)
    assert pipe.transformer is original
    assert torch.equal(call(), stock)


def test_coarse_steps_run_on_a_quarter_of_the_image_tokens_and_repeat_exactly(name):
    pipe, call = modular(name)
    stock = call()
    tokens = []
    image_block(pipe.transformer).register_forward_pre_hook(
        lambda m, args, kw: tokens.append(kw.get("hidden_states", args[0] if args else None).shape[1]),
        with_kwargs=True)
    ddit.enable(pipe, ddit.MultiPatchTransformer(pipe.transformer), policy=FixedPolicy(EARLY_COARSE))
    out = call()
    first = tokens[:]
    assert (out - stock).abs().max() > 1e-3 and torch.isfinite(out).all()
    assert torch.equal(call(), out)
    per_step = first[:: len(first) // STEPS]  # a guider's calls come one after another within a step
    assert per_step == [per_step[0]] * 2 + [4 * per_step[0]] * 2
    summary = ddit.summary(pipe)
    assert [r["patch_size"] for r in summary.records if r["sample"] == 0 and r["branch"] is None] == EARLY_COARSE
    assert summary.token_saving == pytest.approx(2 * (1 - 1 / 4) / STEPS)


class SplitPolicy(PatchPolicy):
    """Sample 0 at patch 4 for the first two steps; sample 1 always at the base size."""

    name = "split"

    def choose(self, step):
        sizes = torch.full((self.batch_size,), self.base_size)
        if step.index < 2:
            sizes[0] = 4
        return sizes, {}


@pytest.mark.parametrize("name", ["flux3", "wan", "qwenimage"])
def test_in_a_mixed_batch_the_fine_sample_equals_its_baseline_twin(name):
    """A guider's cond and uncond calls share each sample's decision, and the rows run in groups of one size."""
    pipe, call = modular(name)
    stock = call()
    ddit.enable(pipe, ddit.MultiPatchTransformer(pipe.transformer), policy=SplitPolicy())
    out = call()
    assert torch.allclose(out[1], stock[1], atol=ATOL, rtol=0)
    assert (out[0] - stock[0]).abs().max() > 1e-3
    records = ddit.summary(pipe).records
    for step in (0, 1):
        sizes = {(r["branch"], r["sample"]): r["patch_size"] for r in records if r["step"] == step}
        assert len(sizes) == 4 and {b for b, _ in sizes} == {None, "call2"}  # two guider calls, named by order
        assert all(size == (4 if sample == 0 else 2) for (_, sample), size in sizes.items())


@pytest.mark.parametrize("name", ["flux", "wan"])
def test_ddit_caches_start_over_at_each_generation_without_the_stock_pipelines_reset(name):
    """A modular pipeline never calls ``_reset_stateful_cache`` after a call, as a stock one does: the new
    generation is told by the scheduler's new timesteps, so a second call repeats the first exactly."""
    pipe, call = modular(name)
    stock = call()
    ddit.enable(pipe, ddit.MultiPatchTransformer(pipe.transformer), policy=SplitPolicy(),
                cache=TeaCache(delta=1e9, coefficients="flux1-dev"))
    out = call()
    skipped = [r["cached"] for r in ddit.summary(pipe).records]
    assert any(skipped) and not all(skipped) and (out - stock).abs().max() > 1e-3
    assert torch.equal(call(), out)
    assert [r["cached"] for r in ddit.summary(pipe).records] == skipped


def test_wan22s_modular_pipeline_runs_both_experts_under_one_policy(tmp_path):
    """Wan 2.2's modular pipeline hands the steps below its boundary to ``transformer_2``: each expert gets its
    adapter, and the one policy decides every step, whichever expert runs it."""
    pipe = ModularPipeline.from_pretrained(str(save_tiny_pipeline("wan22", tmp_path / "wan22")))
    pipe.load_components(dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)

    def call():
        return pipe(prompt="a red circle", num_inference_steps=STEPS, height=128, width=128, num_frames=5,
                    max_sequence_length=16, generator=torch.Generator().manual_seed(0), output="latents")

    stock, tokens = call(), {"transformer": [], "transformer_2": []}
    for name in tokens:
        getattr(pipe, name).blocks[0].register_forward_pre_hook(
            lambda m, args, kw, name=name: tokens[name].append(kw.get("hidden_states", args[0]).shape[1]),
            with_kwargs=True)
    adapters = {name: ddit.MultiPatchTransformer(getattr(pipe, name)) for name in tokens}
    ddit.enable(pipe, adapters, policy=FixedPolicy([4] * STEPS))
    out = call()
    assert tokens["transformer"] and tokens["transformer_2"]  # both experts ran, each at a quarter of the tokens
    fine = 2 * 8 * 8  # 2 latent frames of 16x16 at patch 2
    assert set(tokens["transformer"]) == set(tokens["transformer_2"]) == {fine // 4}
    assert [r["patch_size"] for r in ddit.summary(pipe).records if r["branch"] is None] == [4] * STEPS
    assert (out - stock).abs().max() > 1e-3


@pytest.mark.parametrize("kind, blocks, image", [("ltx", None, False), ("ltx2", "LTX2AutoBlocks", False),
                                                  ("flux", "FluxKontextAutoBlocks", True),
                                                  ("wan-i2v", "WanImage2VideoAutoBlocks", True)])
def test_modular_pipelines_loaded_whole_run_from_text_and_images(kind, blocks, image, tmp_path):
    """Families whose modular denoise steps name their guider calls (LTX-Video: ``pred_cond``, ``pred_uncond``; LTX-2
    also its spatio-temporal and modality passes, each a call of the transformer that returns video and audio, of
    which the video's latents are compared here and the audio in the next test), or
    take a reference image (FLUX.1 Kontext: its tokens beside the latent's) or a first frame (Wan 2.1
    image-to-video), loaded from tiny complete folders and run from text."""
    import diffusers.modular_pipelines as modular_pipelines
    from PIL import Image

    from ddit.backbones import spec_for
    from ddit.tiny_pipelines import TINY_CALL

    folder = str(save_tiny_pipeline(kind, tmp_path / kind))
    pipe = (getattr(modular_pipelines, blocks)().init_pipeline(folder) if blocks
            else ModularPipeline.from_pretrained(folder))
    pipe.load_components(dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    given = dict(prompt="a red circle", num_inference_steps=STEPS, max_sequence_length=16, **TINY_CALL[kind])
    if image:  # Kontext's made at the image's size, not moved to its preferred ones (1024x1024 and the like)
        given.update(image=Image.new("RGB", (given["width"], given["height"]), (200, 30, 30)), _auto_resize=False,
                     max_area=given["width"] * given["height"])
    taken = {i.name for i in pipe.blocks.inputs}

    def call():
        return pipe(**{k: v for k, v in given.items() if k in taken}, generator=torch.Generator().manual_seed(0),
                    output="latents")

    stock = call()
    base = spec_for(pipe.transformer).base_patch_size
    ddit.enable(pipe, ddit.MultiPatchTransformer(pipe.transformer), policy="baseline")
    assert torch.equal(call(), stock)
    ddit.disable(pipe)
    schedule = [4 * base] * 2 + [base] * (STEPS - 2)
    ddit.enable(pipe, ddit.MultiPatchTransformer(pipe.transformer), policy=FixedPolicy(schedule))
    out = call()
    records = ddit.summary(pipe).records
    assert (out - stock).abs().max() > 1e-3 and torch.isfinite(out).all()
    branches = sorted({str(r["branch"]) for r in records})
    assert branches == {"ltx": ["pred_cond", "pred_uncond"], "flux": ["None"],
                        "ltx2": ["pred_cond", "pred_cond_modality", "pred_cond_stg", "pred_uncond"]
                        }.get(kind, ["None", "call2"])
    assert [r["patch_size"] for r in records if str(r["branch"]) == branches[0]] == schedule
    if kind == "flux":  # Kontext's reference tokens run beside the latent's: as many, from an image of its size
        assert records[-1]["base_tokens"] == 2 * (given["height"] // 16) * (given["width"] // 16)


def test_a_modular_ltx2_gives_its_audio_beside_its_video_and_a_coarse_step_changes_both(tmp_path):
    """``run_pipeline`` asks LTX-2's modular blocks for the decoded video and the audio, as ``ddit-ablate`` scores
    both."""
    import diffusers.modular_pipelines as modular_pipelines

    from ddit.pipeline_call import run_pipeline
    from ddit.tiny_pipelines import TINY_CALL

    pipe = modular_pipelines.LTX2AutoBlocks().init_pipeline(str(save_tiny_pipeline("ltx2", tmp_path / "ltx2")))
    pipe.load_components(dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)

    def call():
        return run_pipeline(pipe, prompt=["a red circle"], num_inference_steps=STEPS, max_sequence_length=16,
                            generator=torch.Generator().manual_seed(0), output_type="pt", **TINY_CALL["ltx2"])

    stock = call()
    assert stock.frames.shape[:2] == (1, TINY_CALL["ltx2"]["num_frames"]) and stock.audio.ndim == 3
    ddit.enable(pipe, ddit.MultiPatchTransformer(pipe.transformer), policy=FixedPolicy([4] * 2 + [1] * (STEPS - 2)))
    out = call()
    assert (out.frames - stock.frames).abs().max() > 1e-3 and (out.audio - stock.audio).abs().max() > 1e-5


def test_flux3s_image_conditioned_blocks_run_its_references_beside_coarse_steps():
    """FLUX.3's image-conditioned denoise (``image_cond_latents``: reference latents as their own argument, which
    keep their grid at every size): the baseline is stock, and a fine sample equals its twin beside a coarse one."""
    pipe, call = modular("flux3")
    references = [torch.randn(2, 16, 4, 4, generator=torch.Generator().manual_seed(7)).to(DEVICE)]
    stock = call(image_cond_latents=references)
    assert (stock - call()).abs().max() > 1e-3  # the references count
    ddit.enable(pipe, ddit.MultiPatchTransformer(pipe.transformer), policy="baseline")
    assert torch.allclose(call(image_cond_latents=references), stock, atol=ATOL, rtol=0)
    ddit.disable(pipe)
    ddit.enable(pipe, ddit.MultiPatchTransformer(pipe.transformer), policy=SplitPolicy())
    out = call(image_cond_latents=references)
    assert torch.allclose(out[1], stock[1], atol=ATOL, rtol=0) and (out[0] - stock[0]).abs().max() > 1e-3
    ddit.disable(pipe)
    ddit.enable(pipe, ddit.MultiPatchTransformer(pipe.transformer), policy=FixedPolicy([4] * STEPS))
    assert (call(image_cond_latents=references) - call()).abs().max() > 1e-3  # coarse steps see them too


@torch.no_grad()
def test_qwen_image_21s_modular_pipeline_keeps_its_kv_cache_at_mixed_sizes():
    """Qwen-Image 2.1's denoise step keeps a KV cache of the prompt per guider branch, filled at the first step:
    ddit keeps one per patch size inside it, so that a batch split by size gives what recomputing gives."""
    from diffusers import QwenImage21Transformer2DModel
    from diffusers.modular_pipelines import QwenImage21AutoBlocks

    torch.manual_seed(0)
    transformer = QwenImage21Transformer2DModel(in_channels=64, out_channels=64, num_layers=2, attention_head_dim=16,
                                                num_attention_heads=2, context_in_dim=16, mlp_ratio=2,
                                                axes_dims_rope=(4, 6, 6))
    for p in transformer.parameters():  # zero-initialised layers too, so that outputs depend on everything
        if not p.any():
            torch.nn.init.normal_(p, std=0.05)
    blocks = QwenImage21AutoBlocks()
    for step in list(blocks.sub_blocks):
        if step != "denoise":
            blocks.sub_blocks.pop(step)
    pipe = blocks.init_pipeline()
    pipe.update_components(transformer=transformer.eval().to(DEVICE), guider=ClassifierFreeGuidance(guidance_scale=3),
                           scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))
    pipe.set_progress_bar_config(disable=True)
    text = torch.Generator().manual_seed(1)
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[0, -2:] = 0  # the first prompt two tokens shorter
    given = dict(prompt_embeds=torch.randn(2, 7, 16, generator=text), prompt_embeds_mask=mask,
                 negative_prompt_embeds=torch.randn(2, 7, 16, generator=text),
                 negative_prompt_embeds_mask=torch.ones(2, 7, dtype=torch.long),
                 image_pad_mask=torch.zeros(2, 7, dtype=torch.bool),
                 negative_image_pad_mask=torch.zeros(2, 7, dtype=torch.bool))
    given = {k: v.to(DEVICE) for k, v in given.items()}

    def call(**kwargs):
        return pipe(**given, height=256, width=256, num_inference_steps=STEPS, output="latents",
                    generator=torch.Generator().manual_seed(0), **kwargs)

    stock = call()
    adapter = ddit.MultiPatchTransformer(pipe.transformer)
    for p in adapter.trainable_parameters():  # LoRA B starts at zero: as if trained, so that a size's LoRA counts
        torch.nn.init.normal_(p, std=0.05)
    ddit.enable(pipe, adapter, policy="baseline")
    assert torch.equal(call(), stock)
    ddit.disable(pipe)
    ddit.enable(pipe, adapter, policy=SplitPolicy())  # sample 0 at patch 4 for two steps, sample 1 at patch 1
    cached, recomputed = call(), call(use_kv_cache=False)
    sizes = {(r["step"], r["sample"]): r["patch_size"] for r in ddit.summary(pipe).records}
    assert sizes == {(s, i): 4 if i == 0 and s < 2 else 1 for s in range(STEPS) for i in (0, 1)}
    torch.testing.assert_close(cached, recomputed)
    assert (cached[0] - stock[0]).abs().max() > 1e-3 and torch.allclose(cached[1], stock[1], atol=ATOL)


def test_the_wrapper_names_the_backbones_arguments_as_modular_denoisers_read_them():
    """FLUX.3's and Qwen-Image's denoise steps pass the transformer only what its forward's signature names."""
    pipe, _ = modular("qwenimage")
    backbone = pipe.transformer
    ddit.enable(pipe, ddit.MultiPatchTransformer(backbone), policy="baseline")
    assert inspect.signature(pipe.transformer.forward) == inspect.signature(backbone.forward)
    assert "img_shapes" in inspect.signature(pipe.transformer.forward).parameters


def test_a_modular_flux_folder_runs_from_text_and_saves_with_its_adapter(tmp_path):
    folder = save_tiny_pipeline("flux", tmp_path / "flux")
    pipe = ModularPipeline.from_pretrained(str(folder))
    pipe.load_components(dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)

    def call(p):
        return p(prompt=["a red square", "a blue circle"], height=64, width=64, num_inference_steps=STEPS,
                 generator=[torch.Generator().manual_seed(s) for s in range(2)], output="latents")

    adapter = ddit.MultiPatchTransformer(pipe.transformer)
    with torch.no_grad():
        for p in adapter.trainable_parameters():  # not the initial weights: the reload must bring these back
            p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    ddit.enable(pipe, adapter, policy=FixedPolicy(EARLY_COARSE))
    out = call(pipe)
    assert ddit.summary(pipe).coarse_fraction == pytest.approx(0.5)
    pipe.save_pretrained(tmp_path / "saved", overwrite_modular_index=True)
    assert (tmp_path / "saved" / "modular_model_index.json").exists()
    assert (tmp_path / "saved" / "ddit_adapter" / "multipatch_config.json").exists()

    again = ModularPipeline.from_pretrained(str(tmp_path / "saved"))
    again.load_components(dtype=torch.float32)
    again.set_progress_bar_config(disable=True)
    assert type(again.transformer).__name__ == "FluxTransformer2DModel"  # saved stock, the adapter beside it
    ddit.enable(again, tmp_path / "saved", policy=FixedPolicy(EARLY_COARSE))
    assert torch.allclose(call(again), out, atol=ATOL, rtol=0)


class Small(torch.nn.Linear):
    """Another model a components manager holds (its hooks read each model's device)."""

    @property
    def device(self):
        return self.weight.device


def test_a_components_managers_auto_offload_moves_with_the_wrapper(monkeypatch):
    """``ComponentsManager.enable_auto_cpu_offload`` hooks each model to move it whole when called: enable moves
    the transformer's hook onto ddit's wrapper (adapter included), disable back; where the manager hooks its models
    again (offload enabled after ddit.enable, a model added), the next call moves it onto the wrapper. On this
    CPU-only machine the execution device is the CPU, so the moves themselves are not exercised, only where the
    hooks sit and what the offload strategy would size."""
    monkeypatch.setattr(cm_module.TorchDeviceBackend, "mem_get_info", lambda self: (1 << 40, 1 << 40))
    manager = ComponentsManager()
    pipe, call = modular("flux3")
    backbone = pipe.transformer
    manager.add("transformer", backbone)
    manager.add("other", Small(3, 3))
    pipe._components_manager = manager  # as ModularPipeline.from_pretrained(..., components_manager=) sets it
    manager.enable_auto_cpu_offload(device="cpu")
    assert isinstance(backbone._hf_hook, CustomOffloadHook)
    stock = call()

    def hooked_models():
        """The model the transformer's hook holds, and the models of that hook in the other model's list."""
        hooks = {h.model_id.rsplit("_", 1)[0]: h for h in manager.model_hooks}
        mine = hooks["transformer"]
        return mine.model, [h.model for h in hooks["other"].hook.other_hooks if h is mine]

    ddit.enable(pipe, ddit.MultiPatchTransformer(backbone), policy="baseline")
    wrapper = pipe.transformer
    assert isinstance(wrapper._hf_hook, CustomOffloadHook) and not hasattr(backbone, "_hf_hook")
    assert hooked_models() == (wrapper, [wrapper])  # the other model's hook would offload the wrapper
    assert wrapper.get_memory_footprint() > backbone.get_memory_footprint()  # what the strategy sizes: the adapter
    assert torch.allclose(call(), stock, atol=ATOL, rtol=0)
    assert "img_ids" in inspect.signature(wrapper.forward).parameters  # accelerate's hook keeps the signature

    manager.add("another", Small(3, 3))  # the manager hooks the models it holds again: the backbone
    assert isinstance(backbone._hf_hook, CustomOffloadHook)
    assert torch.allclose(call(), stock, atol=ATOL, rtol=0)
    assert isinstance(wrapper._hf_hook, CustomOffloadHook) and not hasattr(backbone, "_hf_hook")

    ddit.disable(pipe)
    assert pipe.transformer is backbone and isinstance(backbone._hf_hook, CustomOffloadHook)
    assert hooked_models()[0] is backbone and not hasattr(wrapper, "_hf_hook")

    manager.disable_auto_cpu_offload()
    ddit.enable(pipe, ddit.MultiPatchTransformer(backbone), policy="baseline")
    manager.enable_auto_cpu_offload(device="cpu")  # after ddit.enable: it hooks the transformer it holds
    assert torch.allclose(call(), stock, atol=ATOL, rtol=0)
    assert hooked_models()[0] is pipe.transformer and not hasattr(backbone, "_hf_hook")

    ddit.disable(pipe)
    pipe._components_manager = None  # a hook no manager of this pipeline placed cannot be moved: refused first
    with pytest.raises(ValueError, match="names no manager that holds it"):
        ddit.enable(pipe, ddit.MultiPatchTransformer(backbone), policy="baseline")
    assert pipe.transformer is backbone


@pytest.fixture(scope="module")
def modular_folders(tmp_path_factory):
    """Modular FLUX.1 and Wan folders (``modular_model_index.json`` only), saved from tiny complete folders."""
    root, folders = tmp_path_factory.mktemp("modular"), {}
    for kind in ("flux", "wan"):
        pipe = ModularPipeline.from_pretrained(str(save_tiny_pipeline(kind, root / f"{kind}-stock")))
        pipe.load_components(dtype=torch.float32)
        pipe.save_pretrained(str(root / kind), overwrite_modular_index=True)
        folders[kind] = root / kind
    (root / "prompts.txt").write_text("a red circle\nblue stripes on white\n")
    return folders, root / "prompts.txt"


@pytest.mark.parametrize("kind", ["flux", "wan"])
def test_a_modular_pipeline_folder_distils_and_ablates_from_the_command_line(kind, modular_folders, tmp_path,
                                                                              capsys):
    from safetensors.torch import load_file

    from ddit.ablate.cli import main as ablate
    from ddit.cli import main

    folders, prompts = modular_folders
    assert not (folders[kind] / "model_index.json").exists()
    size = ["--height", "128", "--width", "128", "--pipeline-arg", "max_sequence_length=16",
            *(["--num-frames", "5"] if kind == "wan" else [])]
    assert main(["distill", "--pipeline", str(folders[kind]), "--prompts", str(prompts), "--out", str(tmp_path / "d"),
                 "--steps", "2", "--batch-size", "2", "--num-inference-steps", "3", *size]) == 0
    assert len(list((tmp_path / "d" / "states").glob("*.safetensors"))) == 2
    assert "3/3" not in capsys.readouterr().err  # one bar over the prompts, none per 3-step pipeline call
    out = tmp_path / "run"
    assert ablate(["--pipeline", str(folders[kind]), "--adapter", str(tmp_path / "d" / "adapter"), "--prompts",
                   str(prompts), "--out", str(out), "--steps", "4", "--fewer-steps", "3", "--policies", "fixed",
                   "--policy-param", "fixed.fraction=0.5", "--caches", "none", "--no-progress", *size]) == 0
    summary = {r["row"]: r for r in json.loads((out / "summary.json").read_text())}
    assert list(summary) == ["baseline", "baseline@3", "fixed"]
    assert summary["baseline"]["ssim_vs_baseline"] == pytest.approx(1.0)
    assert summary["fixed"]["coarse_step_fraction"] == 0.5 and summary["fixed"]["ssim_vs_baseline"] < 1
    images = load_file(out / "images" / "fixed" / "0000000.safetensors")["images"]
    assert images.shape == ((1, 5, 3, 128, 128) if kind == "wan" else (1, 3, 128, 128))  # decoded, 8-bit
    assert images.dtype == torch.uint8
    fit = tmp_path / "fit.json"  # TeaCache's fit on the modular pipeline's own generations
    assert main(["calibrate", "teacache", "--pipeline", str(folders[kind]), "--prompts", str(prompts), "--steps", "12",
                 "--out", str(fit), *size]) == 0
    calls_per_step = 2 if kind == "wan" else 1  # Wan's guider calls once per branch; modular FLUX.1 does not guide
    assert json.loads(fit.read_text())["pairs"] == 2 * calls_per_step * 11


@pytest.mark.parametrize("extra, message", [
    (["--cpu-offload"], "is a modular pipeline, which offloads through a ComponentsManager"),
    (["--pipeline-arg", "output='images'"], "FluxModularPipeline takes no output; drop the option"),
    (["--pipeline-arg", "guidance_scal=3.0"], "takes no guidance_scal"),
])
def test_what_a_modular_folder_cannot_take_is_refused_before_anything_is_recorded(extra, message, modular_folders,
                                                                                   tmp_path, capsys):
    from ddit.cli import main

    folders, prompts = modular_folders
    assert main(["distill", "--pipeline", str(folders["flux"]), "--prompts", str(prompts), "--out",
                 str(tmp_path / "d"), "--height", "128", "--width", "128", *extra]) == 2
    assert message in capsys.readouterr().err and not (tmp_path / "d" / "states").exists()


def test_progressive_rows_are_refused_on_a_modular_pipeline(modular_folders, tmp_path, capsys):
    from ddit.ablate.cli import main as ablate

    folders, prompts = modular_folders
    adapter = tmp_path / "adapter"
    pipe = ModularPipeline.from_pretrained(str(folders["flux"]))
    pipe.load_components(dtype=torch.float32)
    ddit.MultiPatchTransformer(pipe.transformer).save_pretrained(adapter)
    assert ablate(["--pipeline", str(folders["flux"]), "--adapter", str(adapter), "--prompts", str(prompts),
                   "--out", str(tmp_path / "run"), "--steps", "4", "--progressive", "0.5", "--policies", "baseline",
                   "--caches", "none", "--height", "128", "--width", "128", "--no-progress"]) == 2
    assert "progressive resolution runs in" in capsys.readouterr().err and not (tmp_path / "run").exists()


def test_a_modular_pipelines_size_is_checked_as_it_makes_it(modular_folders, tmp_path):
    """The size checks read a modular pipeline's own defaults and factors: Z-Image's latent is its VAE's 8x, not
    its image processor's 16x; modular Wan's default size is its ``default_height``; and a modular pipeline given an
    image with no size may take its size from the image (FLUX.2's and Qwen-Image-Edit's do): refused up front."""
    from PIL import Image

    from ddit.pipeline_call import Prompt, check_resolution, image_size

    zimage = ModularPipeline.from_pretrained(str(save_tiny_pipeline("zimage", tmp_path / "zimage")))
    zimage.load_components(dtype=torch.float32)
    assert zimage.vae_scale_factor_spatial == 16 and image_size(zimage, {"height": 96, "width": 96}) == (96, 96, 8)
    check_resolution(zimage, {"height": 96, "width": 96}, [2, 4])  # a 12x12 latent, as the pipeline makes
    wan = ModularPipeline.from_pretrained(str(modular_folders[0]["wan"]))
    assert image_size(wan, {}) == (wan.default_height, wan.default_width, 8)
    flux2 = ModularPipeline.from_pretrained(str(save_tiny_pipeline("flux2", tmp_path / "flux2")))
    flux2.load_components(dtype=torch.float32)
    edit = [Prompt("make it blue", {"image": Image.new("RGB", (96, 64))})]
    with pytest.raises(ValueError, match="sizes its output after each prompt's image unless given a size"):
        check_resolution(flux2, {}, [2, 4], edit)
    check_resolution(flux2, {"height": 128, "width": 128}, [2, 4], edit)


@pytest.mark.parametrize("kind", ["flux", "wan"])
def test_asked_for_latents_a_modular_pipeline_skips_its_decode_step(kind, modular_folders):
    """Recording and calibration ask for latents: the VAE never decodes them (seconds per call for a video),
    and the latents are the whole pipeline's."""
    from ddit.pipeline_call import run_pipeline

    pipe = ModularPipeline.from_pretrained(str(modular_folders[0][kind]))
    pipe.load_components(dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    call = dict(prompt=["a red circle"], height=128, width=128, num_inference_steps=2, max_sequence_length=16,
                **({"num_frames": 5} if kind == "wan" else {}))
    whole = pipe(**call, generator=torch.Generator().manual_seed(0), output="latents")
    decodes, decode = [], pipe.vae.decode
    pipe.vae.decode = lambda *args, **kwargs: decodes.append(1) or decode(*args, **kwargs)
    latents = run_pipeline(pipe, **call, generator=torch.Generator().manual_seed(0), output_type="latent").images
    assert torch.equal(latents, whole) and not decodes
    assert "decode" in pipe._blocks.sub_blocks  # the pipeline has its decode step back
    decoded = run_pipeline(pipe, **call, generator=torch.Generator().manual_seed(0), output_type="pt")
    images = decoded.frames if kind == "wan" else decoded.images
    assert decodes and images.shape[-2:] == (128, 128) and 0 <= images.min() and images.max() <= 1


def test_an_ablation_of_flux3_in_batches_of_several_prompts_is_refused_before_anything_is_written(tmp_path):
    from ddit.ablate.pipeline_runner import PipelineAblationConfig, run_pipeline_ablation

    pipe, _ = modular("flux3")  # its text encoder takes one prompt per call, as a string
    config = PipelineAblationConfig(rows={}, prompts=["a red circle", "blue stripes"], batch_size=2)
    with pytest.raises(ValueError, match="Flux3ModularPipeline's text encoder takes one prompt per call"):
        run_pipeline_ablation(config, pipe, {}, tmp_path / "run")
    assert not (tmp_path / "run").exists()
