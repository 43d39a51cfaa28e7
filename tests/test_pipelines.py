"""``ddit.enable`` inside tiny random stock diffusers pipelines (Flux, SD3, PixArt-Sigma, Wan, DiT), built offline."""

import inspect
import os

import pytest
import torch
from accelerate.hooks import AlignDevicesHook, add_hook_to_module, attach_align_device_hook
from diffusers import AutoencoderKLFlux2, ContextParallelConfig, Flux2KleinPipeline
from diffusers.hooks import FirstBlockCacheConfig, MagCacheConfig, TaylorSeerCacheConfig, apply_group_offloading
from peft.tuners.lora import LoraLayer
from tiny_pipelines import NAMES, TEXT_LEN, build, generators, latents, per_sample

import ddit
from ddit.backbones.chroma import ChromaSpec
from ddit.backbones.qwenimage import QwenImageSpec
from ddit.caches import TaylorSeer, TeaCache
from ddit.caches.stack import blocks_of
from ddit.checkpoint import CheckpointError
from ddit.pipelines import ADAPTER_FOLDER
from ddit.policies import FixedPolicy, PatchPolicy

STEPS = 6
EARLY_COARSE = [4, 4, 2, 2, 2, 2]  # patch 4 on a base of 2: a quarter of the tokens
ATOL = 1e-5  # batch composition changes rounding by ~1e-6 (tiny_pipelines)
DEVICE = torch.device(os.environ.get("DDIT_TEST_DEVICE", "cpu"))  # where tiny_pipelines.build puts them


# pipelines that call the transformer once per CFG branch, by the branch names of their calls: in cache contexts
# (Flux and Qwen-Image true CFG, Wan), or without, named by their order (Chroma, though it says it guides); the
# others batch both branches
BRANCH_CALLS = {"flux": ("cond", "uncond"), "qwenimage": ("cond", "uncond"), "wan": ("cond", "uncond"),
                "hunyuanvideo15": ("pred_cond", "pred_uncond"), "hunyuanimage": ("pred_cond", "pred_uncond"),
                "chroma": (None, "call2")}


class SplitPolicy(PatchPolicy):
    """Sample 0 at ``coarse`` for the first ``early`` steps, every other sample at the base size; counts its calls."""

    name = "split"

    def __init__(self, coarse=4, early=2):
        super().__init__()
        self.coarse, self.early = coarse, early

    def choose(self, step):
        sizes = torch.full((self.batch_size,), self.base_size)
        if step.index < self.early:
            sizes[0] = self.coarse
        return sizes, {}


def first_block(transformer):
    """The first block that sees the image tokens alone, or first (Z-Image's noise refiner sees them alone)."""
    for name in ("transformer_blocks", "blocks", "noise_refiner"):
        blocks = getattr(transformer, name, None)
        if blocks:
            return blocks[0]


def stock_of(name, batch=2, **call):
    pipe, kwargs = build(name)
    return pipe, kwargs, latents(pipe(**kwargs(batch=batch, steps=STEPS, **call)))


def lora_free(module):
    return not any(isinstance(m, LoraLayer) for m in module.modules())


@pytest.fixture(params=NAMES)
def name(request):
    return request.param


def test_the_baseline_policy_is_the_stock_pipeline_and_disable_restores_it(name):
    pipe, kwargs, stock = stock_of(name)
    original = pipe.transformer
    ddit.enable(pipe, ddit.MultiPatchTransformer(original), policy="baseline")
    assert torch.allclose(latents(pipe(**kwargs(batch=2, steps=STEPS))), stock, atol=ATOL, rtol=0)
    ddit.disable(pipe)
    assert pipe.transformer is original and lora_free(original)
    assert torch.equal(latents(pipe(**kwargs(batch=2, steps=STEPS))), stock)


def test_coarse_early_steps_run_on_a_quarter_of_the_tokens_and_repeat_exactly(name):
    pipe, kwargs, stock = stock_of(name)
    tokens = []
    first_block(pipe.transformer).register_forward_pre_hook(
        lambda m, args, kw: tokens.append((kw.get("hidden_states", args[0] if args else None)).shape[1]),
        with_kwargs=True)
    ddit.enable(pipe, ddit.MultiPatchTransformer(pipe.transformer), policy=FixedPolicy(EARLY_COARSE))
    out = latents(pipe(**kwargs(batch=2, steps=STEPS)))
    calls_per_step = len(tokens) // STEPS
    per_step = tokens[::calls_per_step]
    assert per_step[2] == 4 * per_step[0] and per_step[:2] == [per_step[0]] * 2 and set(per_step[2:]) == {per_step[2]}
    assert (out - stock).abs().max() > 1e-3 and torch.isfinite(out).all()
    assert torch.equal(latents(pipe(**kwargs(batch=2, steps=STEPS))), out)
    summary = ddit.summary(pipe)
    assert summary.coarse_fraction == pytest.approx(2 / 6)
    assert summary.token_saving == pytest.approx(2 * (1 - 1 / 4) / 6)
    assert "patch size per sample" in str(summary)


def test_in_a_mixed_batch_the_fine_sample_equals_its_baseline_twin_and_branches_share_decisions(name):
    pipe, kwargs, stock = stock_of(name)
    policy = SplitPolicy()
    ddit.enable(pipe, ddit.MultiPatchTransformer(pipe.transformer), policy=policy)
    out = latents(pipe(**kwargs(batch=2, steps=STEPS)))
    assert torch.allclose(out[1], stock[1], atol=ATOL, rtol=0)
    assert (out[0] - stock[0]).abs().max() > 1e-3
    # one decision per sample per step, whether CFG is batched or called per branch
    assert len(policy.trace) == STEPS and policy.batch_size == 2
    calls = {}  # (step, sample) -> [(branch, patch size)], one per transformer call that ran the sample
    for r in ddit.summary(pipe).records:
        calls.setdefault((r["step"], r["sample"]), []).append((r["branch"], r["patch_size"]))
    expected = [(branch, 4) for branch in BRANCH_CALLS.get(name, (None,))]
    assert calls[(0, 0)] == expected and len(calls) == 2 * STEPS
    assert all(len(c) == len(expected) and len({size for _, size in c}) == 1 for c in calls.values())


@pytest.mark.parametrize(("name", "config"), [
    ("flux", FirstBlockCacheConfig(threshold=0.5)),
    ("wan", FirstBlockCacheConfig(threshold=0.5)),
    ("flux", TaylorSeerCacheConfig(cache_interval=2, disable_cache_before_step=1, max_order=1)),
    ("hunyuanvideo15", TaylorSeerCacheConfig(cache_interval=2, disable_cache_before_step=1, max_order=1)),
], ids=["flux-first_block", "wan-first_block", "flux-taylorseer", "hunyuanvideo15-taylorseer"])
def test_diffusers_cache_hooks_compose_with_dynamic_patches(name, config):
    pipe, kwargs, stock = stock_of(name)
    pipe.transformer.enable_cache(config)
    stock_cached = latents(pipe(**kwargs(batch=2, steps=STEPS)))
    pipe.transformer.disable_cache()
    assert (stock_cached - stock).abs().max() > 1e-3  # the hook does skip work here

    ddit.enable(pipe, ddit.MultiPatchTransformer(pipe.transformer), policy="baseline", cache=config)
    assert torch.allclose(latents(pipe(**kwargs(batch=2, steps=STEPS))), stock_cached, atol=ATOL, rtol=0)
    ddit.disable(pipe)
    ddit.enable(pipe, ddit.MultiPatchTransformer(pipe.transformer), policy=SplitPolicy(coarse=8, early=3),
                cache=config)
    first = latents(pipe(**kwargs(batch=2, steps=STEPS)))
    second = latents(pipe(**kwargs(batch=2, steps=STEPS)))
    assert torch.isfinite(first).all() and torch.equal(first, second)  # state resets between calls
    ddit.disable(pipe)
    assert not pipe.transformer.is_cache_enabled
    ddit.enable(pipe, ddit.MultiPatchTransformer(pipe.transformer), policy=SplitPolicy(coarse=8, early=3))
    uncached = latents(pipe(**kwargs(batch=2, steps=STEPS)))
    assert (uncached - first).abs().max() > 1e-3  # the hook skips work under dynamic patches too


DUAL_STREAM = ["flux", "flux2", "chroma", "qwenimage", "sd3", "hunyuanimage", "hunyuanvideo15"]


def transformer_call(pipe, kwargs) -> dict:
    """The arguments of the transformer's first call in a two-sample generation."""
    seen = []
    handle = pipe.transformer.register_forward_pre_hook(lambda m, a, k: seen.append(k) if not seen else None,
                                                        with_kwargs=True)
    pipe(**kwargs(batch=2, steps=2))
    handle.remove()
    return seen[0]


class Given:
    """A stand-in that computes the first ``rows`` rows, and adds ``residual`` to the others' stack input."""

    def __init__(self, rows, residual):
        self.rows, self.residual = rows, residual

    def plan(self, run):
        return torch.arange(len(run.hidden)) < self.rows

    def finish(self, run, output, compute):
        output[~compute] = (run.hidden + self.residual)[~compute].to(output.dtype)
        return output


@pytest.mark.parametrize("name", DUAL_STREAM)
def test_a_dual_stream_stack_runs_only_the_rows_that_compute(name):
    """FLUX's, SD3's... blocks carry text beside the image tokens, and the model's forward joins or splits them
    between block lists: the blocks run on the computing rows only, the others' blocks step aside, and the
    skipped rows' stack output is what the stand-in gives at the output norm's input; on the backbone's own
    forward and on the adapter's coarse path alike."""
    from ddit.caches import replace_stack

    pipe, kwargs = build(name)
    call = transformer_call(pipe, kwargs)
    adapter = ddit.MultiPatchTransformer(pipe.transformer)
    blocks = blocks_of(adapter)
    rows = []  # the rows each block's attention ran on
    counters = [b.attn.register_forward_pre_hook(lambda m, a, k: rows.append(len((*a, *k.values())[0])),
                                                 with_kwargs=True) for b in blocks]
    for size in adapter.patch_sizes[:2]:
        seen = {}
        grab = [blocks[0].register_forward_pre_hook(lambda m, a, k: seen.update({"in": (*a, *k.values())[0]}),
                                                    with_kwargs=True),
                adapter.backbone.norm_out.register_forward_pre_hook(lambda m, a: seen.update({"out": a[0]}))]
        with torch.no_grad():
            stock = adapter(**call, patch_size=size)[0]
        for h in grab:
            h.remove()
        residual = seen["out"] - seen["in"][:, :seen["out"].shape[1]]
        rows.clear()
        with torch.no_grad(), replace_stack(adapter, Given(0, residual)):
            skipped = adapter(**call, patch_size=size)[0]
        assert rows == []  # no block ran
        torch.testing.assert_close(skipped, stock, rtol=1e-5, atol=1e-5)
        with torch.no_grad(), replace_stack(adapter, Given(1, residual)):
            mixed = adapter(**call, patch_size=size)[0]
        assert rows == [1] * len(blocks)  # every block ran on the computing row alone
        torch.testing.assert_close(mixed, stock, rtol=1e-5, atol=1e-5)
    for h in counters:
        h.remove()


def test_a_pass_starts_at_the_first_block_that_runs_and_checkpointed_training_is_refused():
    """SD3's skip-layer guidance may leave out block 0: the plan is made at the first block that runs. A cache in
    a backward pass with gradient checkpointing would recompute blocks it never saw: refused."""
    from ddit.caches import replace_stack

    pipe, kwargs = build("sd3")
    model, call = pipe.transformer, transformer_call(pipe, kwargs)
    with torch.no_grad():
        stock = model(**call, skip_layers=[0])[0]
        with replace_stack(model, Given(1, 0.0)):
            mixed = model(**call, skip_layers=[0])[0]
    torch.testing.assert_close(mixed[0], stock[0], rtol=1e-5, atol=1e-5)
    assert (mixed[1] - stock[1]).abs().max() > 1e-3  # skipped: its input, plus no residual
    model.enable_gradient_checkpointing()
    with pytest.raises(ValueError, match="gradient checkpointing on"), replace_stack(model, Given(1, 0.0)):
        pass


def test_rows_are_cut_in_containers_only_where_every_tensor_has_one_entry_per_row():
    """Qwen-Image's rotary tables are (image tokens, text tokens): with as many rows as text tokens, the pair
    passes whole; LTX's per-row (cos, sin) pair is cut."""
    from ddit.caches.stack import _cut

    index = torch.tensor([0, 2])
    cut = _cut({"hidden_states": torch.zeros(4, 3), "image_rotary_emb": (torch.zeros(16, 2), torch.zeros(4, 2)),
                "per_row": (torch.zeros(4, 5, 2), torch.ones(4, 5, 2)), "kwargs": {"ip": [torch.zeros(4, 1)]}},
               4, index)
    assert cut["hidden_states"].shape == (2, 3)
    assert [t.shape for t in cut["image_rotary_emb"]] == [(16, 2), (4, 2)]
    assert [t.shape for t in cut["per_row"]] == [(2, 5, 2), (2, 5, 2)]
    assert cut["kwargs"]["ip"][0].shape == (2, 1)
    assert _cut({"temb": torch.zeros(8, 3)}, 4, index) is None  # two modulations per row: no row's share


class Spy(TaylorSeer):
    """TaylorSeer reusing the last residual (order 0) at every other step, keeping what each call gave."""

    def __init__(self):
        super().__init__(interval=2, order=0, warmup=1)
        self.calls = []

    def finish(self, group, run, output, compute):
        output = super().finish(group, run, output, compute)
        self.calls.append((group, run.hidden.clone(), output.clone(), {k: self.reused[k] for k in group.samples}))
        return output


@pytest.mark.parametrize("name", ["flux", "sd3", "qwenimage"])
def test_a_skipped_dual_stream_step_adds_the_last_computed_residual_where_the_output_norm_reads(name):
    """What a dual-stream model's output norm reads at a skipped step is the stack's input there plus the
    residual (output - input) of the sample's last computed step, and at a computed one the blocks' output."""
    pipe, kwargs, _ = stock_of(name)
    spy, read = Spy(), []
    ddit.enable(pipe, ddit.MultiPatchTransformer(pipe.transformer), policy="baseline", cache=spy)
    hook = pipe.transformer.backbone.norm_out.register_forward_hook(lambda m, a, o: read.append(a[0].clone()))
    pipe(**kwargs(batch=2, steps=STEPS))
    hook.remove()
    assert len(read) == len(spy.calls) and len(read) >= STEPS
    last = {}  # key -> residual of its last computed step
    for (group, hidden, output, reused), norm_input in zip(spy.calls, read):
        torch.testing.assert_close(norm_input, output)
        for j, key in enumerate(group.samples):
            assert reused[key] == (group.step % 2 == 1)  # computes at 0, 2, 4: interval 2
            r = slice(j, None, len(group.samples))
            if reused[key]:
                torch.testing.assert_close(output[r], hidden[r] + last[key])
            else:
                last[key] = output[r] - hidden[r]


@pytest.mark.parametrize("name", ["pixart", "wan", "zimage", "dit", *DUAL_STREAM])
def test_ddit_caches_keep_state_per_branch_and_sample(name):
    pipe, kwargs, stock = stock_of(name)
    never = TaylorSeer(interval=1)  # never skips: must change nothing
    ddit.enable(pipe, ddit.MultiPatchTransformer(pipe.transformer), policy="baseline", cache=never)
    assert torch.allclose(latents(pipe(**kwargs(batch=2, steps=STEPS))), stock, atol=ATOL, rtol=0)
    ddit.disable(pipe)
    cache = KeysSeen(interval=2, order=1)
    ddit.enable(pipe, ddit.MultiPatchTransformer(pipe.transformer), policy=SplitPolicy(), cache=cache)
    out = latents(pipe(**kwargs(batch=2, steps=STEPS)))
    summary = ddit.summary(pipe)
    assert torch.isfinite(out).all() and summary.cache_hits > 0
    branches = set(BRANCH_CALLS.get(name, (None,)))
    assert {r["branch"] for r in summary.records} == branches
    # one state per (branch, sample): Wan's two calls per step never share one
    assert cache.keys == {(b, s) for b in branches for s in (0, 1)}


@pytest.mark.parametrize("name", [*NAMES, "sd35m"])
def test_teacache_skips_by_what_it_watches_per_sample_and_branch(name):
    """TeaCache runs on every family (what it watches: the next test). delta 0 never skips; a large one skips
    every step but the first and last, of every sample and branch, and a sample's first at a new size."""
    pipe, kwargs, stock = stock_of(name)
    ddit.enable(pipe, ddit.MultiPatchTransformer(pipe.transformer), policy="baseline",
                cache=TeaCache(delta=0, coefficients="flux1-dev"))
    assert torch.allclose(latents(pipe(**kwargs(batch=2, steps=STEPS))), stock, atol=ATOL, rtol=0)
    ddit.disable(pipe)
    ddit.enable(pipe, ddit.MultiPatchTransformer(pipe.transformer), policy=SplitPolicy(),
                cache=TeaCache(delta=1e9, coefficients="flux1-dev"))
    out = latents(pipe(**kwargs(batch=2, steps=STEPS)))
    skipped = {(r["step"], r["sample"], r["branch"]): r["cached"] for r in ddit.summary(pipe).records}
    assert torch.isfinite(out).all() and (out - stock).abs().max() > 1e-3
    # sample 0 turns fine at step 2 (SplitPolicy): its first fine step computes
    computes = {(s, 0) for s in (0, STEPS - 1)} | {(s, 1) for s in (0, STEPS - 1)} | {(2, 0)}
    assert all(cached == ((step, sample) not in computes) for (step, sample, _), cached in skipped.items())


@pytest.mark.parametrize("name", [n for n in NAMES if n != "wan"] + ["sd35m", "ltx", "ltx2"])
def test_teacache_watches_the_first_blocks_timestep_modulated_input(name, monkeypatch):
    """What TeaCache watches is what the first block's (self-)attention receives: the block's input normalised
    and modulated by the timestep. On adaLN-zero blocks (DiT, FLUX.1, SD3, HunyuanImage 2.1, HunyuanVideo 1.5)
    TeaCache reads it from norm1; on the others the backbone's spec computes it (Wan: the next test)."""
    from ddit.caches import teacache

    pipe, kwargs = build(name)
    block = blocks_of(pipe.transformer)[0]
    attention = next(getattr(block, n) for n in ("attn1", "attn", "attention") if hasattr(block, n))
    received, watched = [], []
    attention.register_forward_pre_hook(
        lambda m, args, kw: received.append(kw.get("hidden_states", args[0] if args else None)), with_kwargs=True)
    monkeypatch.setattr(teacache, "modulated_input",
                        lambda *a, real=teacache.modulated_input: watched.append(real(*a)) or watched[-1])
    ddit.enable(pipe, ddit.MultiPatchTransformer(pipe.transformer), policy="baseline",
                cache=TeaCache(delta=0, coefficients="flux1-dev"))
    pipe(**kwargs(batch=2, steps=3))
    assert len(watched) == len(received) >= 3
    for seen, given in zip(watched, received):
        torch.testing.assert_close(seen, given)


@pytest.mark.parametrize("name", ["wan", "flux"])
def test_teacache_calibration_pairs_the_change_of_what_teacache_watches(name):
    """Wan: the timestep projection its blocks take; FLUX.1: its first block's adaLN-zero output,
    ``norm1(x, emb=temb)``, recomputed here from the arguments the block received."""
    from ddit.caches import TeaCacheRecorder
    from ddit.caches.teacache import rel_l1

    pipe, kwargs = build(name)
    block, seen = first_block(pipe.transformer), []

    def watched(m, a, k):
        arguments = inspect.signature(type(m).forward).bind(m, *a, **k).arguments  # not the cache's wrapper
        if name == "wan":
            seen.append(arguments["temb"])
        else:
            seen.append(m.norm1(arguments["hidden_states"], emb=arguments["temb"])[0])

    hook = block.register_forward_pre_hook(watched, with_kwargs=True)
    recorder = TeaCacheRecorder()
    ddit.enable(pipe, ddit.MultiPatchTransformer(pipe.transformer), policy="baseline", cache=recorder)
    pipe(**kwargs(batch=1, steps=STEPS))
    hook.remove()
    calls = len(seen) // STEPS  # per step: one per CFG branch (cond, uncond)
    assert len(seen) == calls * STEPS and len(recorder.pairs) == calls * (STEPS - 1)
    for i in range(calls):
        assert recorder.pairs[i][0] == pytest.approx(rel_l1(seen[calls + i].float(), seen[i].float()))


def test_teacache_skips_where_its_calibration_says_until_the_first_skip():
    """The delta that ``delta_for_share`` gives for a share of the steps, on trajectories recorded with every step
    computed: the real cache skips first at the step, and in the branches, that the estimate says (until then
    the trajectories are the same), and the estimate's delta is the least that reaches the share."""
    from ddit.caches import TeaCacheRecorder, delta_for_share, fit_teacache, skipped_share
    from ddit.caches.teacache import skipped_steps

    pipe, kwargs = build("flux")
    recorder, steps = TeaCacheRecorder(), 12
    ddit.enable(pipe, ddit.MultiPatchTransformer(pipe.transformer), policy="baseline", cache=recorder)
    pipe(**kwargs(batch=1, steps=steps))
    ddit.disable(pipe)
    fit = fit_teacache(recorder.pairs)
    delta = delta_for_share(fit, recorder.sequences, 0.3)
    assert len(recorder.sequences) == 2 and all(len(c) == steps - 1 for c in recorder.sequences)  # cond, uncond
    share = skipped_share(fit, delta, recorder.sequences)  # the same a little either side: not at an edge
    assert share >= 0.3 and skipped_share(fit, delta * (1 - 1e-4), recorder.sequences) == share
    assert skipped_share(fit, delta * (1 + 1e-4), recorder.sequences) == share
    estimated = [skipped_steps(fit, delta, changes) for changes in recorder.sequences]
    first = min(skips.index(True) for skips in estimated if True in skips)

    ddit.enable(pipe, ddit.MultiPatchTransformer(pipe.transformer), policy="baseline",
                cache=TeaCache(delta=delta, coefficients=fit))
    pipe(**kwargs(batch=1, steps=steps))
    skipped = sorted((r["step"], r["branch"]) for r in ddit.summary(pipe).records if r["cached"])
    assert skipped[0][0] == first
    assert sum(step == first for step, _ in skipped) == sum(skips[first] for skips in estimated)


class KeysSeen(TaylorSeer):
    """TaylorSeer that keeps the keys of the states it was asked about."""

    def reset(self):
        super().reset()
        self.keys = getattr(self, "keys", set())

    def reuse(self, group, run, rows):
        self.keys |= set(rows)
        return super().reuse(group, run, rows)


def assert_refused(pipe, match, adapter, **kwargs):
    """Refused, and the pipeline keeps its transformer (LoRA-free unless the caller built an adapter over it)."""
    original = pipe.transformer
    with pytest.raises((ValueError, CheckpointError), match=match):
        ddit.enable(pipe, adapter, **kwargs)
    assert pipe.transformer is original and "save_pretrained" not in vars(pipe)
    assert lora_free(original) or isinstance(adapter, ddit.MultiPatchTransformer)


def test_bad_input_is_refused_before_anything_changes(tmp_path):
    pipe, kwargs = build("sd3")
    flux, _ = build("flux")
    ddit.MultiPatchTransformer(flux.transformer).save_pretrained(tmp_path / "flux_adapter")
    assert_refused(pipe, "was made for FluxTransformer2DModel", tmp_path / "flux_adapter")
    assert_refused(pipe, "unknown patch policy 'nope'", ddit.MultiPatchTransformer(pipe.transformer), policy="nope")
    pipe, kwargs = build("sd3")
    assert_refused(pipe, "unknown feature cache 'nope'", ddit.MultiPatchTransformer(pipe.transformer), cache="nope")
    pipe, kwargs = build("sd3")
    assert_refused(pipe, "not a CacheMixin", ddit.MultiPatchTransformer(pipe.transformer),
                   cache=FirstBlockCacheConfig(threshold=0.2))
    chroma, _ = build("chroma")
    with pytest.MonkeyPatch.context() as patch:  # a dual-stream block whose outputs nobody lists
        patch.setattr(ChromaSpec, "block_outputs", {})
        assert_refused(chroma, "unknown: ChromaSingleTransformerBlock, ChromaTransformerBlock",
                       ddit.MultiPatchTransformer(chroma.transformer), cache=TaylorSeer())
    qwen, _ = build("qwenimage")
    with pytest.MonkeyPatch.context() as patch:  # a first block whose modulated input no spec computes
        patch.setattr(QwenImageSpec, "teacache_blocks", ())
        assert_refused(qwen, "modulated input of QwenImageTransformerBlock",
                       ddit.MultiPatchTransformer(qwen.transformer), cache=TeaCache(coefficients="flux1-dev"))
    assert TeaCache(coefficients="flux1-dev").delta == 0.4  # the published fit's own (TeaCache4FLUX's 1.8x)
    with pytest.raises(ValueError, match="adds at least 0.18 per step .* at delta 0.025 it never skips"):
        TeaCache(coefficients="flux1-dev", delta=0.025)  # TeaCache's own delta with FLUX's fit: none would skip
    with pytest.raises(ValueError, match="not all finite"):
        TeaCache(coefficients=[float("nan"), 0, 0, 1, 0])
    pipe, kwargs = build("sd3")
    flux, _ = build("flux")
    assert_refused(flux, "MagCacheConfig is not supported", ddit.MultiPatchTransformer(flux.transformer),
                   cache=MagCacheConfig(num_inference_steps=STEPS, mag_ratios=[1.0] * STEPS))
    pixart, _ = build("pixart")
    assert_refused(pixart, "coefficients", ddit.MultiPatchTransformer(pixart.transformer), cache=TeaCache())
    other, _ = build("sd3")
    assert_refused(pipe, "wraps another transformer", ddit.MultiPatchTransformer(other.transformer))

    ddit.enable(pipe, ddit.MultiPatchTransformer(pipe.transformer), policy="baseline")
    with pytest.raises(ValueError, match="already enabled"):
        ddit.enable(pipe, tmp_path / "flux_adapter")
    call = kwargs(batch=1, steps=STEPS)
    with pytest.raises(ValueError, match="multiples of 64 pixels$"):  # patch 8 x vae factor 8
        pipe(**{**call, "height": 96, "width": 96})
    pixart, pixart_kwargs = build("pixart")  # a pipeline that bins resolutions says so
    ddit.enable(pixart, ddit.MultiPatchTransformer(pixart.transformer), policy="baseline")
    with pytest.raises(ValueError, match="64 pixels .this pipeline moves the requested size to its nearest"):
        pixart(**{**pixart_kwargs(batch=1, steps=STEPS), "height": 96, "width": 96})
    ddit.disable(pipe)
    with pytest.raises(ValueError, match="not enabled"):
        ddit.disable(pipe)


def test_an_enabled_pipeline_saves_stock_components_and_its_adapter(tmp_path):
    pipe, kwargs = build("sd3")
    adapter = ddit.MultiPatchTransformer(pipe.transformer)
    with torch.no_grad():
        for p in adapter.trainable_parameters():  # a trained adapter: nothing at its initial value
            p.add_(0.01 * torch.randn_like(p))
    ddit.enable(pipe, adapter, policy=FixedPolicy(EARLY_COARSE))
    out = latents(pipe(**kwargs(batch=1, steps=STEPS)))
    pipe.save_pretrained(tmp_path)
    assert (tmp_path / "transformer" / "config.json").exists() and (tmp_path / ADAPTER_FOLDER).is_dir()
    assert torch.equal(latents(pipe(**kwargs(batch=1, steps=STEPS))), out)  # still enabled after saving

    absent = {k: None for k, v in pipe.components.items() if v is None}  # no text encoders offline
    loaded = type(pipe).from_pretrained(tmp_path, **absent)
    loaded.set_progress_bar_config(disable=True)
    assert lora_free(loaded.transformer)
    ddit.enable(loaded, tmp_path, policy=FixedPolicy(EARLY_COARSE))
    assert torch.allclose(latents(loaded(**kwargs(batch=1, steps=STEPS))), out, atol=ATOL, rtol=0)


def test_the_oracle_and_the_percentile_policies_run_inside_a_pipeline():
    pipe, kwargs = build("pixart")
    ddit.enable(pipe, ddit.MultiPatchTransformer(pipe.transformer), policy="oracle", tolerance=10.0)
    latents(pipe(**kwargs(batch=2, steps=STEPS)))
    assert ddit.summary(pipe).coarse_fraction > 0  # a huge tolerance: coarse whenever allowed
    ddit.disable(pipe)
    ddit.enable(pipe, ddit.MultiPatchTransformer(pipe.transformer), policy="third_order", tau=1e9)
    latents(pipe(**kwargs(batch=2, steps=STEPS)))
    sizes = [r["patch_size"] for r in ddit.summary(pipe).records]
    assert sizes[:2 * 3] == [2] * 6 and sizes[-1] == 8  # three warm-up steps, then the coarsest
    ddit.disable(pipe)
    ddit.enable(pipe, ddit.MultiPatchTransformer(pipe.transformer), policy="probed_third_order", tau=1e9, hold=1)
    latents(pipe(**kwargs(batch=2, steps=STEPS)))
    sizes = [r["patch_size"] for r in ddit.summary(pipe).records]
    assert sizes == [size for size in [2, 2, 2, 8, 2, 2] for _ in range(2)]  # one coarse step, then the probe


def test_a_pipeline_in_bfloat16_runs_coarse_steps_in_bfloat16():
    pipe, kwargs = build("flux")
    pipe.to(torch.bfloat16)
    ddit.enable(pipe, ddit.MultiPatchTransformer(pipe.transformer), policy=FixedPolicy(EARLY_COARSE))
    assert pipe.transformer.dtype == torch.bfloat16
    call = {k: v.to(torch.bfloat16) if torch.is_tensor(v) else v for k, v in kwargs(batch=1, steps=STEPS).items()}
    out = pipe(**call).images
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_the_wrapper_answers_what_pipelines_and_users_ask_of_a_transformer():
    pipe, _ = build("sd3")
    original = pipe.transformer
    ddit.enable(pipe, ddit.MultiPatchTransformer(original), policy="baseline")
    wrapper = pipe.transformer
    assert wrapper.config is original.config and wrapper.dtype == original.dtype and wrapper.device == original.device
    processors = wrapper.attn_processors
    assert processors.keys() == original.attn_processors.keys() and processors
    wrapper.set_attn_processor(dict(processors))
    wrapper.enable_gradient_checkpointing()
    assert original.gradient_checkpointing


def test_a_call_that_died_mid_generation_does_not_leak_into_the_next():
    pipe, kwargs = build("flux")
    ddit.enable(pipe, ddit.MultiPatchTransformer(pipe.transformer), policy="third_order", tau=1e9)
    clean = latents(pipe(**kwargs(batch=1, steps=STEPS)))

    def die(pipe, step, t, outputs):
        if step == 3:
            raise KeyboardInterrupt
        return outputs

    with pytest.raises(KeyboardInterrupt):  # diffusers never gets to reset the transformer
        pipe(**kwargs(batch=1, steps=STEPS), callback_on_step_end=die)
    assert torch.equal(latents(pipe(**kwargs(batch=1, steps=STEPS))), clean)


@pytest.mark.parametrize("where", ["transformer", "callback"])
def test_a_call_that_died_at_its_first_step_does_not_hold_the_next_one(where):
    """Out of memory in the first transformer call, or an interrupt right after it: a retry with another batch
    starts a new generation (it starts at step 0 and timestep 1000 again, which alone would look like the same
    step), as a new pipeline call sets its scheduler's timesteps anew."""
    pipe, kwargs = build("flux")
    ddit.enable(pipe, ddit.MultiPatchTransformer(pipe.transformer), policy="fixed", fraction=0.5)
    clean = latents(pipe(**kwargs(batch=1, steps=STEPS)))
    wrapper = pipe.transformer

    def oom(*args, **kw):
        raise torch.OutOfMemoryError("CUDA out of memory")

    def die(pipe, step, t, outputs):
        raise KeyboardInterrupt

    with pytest.raises((torch.OutOfMemoryError, KeyboardInterrupt)):
        if where == "transformer":
            wrapper.adapter.forward, forward = oom, wrapper.adapter.forward
            try:
                pipe(**kwargs(batch=2, steps=STEPS))
            finally:
                wrapper.adapter.forward = forward
        else:
            pipe(**kwargs(batch=2, steps=STEPS), callback_on_step_end=die)
    assert torch.equal(latents(pipe(**kwargs(batch=1, steps=STEPS))), clean)
    assert ddit.summary(pipe).coarse_fraction == 0.5


def test_a_pipeline_made_from_the_enabled_one_keeps_its_step_count_when_the_first_is_gone():
    """from_pipe shares the scheduler; the runtime reads it through the pipeline ddit.enable was given, and keeps
    it when that pipeline is collected (else the step count, hence every schedule, would be lost)."""
    import gc

    from diffusers import FluxPipeline

    pipe, kwargs = build("flux")
    ddit.enable(pipe, ddit.MultiPatchTransformer(pipe.transformer), policy="fixed", fraction=0.5)
    other = FluxPipeline.from_pipe(pipe)
    other.set_progress_bar_config(disable=True)
    del pipe
    gc.collect()
    other(**kwargs(batch=1, steps=STEPS))
    assert ddit.summary(other).coarse_fraction == 0.5


def test_perturbed_attention_guidance_is_refused():
    from diffusers import StableDiffusion3PAGPipeline

    pipe, _ = build("sd3")
    pag = StableDiffusion3PAGPipeline.from_pipe(pipe, pag_applied_layers=["blocks.0"])
    with pytest.raises(ValueError, match="perturbed-attention guidance"):
        ddit.enable(pag, ddit.MultiPatchTransformer(pag.transformer))


class ProbeOnce(PatchPolicy):
    """Probes the model at the base size at every step, keeps the probe's shape, stays at the base size."""

    name = "probe_once"

    def choose(self, step):
        self.shape = tuple(step.probe(self.base_size, step.latent).shape)
        return self.base_size, {}


@pytest.mark.parametrize("name", ["sd3", "flux", "zimage"])
def test_a_probing_policy_sees_every_cfg_branch_of_each_sample(name):
    pipe, kwargs, stock = stock_of(name)
    policy = ProbeOnce()
    ddit.enable(pipe, ddit.MultiPatchTransformer(pipe.transformer), policy=policy)
    out = latents(pipe(**kwargs(batch=2, steps=STEPS)))
    per_branch = stock[0].numel()  # one prediction of one sample in one branch
    batched_branches = 1 if name == "flux" else 2  # Flux calls per branch: its probe sees the call's branch
    assert policy.shape == (2, batched_branches * per_branch)
    assert torch.allclose(out, stock, atol=ATOL, rtol=0)  # probes leave no trace in the generation


def test_sd3_skip_layer_guidance_makes_an_extra_call_per_step_and_runs():
    """Its layer list is not per sample, even where it has as many entries as the batch has samples: a mixed
    batch's fine sample, run in its own group, skips the same layers as in the stock call."""
    pipe, kwargs, _ = stock_of("sd3")

    def call():  # fresh generators for every call
        return {**kwargs(batch=2, steps=STEPS), "skip_guidance_layers": [0, 1]}

    stock = latents(pipe(**call()))
    ddit.enable(pipe, ddit.MultiPatchTransformer(pipe.transformer), policy="baseline")
    assert torch.allclose(latents(pipe(**call())), stock, atol=ATOL, rtol=0)
    ddit.disable(pipe)
    ddit.enable(pipe, ddit.MultiPatchTransformer(pipe.transformer), policy=SplitPolicy())
    out = latents(pipe(**call()))
    assert torch.allclose(out[1], stock[1], atol=ATOL, rtol=0) and (out[0] - stock[0]).abs().max() > 1e-3


def test_caches_that_cannot_work_under_dynamic_patches_are_refused():
    flux, _ = build("flux")
    assert_refused(flux, "use_lite_mode", ddit.MultiPatchTransformer(flux.transformer),
                   cache=TaylorSeerCacheConfig(use_lite_mode=True))
    flux, _ = build("flux")
    assert_refused(flux, "outside the transformer blocks", ddit.MultiPatchTransformer(flux.transformer),
                   cache=TaylorSeerCacheConfig(cache_identifiers=["proj_out"]))
    flux, _ = build("flux")
    flux.transformer.enable_cache(FirstBlockCacheConfig(threshold=0.2))
    assert_refused(flux, "already has a diffusers cache enabled|has a diffusers cache enabled",
                   ddit.MultiPatchTransformer(flux.transformer))


def test_moving_and_saving_reach_the_lora_layers_while_they_are_out_of_the_backbone(tmp_path):
    pipe, kwargs = build("sd3")
    adapter = ddit.MultiPatchTransformer(pipe.transformer)
    with torch.no_grad():
        for p in adapter.trainable_parameters():
            p.add_(0.01)
    ddit.enable(pipe, adapter, policy="baseline")
    latents(pipe(**kwargs(batch=1, steps=2)))  # base-size calls only: the LoRA layers are out now
    assert lora_free(pipe.transformer.adapter.backbone)
    saved = adapter.adapter_state_dict()
    assert any(".lora_" in k for k in saved) and lora_free(adapter.backbone)
    pipe.to(torch.float64)
    assert all(p.dtype == torch.float64 for p in adapter.trainable_parameters())


def offload_hooked(pipe):
    """The components that ``enable_model_cpu_offload``'s hooks move to the device when called."""
    return [hook.model for hook in pipe._all_hooks]


@pytest.mark.parametrize("order", ["enable_then_offload", "offload_then_enable"])
def test_model_cpu_offload_moves_the_adapter_with_the_transformer_in_either_order(name, order, tmp_path):
    """On the CPU the hooks move nothing (DDIT_TEST_DEVICE=cuda in benchmarks/gpu_check.sh moves them for real):
    here the hooks must sit on the transformer the pipeline calls, before and after ``disable``."""
    pipe, kwargs, stock = stock_of(name)
    adapter = ddit.MultiPatchTransformer(pipe.transformer)
    adapter.save_pretrained(tmp_path)
    ddit.enable(pipe, adapter, policy=FixedPolicy(EARLY_COARSE))
    expected = latents(pipe(**kwargs(batch=2, steps=STEPS)))

    pipe, kwargs = build(name)
    if order == "offload_then_enable":
        pipe.enable_model_cpu_offload(device=DEVICE)
    ddit.enable(pipe, tmp_path, policy=FixedPolicy(EARLY_COARSE))
    if order == "enable_then_offload":
        pipe.enable_model_cpu_offload(device=DEVICE)
    assert pipe.transformer in offload_hooked(pipe) and pipe.transformer.device.type == "cpu"
    for _ in range(2):  # diffusers hooks the components again after each call
        assert torch.allclose(latents(pipe(**kwargs(batch=2, steps=STEPS))).cpu(), expected.cpu(), atol=ATOL, rtol=0)
    assert ddit.summary(pipe).coarse_fraction == pytest.approx(2 / 6)
    ddit.disable(pipe)
    assert pipe.transformer in offload_hooked(pipe) and lora_free(pipe.transformer)
    assert torch.allclose(latents(pipe(**kwargs(batch=2, steps=STEPS))).cpu(), stock.cpu(), atol=ATOL, rtol=0)


def test_a_transformer_placed_whole_by_a_device_map_runs_and_one_placed_layer_by_layer_is_refused():
    """A pipeline's device_map puts each component whole on one device, behind hooks that only align inputs."""
    pipe, kwargs = build("flux")
    adapter = ddit.MultiPatchTransformer(pipe.transformer)
    ddit.enable(pipe, adapter, policy=FixedPolicy(EARLY_COARSE))
    expected = latents(pipe(**kwargs(batch=1, steps=STEPS)))
    ddit.disable(pipe)
    add_hook_to_module(pipe.transformer, AlignDevicesHook(execution_device=DEVICE, io_same_device=True))
    attach_align_device_hook(pipe.transformer, execution_device=DEVICE, offload=False)
    ddit.enable(pipe, adapter, policy=FixedPolicy(EARLY_COARSE))
    assert torch.allclose(latents(pipe(**kwargs(batch=1, steps=STEPS))), expected, atol=ATOL, rtol=0)

    pipe, kwargs = build("flux")
    attach_align_device_hook(pipe.transformer, execution_device=DEVICE, offload=True)  # weights kept off-device
    assert_refused(pipe, "sequential CPU offload or a device map", "adapter-never-read")  # refused before loading


def test_offloading_layer_by_layer_is_refused_in_either_order(tmp_path):
    def group(pipe):
        pipe.enable_group_offload(onload_device=DEVICE, offload_device=torch.device("cpu"),
                                  offload_type="block_level", num_blocks_per_group=1)

    def sequential(pipe):
        pipe.enable_sequential_cpu_offload(device=DEVICE)

    flux, kwargs = build("flux")
    ddit.MultiPatchTransformer(flux.transformer).save_pretrained(tmp_path)
    for offload, match in ((group, "group offloading enabled"), (sequential, "sequential CPU offload")):
        pipe, kwargs = build("flux")
        offload(pipe)
        assert_refused(pipe, match, tmp_path)
    pipe, kwargs = build("flux")
    sequential(pipe)
    with pytest.raises(ValueError, match="no weights here .meta device"):
        ddit.MultiPatchTransformer(pipe.transformer)

    pipe, kwargs = build("flux")
    ddit.enable(pipe, tmp_path, policy="baseline")
    with pytest.raises(ValueError, match="group offloading places the transformer layer by layer"):
        group(pipe)
    sequential(pipe)
    with pytest.raises(ValueError, match="sequential CPU offload .or a device map. places the transformer"):
        pipe(**kwargs(batch=1, steps=2))
    pipe, kwargs = build("flux")
    ddit.enable(pipe, tmp_path, policy="baseline")
    apply_group_offloading(pipe.transformer, onload_device=DEVICE, offload_type="leaf_level")  # past the pipeline
    with pytest.raises(ValueError, match="group offloading places the transformer layer by layer"):
        pipe(**kwargs(batch=1, steps=2))


@pytest.mark.parametrize("order", ["compile_then_enable", "enable_then_compile"])
def test_regional_compilation_compiles_the_blocks_coarse_steps_run(order):
    pipe, kwargs = build("flux")
    ddit.enable(pipe, ddit.MultiPatchTransformer(pipe.transformer), policy=FixedPolicy(EARLY_COARSE))
    expected = latents(pipe(**kwargs(batch=2, steps=STEPS)))

    pipe, kwargs = build("flux")
    if order == "compile_then_enable":
        pipe.transformer.compile_repeated_blocks(backend="eager")  # dynamo's tracing, without a C++ compiler
    ddit.enable(pipe, ddit.MultiPatchTransformer(pipe.transformer), policy=FixedPolicy(EARLY_COARSE))
    if order == "enable_then_compile":
        pipe.transformer.compile_repeated_blocks(backend="eager")
    assert first_block(pipe.transformer.adapter.backbone)._compiled_call_impl is not None
    assert torch.allclose(latents(pipe(**kwargs(batch=2, steps=STEPS))), expected, atol=ATOL, rtol=0)
    assert ddit.summary(pipe).coarse_fraction == pytest.approx(2 / 6)


@pytest.mark.parametrize("name", ["flux", "wan"])
def test_regional_compilation_with_a_ddit_cache_compiles_the_blocks_once(name):
    """The cache's per-call, per-row decisions stay outside torch.compile: at one size the blocks compile once
    (a graph per kind of block, as without the cache; traced decisions gave one per call until dynamo's limit),
    and a partly skipped mixed batch gives the eager run's output."""
    from torch._dynamo.utils import counters

    def run(compiled, policy, cache):
        torch._dynamo.reset()
        counters.clear()
        pipe, kwargs = build(name)
        if compiled:
            pipe.transformer.compile_repeated_blocks(backend="eager")
        ddit.enable(pipe, ddit.MultiPatchTransformer(pipe.transformer), policy=policy, cache=cache)
        return latents(pipe(**kwargs(batch=2, steps=STEPS))), counters["stats"]["unique_graphs"]

    _, alone = run(True, "baseline", None)
    _, cached = run(True, "baseline", TaylorSeer(interval=2, order=1, warmup=1))
    assert cached == alone == len({type(b) for b in blocks_of(build(name)[0].transformer)})
    eager, _ = run(False, SplitPolicy(), TaylorSeer(interval=2, order=1, warmup=1))
    compiled, _ = run(True, SplitPolicy(), TaylorSeer(interval=2, order=1, warmup=1))
    torch.testing.assert_close(compiled, eager, rtol=0, atol=ATOL)


def test_a_compiled_wrapper_is_refused_pointing_to_regional_compilation():
    pipe, _ = build("flux")
    original = pipe.transformer
    pipe.transformer = torch.compile(original)
    with pytest.raises(TypeError, match="torch.compile wrapper around FluxTransformer2DModel.*compile_repeated_blocks"):
        ddit.enable(pipe, ddit.MultiPatchTransformer(pipe.transformer))


def test_float8_storage_before_the_adapter_is_refused_naming_the_layers():
    pipe, _ = build("flux")
    pipe.transformer.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)
    with pytest.raises(ValueError, match="layerwise casting enabled.*first, then"):
        ddit.MultiPatchTransformer(pipe.transformer)
    pipe, _ = build("flux")
    pipe.transformer.x_embedder.to(torch.float8_e4m3fn)
    with pytest.raises(ValueError, match="x_embedder and proj_out are stored as torch.float8_e4m3fn"):
        ddit.MultiPatchTransformer(pipe.transformer)
    assert lora_free(pipe.transformer)


def test_parallelism_is_refused_before_and_while_enabled():
    pipe, _ = build("flux")
    pipe.transformer._parallel_config = ContextParallelConfig(ring_degree=2)  # what enable_parallelism sets
    with pytest.raises(ValueError, match="context or tensor parallelism .enable_parallelism., which split"):
        ddit.MultiPatchTransformer(pipe.transformer)
    pipe, _ = build("flux")
    ddit.enable(pipe, ddit.MultiPatchTransformer(pipe.transformer))
    with pytest.raises(ValueError, match="enable_parallelism: context and tensor parallelism split"):
        pipe.transformer.enable_parallelism(config=ContextParallelConfig(ring_degree=2))


def test_samples_from_identical_noise_stay_samples_where_the_pipeline_calls_per_branch():
    """Chroma says it guides but calls once per branch, as every pipeline of the packed-token families does: two
    samples drawn from one seed (identical halves) must not be read as one sample's two branches."""
    pipe, kwargs = build("chroma")
    ddit.enable(pipe, ddit.MultiPatchTransformer(pipe.transformer), policy=FixedPolicy(EARLY_COARSE))
    pipe(**kwargs(batch=2, seeds=[0, 0], steps=STEPS))
    assert {r["sample"] for r in ddit.summary(pipe).records} == {0, 1}


def test_an_ip_adapter_image_prompt_or_controlnet_residuals_off_the_latents_tokens_are_refused_at_the_first_call():
    """An image prompt given to a family whose spec does not project it as the backbone does (FLUX.1, Chroma and SD3
    do: tests/test_ip_adapter.py) would be dropped silently at coarse steps; ControlNet residuals that are not on
    the latent's tokens could not be averaged for a coarse step."""
    pipe, kwargs = build("qwenimage")
    calls = []
    pipe.transformer.register_forward_pre_hook(lambda *a: calls.append(1))
    ddit.enable(pipe, ddit.MultiPatchTransformer(pipe.transformer), policy=FixedPolicy(EARLY_COARSE))
    image_prompt = {"ip_adapter_image_embeds": [torch.zeros(1, 4)]}
    with pytest.raises(ValueError, match=r"\['ip_adapter_image_embeds'\] \(an IP-Adapter.*drop it from the"):
        pipe(**kwargs(steps=STEPS), attention_kwargs=image_prompt)
    assert not calls  # nothing ran
    pipe, kwargs = build("flux")
    pipe.transformer.register_forward_pre_hook(lambda *a: calls.append(1))
    ddit.enable(pipe, ddit.MultiPatchTransformer(pipe.transformer), policy=FixedPolicy(EARLY_COARSE))
    ids = torch.zeros(8, 8, 3)  # the 8 x 8 packed tokens of a 16 x 16 latent, as FluxPipeline makes them
    ids[..., 1], ids[..., 2] = torch.arange(8)[:, None], torch.arange(8)[None]
    with pytest.raises(ValueError, match=r"controlnet_block_samples holds a tensor of shape \(1,\), not \(batch, 64, "):
        pipe.transformer(hidden_states=torch.zeros(1, 64, 64), encoder_hidden_states=torch.zeros(1, TEXT_LEN, 32),
                         pooled_projections=torch.zeros(1, 32), timestep=torch.ones(1), img_ids=ids.reshape(-1, 3),
                         txt_ids=torch.zeros(TEXT_LEN, 3), guidance=torch.ones(1),
                         controlnet_block_samples=[torch.zeros(1)])
    assert not calls


def test_fused_qkv_projections_are_refused_before_while_and_after_enable():
    pipe, _ = build("sd3")  # a fused to_qkv would run instead of the LoRA layers on to_q, to_k and to_v
    pipe.transformer.fuse_qkv_projections()
    with pytest.raises(ValueError, match="fused attention projections.*unfuse_qkv_projections"):
        ddit.MultiPatchTransformer(pipe.transformer)
    pipe.transformer.unfuse_qkv_projections()
    adapter = ddit.MultiPatchTransformer(pipe.transformer)
    ddit.enable(pipe, adapter)
    with pytest.raises(ValueError, match="fuse_qkv_projections: a fused q/k/v projection would bypass"):
        pipe.transformer.fuse_qkv_projections()
    ddit.disable(pipe).transformer.fuse_qkv_projections()  # fusing the stock transformer is fine...
    with pytest.raises(ValueError, match="fused attention projections"):
        ddit.enable(pipe, adapter)  # ...until the adapter's LoRA layers would go back in


def test_compiling_the_enabled_transformer_whole_keeps_summary_and_disable_working():
    pipe, kwargs, stock = stock_of("sd3", batch=1)
    ddit.enable(pipe, ddit.MultiPatchTransformer(pipe.transformer), policy=FixedPolicy(EARLY_COARSE))
    expected = latents(pipe(**kwargs(batch=1, steps=STEPS)))
    pipe.transformer = torch.compile(pipe.transformer, backend="eager")
    assert torch.allclose(latents(pipe(**kwargs(batch=1, steps=STEPS))), expected, atol=ATOL, rtol=0)
    assert ddit.summary(pipe).coarse_fraction == pytest.approx(2 / 6)
    ddit.disable(pipe)
    assert torch.allclose(latents(pipe(**kwargs(batch=1, steps=STEPS))), stock, atol=ATOL, rtol=0)


def test_layerwise_casting_after_enable_stores_the_blocks_in_float8_and_runs_coarse_steps():
    pipe, kwargs = build("flux")
    ddit.enable(pipe, ddit.MultiPatchTransformer(pipe.transformer), policy=FixedPolicy(EARLY_COARSE))
    pipe.transformer.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)
    adapter = pipe.transformer.adapter
    assert adapter.dtype == torch.float32 and adapter.backbone.x_embedder.weight.dtype == torch.float8_e4m3fn
    assert {layer.get_base_layer().weight.dtype for layer in adapter._lora_layers} == {torch.float8_e4m3fn}
    # diffusers leaves peft layers in the compute dtype (they are small)
    assert {layer.lora_A["patch4"].weight.dtype for layer in adapter._lora_layers} == {torch.float32}
    assert torch.isfinite(latents(pipe(**kwargs(batch=2, steps=STEPS)))).all()
    assert ddit.summary(pipe).coarse_fraction == pytest.approx(2 / 6)


def test_flux2_klein_guides_with_two_calls_per_step_that_share_one_decision():
    """FLUX.2 [klein] (not guidance-distilled) calls the transformer once per CFG branch, in cache contexts."""
    base, _ = build("flux2")
    torch.manual_seed(0)
    vae = AutoencoderKLFlux2(block_out_channels=(8,) * 4, layers_per_block=1, latent_channels=16, norm_num_groups=4,
                             mid_block_add_attention=False).eval()  # Klein reads its latent statistics
    pipe = Flux2KleinPipeline(scheduler=base.scheduler, vae=vae, text_encoder=None, tokenizer=None,
                              transformer=base.transformer).to(DEVICE)
    pipe.set_progress_bar_config(disable=True)

    def call():
        return latents(pipe(prompt_embeds=per_sample([0, 1], 1, TEXT_LEN, 32).to(DEVICE),
                            negative_prompt_embeds=torch.zeros(2, TEXT_LEN, 32, device=DEVICE), guidance_scale=4.0,
                            height=128, width=128, num_inference_steps=STEPS, generator=generators([0, 1]),
                            output_type="latent"))

    stock = call()
    ddit.enable(pipe, ddit.MultiPatchTransformer(pipe.transformer), policy=SplitPolicy())
    out = call()
    assert torch.allclose(out[1], stock[1], atol=ATOL, rtol=0) and (out[0] - stock[0]).abs().max() > 1e-3
    calls = {}
    for r in ddit.summary(pipe).records:
        calls.setdefault((r["step"], r["sample"]), []).append((r["branch"], r["patch_size"]))
    assert calls[(0, 0)] == [("cond", 4), ("uncond", 4)] and calls[(0, 1)] == [("cond", 2), ("uncond", 2)]


def test_z_image_cfg_truncation_drops_the_uncond_branch_mid_generation_and_keeps_the_decisions():
    """Z-Image stops guiding past cfg_truncation: its later calls carry one branch, not two."""
    pipe, kwargs, _ = stock_of("zimage")
    stock = latents(pipe(**kwargs(batch=2, steps=STEPS), cfg_truncation=0.5))
    ddit.enable(pipe, ddit.MultiPatchTransformer(pipe.transformer), policy=SplitPolicy(early=4))
    out = latents(pipe(**kwargs(batch=2, steps=STEPS), cfg_truncation=0.5))
    assert torch.allclose(out[1], stock[1], atol=ATOL, rtol=0) and (out[0] - stock[0]).abs().max() > 1e-3
    records = ddit.summary(pipe).records
    assert [r["patch_size"] for r in records if r["sample"] == 0] == [4] * 4 + [2] * 2
    assert {r["tokens"] for r in records if r["step"] == STEPS - 1} == {256}  # one branch of 16 x 16 tokens
    assert {r["tokens"] for r in records if r["step"] == 0 and r["sample"] == 1} == {512}  # two
    ddit.disable(pipe)  # ddit's TaylorSeer starts a sample afresh when its branches go from two to one
    ddit.enable(pipe, ddit.MultiPatchTransformer(pipe.transformer), policy=SplitPolicy(early=4),
                cache=TaylorSeer(interval=2, order=1, warmup=1))
    cached = latents(pipe(**kwargs(batch=2, steps=STEPS), cfg_truncation=0.5))
    assert torch.isfinite(cached).all() and ddit.summary(pipe).cache_hits > 0


def test_z_image_img2img_truncated_from_its_first_step_reads_its_rows_as_samples(tmp_path):
    """img2img starting past cfg_truncation never guides: its calls carry one row per image, not two branches."""
    from diffusers import DiffusionPipeline, ZImageImg2ImgPipeline

    from ddit.tiny_pipelines import TINY_CALL, save_tiny_pipeline

    pipe = ZImageImg2ImgPipeline.from_pipe(DiffusionPipeline.from_pretrained(save_tiny_pipeline("zimage", tmp_path)))
    pipe.set_progress_bar_config(disable=True)
    image = torch.rand(2, 3, 128, 128, generator=torch.Generator().manual_seed(1))

    def call():
        return pipe(prompt=["a red circle", "stripes"], image=image, strength=0.6, cfg_truncation=0.1,
                    num_inference_steps=STEPS, generator=generators([0, 1]), output_type="latent",
                    **TINY_CALL["zimage"]).images

    stock = call()
    ddit.enable(pipe, ddit.MultiPatchTransformer(pipe.transformer), policy=SplitPolicy(early=STEPS))
    out = call()
    assert {r["sample"] for r in ddit.summary(pipe).records} == {0, 1}  # two samples, not one sample's branches
    assert torch.allclose(out[1], stock[1], atol=ATOL, rtol=0) and (out[0] - stock[0]).abs().max() > 1e-3


class FirstLatent(PatchPolicy):
    """The base size always; keeps the shape of the latent it is shown."""

    name = "first_latent"

    def choose(self, step):
        self.shape = tuple(step.latent.shape)
        return torch.full((self.batch_size,), self.base_size), {}


def test_hunyuanvideo15_policies_read_the_latent_without_its_condition_channels_and_hooking_guiders_are_refused():
    """Its pipeline appends condition and mask channels (9 in, 4 out here) that never change: a policy reads the
    4 the steps move. Guiders that hook the transformer's layers cannot find them inside the wrapper."""
    from diffusers import SkipLayerGuidance

    pipe, kwargs, stock = stock_of("hunyuanvideo15")
    policy = FirstLatent()
    ddit.enable(pipe, ddit.MultiPatchTransformer(pipe.transformer), policy=policy)
    assert torch.allclose(latents(pipe(**kwargs(batch=2, steps=STEPS))), stock, atol=ATOL, rtol=0)
    assert policy.shape == (2, 4, 2, 16, 16)
    ddit.disable(pipe)
    pipe.guider = SkipLayerGuidance(skip_layer_guidance_layers=[0])
    assert_refused(pipe, "SkipLayerGuidance changes the transformer's layers", None)
