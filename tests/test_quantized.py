"""Quantized transformers: what users with one consumer GPU run (a GGUF file, torchao's int8, quanto's int8/int4).

The adapter distilled on the full-precision model runs on its quantized copy: its coarse heads start from the
patch layers read back through the quantizer's own dequantization (a GGUF file may hold them quantized too),
and ddit's LoRA layers wrap the quantized block layers. The quantized models are made here from the tiny
test transformers: a GGUF file written with ``gguf``'s own quantization, in diffusers' key names, loaded with
``from_single_file``; torchao and quanto through ``from_pretrained(quantization_config=...)``.
"""

import json
import os
from types import SimpleNamespace

import pytest
import torch
from accelerate.utils import DistributedType
from diffusers import BitsAndBytesConfig, DiffusionPipeline, GGUFQuantizationConfig, QuantoConfig, TorchAoConfig
from peft.tuners.lora import LoraLayer
from safetensors.torch import save_file
from torch import nn

import ddit
import ddit.weights
from ddit import MultiPatchTransformer
from ddit.checkpoint import CheckpointError
from ddit.distill import DistillConfig
from ddit.quantized import float_weight
from ddit.self_distill import self_distill
from ddit.tiny_pipelines import TINY_CALL, save_tiny_pipeline
from ddit.weights import load_pipeline, load_transformer_file, pipeline_folder
from test_pipelines import SplitPolicy
from tiny_pipelines import build, latents

STEPS, ATOL = 4, 1e-5
DEVICE = torch.device(os.environ.get("DDIT_TEST_DEVICE", "cpu"))  # the stock pipelines' (benchmarks/gpu_check.sh)
#: How far a dequantized weight may sit from the original, relative to its largest entry (4 bits: up to a step,
#: an eighth of a block's largest entry).
ROUNDING = {"gguf-q8_0": 0.01, "gguf-q4_0": 0.15, "torchao-int8": 0.01, "quanto-int8": 0.01, "quanto-int4": 0.15}


def gguf_copy(model: nn.Module, folder, qtype: str) -> nn.Module:
    """``model`` written to a GGUF file (every 2-D weight whose rows fill whole blocks quantized as ``qtype``, the
    patch layers too, as a GGUF file may) and loaded back as diffusers loads one."""
    import gguf

    kind = getattr(gguf.GGMLQuantizationType, qtype.upper())
    folder.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(folder / "model.gguf", "ddit-test")
    for name, p in model.state_dict().items():
        a = p.detach().float().cpu().numpy()
        if a.ndim == 2 and a.shape[-1] % gguf.GGML_QUANT_SIZES[kind][0] == 0:
            writer.add_tensor(name, gguf.quants.quantize(a, kind), raw_dtype=kind)
        else:
            writer.add_tensor(name, a)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    model.save_config(folder)
    return type(model).from_single_file(folder / "model.gguf", config=str(folder),
                                        quantization_config=GGUFQuantizationConfig(compute_dtype=torch.float32))


def quantized(model: nn.Module, storage: str, folder) -> nn.Module:
    """A copy of ``model`` stored as ``storage`` (a key of ROUNDING)."""
    if storage.startswith("gguf"):
        return gguf_copy(model, folder, storage.split("-")[1])
    from torchao.quantization import Int8WeightOnlyConfig

    config = {"torchao-int8": lambda: TorchAoConfig(Int8WeightOnlyConfig()),
              "quanto-int8": lambda: QuantoConfig(weights_dtype="int8"),
              "quanto-int4": lambda: QuantoConfig(weights_dtype="int4")}[storage]()
    model.save_pretrained(folder)
    return type(model).from_pretrained(folder, quantization_config=config, torch_dtype=torch.float32)


def is_quantized(layer: nn.Module) -> bool:
    """Whether ``layer`` stores its weight in a quantizer's tensor type (GGUF's, torchao's, quanto's)."""
    return type(layer.weight) not in (torch.Tensor, nn.Parameter)


@pytest.mark.parametrize(("name", "storage"), [*(("flux", storage) for storage in ROUNDING), ("flux2", "gguf-q8_0")])
def test_the_coarse_heads_start_from_the_dequantized_patch_layers(name, storage, tmp_path):
    """FLUX.2's patch layers have no bias: the heads start with a zero one."""
    pipe, _ = build(name)
    full = pipe.transformer.cpu()  # the heads' arithmetic, on any device
    model = quantized(full, storage, tmp_path)
    assert is_quantized(model.x_embedder) and is_quantized(model.proj_out)
    for layer in ("x_embedder", "proj_out"):
        original, read = getattr(full, layer).weight, float_weight(getattr(model, layer))
        assert read.shape == original.shape and read.is_floating_point()
        error = (read.float() - original).abs().max() / original.abs().max()
        assert 0 < error < ROUNDING[storage], layer  # rounded as the storage rounds, and no more
    adapter = MultiPatchTransformer(model)
    reference = MultiPatchTransformer(full)
    reference.detach()
    with torch.no_grad():  # the heads a full-precision model with these patch layers would start from
        full.x_embedder.weight.copy_(float_weight(model.x_embedder))
        full.proj_out.weight.copy_(float_weight(model.proj_out))
    exact = MultiPatchTransformer(full)
    for size in adapter.heads:
        assert torch.equal(adapter.heads[size].embed.weight, exact.heads[size].embed.weight)
        assert torch.equal(adapter.heads[size].unembed.weight, exact.heads[size].unembed.weight)
        assert not torch.equal(adapter.heads[size].embed.weight, reference.heads[size].embed.weight)


@pytest.mark.parametrize(("name", "storage"), [("flux", "gguf-q8_0"), ("flux", "torchao-int8"),
                                               ("flux", "quanto-int4"), ("wan", "gguf-q4_0")])
def test_an_adapter_made_on_the_full_model_runs_on_its_quantized_copy_in_the_stock_pipeline(name, storage, tmp_path):
    pipe, kwargs = build(name)
    adapter = tmp_path / "adapter"
    made = MultiPatchTransformer(pipe.transformer)  # on the full-precision model, as if trained: LoRA B not zero
    with torch.no_grad():
        for p in made.trainable_parameters():
            p.add_(0.05 * torch.randn_like(p))
    made.save_pretrained(adapter)
    made.detach()
    pipe.transformer = quantized(pipe.transformer.cpu(), storage, tmp_path / "model").to(DEVICE)
    stock = latents(pipe(**kwargs(batch=2, steps=STEPS)))

    ddit.enable(pipe, adapter, policy="baseline")
    loras = [m for m in pipe.transformer.adapter.backbone.modules() if isinstance(m, LoraLayer)]
    assert any(is_quantized(m.get_base_layer()) for m in loras)  # ddit's LoRA wraps quantized layers
    assert torch.equal(latents(pipe(**kwargs(batch=2, steps=STEPS))), stock)
    ddit.disable(pipe)

    ddit.enable(pipe, adapter, policy=SplitPolicy(coarse=4, early=2))
    out = latents(pipe(**kwargs(batch=2, steps=STEPS)))
    assert torch.allclose(out[1], stock[1], atol=ATOL, rtol=0)  # the fine sample equals its stock twin
    assert (out[0] - stock[0]).abs().max() > 1e-3 and torch.isfinite(out).all()
    enabled = pipe.transformer.adapter  # the LoRA over the quantized layers is what coarse steps run
    enabled.load_adapter_state_dict({k: torch.zeros_like(v) if ".lora_B." in k else v
                                     for k, v in enabled.adapter_state_dict().items()})
    without_lora = latents(pipe(**kwargs(batch=2, steps=STEPS)))
    assert (without_lora[0] - out[0]).abs().max() > 1e-4 and torch.equal(without_lora[1], out[1])


@pytest.mark.skipif(DEVICE.type != "cuda", reason="diffusers quantizes with bitsandbytes on CUDA only")
@pytest.mark.parametrize(("name", "bits"), [("flux", 4), ("flux", 8), ("flux2", 4)])
def test_bitsandbytes_on_cuda(name, bits, tmp_path):
    """bitsandbytes' 4-bit (NF4) and 8-bit layers, the patch layers among them: read back through peft's
    dequantization, ddit's LoRA in peft's bitsandbytes layers (benchmarks/gpu_check.sh). FLUX.2's bias-free patch
    layers packed in 4 bits: the heads' zero bias takes its size from the dequantized weight, not the packing."""
    pytest.importorskip("bitsandbytes")
    pipe, kwargs = build(name)
    adapter = tmp_path / "adapter"
    made = MultiPatchTransformer(pipe.transformer)
    with torch.no_grad():  # as if trained: LoRA B not zero
        for p in made.trainable_parameters():
            p.add_(0.05 * torch.randn_like(p))
    made.save_pretrained(adapter)
    original = made.detach().x_embedder.weight.detach().clone()
    pipe.transformer.save_pretrained(tmp_path / "model")
    config = (BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
              if bits == 4 else BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=0.0))  # no outlier split:
    # LLM.int8 picks its outlier columns over the whole batch, which would tie a sample to the rest of its batch
    pipe.transformer = type(pipe.transformer).from_pretrained(tmp_path / "model", quantization_config=config,
                                                              torch_dtype=torch.float32).to(DEVICE)
    assert is_quantized(pipe.transformer.x_embedder)
    read = float_weight(pipe.transformer.x_embedder).float()
    assert read.shape == original.shape and 0 < (read - original).abs().max() < 0.2 * original.abs().max()
    stock = latents(pipe(**kwargs(batch=2, steps=STEPS)))
    ddit.enable(pipe, adapter, policy="baseline")
    assert torch.equal(latents(pipe(**kwargs(batch=2, steps=STEPS))), stock)
    ddit.disable(pipe)
    ddit.enable(pipe, adapter, policy=SplitPolicy(coarse=4, early=2))
    out = latents(pipe(**kwargs(batch=2, steps=STEPS)))
    assert torch.allclose(out[1], stock[1], atol=ATOL, rtol=0)
    assert (out[0] - stock[0]).abs().max() > 1e-3 and torch.isfinite(out).all()


def test_an_adapter_is_distilled_on_the_quantized_model_it_will_run_on(tmp_path):
    """With too little memory for the full model, the adapter trains beside its quantized copy (as QLoRA does):
    only ddit's weights change, the quantized ones stay as they are."""
    folder = save_tiny_pipeline("flux", tmp_path / "pipe")
    pipe = DiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    pipe.transformer = gguf_copy(pipe.transformer, tmp_path, "q8_0")
    frozen = {n: p.clone() for n, p in pipe.transformer.state_dict().items()}
    config = DistillConfig(steps=2, batch_size=2, num_inference_steps=None, timestep_scale=None)
    export = self_distill(pipe, ["a red circle", "blue stripes"], tmp_path / "run", config=config, progress=False,
                          call={**TINY_CALL["flux"], "num_inference_steps": 2, "max_sequence_length": 16})
    report = json.loads((tmp_path / "run" / "distill.json").read_text())
    assert torch.isfinite(torch.tensor(report["losses"])).all()
    after = pipe.transformer.state_dict()  # the pipeline comes back stock, its quantized weights as they were
    assert after.keys() == frozen.keys() and all(torch.equal(p, frozen[n]) for n, p in after.items())
    initial = MultiPatchTransformer(pipe.transformer)
    initial.detach()
    ddit.enable(pipe, export, policy="fixed", fraction=0.5)
    assert not torch.equal(pipe.transformer.adapter.heads["4"].embed.weight, initial.heads["4"].embed.weight)
    def generate():
        return pipe("a red circle", num_inference_steps=4, output_type="latent", max_sequence_length=16,
                    generator=torch.Generator().manual_seed(0), **TINY_CALL["flux"]).images

    out = generate()
    assert ddit.summary(pipe).coarse_fraction == 0.5 and torch.isfinite(out).all()
    pipe.enable_model_cpu_offload(device="cpu")  # the quantized transformer and its adapter move as one
    assert torch.allclose(generate(), out, atol=1e-5, rtol=0)


def test_patch_layers_no_quantizer_reads_back_are_refused_naming_them():
    pipe, _ = build("flux")
    model = pipe.transformer
    model.x_embedder.weight = nn.Parameter(model.x_embedder.weight.to(torch.int8), requires_grad=False)
    with pytest.raises(ValueError, match=r"x_embedder and proj_out are stored as .*modules_to_not_convert"):
        MultiPatchTransformer(model)
    assert not any(isinstance(m, LoraLayer) for m in model.modules())


def test_the_commands_take_the_transformer_from_a_gguf_file(tmp_path, capsys):
    """``--transformer FILE``: ``ddit distill`` records and trains beside the quantized transformer (its storage
    part of the recording), and ``ddit-ablate`` runs every row on it (its bytes in the run's identity)."""
    from ddit.ablate.cli import main as ablate
    from ddit.cli import main

    folder = save_tiny_pipeline("flux", tmp_path / "flux")
    gguf_copy(DiffusionPipeline.from_pretrained(folder).transformer, tmp_path / "q8", "q8_0")
    file = tmp_path / "q8" / "model.gguf"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n")
    tiny = ["--prompts", str(prompts), "--height", "128", "--width", "128", "--pipeline-arg", "max_sequence_length=16"]
    distill = ["distill", "--pipeline", str(folder), "--transformer", str(file), "--out", str(tmp_path / "run"),
               "--num-inference-steps", "2", "--steps", "2", "--batch-size", "2", "--dtype", "float32", *tiny]
    assert main(distill) == 0
    recording = json.loads((tmp_path / "run" / "states" / "recording.json").read_text())
    assert recording["storage"]["transformer"].startswith("GGUFQuantizer") and "Q8_0" in recording["storage"][
        "transformer"]
    capsys.readouterr()
    assert main([a for a in distill if a != str(file) and a != "--transformer"] + ["--resume"]) == 2
    assert "was recorded with" in capsys.readouterr().err  # the full-precision transformer is another teacher

    run = ["--pipeline", str(folder), "--adapter", str(tmp_path / "run" / "adapter"), "--steps", "3",
           "--policies", "fixed", "--policy-param", "fixed.fraction=0.4", "--caches", "none", "--dtype", "float32",
           "--no-progress", *tiny]
    assert ablate([*run, "--transformer", str(file), "--out", str(tmp_path / "ablate")]) == 0
    config = json.loads((tmp_path / "ablate" / "config.json").read_text())
    assert config["transformer_file"] == "model.gguf"
    assert "the transformer from model.gguf" in (tmp_path / "ablate" / "report.md").read_text()
    summary = {r["row"]: r for r in json.loads((tmp_path / "ablate" / "summary.json").read_text())}
    assert summary["fixed"]["coarse_step_fraction"] > 0
    capsys.readouterr()
    assert ablate([*run, "--out", str(tmp_path / "ablate")]) == 2  # without the file: another model
    assert "transformer_file" in capsys.readouterr().err

    fit = tmp_path / "fit.json"  # a TeaCache fit of the quantized transformer says so
    assert main(["calibrate", "teacache", "--pipeline", str(folder), "--transformer", str(file), "--dtype", "float32",
                 "--steps", "22", "--out", str(fit), *tiny]) == 0
    assert json.loads(fit.read_text())["storage"].startswith("GGUFQuantizer")

    with pytest.raises(SystemExit):
        main([*distill[:4], str(tmp_path / "model.ckpt"), *distill[5:]])
    assert "--transformer takes one file, a .gguf file" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        ablate([*run, "--transformer", str(tmp_path / "none.gguf"), "--out", str(tmp_path / "x")])
    assert "no such file" in capsys.readouterr().err
    assert main(["distill", "--transformer", str(file), "--out", str(tmp_path / "x")]) == 2
    assert "--transformer need --pipeline" in capsys.readouterr().err


class Wrapped(nn.Module):
    """A layer peft puts no LoRA on (as it puts none on torchao's int4 weights), named as a LoRA target."""

    def __init__(self, linear):
        super().__init__()
        self.linear = linear

    def forward(self, x):
        return self.linear(x)


@pytest.mark.parametrize("styled", [False, True])
def test_a_layer_peft_cannot_take_leaves_the_backbone_as_it_was(styled):
    """peft fails midway through the injection (block 0's to_q and to_k already hold ddit's LoRA): every layer
    goes back, a style LoRA's with its own adapters only and active as before."""
    from peft import LoraConfig

    pipe, _ = build("flux")
    model = pipe.transformer
    if styled:
        model.add_adapter(LoraConfig(r=2, target_modules=["to_k", "to_out.0"]), adapter_name="style")
        model.disable_adapters()
    before = {name: type(m) for name, m in model.named_modules()}
    state = {n: p.clone() for n, p in model.state_dict().items()}
    model.transformer_blocks[0].attn.to_v = Wrapped(model.transformer_blocks[0].attn.to_v)
    with pytest.raises(ValueError, match="(?s)peft puts no LoRA on FluxTransformer2DModel.transformer_blocks.0.attn"
                                         ".to_v .*left as it was"):
        MultiPatchTransformer(model)
    model.transformer_blocks[0].attn.to_v = model.transformer_blocks[0].attn.to_v.linear
    assert {name: type(m) for name, m in model.named_modules()} == before
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(p, state[n]) for n, p in model.state_dict().items())
    assert list(getattr(model, "peft_config", {})) == (["style"] if styled else [])
    if styled:
        layer = model.transformer_blocks[0].attn.to_k
        assert set(layer.lora_A) == {"style"} and layer.disable_adapters and layer.active_adapters == ["style"]
    MultiPatchTransformer(model)  # and an adapter goes in afterwards


def test_a_transformer_file_loads_with_the_folders_config_and_what_it_cannot_replace_is_refused(tmp_path,
                                                                                                 monkeypatch):
    """``load_pipeline(transformer_file=...)``: a safetensors file's weights, not the folder's; refused before any
    loading: two experts, a class diffusers loads from folders only, FSDP over a quantized transformer. A Hub
    repository is downloaded without the transformer's weights."""
    folder = save_tiny_pipeline("flux", tmp_path / "flux")
    weights = {k: v + 1 if k == "proj_out.bias" else v
               for k, v in DiffusionPipeline.from_pretrained(folder).transformer.state_dict().items()}
    save_file(weights, tmp_path / "tuned.safetensors")
    pipe = load_pipeline(folder, transformer_file=tmp_path / "tuned.safetensors")
    assert pipe.transformer.dtype == torch.float32  # the folder's saved dtype
    assert torch.equal(pipe.transformer.proj_out.bias, weights["proj_out.bias"])

    for kind, message in (("wan22", "two experts"), ("pixart", "from a folder only")):
        with pytest.raises(CheckpointError, match=message):
            load_transformer_file(tmp_path / "tuned.safetensors", save_tiny_pipeline(kind, tmp_path / kind),
                                  torch.float32)

    pipe.transformer = gguf_copy(pipe.transformer, tmp_path / "q8", "q8_0")
    fsdp = SimpleNamespace(distributed_type=DistributedType.FSDP)
    with pytest.raises(ValueError, match="quantized \\(GGUFQuantizer\\), and FSDP"):
        self_distill(pipe, ["a red circle"], tmp_path / "run", accelerator=fsdp, progress=False)
    assert not (tmp_path / "run").exists()

    downloads, fetched = [], []
    monkeypatch.setattr(ddit.weights, "local_or_hub", lambda path, files: fetched.extend(files) or folder)
    monkeypatch.setattr(DiffusionPipeline, "download", lambda name, **kw: downloads.append(kw) or str(folder))
    assert pipeline_folder("owner/flux", without=("transformer",)) == folder
    assert downloads == [{"transformer": None}]  # as a component passed: diffusers fetches nothing of it
    assert "transformer/config.json" in fetched  # which from_single_file needs


def test_two_processes_distil_beside_a_gguf_transformer(tmp_path):
    """``accelerate launch`` with two CPU processes (gloo), data-parallel: DDP takes the frozen quantized weights
    beside the adapter's."""
    import subprocess
    import sys

    folder = save_tiny_pipeline("flux", tmp_path / "flux")
    gguf_copy(DiffusionPipeline.from_pretrained(folder).transformer, tmp_path / "q8", "q8_0")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\nblue stripes\na green moon\n")
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0"]
    done = subprocess.run([*launch, "-m", "ddit.cli", "distill", "--pipeline", str(folder), "--transformer",
                           str(tmp_path / "q8" / "model.gguf"), "--dtype", "float32", "--prompts", str(prompts),
                           "--out", str(tmp_path / "run"), "--steps", "2", "--batch-size", "2",
                           "--num-inference-steps", "2", "--height", "128", "--width", "128",
                           "--pipeline-arg", "max_sequence_length=16"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "run" / "distill.json").read_text())
    assert report["data"]["prompts"] == 3 and report["steps"] == 2
    assert torch.isfinite(torch.tensor(report["losses"])).all()
