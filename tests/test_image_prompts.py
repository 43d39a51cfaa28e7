"""Prompts that carry their own images (a ``.jsonl`` prompts file): image-to-video through ``ddit distill
--pipeline`` and ``ddit-ablate --pipeline``, on the complete tiny Wan 2.2 A14B image-to-video folder."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from ddit.ablate.cli import main as ablate_main
from ddit.cli import main
from ddit.pipeline_call import Prompt, check_call, check_resolution, image_size, read_prompts
from ddit.tiny_pipelines import TINY_CALL, save_tiny_pipeline

TEXTS = ["a red circle", "blue stripes on white"]
SIZE = [*(a for name, value in TINY_CALL["wan22-i2v"].items() for a in (f"--{name.replace('_', '-')}", str(value))),
        "--pipeline-arg", "max_sequence_length=16"]


def write_image(path, seed, size=(128, 128)):
    pixels = np.random.default_rng(seed).integers(0, 256, (*size[::-1], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def write_prompts(folder, lines):
    """A .jsonl prompts file in ``folder``, each image beside it."""
    path = folder / "prompts.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    return path


@pytest.fixture(scope="module")
def i2v(tmp_path_factory):
    """The tiny image-to-video folder, and a prompts file that gives each prompt its own first frame."""
    root = tmp_path_factory.mktemp("i2v")
    folder = save_tiny_pipeline("wan22-i2v", root / "pipeline")
    (root / "frames").mkdir()
    for i in range(2):
        write_image(root / "frames" / f"{i}.png", i)
    prompts = write_prompts(root, [{"prompt": t, "image": f"frames/{i}.png"} for i, t in enumerate(TEXTS)])
    return folder, prompts


def test_a_jsonl_file_gives_each_prompt_its_arguments_and_a_key_that_holds_their_content(tmp_path):
    for i in range(2):
        write_image(tmp_path / f"{i}.png", i)
    path = write_prompts(tmp_path, [{"prompt": " a cat ", "image": "0.png", "guidance_scale": 5.0},
                                    {"prompt": "a dog", "image": "1.png", "guidance_scale": 3.0}])
    cat, dog = read_prompts(path)
    assert cat.text == "a cat" and cat.label == "a cat [image=0.png, guidance_scale=5.0]"
    assert cat.inputs["image"].size == (128, 128) and cat.inputs["guidance_scale"] == 5.0  # not decoded yet
    image = cat.call_inputs()["image"]  # decoded for the call, as diffusers' load_image gives it
    assert isinstance(image, Image.Image) and image.mode == "RGB"
    assert np.array_equal(np.asarray(image), np.asarray(Image.open(tmp_path / "0.png")))
    key = json.loads(cat.key)
    assert key["prompt"] == "a cat" and key["image"].startswith("sha256:") and key["guidance_scale"] == 5.0

    write_image(tmp_path / "0.png", 7)  # same file name, other pixels: another prompt, and a stale one
    assert read_prompts(path)[0].key != cat.key
    with pytest.raises(ValueError, match="0.png changed after the prompts file was read"):
        cat.call_inputs()
    write_prompts(tmp_path, [{"prompt": "a dog"}])
    assert read_prompts(path) == [Prompt("a dog")] and read_prompts(path)[0].key == "a dog"  # as in a text file
    (tmp_path / "plain.txt").write_text('{"prompt": "as text"}\n')
    assert read_prompts(tmp_path / "plain.txt") == [Prompt('{"prompt": "as text"}')]  # only .jsonl is JSON
    (tmp_path / "bom.txt").write_text("a cat\na dog\n", encoding="utf-8-sig")  # as some editors save it
    assert read_prompts(tmp_path / "bom.txt") == [Prompt("a cat"), Prompt("a dog")]


def test_a_prompt_made_in_python_is_known_by_its_arguments_content():
    pixels = np.zeros((8, 8, 3), dtype=np.uint8)
    same, other = Image.fromarray(pixels), Image.fromarray(pixels + 1)
    assert Prompt("a", {"image": same}).key == Prompt("a", {"image": Image.fromarray(pixels.copy())}).key
    assert Prompt("a", {"image": same}).key != Prompt("a", {"image": other}).key
    assert Prompt("a", {"image": same}) != Prompt("a", {"image": other})
    tensor = torch.zeros(1, 3, 8, 8)
    assert Prompt("a", {"image": tensor}).key != Prompt("a", {"image": tensor + 1}).key
    assert Prompt("a", {"image": tensor}).label == "a [image=<tensor 1x3x8x8>]"
    with pytest.raises(ValueError, match="a prompt's image \\(object\\) cannot be told apart"):
        Prompt("a", {"image": object()})


@pytest.mark.parametrize("line, message", [
    ("not json", "prompts.jsonl, line 2 is not JSON"),
    ('{"image": "cat.png"}', 'prompts.jsonl, line 2 needs a "prompt" with text'),
    ('["a cat"]', 'line 2 needs a "prompt" with text'),
    ('{"prompt": "a cat", "image": "missing.png"}', "line 2: cannot read the image .*missing.png for image \\(no "
                                                    "such file\\); image paths are relative to the prompts file"),
    ('{"prompt": "a cat", "image": "broken.png"}', "line 2: cannot read the image .*broken.png for image \\(not an "
                                                   "image file PIL can read\\)"),
    ('{"prompt": "a cat", "image": "folder.png"}', "line 2: cannot read the image .*folder.png for image \\(no "
                                                   "such file\\)"),
    ('{"prompt": "a cat", "image": "https://x.org/cat.png"}', "line 2: image 'https://x.org/cat.png' is a URL; "
                                                               "download the image"),
    ('{"prompt": "a cat", "height": 64}', "line 2 gives height: a run makes one size for all its prompts"),
    ('{"prompt": "a cat", "width": 64, "num_frames": 9}', "line 2 gives width, num_frames: a run makes one size"),
    ('{"prompt": "a cat", "image": "cat.png"}', "line 2 gives image, but line 1 gives no argument: every line must "
                                                "give the same arguments"),
])
def test_a_bad_jsonl_line_is_named_with_its_number_and_the_fix(line, message, tmp_path):
    write_image(tmp_path / "cat.png", 0)
    (tmp_path / "broken.png").write_bytes(b"not a png")
    (tmp_path / "folder.png").mkdir()
    path = tmp_path / "prompts.jsonl"
    path.write_text('\ufeff{"prompt": "fine"}\n' + line + "\n")  # a byte-order mark, as some editors write
    with pytest.raises(ValueError, match=message):
        read_prompts(path)


def test_what_the_prompts_give_is_checked_against_the_pipeline_before_any_work(i2v):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(i2v[0])
    image = {"image": Image.new("RGB", (128, 128))}
    given = [Prompt("a", image), Prompt("b", image)]
    check_call(pipe, {"num_frames": 5}, given)  # every prompt has its image: fine
    cases = [
        ({}, [given[0], Prompt("b")], {}, "needs image in every call \\('b' has none\\): give each prompt its own "
                                          'in a .jsonl prompts file.*"image": "cat.png"'),
        ({}, [Prompt("a", {**image, "colour": 1})], {}, "takes no colour, which the prompts file gives"),
        ({}, [Prompt("a", {**image, "generator": 1})], {}, "ddit sets generator itself"),
        ({}, [Prompt("a", {**image, "num_videos_per_prompt": 2})], {}, "ddit sets num_videos_per_prompt itself"),
        ({}, [Prompt("a", {**image, "num_inference_steps": 3})], dict(sets=("num_inference_steps",)),
         "ddit sets num_inference_steps itself"),
        ({"image": "x"}, given, {}, "image is given both as an option and in the prompts file"),
        ({"return_dict": False}, given, {}, "ddit sets return_dict itself"),
        ({"latents": 0}, given, {}, "ddit sets latents itself"),
    ]
    for call, prompts, options, message in cases:
        with pytest.raises(ValueError, match=message):
            check_call(pipe, call, prompts, **options)


def test_an_image_sized_pipeline_is_checked_at_the_size_each_image_gives():
    """HunyuanVideo 1.5's image-to-video takes no height or width: it picks a size after the image."""
    from diffusers.pipelines.hunyuan_video1_5.image_processor import HunyuanVideo15ImageProcessor

    class ImageSized:  # what the check reads of HunyuanVideo15ImageToVideoPipeline
        target_size, vae_scale_factor_spatial = 640, 16
        video_processor = HunyuanVideo15ImageProcessor(vae_scale_factor=16)

        def __call__(self, image, prompt=None, num_frames=121):
            pass

    pipe = ImageSized()
    wide, tall = Image.new("RGB", (1280, 720)), Image.new("RGB", (480, 848))
    expected = pipe.video_processor.calculate_default_height_width(720, 1280, 640)
    assert image_size(pipe, {"image": wide}) == (*expected, 16) and expected[0] < expected[1]
    assert image_size(pipe, {"image": tall})[0] > image_size(pipe, {"image": tall})[1]
    sizes = [p for p in (1, 2, 4, 8) if all(d // 16 % p == 0 for d in expected)]
    check_resolution(pipe, {}, sizes, [Prompt("wide", {"image": wide}), Prompt("wide too", {"image": wide})])
    too_coarse = 2 * max(sizes)
    with pytest.raises(ValueError, match=f"patch sizes \\[{too_coarse}\\] do not divide .* sizes its output "
                                         "after the image \\(of 'wide.*' here\\): use images whose size it picks "
                                         "is a multiple of"):
        check_resolution(pipe, {}, [1, too_coarse], [Prompt("wide", {"image": wide})])
    with pytest.raises(ValueError, match="after the image: .* for 'wide.*', .* for 'tall.*'; a run makes one size"):
        check_resolution(pipe, {}, [1], [Prompt("wide", {"image": wide}), Prompt("tall", {"image": tall})])


def test_image_to_video_distils_from_a_jsonl_file_resumes_and_refuses_another_image(i2v, tmp_path, capsys):
    folder, prompts = i2v
    out = tmp_path / "run"
    args = ["distill", "--pipeline", str(folder), "--prompts", str(prompts), "--out", str(out),
            "--num-inference-steps", "4", "--batch-size", "2", *SIZE]
    assert main([*args, "--steps", "2"]) == 0
    recorded = sorted((out / "states").rglob("*.safetensors"))
    assert [str(p.relative_to(out / "states")) for p in recorded] == [
        "00000.safetensors", "00001.safetensors", "transformer_2/00000.safetensors", "transformer_2/00001.safetensors"]
    assert (out / "adapter" / "transformer_2").is_dir()  # both experts' adapters
    conditions = []  # after the noisy latent's 16 channels: the prompt's own first frame's latent, and a mask
    for path in recorded[:2]:
        latents = [v for k, v in load_file(path).items() if k.startswith("hidden_states.")]
        assert len(latents) >= 2 and all(torch.equal(x[:, 16:], latents[0][:, 16:]) for x in latents)
        conditions.append(latents[0][:, 16:32])
    assert not torch.allclose(*conditions)  # each prompt's own image reached the pipeline
    stamps = [p.stat().st_mtime_ns for p in recorded]
    assert main([*args, "--steps", "3", "--resume"]) == 0
    assert [p.stat().st_mtime_ns for p in recorded] == stamps  # the same prompts and images: nothing recorded twice

    renamed = tmp_path / "renamed"  # the same images under other names: the same prompts
    renamed.mkdir()
    for i in range(2):
        write_image(renamed / f"first-frame-{i}.png", i)
    same = write_prompts(renamed, [{"prompt": t, "image": f"first-frame-{i}.png"} for i, t in enumerate(TEXTS)])
    assert main([*args[:4], str(same), *args[5:], "--steps", "3", "--resume"]) == 0
    assert [p.stat().st_mtime_ns for p in recorded] == stamps

    moved = tmp_path / "moved"
    (moved / "frames").mkdir(parents=True)
    write_image(moved / "frames" / "0.png", 7)  # the first prompt's text, another first frame
    write_image(moved / "frames" / "1.png", 1)
    other = write_prompts(moved, [{"prompt": t, "image": f"frames/{i}.png"} for i, t in enumerate(TEXTS)])
    capsys.readouterr()
    assert main([*args[:4], str(other), *args[5:], "--steps", "3", "--resume"]) == 2
    assert "00000.safetensors was recorded from another prompt than 'a red circle [image=frames/0.png]'" in (
        capsys.readouterr().err)
    assert [p.stat().st_mtime_ns for p in recorded] == stamps


def test_image_to_video_ablates_each_prompt_with_its_image(i2v, tmp_path, capsys):
    folder, prompts = i2v
    adapter = tmp_path / "distill"
    assert main(["distill", "--pipeline", str(folder), "--prompts", str(prompts), "--out", str(adapter),
                 "--num-inference-steps", "4", "--steps", "1", *SIZE]) == 0
    args = ["--pipeline", str(folder), "--adapter", str(adapter / "adapter"), "--prompts", str(prompts),
            "--out", str(tmp_path / "ablate"), "--steps", "4", "--fewer-steps", "2", "--policies", "fixed,budget",
            "--policy-param", "fixed.fraction=0.5", "--policy-param", "budget.speedup=1.25", "--caches", "none",
            "--no-progress", *SIZE]
    nowhere = [*args[:1], str(tmp_path / "no-pipeline"), *args[2:]]
    assert ablate_main([*nowhere, "--batch-size", "2"]) == 2  # refused before the pipeline loads
    assert "run one sample per pipeline call" in capsys.readouterr().err
    stepped = write_prompts(tmp_path, [{"prompt": "a", "image": str(prompts.parent / "frames" / "0.png"),
                                        "num_inference_steps": 3}])
    assert ablate_main([*args[:5], str(stepped), *args[6:]]) == 2
    assert "ddit sets num_inference_steps itself" in capsys.readouterr().err
    assert not (tmp_path / "ablate").exists()

    assert ablate_main(args) == 0
    summary = {r["row"]: r for r in json.loads((tmp_path / "ablate" / "summary.json").read_text())}
    labels = {f"{t} [image=frames/{i}.png]" for i, t in enumerate(TEXTS)}
    assert set(summary["fixed"]["per_prompt"]) == labels
    assert summary["fixed"]["coarse_step_fraction"] > 0 and summary["fixed"]["ssim_vs_baseline"] < 1
    tau = json.loads((tmp_path / "ablate" / "calibration.json").read_text())["budget"]  # fitted on the prompts'
    assert tau > 0 and set(summary["budget"]["per_prompt"]) == labels  # calibration samples, with their images
    config = json.loads((tmp_path / "ablate" / "config.json").read_text())
    assert all(json.loads(key)["image"].startswith("sha256:") for key in config["prompts"])

    # ``accelerate launch`` with two CPU processes: each samples one prompt with its image, as one process did
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0"]
    sharded = tmp_path / "sharded"
    done = subprocess.run([*launch, "-m", "ddit.ablate.cli", *args[:7], str(sharded), *args[8:]], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (sharded / "results-rank1.jsonl").exists()
    for key in ("baseline", "fixed"):
        for name in ("0000000", "0000001"):  # sample 1 is rank 1's
            a, b = (load_file(folder / "images" / key / f"{name}.safetensors")["images"]
                    for folder in (sharded, tmp_path / "ablate"))
            assert torch.equal(a, b), (key, name)
