"""Edit pipelines, whose reference images' tokens ride beside the latent's (FLUX.1 Kontext, FLUX.2's image=,
Qwen-Image-Edit), on the tiny folders: each reference keeps its own grid, runs as coarse as its size allows, and
neither the policy's signal nor distillation sees it. The pipelines run on ``DDIT_TEST_DEVICE`` (default ``cpu``;
``benchmarks/gpu_check.sh``: ``cuda``)."""

import json
import os

import diffusers
import pytest
import torch
from diffusers import DiffusionPipeline
from PIL import Image
from safetensors import safe_open
from test_pipelines import Given

import ddit
from ddit.ablate.cli import main as ablate_main
from ddit.caches import TaylorSeer, replace_stack
from ddit.cli import main
from ddit.pipeline_call import Prompt, check_resolution
from ddit.policies import PatchPolicy
from ddit.tiny_pipelines import save_tiny_pipeline, wake_zeros

#: A 128x64 reference (taller than wide) for a 128x128 output: a 16x16 latent beside a 16x8 one.
TALL = torch.rand(1, 3, 128, 64, generator=torch.Generator().manual_seed(1))
DEVICE = torch.device(os.environ.get("DDIT_TEST_DEVICE", "cpu"))
KONTEXT = dict(height=128, width=128, max_area=128 * 128, _auto_resize=False, num_inference_steps=4)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """FLUX.1 Kontext as a user of FLUX.1-Kontext-dev has it (the tiny FLUX components, Kontext's model index),
    and FLUX.2 [klein]."""
    root = tmp_path_factory.mktemp("edit")
    flux = DiffusionPipeline.from_pretrained(save_tiny_pipeline("flux", root / "flux"))
    diffusers.FluxKontextPipeline.from_pipe(flux).save_pretrained(root / "kontext")
    return {"kontext": root / "kontext", "flux2": save_tiny_pipeline("flux2", root / "flux2")}


def load(folder):
    pipe = DiffusionPipeline.from_pretrained(folder).to(DEVICE)
    pipe.set_progress_bar_config(disable=True)
    return pipe


class SeenLatents(PatchPolicy):
    """A fixed schedule that keeps the latents the runtime shows it."""

    name = "seen-latents"

    def __init__(self, schedule):
        super().__init__()
        self.schedule, self.seen = schedule, []

    def choose(self, step):
        self.seen.append(step.latent.shape)
        return self.schedule[step.index], {}


def test_kontext_runs_a_reference_of_another_size_coarse_and_reads_only_the_generated_latent(folders):
    pipe = load(folders["kontext"])

    def call():
        return pipe(image=TALL, prompt="a red circle", generator=torch.Generator().manual_seed(0), output_type="pt",
                    **KONTEXT).images

    stock = call()
    adapter = ddit.MultiPatchTransformer(pipe.transformer)
    ddit.enable(pipe, adapter, policy="baseline")
    torch.testing.assert_close(call(), stock, rtol=0, atol=1e-5)
    ddit.disable(pipe)

    policy = SeenLatents([8, 4, 2, 2])
    ddit.enable(pipe, adapter, policy=policy)
    out = call()
    assert policy.seen == [(1, 16, 16, 16)] * 4  # the generated latent; the reference's tokens are not in it
    # tokens: the 16x16 latent's and the 16x8 reference's, at 8 (4 + 2), 4 (16 + 8) and the base size (64 + 32)
    assert [(r["patch_size"], r["tokens"], r["base_tokens"]) for r in ddit.summary(pipe).records] == [
        (8, 6, 96), (4, 24, 96), (2, 96, 96), (2, 96, 96)]
    assert torch.isfinite(out).all() and (out - stock).abs().max() > 1e-3
    ddit.disable(pipe)
    assert torch.equal(call(), stock)

    # a cache on the dual-stream blocks: the reference's tokens run through them, the output norm sees the generated
    # grid's alone at coarse sizes; a cache that never skips changes nothing
    ddit.enable(pipe, adapter, policy="baseline", cache=TaylorSeer(interval=1))
    torch.testing.assert_close(call(), stock, rtol=0, atol=1e-5)
    ddit.disable(pipe)
    ddit.enable(pipe, adapter, policy=SeenLatents([4, 4, 4, 2]), cache=TaylorSeer(interval=2, order=0, warmup=1))
    cached = call()
    assert [r["cached"] for r in ddit.summary(pipe).records] == [False, True, False, False]
    assert torch.isfinite(cached).all() and not torch.equal(cached, out)
    ddit.disable(pipe)


def test_flux2_reference_images_of_two_sizes_run_beside_the_latent(folders):
    """The first reference (128x128) is coarse at every size; the second (96x64, a 12x8 latent) at 4 at most."""
    pipe = load(folders["flux2"])
    images = [torch.rand(1, 3, 128, 128, generator=torch.Generator().manual_seed(2)),
              torch.rand(1, 3, 96, 64, generator=torch.Generator().manual_seed(3))]

    def call():
        return pipe(image=[Image.fromarray((i[0].permute(1, 2, 0) * 255).byte().numpy()) for i in images],
                    prompt="a red circle", height=128, width=128, num_inference_steps=3,
                    generator=torch.Generator().manual_seed(0), output_type="pt").images

    stock = call()
    ddit.enable(pipe, ddit.MultiPatchTransformer(pipe.transformer), policy="fixed", schedule=[8, 4, 2])
    out = call()
    # a 16x16 latent, a 16x16 reference, a 12x8 one: at 8, 4 + 4 + 6 (at 4); at 4, 16 + 16 + 6; then 64 + 64 + 24
    tokens = sorted((r["step"], r["branch"], r["tokens"]) for r in ddit.summary(pipe).records)
    assert tokens == [(0, "cond", 4 + 4 + 6), (0, "uncond", 4 + 4 + 6), (1, "cond", 16 + 16 + 6),
                      (1, "uncond", 16 + 16 + 6), (2, "cond", 64 + 64 + 24), (2, "uncond", 64 + 64 + 24)]
    assert torch.isfinite(out).all() and (out - stock).abs().max() > 1e-3


def test_kontext_distils_on_images_of_two_shapes_and_ablates_each_edit(folders, tmp_path):
    """`ddit distill` on a .jsonl prompts file whose images differ in shape: the recorded calls differ in their
    references' grids, and training draws batches of one grid each; the adapter then runs coarse steps, and
    `ddit-ablate` compares each edit with its baseline twin."""
    for name, size in (("tall.png", (64, 128)), ("wide.png", (128, 64))):
        Image.new("RGB", size, (200, 30, 30)).save(tmp_path / name)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "make it blue", "image": "tall.png"}\n'
                       '{"prompt": "add stripes", "image": "wide.png"}\n')
    out = tmp_path / "run"
    options = ["--height", "128", "--width", "128", "--pipeline-arg", "max_sequence_length=16", "--pipeline-arg",
               "_auto_resize=False", "--pipeline-arg", f"max_area={128 * 128}"]
    assert main(["distill", "--pipeline", str(folders["kontext"]), "--prompts", str(prompts), "--out", str(out),
                 "--num-inference-steps", "3", "--batch-size", "2", "--steps", "6", *options]) == 0
    shapes = set()
    for path in sorted((out / "states").glob("*.safetensors")):
        with safe_open(path, "pt") as f:
            shapes |= {f.get_slice(k).get_shape()[1] for k in f.keys() if k.startswith("hidden_states")}
    assert shapes == {64 + 32}  # 16x16 latent + a 16x8 or 8x16 reference
    report = json.loads((out / "distill.json").read_text())
    assert report["steps"] == 6 and torch.isfinite(torch.tensor(report["losses"])).all()

    pipe = load(folders["kontext"])
    ddit.enable(pipe, out / "adapter", policy="fixed", schedule=[8, 4, 2, 2])
    images = pipe(image=TALL, prompt="make it blue", generator=torch.Generator().manual_seed(0), output_type="pt",
                  **KONTEXT).images
    assert torch.isfinite(images).all() and ddit.summary(pipe).coarse_fraction == 0.5

    assert ablate_main(["--pipeline", str(folders["kontext"]), "--adapter", str(out / "adapter"), "--prompts",
                        str(prompts), "--out", str(tmp_path / "ablate"), "--steps", "4", "--policies", "fixed",
                        "--policy-param", "fixed.fraction=0.5", "--caches", "none", "--no-progress", *options]) == 0
    summary = {r["row"]: r for r in json.loads((tmp_path / "ablate" / "summary.json").read_text())}
    assert set(summary["fixed"]["per_prompt"]) == {"make it blue [image=tall.png]", "add stripes [image=wide.png]"}
    assert summary["fixed"]["coarse_step_fraction"] == 0.5 and summary["fixed"]["ssim_vs_baseline"] < 1


def test_edit_pipelines_sized_by_their_images_need_a_size_and_kontext_is_checked_at_its_area(folders):
    """FLUX.2 and Qwen-Image-Edit take the output's size from the image when given none, which ddit could check
    only after the work; Kontext rescales the size it is given to max_area (128x192: 832x1248 at its default
    area, 96x144 at 128 x 128 pixels; latents that 8 does not divide)."""
    image = Prompt("make it blue", {"image": Image.new("RGB", (64, 64))})
    with pytest.raises(ValueError, match="Flux2KleinPipeline sizes its output after each prompt's image unless "
                                         "given a size .*pass --height and --width"):
        check_resolution(load(folders["flux2"]), {}, (2, 4, 8), [image])
    check_resolution(load(folders["flux2"]), {"height": 128, "width": 128}, (2, 4, 8), [image])
    kontext = load(folders["kontext"])
    check_resolution(kontext, {"height": 128, "width": 128}, (2, 4, 8), [image])  # made at 1024x1024
    with pytest.raises(ValueError, match="do not divide the 104x156 latent of a 832x1248 image"):  # its default area
        check_resolution(kontext, {"height": 128, "width": 192}, (2, 4, 8), [image])
    with pytest.raises(ValueError, match="do not divide the 12x18 latent of a 96x144 image"):
        check_resolution(kontext, {"height": 128, "width": 192, "max_area": 128 * 128}, (2, 4, 8), [image])
    inpaint = diffusers.FluxKontextInpaintPipeline.from_pipe(kontext)  # its size is the image's, whatever it is given
    with pytest.raises(ValueError, match="FluxKontextInpaintPipeline sizes its output after each prompt's image, "
                                         "whatever size it is given"):
        check_resolution(inpaint, {"height": 128, "width": 128}, (2, 4, 8), [image])


def test_qwen_image_edit_runs_its_reference_beside_the_latent(tmp_path):
    """The stock QwenImageEditPipeline on the tiny Qwen-Image components, given prompt embeddings (its processor and
    vision tower have no tiny build): it resizes the 96x64 reference to about 1024x1024 pixels, a 78x52-token grid
    that 4 divides and 8 does not."""
    base = load(save_tiny_pipeline("qwenimage", tmp_path))
    pipe = diffusers.QwenImageEditPipeline(scheduler=base.scheduler, vae=base.vae, text_encoder=None, tokenizer=None,
                                           processor=None, transformer=base.transformer)
    pipe.set_progress_bar_config(disable=True)
    prompt = dict(prompt_embeds=torch.randn(1, 7, 32, generator=torch.Generator().manual_seed(0)).to(DEVICE),
                  prompt_embeds_mask=torch.ones(1, 7, dtype=torch.long, device=DEVICE))

    def call():
        return pipe(image=Image.new("RGB", (96, 64), (200, 30, 30)), height=128, width=128, num_inference_steps=2,
                    generator=torch.Generator().manual_seed(0), output_type="pt", **prompt).images

    stock = call()
    ddit.enable(pipe, ddit.MultiPatchTransformer(pipe.transformer), policy="fixed", schedule=[8, 2])
    out = call()
    assert [(r["tokens"], r["base_tokens"]) for r in ddit.summary(pipe).records] == [(4 + 39 * 26, 64 + 78 * 52),
                                                                                    (64 + 78 * 52, 64 + 78 * 52)]
    assert torch.isfinite(out).all() and (out - stock).abs().max() > 1e-3


def test_qwen_image_edit_2511_keeps_a_fine_sample_of_a_mixed_batch_equal_to_stock(tmp_path):
    """Edit-2511's zero_cond_t modulates the reference's tokens as at t = 0; a batch split by size gives each group
    its own rows of img_shapes, and the sample that runs fine at every step is its stock twin."""
    base = load(save_tiny_pipeline("qwenimage", tmp_path))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        config = {**base.transformer.config, "zero_cond_t": True}
        transformer = wake_zeros(type(base.transformer).from_config(config)).to(DEVICE)
    pipe = diffusers.QwenImageEditPipeline(scheduler=base.scheduler, vae=base.vae, text_encoder=None, tokenizer=None,
                                           processor=None, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    prompt = dict(prompt_embeds=torch.randn(2, 7, 32, generator=torch.Generator().manual_seed(0)).to(DEVICE),
                  prompt_embeds_mask=torch.ones(2, 7, dtype=torch.long, device=DEVICE))

    def call():
        return pipe(image=Image.new("RGB", (64, 64), (200, 30, 30)), height=128, width=128, num_inference_steps=2,
                    generator=[torch.Generator().manual_seed(s) for s in (0, 1)], output_type="pt", **prompt).images

    stock = call()
    policy = SeenLatents([torch.tensor([8, 2])] * 2)
    ddit.enable(pipe, ddit.MultiPatchTransformer(pipe.transformer), policy=policy)
    out = call()
    assert {(r["sample"], r["patch_size"]) for r in ddit.summary(pipe).records} == {(0, 8), (1, 2)}
    torch.testing.assert_close(out[1], stock[1], rtol=0, atol=1e-5)
    assert (out[0] - stock[0]).abs().max() > 1e-3
    ddit.disable(pipe)

    # its blocks take two modulations per row: a cache whose samples disagree runs every row (the skipped one's
    # output is the stand-in's all the same), as no row's share of them can be cut
    seen = []
    hook = transformer.register_forward_pre_hook(lambda m, a, k: seen.append(k), with_kwargs=True)
    call()
    hook.remove()
    recorded, probe = {}, [transformer.norm_out.register_forward_pre_hook(lambda m, a: recorded.update(out=a[0])),
                           transformer.transformer_blocks[0].register_forward_pre_hook(
                               lambda m, a, k: recorded.update(inp=k["hidden_states"]), with_kwargs=True)]
    with torch.no_grad():
        reference = transformer(**seen[0])[0]
    for h in probe:
        h.remove()
    rows = []
    count = transformer.transformer_blocks[0].attn.register_forward_pre_hook(
        lambda m, a, k: rows.append(len((*a, *k.values())[0])), with_kwargs=True)
    with torch.no_grad(), replace_stack(transformer, Given(1, recorded["out"] - recorded["inp"])):
        mixed = transformer(**seen[0])[0]
    count.remove()
    assert rows == [2]
    torch.testing.assert_close(mixed, reference, rtol=1e-5, atol=1e-5)


def test_kontext_inpainting_runs_its_reference_beside_the_latent(folders):
    """The commands refuse it (its size is its image's, checked only after the work); ddit.enable runs it."""
    pipe = diffusers.FluxKontextInpaintPipeline.from_pipe(load(folders["kontext"]))
    mask = Image.new("L", (128, 128), 0)
    mask.paste(255, (32, 32, 96, 96))

    def call():
        return pipe(image=Image.new("RGB", (128, 128), (200, 30, 30)), mask_image=mask, prompt="a red circle",
                    num_inference_steps=4, strength=1.0, max_area=128 * 128, _auto_resize=False,
                    generator=torch.Generator().manual_seed(0), output_type="pt").images

    stock = call()
    ddit.enable(pipe, ddit.MultiPatchTransformer(pipe.transformer), policy="fixed", schedule=[8, 4, 2, 2])
    out = call()
    assert [r["tokens"] for r in ddit.summary(pipe).records] == [4 + 4, 16 + 16, 64 + 64, 64 + 64]
    assert torch.isfinite(out).all() and (out - stock).abs().max() > 1e-3


def test_qwen_image_edit_plus_runs_two_references_each_as_coarse_as_its_size_allows(tmp_path):
    """QwenImageEditPlusPipeline (given prompt embeddings) with two references: the 96x64 one resized to 1248x832
    pixels (52x78 tokens: 4 divides them, 8 does not), the 64x64 one to 1024x1024 (64x64 tokens: 8 does)."""
    base = load(save_tiny_pipeline("qwenimage", tmp_path))
    pipe = diffusers.QwenImageEditPlusPipeline(scheduler=base.scheduler, vae=base.vae, text_encoder=None,
                                               tokenizer=None, processor=None, transformer=base.transformer)
    pipe.set_progress_bar_config(disable=True)
    images = [Image.new("RGB", (96, 64), (200, 30, 30)), Image.new("RGB", (64, 64), (30, 200, 30))]
    prompt = dict(prompt_embeds=torch.randn(1, 7, 32, generator=torch.Generator().manual_seed(0)).to(DEVICE),
                  prompt_embeds_mask=torch.ones(1, 7, dtype=torch.long, device=DEVICE))

    def call():
        return pipe(image=images, height=128, width=128, num_inference_steps=2,
                    generator=torch.Generator().manual_seed(0), output_type="pt", **prompt).images

    stock = call()
    ddit.enable(pipe, ddit.MultiPatchTransformer(pipe.transformer), policy="fixed", schedule=[8, 2])
    out = call()
    assert [r["tokens"] for r in ddit.summary(pipe).records] == [4 + 26 * 39 + 16 * 16, 64 + 52 * 78 + 64 * 64]
    assert torch.isfinite(out).all() and (out - stock).abs().max() > 1e-3
