import json

import pytest
import torch
from conftest import TINY_DIT
from PIL import Image

from ddit.cli import main
from ddit.testbed.base_model import build_base_model


def test_generate_writes_a_grid_png(tmp_path):
    build_base_model(**TINY_DIT).save_pretrained(tmp_path / "model")
    out = tmp_path / "grid.png"
    code = main(["generate", "--prompt", "moon", "--num", "4", "--steps", "2",
                 "--model", str(tmp_path / "model"), "--out", str(out)])
    assert code == 0
    # 4 images of 32 px in one row with 2 px gaps, scaled 4x
    assert Image.open(out).size == ((4 * 34 + 2) * 4, (34 + 2) * 4)


def test_unknown_prompt_is_a_clear_error(tmp_path, capsys):
    code = main(["generate", "--prompt", "zebra", "--out", str(tmp_path / "x.png")])
    assert code == 2
    assert "unknown prompt 'zebra'" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_unknown_command_exits_with_usage():
    with pytest.raises(SystemExit):
        main(["teleport"])


def test_distill_command_trains_and_resumes(tmp_path):
    build_base_model(**TINY_DIT).save_pretrained(tmp_path / "base")
    args = ["distill", "--out", str(tmp_path / "run"), "--base", str(tmp_path / "base"),
            "--sizes", "4", "--batch-size", "2", "--num-inference-steps", "4"]
    assert main([*args, "--steps", "1"]) == 0
    assert main([*args, "--steps", "2", "--resume"]) == 0
    assert (tmp_path / "run" / "adapter" / "multipatch.safetensors").is_file()


def test_distill_with_backbone_needs_latents(tmp_path, capsys):
    build_base_model(**TINY_DIT).save_pretrained(tmp_path / "dit")
    assert main(["distill", "--out", str(tmp_path / "run"), "--backbone", str(tmp_path / "dit")]) == 2
    assert "--backbone needs --latents" in capsys.readouterr().err


def test_calibrate_teacache_writes_a_fit(tmp_path):
    model = build_base_model(**TINY_DIT)
    for p in model.parameters():  # the zero-initialised output would make every change 0 / 0
        torch.nn.init.normal_(p, std=0.05)
    model.save_pretrained(tmp_path / "model")
    out = tmp_path / "fit.json"
    assert main(["calibrate", "teacache", "--model", str(tmp_path / "model"), "--per-class", "1",
                 "--steps", "6", "--out", str(out)]) == 0
    assert len(json.loads(out.read_text())["coefficients"]) == 5


@pytest.mark.parametrize("flags, expected", [
    (["--num", "0"], "--num and --steps must be at least 1"),
    (["--steps", "0"], "--num and --steps must be at least 1"),
    (["--guidance", "-5"], "--guidance must be at least 1"),
])
def test_generate_refuses_runs_that_cannot_mean_anything(tmp_path, capsys, flags, expected):
    assert main(["generate", "--prompt", "moon", "--out", str(tmp_path / "x.png"), *flags]) == 2
    assert expected in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_ctrl_c_ends_with_one_line(tmp_path, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("ddit.testbed.base_model.generate", interrupted)
    build_base_model(**TINY_DIT).save_pretrained(tmp_path / "model")
    assert main(["generate", "--prompt", "moon", "--model", str(tmp_path / "model"),
                 "--out", str(tmp_path / "x.png")]) == 130
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "interrupted" in err and "Traceback" not in err


def test_help_names_the_harness_and_what_it_can_run(capsys):
    from ddit.ablate.cli import main as ablate_main

    with pytest.raises(SystemExit):
        main(["--help"])
    assert "ddit-ablate" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        ablate_main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "third_order" in text and "oracle" in text and "taylorseer" in text and "--device" in text


def test_a_grid_with_row_labels_writes_them_in_a_margin(tmp_path):
    from ddit.images import save_grid

    images = torch.zeros(4, 3, 8, 8)
    save_grid(images, tmp_path / "plain.png", ncol=2)
    save_grid(images, tmp_path / "labelled.png", ncol=2, row_labels=["baseline", "third_order"])
    plain, labelled = Image.open(tmp_path / "plain.png"), Image.open(tmp_path / "labelled.png").convert("L")
    assert labelled.height == plain.height and labelled.width > plain.width
    margin = labelled.crop((0, 0, labelled.width - plain.width, labelled.height))
    assert margin.getextrema()[0] < 128  # dark text on the white margin


@pytest.mark.parametrize("command, message", [
    (["distill", "--prompts", "p.txt"], "--prompts, --cpu-offload, --lora and --transformer need --pipeline"),
    (["distill", "--cpu-offload"], "--prompts, --cpu-offload, --lora and --transformer need --pipeline"),
    (["calibrate", "teacache", "--cpu-offload"],
     "--cpu-offload, --transformer, --lora and --pipeline-arg need --pipeline"),
])
def test_pipeline_options_without_a_pipeline_are_refused(command, message, tmp_path, capsys):
    assert main([*command, "--out", str(tmp_path / "out")]) == 2
    assert message in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_eval_of_fewer_than_two_images_is_refused_before_sampling(capsys):
    assert main(["testbed", "eval", "--num", "1"]) == 2
    assert "--num must be at least 2" in capsys.readouterr().err


def test_calibrate_teacache_with_a_lora_fits_the_styled_transformer(tmp_path, capsys):
    """``--lora``: the fit is the styled transformer's, and says which LoRA (by a hash of its weights) and scale."""
    from diffusers import DiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from ddit.tiny_pipelines import save_tiny_pipeline

    folder = save_tiny_pipeline("flux", tmp_path / "flux")
    source = DiffusionPipeline.from_pretrained(folder)
    torch.manual_seed(0)
    source.transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "add_q_proj"],
                                              init_lora_weights=False), adapter_name="style")
    type(source).save_lora_weights(tmp_path / "style", transformer_lora_layers=get_peft_model_state_dict(
        source.transformer, adapter_name="style"))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\nblue stripes on white\n")
    args = ["calibrate", "teacache", "--pipeline", str(folder), "--prompts", str(prompts), "--height", "128",
            "--width", "128", "--pipeline-arg", "max_sequence_length=16", "--steps", "12"]
    assert main([*args, "--out", str(tmp_path / "plain.json")]) == 0
    assert main([*args, "--out", str(tmp_path / "styled.json"), "--lora", f"{tmp_path / 'style'}:0.5"]) == 0
    plain, styled = (json.loads((tmp_path / f"{name}.json").read_text()) for name in ("plain", "styled"))
    assert "loras" not in plain and list(styled["loras"]) == ["transformer"]
    assert list(styled["loras"]["transformer"]) == ["lora0"] and styled["loras"]["transformer"]["lora0"].endswith(
        "scale 0.5")
    assert styled["coefficients"] != plain["coefficients"]
    wan22 = save_tiny_pipeline("wan22", tmp_path / "wan22")  # refused before loading, with TeaCache's reason
    assert main([*args[:3], str(wan22), *args[4:], "--out", str(tmp_path / "x.json"), "--lora", str(
        tmp_path / "style")]) == 2
    assert "needs a fit per expert" in capsys.readouterr().err


def test_calibrate_teacache_fits_a_pipelines_transformer_for_teacache_to_take(tmp_path, capsys):
    """``ddit calibrate teacache --pipeline``: one (input change, output change) pair per prompt and pair of
    consecutive steps, fitted and written where TeaCache (and ``--cache-param teacache.coefficients=``) reads it."""
    from diffusers import DiffusionPipeline
    from peft.tuners.lora import LoraLayer
    from tiny_pipelines import build

    import ddit
    from ddit.backbones.qwenimage import QwenImageSpec
    from ddit.caches import TeaCache
    from ddit.calibration import calibrate_teacache_on_pipeline
    from ddit.tiny_pipelines import save_tiny_pipeline

    folder = save_tiny_pipeline("flux", tmp_path / "flux")
    prompts, fit = tmp_path / "prompts.txt", tmp_path / "fit.json"
    prompts.write_text("a red circle\nblue stripes on white\n")
    args = ["calibrate", "teacache", "--pipeline", str(folder), "--prompts", str(prompts), "--height", "128",
            "--width", "128", "--pipeline-arg", "max_sequence_length=16", "--out", str(fit)]
    assert main([*args, "--steps", "6"]) == 2
    assert "10 pairs of consecutive steps are too few" in capsys.readouterr().err and not fit.exists()
    assert main([*args, "--steps", "12"]) == 0
    written = json.loads(fit.read_text())
    assert len(written["coefficients"]) == 5 and written["pairs"] == 2 * 11
    assert written["model"] == "FluxTransformer2DModel"
    guide = written["delta_for_skipped_share"]  # deltas that skip more steps are larger
    assert list(guide) == ["0.2", "0.3", "0.4", "0.5", "0.6"] and guide["0.2"] <= guide["0.5"]
    assert "TeaCache skips 20% of the steps at delta" in capsys.readouterr().out
    offloads = []
    with pytest.MonkeyPatch.context() as patch:  # diffusers' model CPU offload, onto the CPU here: the same fit
        patch.setattr(DiffusionPipeline, "enable_model_cpu_offload",
                      lambda pipe, *a, real=DiffusionPipeline.enable_model_cpu_offload, **k:
                      offloads.append(k.get("device")) or real(pipe, *a, **k))
        assert main([*args[:-1], str(tmp_path / "offloaded.json"), "--steps", "12", "--cpu-offload"]) == 0
    offloaded = json.loads((tmp_path / "offloaded.json").read_text())["coefficients"]
    assert offloads and offloaded == pytest.approx(written["coefficients"], rel=1e-4)  # an ill-conditioned fit

    pipe = DiffusionPipeline.from_pretrained(folder)
    ddit.enable(pipe, ddit.MultiPatchTransformer(pipe.transformer), policy="baseline",
                cache=TeaCache(coefficients=fit, delta=1e9))
    pipe("a red circle", height=128, width=128, num_inference_steps=4, max_sequence_length=16, output_type="latent")
    assert [r["cached"] for r in ddit.summary(pipe).records] == [False, True, True, False]
    ddit.disable(pipe)

    qwen, _ = build("qwenimage")  # blocks whose modulated input TeaCache does not know: refused before any call
    with pytest.MonkeyPatch.context() as patch, pytest.raises(ValueError, match="modulated input of QwenImage"):
        patch.setattr(QwenImageSpec, "teacache_blocks", ())
        calibrate_teacache_on_pipeline(qwen, ["a red circle"], tmp_path / "qwen.json")
    assert "save_pretrained" not in vars(qwen) and not (tmp_path / "qwen.json").exists()
    assert not any(isinstance(m, LoraLayer) for m in qwen.transformer.modules())
    assert not any(isinstance(m, LoraLayer) for m in pipe.transformer.modules())  # disabled: stock again
    with pytest.raises(ValueError, match="neither a published fit"):
        TeaCache(coefficients=tmp_path / "missing.json")
    ddit.enable(pipe, ddit.MultiPatchTransformer(pipe.transformer), policy="baseline")
    with pytest.raises(ValueError, match="this pipeline is enabled"):
        calibrate_teacache_on_pipeline(pipe, ["a red circle"], tmp_path / "again.json")
    ddit.disable(pipe)
    pipe.set_progress_bar_config(desc="mine")
    calibrate_teacache_on_pipeline(pipe, ["a"] * 2, tmp_path / "new" / "fit.json", progress=False,
                                   call=dict(height=128, width=128, num_inference_steps=12, max_sequence_length=16))
    assert (tmp_path / "new" / "fit.json").is_file() and pipe._progress_bar_config == {"desc": "mine"}
