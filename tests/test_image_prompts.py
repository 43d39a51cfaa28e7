"""Prompts that carry their own images (a ``.jsonl`` prompts file): image-to-video through ``ddit distill
--pipeline`` and ``ddit-ablate --pipeline``, on the complete tiny Wan 2.2 A14B image-to-video folder."""

import json

import numpy as np
import pytest
from PIL import Image

from ddit.ablate.cli import main as ablate_main
from ddit.cli import main
from ddit.pipeline_call import Prompt, check_call, check_resolution, image_size, read_prompts
from ddit.tiny_pipelines import TINY_CALL, save_tiny_pipeline

TEXTS = ["a red circle", "blue stripes on white"]
SIZE = ["--height", "128", "--width", "128", "--num-frames", "5", "--pipeline-arg", "max_sequence_length=16"]


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


def test_a_jsonl_file_gives_each_prompt_its_images_loaded_and_a_key_that_holds_their_content(tmp_path):
    write_image(tmp_path / "cat.png", 0)
    path = write_prompts(tmp_path, [{"prompt": " a cat ", "image": "cat.png", "num_frames": 9}, {"prompt": "a dog"}])
    cat, dog = read_prompts(path)
    assert cat.text == "a cat" and isinstance(cat.inputs["image"], Image.Image) and cat.inputs["num_frames"] == 9
    assert cat.label == "a cat [image=cat.png, num_frames=9]"
    assert dog == Prompt("a dog") and dog.key == "a dog" and not dog.inputs  # a plain prompt, as in a text file
    key = json.loads(cat.key)
    assert key["prompt"] == "a cat" and key["image"].startswith("sha256:") and key["num_frames"] == 9

    write_image(tmp_path / "cat.png", 1)  # same file name, other pixels: another prompt
    assert read_prompts(path)[0].key != cat.key
    (tmp_path / "plain.txt").write_text('{"prompt": "as text"}\n')
    assert read_prompts(tmp_path / "plain.txt") == [Prompt('{"prompt": "as text"}')]  # only .jsonl is JSON


@pytest.mark.parametrize("line, message", [
    ("not json", "prompts.jsonl, line 2 is not JSON"),
    ('{"image": "cat.png"}', 'prompts.jsonl, line 2 needs a "prompt" with text'),
    ('["a cat"]', 'line 2 needs a "prompt" with text'),
    ('{"prompt": "a cat", "image": "missing.png"}', "line 2: cannot read the image .*missing.png for image"),
    ('{"prompt": "a cat", "image": "broken.png"}', "line 2: cannot read the image .*broken.png"),
])
def test_a_bad_jsonl_line_is_named_with_its_number_and_the_fix(line, message, tmp_path):
    (tmp_path / "broken.png").write_bytes(b"not a png")
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "fine"}\n' + line + "\n")
    with pytest.raises(ValueError, match=message):
        read_prompts(path)


def test_what_the_prompts_give_is_checked_against_the_pipeline_before_any_work(i2v):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(i2v[0])
    image = {"image": Image.new("RGB", (128, 128))}
    given = [Prompt("a", image, key="a1"), Prompt("b", image, key="b1")]
    check_call(pipe, {"num_frames": 5}, given)  # every prompt has its image: fine
    cases = [
        ({}, [given[0], Prompt("b")], "needs image in every call \\('b' has none\\)"),
        ({}, [Prompt("a", {**image, "colour": 1}, key="a2")], "takes no colour, which the prompts file gives"),
        ({}, [Prompt("a", {**image, "generator": 1}, key="a3")], "ddit sets generator itself"),
        ({"image": "x"}, given, "image is given both as an option and in the prompts file"),
    ]
    for call, prompts, message in cases:
        with pytest.raises(ValueError, match=message):
            check_call(pipe, call, prompts)


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
    check_resolution(pipe, {}, sizes, [Prompt("wide", {"image": wide}, key="w")])
    too_coarse = 2 * max(sizes)
    with pytest.raises(ValueError, match=f"patch sizes \\[{too_coarse}\\] do not divide .*sizes its output after "
                                         "the image of 'wide'"):
        check_resolution(pipe, {}, [1, too_coarse], [Prompt("wide", {"image": wide}, key="w")])


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
    assert "00000.safetensors was recorded from the prompt" in capsys.readouterr().err
    assert [p.stat().st_mtime_ns for p in recorded] == stamps


def test_image_to_video_ablates_each_prompt_with_its_image(i2v, tmp_path, capsys):
    folder, prompts = i2v
    adapter = tmp_path / "distill"
    assert main(["distill", "--pipeline", str(folder), "--prompts", str(prompts), "--out", str(adapter),
                 "--num-inference-steps", "4", "--steps", "1", *SIZE]) == 0
    args = ["--pipeline", str(folder), "--adapter", str(adapter / "adapter"), "--prompts", str(prompts),
            "--out", str(tmp_path / "ablate"), "--steps", "4", "--fewer-steps", "2", "--policies", "fixed",
            "--policy-param", "fixed.fraction=0.5",
            "--caches", "none", "--no-progress", *SIZE]
    assert ablate_main([*args, "--batch-size", "2"]) == 2
    assert "run one sample per pipeline call" in capsys.readouterr().err
    assert not (tmp_path / "ablate").exists()

    assert ablate_main(args) == 0
    summary = {r["row"]: r for r in json.loads((tmp_path / "ablate" / "summary.json").read_text())}
    labels = {f"{t} [image=frames/{i}.png]" for i, t in enumerate(TEXTS)}
    assert set(summary["fixed"]["per_prompt"]) == labels
    assert summary["fixed"]["coarse_step_fraction"] > 0 and summary["fixed"]["ssim_vs_baseline"] < 1
    config = json.loads((tmp_path / "ablate" / "config.json").read_text())
    assert all(json.loads(key)["image"].startswith("sha256:") for key in config["prompts"])
    assert TINY_CALL["wan22-i2v"]["num_frames"] == 5
