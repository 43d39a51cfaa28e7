"""Spectral progressive resolution: the DCT resize, the sampler's half-resolution phase, and where it may run."""

import pytest
import torch

import ddit
from ddit.adapter import MultiPatchTransformer
from ddit.policies import ProgressiveResolution, dct_resize, get_policy, power_law, spectral_switch
from ddit.testbed.base_model import build_base_model, generate
from tiny_pipelines import build

from conftest import TINY_DIT

# a switch inside each tiny pipeline's 6-step schedule (FLUX.2's and HunyuanImage's shifts keep every step above 0.57)
SWITCH = {"flux": 0.5, "flux2": 0.9, "chroma": 0.5, "qwenimage": 0.5, "zimage": 0.5, "sd3": 0.5, "hunyuanimage": 0.9}
PROGRESSIVE = list(SWITCH)
UNPACKED = ("zimage", "sd3", "hunyuanimage")  # latents on their grid (B, C, H, W); the others pack 2x2 patches as tokens


def test_noise_keeps_its_variance_and_an_image_its_values():
    noise = torch.randn(64, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert dct_resize(noise, 16, keep="energy").std().item() == pytest.approx(1.0, abs=0.02)
    constant = torch.full((1, 3, 32, 32), 0.7)
    torch.testing.assert_close(dct_resize(constant, 16, keep="amplitude"), torch.full((1, 3, 16, 16), 0.7))
    torch.testing.assert_close(dct_resize(torch.full((1, 3, 16, 16), 0.7), 32, keep="amplitude"), constant)
    half = dct_resize(noise, 16, keep="amplitude")  # a band-limited image survives the round trip
    torch.testing.assert_close(dct_resize(dct_resize(half, 32, keep="amplitude"), 16, keep="amplitude"), half)
    with pytest.raises(ValueError, match="keep is 'energy' or 'amplitude'"):
        dct_resize(noise, 16, keep="both")


def power_law_field(amplitude: float, beta: float, n: int = 256, size: int = 32) -> torch.Tensor:
    """Gaussian fields whose power at w cycles per image is ``amplitude * w ** -beta`` (orthonormal FFT)."""
    f = torch.fft.fftfreq(size) * size
    w = (f[:, None] ** 2 + f[None, :] ** 2).sqrt().clamp(min=1)
    white = torch.fft.fft2(torch.randn(n, 1, size, size, generator=torch.Generator().manual_seed(0)), norm="ortho")
    return torch.fft.ifft2(white * (amplitude * w ** -beta).sqrt(), norm="ortho").real


def test_the_power_law_fit_finds_a_fields_amplitude_and_exponent():
    amplitude, beta = power_law(power_law_field(20.0, 2.5))
    assert amplitude == pytest.approx(20.0, rel=0.1) and beta == pytest.approx(2.5, abs=0.05)
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        power_law(torch.zeros(3, 32, 32))


def test_the_spectral_switch_is_the_half_grids_nyquist_activation_time():
    fields = power_law_field(20.0, 2.5)
    amplitude, beta = power_law(fields)
    power = amplitude * 8 ** -beta  # 32 x 32: the half grid's Nyquist is 8 cycles per image
    expected = 1 / (1 + (0.05 / (power * (1 + power - 0.05))) ** 0.5)
    assert spectral_switch(fields, 0.05) == pytest.approx(expected)
    # more tolerance, a later switch; more power at high frequencies, an earlier one
    assert spectral_switch(fields, 0.1) < spectral_switch(fields, 0.05) < spectral_switch(fields, 0.01)
    assert spectral_switch(power_law_field(20.0, 1.5), 0.05) > spectral_switch(fields, 0.05)
    assert ProgressiveResolution.from_latents(fields, 0.05).switch == pytest.approx(spectral_switch(fields, 0.05))
    with pytest.raises(ValueError, match="delta is the tolerance"):
        spectral_switch(fields, 1.5)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return MultiPatchTransformer(build_base_model(**TINY_DIT)).eval()


def test_early_steps_run_at_half_resolution_on_a_quarter_of_the_tokens(model):
    labels = torch.tensor([0, 1])
    base = generate(model, labels, steps=6, guidance=2.0)
    late = generate(model, labels, steps=6, guidance=2.0, policy=get_policy("progressive", switch=1.0))
    torch.testing.assert_close(late.images, base.images)  # never above sigma 1: the baseline itself
    run = generate(model, labels, steps=6, guidance=2.0, policy=get_policy("progressive", switch=0.5))
    tokens = [step["tokens"] for step in run.traces[0]]
    half = [step["sigma"] > 0.5 for step in run.traces[0]]
    assert any(half) and not all(half)
    assert all(t * 4 == tokens[-1] for t, h in zip(tokens, half) if h)
    flops = [step["flops"] for step in run.traces[0]]
    assert all(f < flops[-1] / 3 for f, h in zip(flops, half) if h)
    assert run.images.shape == base.images.shape and not torch.allclose(run.images, base.images)


def test_a_switch_outside_the_noise_levels_is_refused():
    with pytest.raises(ValueError, match="switch is the noise level sigma"):
        ProgressiveResolution(switch=0)


def test_a_pipeline_refuses_it_before_anything_changes():
    pipe, _ = build("sd3")
    stock = pipe.transformer
    with pytest.raises(ValueError, match="run it with ddit.progressive_call"):
        ddit.enable(pipe, MultiPatchTransformer(stock), policy="progressive")
    assert pipe.transformer is stock


def _inputs(pipe) -> list[torch.Tensor]:
    """Every latent the pipeline's transformer is given, in order (a forward pre-hook), as the pipeline holds it
    (Z-Image hands its transformer a list of (C, 1, H, W) latents)."""
    seen = []

    def keep(module, args, kwargs):
        x = kwargs.get("hidden_states", args[0] if args else None)
        seen.append(torch.stack(x)[:, :, 0] if isinstance(x, list) else x.clone())

    pipe.transformer.register_forward_pre_hook(keep, with_kwargs=True)
    return seen


@pytest.mark.parametrize("name", PROGRESSIVE)
def test_the_stock_schedule_is_read_from_the_pipeline_and_replayed_exactly(name):
    from ddit.progressive_pipeline import _exact_sigmas, _layout, stock_start

    pipe, call_kwargs = build(name)
    stock = pipe(**call_kwargs(batch=2, steps=5)).images
    call = call_kwargs(batch=2, steps=5)
    start = stock_start(pipe, **call)  # stops before the first step
    assert len(start.sigmas) == 5 and start.sigmas[0] == 1 and (start.sigmas.diff() < 0).all()
    assert "prepare_latents" not in vars(pipe)  # the spy is gone
    own = pipe.prepare_latents  # an instance's own method (a user's patch) stays
    pipe.prepare_latents = own
    stock_start(pipe, **call)
    assert vars(pipe)["prepare_latents"] is own
    del pipe.prepare_latents
    pipe.scheduler = _exact_sigmas(pipe.scheduler)
    layout = _layout(pipe)  # the noise as the call takes it (FLUX.2 takes a grid where it returns tokens)
    noise = layout.from_grid(pipe, layout.to_grid(pipe, start.noise, call["height"], call["width"]))
    replayed = pipe(**call, sigmas=start.sigmas.tolist(), latents=noise)
    torch.testing.assert_close(replayed.images, stock)


@pytest.mark.parametrize("name", PROGRESSIVE)
def test_a_stock_pipeline_runs_its_early_steps_at_half_resolution(name):
    from ddit.progressive_pipeline import _layout, half_resolution_steps

    pipe, call_kwargs = build(name)
    seen = _inputs(pipe)
    stock = pipe(**call_kwargs(batch=2, steps=6)).images
    first_stock, tokens = seen[0], seen[-1].shape[-1 if name in UNPACKED else 1]
    steps = half_resolution_steps(pipe, SWITCH[name], **call_kwargs(batch=2, steps=6))
    seen.clear()
    run = ddit.progressive_call(pipe, SWITCH[name], **call_kwargs(batch=2, steps=6)).images
    calls_per_step = len(seen) // 6  # true CFG (Flux, Qwen-Image) and Chroma call twice a step
    half = [h for h in steps for _ in range(calls_per_step)]
    assert any(half) and not all(half)
    if name not in UNPACKED:  # packed 2x2: a quarter of the tokens
        assert [x.shape[1] for x in seen] == [tokens // 4 if h else tokens for h in half]
    else:
        assert [x.shape[-1] for x in seen] == [tokens // 2 if h else tokens for h in half]
    assert run.shape == stock.shape and torch.isfinite(run).all() and not torch.allclose(run, stock)
    # the first step sees the low frequencies of the stock call's own noise, on the latent grid
    layout, side = _layout(pipe), call_kwargs()["height"]
    full = layout.to_grid(pipe, first_stock, side, side)
    torch.testing.assert_close(layout.to_grid(pipe, seen[0], side // 2, side // 2),
                               dct_resize(full, full.shape[-1] // 2, keep="energy"))
    above = ddit.progressive_call(pipe, 1.0, **call_kwargs(batch=2, steps=6)).images
    torch.testing.assert_close(above, stock)  # nothing above the switch: the stock call
    again = ddit.progressive_call(pipe, SWITCH[name], **call_kwargs(batch=2, steps=6), return_dict=False)[0]
    torch.testing.assert_close(again, run)


@pytest.mark.parametrize("name", PROGRESSIVE)
def test_the_full_resolution_phase_starts_from_the_upsampled_half_resolution_latent(name, monkeypatch):
    """The hand-over: the second call's first latent is the first call's last one, DCT-upsampled keeping its
    amplitude, and the two calls' steps are the stock call's noise levels, each once."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from ddit.progressive_pipeline import _layout, stock_start

    pipe, call_kwargs = build(name)
    steps, step = [], FlowMatchEulerDiscreteScheduler.step

    def spy(self, model_output, timestep, sample, *args, **kwargs):
        out = step(self, model_output, timestep, sample, *args, **kwargs)
        steps.append((float(timestep), (out[0] if isinstance(out, tuple) else out.prev_sample).clone()))
        return out

    monkeypatch.setattr(FlowMatchEulerDiscreteScheduler, "step", spy)
    sigmas = stock_start(pipe, **call_kwargs(batch=2, steps=6)).sigmas
    seen = _inputs(pipe)
    ddit.progressive_call(pipe, SWITCH[name], **call_kwargs(batch=2, steps=6))
    half = sum(ProgressiveResolution(SWITCH[name]).half(float(s)) for s in sigmas)
    torch.testing.assert_close(torch.tensor([t for t, _ in steps]), sigmas * 1000)
    layout, side = _layout(pipe), call_kwargs()["height"]
    early = layout.to_grid(pipe, steps[half - 1][1], side // 2, side // 2)
    calls = len(seen) // 6
    first_full = layout.to_grid(pipe, seen[half * calls][:2], side, side)
    torch.testing.assert_close(first_full.float(), dct_resize(early, 2 * early.shape[-1], keep="amplitude").float())


def test_flux2_klein_from_a_complete_folder_runs_progressive_calls(tmp_path):
    from diffusers import DiffusionPipeline

    from ddit.tiny_pipelines import TINY_CALL, save_tiny_pipeline

    pipe = DiffusionPipeline.from_pretrained(save_tiny_pipeline("flux2", tmp_path))
    pipe.set_progress_bar_config(disable=True)

    def call():
        return dict(prompt="a red circle", num_inference_steps=6, generator=torch.Generator().manual_seed(0),
                    output_type="pt", **TINY_CALL["flux2"])

    with torch.no_grad():  # latent statistics that are not the identity, as a trained VAE's
        pipe.vae.bn.running_mean.uniform_(-1, 1, generator=torch.Generator().manual_seed(0))
        pipe.vae.bn.running_var.uniform_(0.5, 4, generator=torch.Generator().manual_seed(1))
    stock = pipe(**call()).images
    torch.testing.assert_close(ddit.progressive_call(pipe, 1.0, **call()).images, stock)
    run = ddit.progressive_call(pipe, SWITCH["flux2"], **call()).images
    assert run.shape == stock.shape and torch.isfinite(run).all() and not torch.allclose(run, stock)

    from ddit.progressive_pipeline import _layout

    last = {}  # the packed latents of the last step, which its latent output unpacks into the VAE's scale

    def keep(pipeline, step, timestep, outputs):
        last["tokens"] = outputs["latents"]
        return outputs

    output = pipe(**{**call(), "output_type": "latent"}, callback_on_step_end=keep).images
    layout, side = _layout(pipe), TINY_CALL["flux2"]["height"]
    torch.testing.assert_close(layout.to_grid(pipe, output, side, side),
                               layout.to_grid(pipe, last["tokens"], side, side))


def test_a_flux_image_that_is_not_square_halves_both_sides():
    pipe, call_kwargs = build("flux")
    seen = _inputs(pipe)
    call = lambda: {**call_kwargs(batch=1, steps=4), "height": 128, "width": 64}  # noqa: E731
    stock = pipe(**call()).images
    run = ddit.progressive_call(pipe, 0.6, **call()).images
    assert run.shape == stock.shape == (1, 32, 64)  # 16 x 8 latent, packed 2x2
    assert {x.shape[1] for x in seen[len(seen) // 2:]} == {32, 8}  # full size, and a quarter of the tokens


def test_progressive_call_refuses_what_it_cannot_run():
    pipe, call_kwargs = build("sd3")
    with pytest.raises(ValueError, match="multiples of 32"):
        ddit.progressive_call(pipe, 0.5, **{**call_kwargs(), "height": 112})
    with pytest.raises(ValueError, match="below every step's noise level"):
        ddit.progressive_call(pipe, 0.001, **call_kwargs())
    with pytest.raises(ValueError, match="cannot take sigmas="):
        ddit.progressive_call(pipe, 0.5, **call_kwargs(), sigmas=[1.0, 0.5])
    with pytest.raises(ValueError, match="not in PixArtSigmaPipeline"):
        ddit.progressive_call(build("pixart")[0], 0.5, **build("pixart")[1]())
    flux2, flux2_kwargs = build("flux2")
    call = {k: v for k, v in flux2_kwargs().items() if k not in ("height", "width")}
    with pytest.raises(ValueError, match="sizes its output after the image unless given one: pass height="):
        ddit.progressive_call(flux2, 0.9, **call, image=torch.rand(1, 3, 128, 256))
    with pytest.raises(ValueError, match="caption_upsample_temperature"):
        ddit.progressive_call(flux2, 0.9, **flux2_kwargs(), caption_upsample_temperature=0.15)


@pytest.mark.parametrize("name", ["teacache", "taylorseer"])
def test_caches_start_afresh_when_the_resolution_changes(model, name):
    from ddit.caches import get_cache

    cache = get_cache(name, **({"coefficients": [0.0, 0.0, 0.0, 1.0, 0.0]} if name == "teacache" else {}))
    run = generate(model, torch.tensor([0, 1]), steps=8, guidance=2.0,
                   policy=get_policy("progressive", switch=0.5), cache=cache)
    assert torch.isfinite(run.images).all() and run.images.shape == (2, 3, 32, 32)


def test_the_ablation_has_a_progressive_reference_row_on_the_testbed_only():
    from ddit.ablate.config import build_config

    rows = build_config(["third_order"], ["none"], progressive=(0.4, 0.6)).rows
    assert [k for k in rows if k.startswith("progressive")] == ["progressive[switch=0.4]", "progressive[switch=0.6]"]
    assert rows["progressive[switch=0.4]"].make_policy().switch == 0.4


def test_a_progressive_row_may_take_its_switch_from_the_spectral_rule():
    from ddit.ablate.cli import build_parser
    from ddit.ablate.config import SPECTRUM_IMAGES, build_config
    from ddit.testbed.data import make_dataset

    args = build_parser().parse_args(["--out", "x", "--progressive", "0.4,delta=0.05"])
    assert args.progressive == (0.4, "delta=0.05")
    rows = build_config(["third_order"], ["none"], progressive=args.progressive).rows
    switch = rows["progressive[delta=0.05]"].make_policy().switch
    assert switch == pytest.approx(spectral_switch(make_dataset(SPECTRUM_IMAGES, seed=0)[0], 0.05), abs=1e-4)
    assert 0.4 < switch < 0.5  # the testbed's spectrum: near the switch tuned by hand (0.4)
    for bad, message in (("delta=x", "delta must be a number"), ("half", "give a switch noise level")):
        with pytest.raises(ValueError, match=message):
            build_config(["third_order"], ["none"], progressive=(bad,))


@pytest.mark.parametrize("name", PROGRESSIVE)
def test_progressive_call_keeps_the_pipelines_dtype(name):
    pipe, call_kwargs = build(name)
    pipe = pipe.to(torch.bfloat16)

    def call():
        def bf16(v):
            return v.to(torch.bfloat16) if torch.is_tensor(v) else [bf16(x) for x in v] if isinstance(v, list) else v
        return {k: bf16(v) for k, v in call_kwargs(batch=2, steps=4).items()}

    stock = pipe(**call()).images
    run = ddit.progressive_call(pipe, SWITCH[name], **call()).images
    # Z-Image keeps its latents in float32 whatever its transformer's dtype
    assert run.dtype == stock.dtype == (torch.float32 if name == "zimage" else torch.bfloat16)
    assert torch.isfinite(run).all() and not torch.equal(run, stock)
    torch.testing.assert_close(ddit.progressive_call(pipe, 1.0, **call()).images, stock)
