"""``ddit-ablate --pipeline``: rows through ``ddit.enable`` in a complete tiny pipeline, resumable and sharded."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from ddit.ablate.cli import main
from ddit.cli import main as ddit_main
from ddit.tiny_pipelines import save_tiny_pipeline

STEPS = 5


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny SD3 pipeline folder, an adapter distilled from it, a prompts file."""
    root = tmp_path_factory.mktemp("pipeline")
    folder = save_tiny_pipeline("sd3", root / "sd3")
    prompts = root / "prompts.txt"
    prompts.write_text("a red circle\nblue stripes on white\n")
    assert ddit_main(["distill", "--pipeline", str(folder), "--prompts", str(prompts), "--out", str(root / "distill"),
                      "--steps", "2", "--batch-size", "2", "--num-inference-steps", "3", "--height", "128",
                      "--width", "128", "--pipeline-arg", "max_sequence_length=16"]) == 0
    return folder, root / "distill" / "adapter", prompts


def args(setup, out, *extra, policies=("fixed", "fixed.fraction=0.4"), caches="none"):
    folder, adapter, prompts = setup
    return ["--pipeline", str(folder), "--adapter", str(adapter), "--prompts", str(prompts), "--out", str(out),
            "--steps", str(STEPS), "--fewer-steps", "3", "--policies", policies[0],
            *(a for param in policies[1:] for a in ("--policy-param", param)), "--caches", caches,
            "--height", "128", "--width", "128", "--pipeline-arg", "max_sequence_length=16",
            "--num-per-prompt", "2", "--batch-size", "2", "--no-progress", *extra]


def test_rows_run_inside_the_pipeline_and_are_compared_with_their_twins(setup, tmp_path):
    out = tmp_path / "run"
    assert main(args(setup, out)) == 0
    summary = {r["row"]: r for r in json.loads((out / "summary.json").read_text())}
    assert list(summary) == ["baseline", "baseline@3", "fixed"]
    assert summary["baseline"]["ssim_vs_baseline"] == pytest.approx(1.0)
    assert summary["baseline"]["psnr_vs_baseline"] is None  # identical: infinite, null in JSON
    fixed = summary["fixed"]
    assert fixed["coarse_step_fraction"] == pytest.approx(0.4) and fixed["mean_patch_size"] > 2
    assert fixed["ssim_vs_baseline"] < 1 and set(fixed["per_prompt"]) == {"a red circle", "blue stripes on white"}
    assert summary["baseline@3"]["coarse_step_fraction"] == 0
    assert fixed["cached_step_fraction"] == 0  # no cache: none skipped (a diffusers hook's: unknown, None)
    images = load_file(out / "images" / "fixed" / "0000000.safetensors")["images"]
    assert images.shape == (2, 3, 128, 128) and images.dtype == torch.uint8  # 8-bit, as decoded
    report = (out / "report.md").read_text()
    assert "LPIPS and CLIP score: skipped" in report and "plots/patch_sizes.png" in report
    assert (out / "grids" / "prompt001.png").exists()


def test_progressive_resolution_is_a_row_of_a_pipeline_ablation(setup, tmp_path):
    out = tmp_path / "run"
    assert main(args(setup, out, "--progressive", "0.5")) == 0
    summary = {r["row"]: r for r in json.loads((out / "summary.json").read_text())}
    assert list(summary) == ["baseline", "baseline@3", "progressive[switch=0.5]", "fixed"]
    progressive = summary["progressive[switch=0.5]"]
    assert 0 < progressive["ssim_vs_baseline"] < 1
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    sizes = {tuple(r["patch_size"]) for r in records if r["row"] == "progressive[switch=0.5]"}
    assert len(sizes) == 1 and 0 < progressive["coarse_step_fraction"] < 1  # half size while sigma > 0.5
    sizes = sizes.pop()  # patch 2's pipeline: the half-size steps count as 4, first, then full size
    assert sizes[0] == 4 and sizes[-1] == 2 and list(sizes) == sorted(sizes, reverse=True)
    images = load_file(out / "images" / "progressive[switch=0.5]" / "0000000.safetensors")["images"]
    assert images.shape == (2, 3, 128, 128)


def test_a_torn_run_resumes_to_the_same_summary(setup, tmp_path):
    out = tmp_path / "run"
    assert main(args(setup, out)) == 0
    straight = json.loads((out / "summary.json").read_text())
    results = out / "results.jsonl"
    lines = results.read_text().splitlines(keepends=True)
    results.write_text("".join(lines[:3]) + lines[3][:20])  # a kill in the middle of a line
    (out / "images" / "fixed" / "0000002.safetensors").unlink()
    assert main(args(setup, out)) == 0
    resumed = json.loads((out / "summary.json").read_text())
    for a, b in zip(straight, resumed):
        for name in ("ssim_vs_baseline", "psnr_vs_baseline", "mean_patch_size", "coarse_step_fraction"):
            assert a[name] == b[name], (a["row"], name)


def test_model_cpu_offload_gives_the_same_rows_and_is_part_of_the_configuration(setup, tmp_path, monkeypatch,
                                                                                 capsys):
    """``--cpu-offload``: diffusers' model CPU offload, onto the CPU here (its hooks copy the weights between
    ``cpu`` and ``cpu:0``); the rows' quality is that without it. Its wall times include the moves, so a run
    cannot resume with the other setting."""
    from diffusers import DiffusionPipeline

    plain, offloaded = tmp_path / "plain", tmp_path / "offloaded"
    assert main(args(setup, plain)) == 0
    offloads = []
    monkeypatch.setattr(DiffusionPipeline, "enable_model_cpu_offload",
                        lambda pipe, *a, real=DiffusionPipeline.enable_model_cpu_offload, **k:
                        offloads.append(k.get("device")) or real(pipe, *a, **k))
    assert main(args(setup, offloaded, "--cpu-offload")) == 0
    assert offloads and all(torch.device(d).type == "cpu" for d in offloads)
    for a, b in zip(*(json.loads((o / "summary.json").read_text()) for o in (plain, offloaded))):
        for name in ("ssim_vs_baseline", "mean_patch_size", "coarse_step_fraction"):
            assert a[name] == pytest.approx(b[name], abs=1e-6), (a["row"], name)
    assert "under model CPU offload" in (offloaded / "report.md").read_text()
    capsys.readouterr()
    assert main(args(setup, plain, "--cpu-offload")) == 2
    assert "cpu_offload: false -> true" in capsys.readouterr().err


def test_a_lora_loaded_for_every_row_is_part_of_the_configuration(setup, tmp_path, capsys):
    """``--lora PATH:SCALE``: every row, the baseline included, runs the LoRA unfused beside ddit's adapter; a run
    cannot resume with another LoRA or scale."""
    from diffusers import StableDiffusion3Pipeline
    from peft import LoraConfig
    from peft.tuners.lora import LoraLayer
    from peft.utils import get_peft_model_state_dict
    from tiny_pipelines import build

    from ddit.checkpoint import CheckpointError
    from ddit.weights import load_loras

    source = StableDiffusion3Pipeline.from_pretrained(setup[0])
    torch.manual_seed(0)
    source.transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "add_q_proj"],
                                              init_lora_weights=False), adapter_name="style")
    lora = tmp_path / "style"
    type(source).save_lora_weights(lora, transformer_lora_layers=get_peft_model_state_dict(source.transformer,
                                                                                         adapter_name="style"))
    plain, styled = tmp_path / "plain", tmp_path / "styled"
    assert main(args(setup, plain)) == 0
    assert main(args(setup, styled, "--lora", f"{lora}:0.5")) == 0
    config = json.loads((styled / "config.json").read_text())
    assert config["loras"] == [["style", 0.5]] and "lora0" in config["model"]
    summary = {r["row"]: r for r in json.loads((styled / "summary.json").read_text())}
    assert summary["baseline"]["ssim_vs_baseline"] == pytest.approx(1.0) and summary["fixed"]["ssim_vs_baseline"] < 1
    for row in ("baseline", "fixed"):  # the LoRA is in the baseline and in ddit's rows
        images = [load_file(o / "images" / row / "0000000.safetensors")["images"] for o in (plain, styled)]
        assert not torch.equal(*images), row
    assert "LoRAs style at 0.5" in (styled / "report.md").read_text()

    pipe = StableDiffusion3Pipeline.from_pretrained(setup[0])
    load_loras(pipe, [(str(lora), 0.5)])
    layer = next(m for m in pipe.transformer.modules() if isinstance(m, LoraLayer))
    assert layer.scaling == {"lora0": 0.5}  # alpha / r = 1, weighted 0.5
    flux, _ = build("flux")  # a LoRA on FLUX.1's single-stream blocks, which SD3 lacks
    flux.transformer.add_adapter(LoraConfig(r=4, target_modules=r".*single_transformer_blocks.*to_q"))
    type(flux).save_lora_weights(tmp_path / "flux", transformer_lora_layers=get_peft_model_state_dict(
        flux.transformer))
    with pytest.raises(CheckpointError, match="flux: cannot load it into StableDiffusion3Pipeline: Target modules"):
        load_loras(StableDiffusion3Pipeline.from_pretrained(setup[0]), [(str(tmp_path / "flux"), 1.0)])
    save_file({"unet.mid_block.to_q.lora_A.weight": torch.zeros(4, 8)}, tmp_path / "unet.safetensors")
    with pytest.raises(CheckpointError, match="none of its weights fit SD3Transformer2DModel"):
        load_loras(StableDiffusion3Pipeline.from_pretrained(setup[0]), [(str(tmp_path / "unet.safetensors"), 1.0)])
    wan22, _ = build("wan22")
    with pytest.raises(ValueError, match="two experts .*load_into_transformer_2"):
        load_loras(wan22, [(str(lora), 1.0)])
    capsys.readouterr()
    assert main(args(setup, styled, "--lora", f"{lora}:1")) == 2
    assert "loras" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(args(setup, tmp_path / "missing", "--lora", str(tmp_path / "none.safetensors")))
    assert "no such LoRA file or folder" in capsys.readouterr().err


@pytest.mark.parametrize("change, message", [
    (dict(caches="teacache"), "row baseline+teacache: TeaCache needs its polynomial fit for this model"),
    (dict(extra=("--num-frames", "5")), "StableDiffusion3Pipeline takes no num_frames"),
    (dict(extra=("--progressive", "delta=0.05")), "the spectral rule needs clean latents of your images"),
    (dict(extra=("--progressive", "0.001")), "row progressive[switch=0.001]: switch 0.001 is below every step's noise"),
    (dict(policies=("progressive",), caches="none,first_block_cache"), "progressive resolution runs the stock "
                                                                       "pipeline (ddit.progressive_call), which "
                                                                       "takes no cache"),
    (dict(extra=("--num-per-class", "2")), "--num-per-class is for the testbed only"),
    (dict(extra=("--pipeline-arg", "sigmas=[1.0,0.5]")), "ddit sets sigmas itself"),  # would override every row's
])
def test_rows_that_cannot_run_are_refused_before_anything_is_written(setup, tmp_path, capsys, change, message):
    out = tmp_path / "run"
    assert main(args(setup, out, *change.pop("extra", ()), **change)) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_a_budget_row_calibrates_its_tau_on_the_pipeline_once(setup, tmp_path):
    out = tmp_path / "run"
    assert main(args(setup, out, policies=("budget", "budget.speedup=1.25"))) == 0
    tau = json.loads((out / "calibration.json").read_text())["budget"]
    assert tau > 0
    budget = {r["row"]: r for r in json.loads((out / "summary.json").read_text())}["budget"]
    assert budget["coarse_step_fraction"] > 0
    assert main(args(setup, out, policies=("budget", "budget.speedup=1.25"))) == 0  # resumed: the same tau
    assert json.loads((out / "calibration.json").read_text())["budget"] == tau


def test_an_adapter_of_another_transformer_is_refused(setup, tmp_path, capsys):
    other = save_tiny_pipeline("flux", tmp_path / "flux")
    a = args(setup, tmp_path / "run")
    a[a.index("--pipeline") + 1] = str(other)
    assert main(a) == 2
    assert "adapter" in capsys.readouterr().err


def test_two_processes_share_the_batches_and_match_one_process(setup, tmp_path):
    """``accelerate launch`` with two CPU processes: each samples every other batch into its own
    results file; the main process summarises; images equal a one-process run's."""
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0"]
    sharded = tmp_path / "sharded"
    done = subprocess.run([*launch, "-m", "ddit.ablate.cli", *args(setup, sharded)], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (sharded / "results.jsonl").exists() and (sharded / "results-rank1.jsonl").exists()
    alone = tmp_path / "alone"
    assert main(args(setup, alone)) == 0
    for key in ("baseline", "fixed"):
        for name in ("0000000", "0000002"):
            a = load_file(sharded / "images" / key / f"{name}.safetensors")["images"]
            b = load_file(alone / "images" / key / f"{name}.safetensors")["images"]
            assert (a - b).abs().max() < 1e-5, (key, name)
    rows = [r["row"] for r in json.loads((sharded / "summary.json").read_text())]
    assert rows == ["baseline", "baseline@3", "fixed"]


def test_diffusers_cache_hooks_and_teacache_are_rows_of_a_flux_pipeline_ablation(tmp_path, capsys):
    """FLUX.1 with diffusers' FirstBlockCache and with ddit's TeaCache (the published FLUX.1 fit), each alone and
    under the patch policy: the paper's composition, in the stock pipeline."""
    from diffusers import DiffusionPipeline

    from ddit import MultiPatchTransformer

    folder = save_tiny_pipeline("flux", tmp_path / "flux")
    MultiPatchTransformer(DiffusionPipeline.from_pretrained(folder).transformer).save_pretrained(tmp_path / "adapter")
    (tmp_path / "prompts.txt").write_text("a red circle\n")
    out = tmp_path / "run"
    assert main(["--pipeline", str(folder), "--adapter", str(tmp_path / "adapter"), "--prompts",
                 str(tmp_path / "prompts.txt"), "--out", str(out), "--steps", "4", "--fewer-steps", "",
                 "--policies", "fixed", "--policy-param", "fixed.fraction=0.5", "--caches",
                 "first_block_cache,teacache", "--cache-param", "first_block_cache.threshold=0.5",
                 "--cache-param", "teacache.coefficients=flux1-dev", "--cache-param", "teacache.delta=1e9",
                 "--height", "128", "--width", "128", "--pipeline-arg", "max_sequence_length=16",
                 "--no-progress"]) == 0
    summary = {r["row"]: r for r in json.loads((out / "summary.json").read_text())}
    assert list(summary) == ["baseline", "baseline+first_block_cache", "baseline+teacache", "fixed+first_block_cache",
                             "fixed+teacache"]
    assert summary["fixed+first_block_cache"]["coarse_step_fraction"] == 0.5
    assert summary["fixed+first_block_cache"]["cached_step_fraction"] is None  # a hook does not say
    # every step but the first and last skipped, and a sample's first fine step (4 steps: steps 0 and 2 coarse)
    assert summary["baseline+teacache"]["cached_step_fraction"] == pytest.approx(0.5)
    assert summary["fixed+teacache"]["cached_step_fraction"] == pytest.approx(0.25)
    assert summary["fixed+teacache"]["ssim_vs_baseline"] < 1

    assert main(["--out", str(tmp_path / "testbed"), "--caches", "first_block_cache"]) == 2
    assert "diffusers' cache hooks run in pipeline ablations only (--pipeline)" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["wan", "wan22", "skyreels-df"])
def test_a_video_pipeline_is_compared_frame_by_frame(kind, tmp_path):
    """Wan 2.2's second expert takes its adapter from the folder's transformer_2 subfolder: with every step coarse,
    its steps (the later half here) run coarse too. SkyReels-V2's diffusion forcing steps per-frame copies of its
    scheduler."""
    from diffusers import DiffusionPipeline

    from ddit import MultiPatchTransformer

    folder = save_tiny_pipeline(kind, tmp_path / kind)
    pipe = DiffusionPipeline.from_pretrained(folder)
    MultiPatchTransformer(pipe.transformer).save_pretrained(tmp_path / "adapter")
    if kind == "wan22":
        MultiPatchTransformer(pipe.transformer_2).save_pretrained(tmp_path / "adapter" / "transformer_2")
    fraction = 1.0 if kind == "wan22" else 0.5
    (tmp_path / "prompts.txt").write_text("a red circle\n")
    out = tmp_path / "run"
    assert main(["--pipeline", str(folder), "--adapter", str(tmp_path / "adapter"), "--prompts",
                 str(tmp_path / "prompts.txt"), "--out", str(out), "--steps", "4", "--fewer-steps", "",
                 "--policies", "fixed", "--policy-param", f"fixed.fraction={fraction}", "--caches", "none",
                 "--height", "128", "--width", "128", "--num-frames", "5", "--pipeline-arg", "max_sequence_length=16",
                 "--no-progress"]) == 0
    frames = load_file(out / "images" / "fixed" / "0000000.safetensors")["images"]
    assert frames.shape == (1, 5, 3, 128, 128) and frames.dtype == torch.uint8
    fixed = {r["row"]: r for r in json.loads((out / "summary.json").read_text())}["fixed"]
    assert 0 < fixed["ssim_vs_baseline"] < 1 and fixed["coarse_step_fraction"] == fraction
    assert (out / "grids" / "prompt000.png").exists()
    models = json.loads((out / "config.json").read_text())["model"]
    assert ("adapter_2" in models) == (kind == "wan22")  # a changed second adapter must not resume the run
    if kind == "wan22":
        from ddit.ablate.models import fingerprint

        assert models["adapter_2"] == fingerprint({"a": tmp_path / "adapter" / "transformer_2"})["a"]


def test_ltx2s_audio_is_compared_with_its_twins_beside_the_video(tmp_path):
    """LTX-2 generates audio with the video: its rows keep the waveforms and score them against the baseline's, a
    row's SNR from its samples' mean noise-to-signal ratio, as a PSNR; a cache skips both streams."""
    from diffusers import DiffusionPipeline

    from ddit import MultiPatchTransformer

    folder = save_tiny_pipeline("ltx2", tmp_path / "ltx2")
    MultiPatchTransformer(DiffusionPipeline.from_pretrained(folder).transformer).save_pretrained(tmp_path / "adapter")
    (tmp_path / "prompts.txt").write_text("a red circle\nblue stripes on white\n")
    out = tmp_path / "run"
    assert main(["--pipeline", str(folder), "--adapter", str(tmp_path / "adapter"), "--prompts",
                 str(tmp_path / "prompts.txt"), "--out", str(out), "--steps", "6", "--fewer-steps", "",
                 "--policies", "fixed", "--policy-param", "fixed.fraction=0.5", "--caches", "none,taylorseer",
                 "--height", "32", "--width", "32", "--num-frames", "5", "--pipeline-arg", "max_sequence_length=16",
                 "--pipeline-arg", "spatio_temporal_guidance_blocks=[1]", "--num-per-prompt", "2", "--batch-size", "2",
                 "--no-progress"]) == 0
    saved = load_file(out / "images" / "fixed" / "0000000.safetensors")
    assert saved["images"].shape == (2, 5, 3, 32, 32) and saved["audio"].ndim == 3  # (samples, channels, time)
    summary = {r["row"]: r for r in json.loads((out / "summary.json").read_text())}
    assert summary["baseline"]["audio_snr_vs_baseline"] is None  # identical: infinite, null in JSON
    for key in ("fixed", "baseline+taylorseer", "fixed+taylorseer"):
        row = summary[key]
        prompts = [p["audio_snr_vs_baseline"] for p in row["per_prompt"].values()]
        assert all(math.isfinite(p) for p in prompts) and len(set(prompts)) == 2
        pooled = -10 * math.log10(sum(10 ** (-p / 10) for p in prompts) / 2)  # two samples per prompt
        assert row["audio_snr_vs_baseline"] == pytest.approx(pooled)
    assert summary["baseline+taylorseer"]["cached_step_fraction"] > 0
    baseline = next(line for line in (out / "report.md").read_text().splitlines() if line.startswith("| baseline |"))
    assert baseline.count("identical") == 2  # PSNR and audio SNR


def test_a_row_whose_audio_only_some_batches_hold_is_refused_by_name(tmp_path):
    """Batches written before ddit kept the audio, resumed after: summing up would drop the row's audio score."""
    from ddit.ablate.runner import load_images, save_images

    images, audio = torch.zeros(2, 3, 8, 8, dtype=torch.uint8), torch.ones(2, 2, 16)
    save_images(tmp_path, "fixed", 0, images, audio)
    assert torch.equal(load_images(tmp_path, "fixed", "audio"), audio)
    save_images(tmp_path, "fixed", 2, images)
    assert load_images(tmp_path, "fixed").shape[0] == 4
    with pytest.raises(RuntimeError, match="has audio in some batches and not in 0000002.safetensors: delete"):
        load_images(tmp_path, "fixed", "audio")
