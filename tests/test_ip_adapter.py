"""IP-Adapters (FLUX.1, Chroma, SD3): the backbone projects the image prompt in its own forward, before its blocks;
the spec projects it the same way at a coarse size, and each image token, coarse or fine, attends to it. The
backbones with an IP-Adapter put in place as diffusers' loaders place one (random weights), and the stock FLUX.1 and
SD3 pipelines given image embeddings (no image encoder needed)."""

import os

import pytest
import torch
from diffusers import ChromaTransformer2DModel, DiffusionPipeline, FluxTransformer2DModel, SD3Transformer2DModel
from diffusers.models.attention_processor import SD3IPAdapterJointAttnProcessor2_0
from diffusers.models.embeddings import IPAdapterTimeImageProjection, ImageProjection, MultiIPAdapterImageProjection
from diffusers.models.transformers.transformer_flux import FluxIPAdapterAttnProcessor

import ddit
from ddit.adapter import MultiPatchTransformer, PatchHead
from ddit.backbones import ChromaSpec, Flux2Spec, Flux3Spec, FluxSpec
from ddit.caches import TaylorSeer
from ddit.policies import FixedPolicy, PatchPolicy
from ddit.tiny_pipelines import SIDE, save_tiny_pipeline, wake_zeros

B, ROWS, COLS, EMBED = 2, 8, 4, 8  # two samples; fine tokens of a 16 x 8 latent under a 2x2 patch; image features
STEPS, ATOL = 4, 1e-5
DEVICE = torch.device(os.environ.get("DDIT_TEST_DEVICE", "cpu"))  # the stock pipelines' (benchmarks/gpu_check.sh)


def with_flux_ip_adapter(model):
    """FLUX.1's (and Chroma's) IP-Adapter as diffusers' loader places it: an image projection to four text-width
    tokens, and an image-prompt attention in each dual-stream block."""
    width = model.config.joint_attention_dim
    model.encoder_hid_proj = MultiIPAdapterImageProjection(
        [ImageProjection(cross_attention_dim=width, image_embed_dim=EMBED, num_image_text_embeds=4)])
    model.set_attn_processor({name: FluxIPAdapterAttnProcessor(model.inner_dim, width, num_tokens=[4], scale=[1.0])
                              if name.startswith("transformer_blocks") else processor
                              for name, processor in model.attn_processors.items()})
    return model


def with_sd3_ip_adapter(model):
    """SD3.5's IP-Adapter as diffusers' loader places it: a timestep-aware resampler, and an image-prompt attention
    normed by its timestep embedding in every block."""
    width = model.config.num_attention_heads * model.config.attention_head_dim
    model.image_proj = IPAdapterTimeImageProjection(embed_dim=EMBED, output_dim=width, hidden_dim=16, depth=1,
                                                    dim_head=8, heads=2, num_queries=4, timestep_in_dim=8)
    model.set_attn_processor({name: SD3IPAdapterJointAttnProcessor2_0(
        hidden_size=width, ip_hidden_states_dim=width, head_dim=model.config.attention_head_dim, timesteps_emb_dim=16)
        for name in model.attn_processors})
    return model


def flux():
    model = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=2, num_single_layers=1,
                                   attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                   pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(4, 4, 8))
    return with_flux_ip_adapter(model), dict(**_packed(), pooled_projections=torch.randn(B, 32),
                                             guidance=torch.tensor([3.5, 3.5]))


def chroma():
    model = ChromaTransformer2DModel(patch_size=1, in_channels=64, num_layers=2, num_single_layers=1,
                                     attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                     axes_dims_rope=(4, 4, 8), approximator_num_channels=16,
                                     approximator_hidden_dim=32, approximator_layers=1)
    return with_flux_ip_adapter(model), _packed()


def _packed():
    ids = torch.zeros(ROWS, COLS, 3)
    ids[..., 1], ids[..., 2] = torch.arange(ROWS)[:, None], torch.arange(COLS)[None]
    return dict(hidden_states=torch.randn(B, ROWS * COLS, 64), encoder_hidden_states=torch.randn(B, 5, 32),
                timestep=torch.tensor([0.3, 0.9]), img_ids=ids.reshape(-1, 3), txt_ids=torch.zeros(5, 3))


def sd3():
    model = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
                                  num_attention_heads=4, joint_attention_dim=32, caption_projection_dim=32,
                                  pooled_projection_dim=16, out_channels=4, pos_embed_max_size=16)
    return with_sd3_ip_adapter(model), dict(
        hidden_states=torch.randn(B, 4, 2 * ROWS, 2 * COLS), encoder_hidden_states=torch.randn(B, 5, 32),
        pooled_projections=torch.randn(B, 16), timestep=torch.tensor([300.0, 900.0]))


FAMILIES = {"flux": (flux, lambda: [torch.randn(B, 1, EMBED)]), "chroma": (chroma, lambda: [torch.randn(B, 1, EMBED)]),
            "sd3": (sd3, lambda: torch.randn(B, 1, EMBED))}


def family(name):
    build, embeds = FAMILIES[name]
    torch.manual_seed(0)
    backbone, inputs = build()
    return MultiPatchTransformer(wake_zeros(backbone).eval()), inputs, embeds()


def other(embeds):
    """The samples' image prompts swapped."""
    return [e.roll(1, dims=0) for e in embeds] if isinstance(embeds, list) else embeds.roll(1, dims=0)


def prompt(embeds) -> dict:
    """Fresh attention kwargs holding an image prompt (the stock forward pops it from the dict it is given)."""
    return {"joint_attention_kwargs": {"ip_adapter_image_embeds": embeds}}


@pytest.mark.parametrize("name", FAMILIES)
@torch.no_grad()
def test_the_spec_projects_the_image_prompt_as_the_backbone_does(name):
    model, inputs, embeds = family(name)
    reference = model.backbone(**inputs, **prompt(embeds), return_dict=False)[0]
    assert (reference - model.backbone(**inputs, **prompt(other(embeds)), return_dict=False)[0]).abs().max() > 1e-3
    given = model._signature.bind(**inputs, **prompt(embeds), return_dict=False)
    given.apply_defaults()
    head = PatchHead(*model.spec.base_weights(), scale=1)
    out = model._patched(head, model.base_patch_size, model.spec.latent(given.arguments), given.arguments)[0]
    assert (out - reference).abs().max() <= 1e-5


@pytest.mark.parametrize("name", FAMILIES)
@torch.no_grad()
def test_coarse_steps_see_the_image_prompt_and_leave_the_callers_dict_alone(name):
    model, inputs, embeds = family(name)
    for size in model.patch_sizes[1:]:
        given = prompt(embeds)
        out = model(**inputs, **given, patch_size=size).sample
        assert "ip_adapter_image_embeds" in given["joint_attention_kwargs"]  # projected from a copy
        assert (model(**inputs, **prompt(other(embeds)), patch_size=size).sample - out).abs().max() > 1e-4


# -- the stock pipelines

class SplitPolicy(PatchPolicy):
    """Sample 0 at patch 4 for the first two steps; sample 1 always at the base size."""

    name = "split"

    def choose(self, step):
        sizes = torch.full((self.batch_size,), self.base_size)
        if step.index < 2:
            sizes[0] = 4
        return sizes, {}


def flux_pipeline(tmp_path):
    """The tiny FluxPipeline with an IP-Adapter; true CFG, the negative image prompt given too (no image encoder).
    Each sample gets an image prompt of its own, taken as given (the stock pipeline repeats one for every prompt),
    so that a batch run in groups must give each row its own."""
    pipe = DiffusionPipeline.from_pretrained(save_tiny_pipeline("flux", tmp_path))
    torch.manual_seed(0)
    with_flux_ip_adapter(pipe.transformer)
    pipe.prepare_ip_adapter_image_embeds = lambda image, embeds, device, count: [e.to(device) for e in embeds]
    images, negative = torch.randn(B, 1, EMBED), torch.zeros(B, 1, EMBED)
    return pipe.to(DEVICE), dict(negative_prompt=["", ""], true_cfg_scale=2.0, ip_adapter_image_embeds=[images],
                                 negative_ip_adapter_image_embeds=[negative]), dict(ip_adapter_image_embeds=[negative])


def chroma_pipeline(tmp_path):
    """The tiny ChromaPipeline with an IP-Adapter, as FLUX.1's: CFG as two calls a step."""
    pipe = DiffusionPipeline.from_pretrained(save_tiny_pipeline("chroma", tmp_path))
    torch.manual_seed(0)
    with_flux_ip_adapter(pipe.transformer)
    pipe.prepare_ip_adapter_image_embeds = lambda image, embeds, device, count: [e.to(device) for e in embeds]
    images, negative = torch.randn(B, 1, EMBED), torch.zeros(B, 1, EMBED)
    return pipe.to(DEVICE), dict(ip_adapter_image_embeds=[images], negative_ip_adapter_image_embeds=[negative]), \
        dict(ip_adapter_image_embeds=[negative])


def sd3_pipeline(tmp_path):
    """The tiny StableDiffusion3Pipeline with an IP-Adapter, in its batched CFG rows (negative, then positive), each
    sample with an image prompt of its own, taken as given."""
    pipe = DiffusionPipeline.from_pretrained(save_tiny_pipeline("sd3", tmp_path))
    torch.manual_seed(0)
    with_sd3_ip_adapter(pipe.transformer)
    pipe.prepare_ip_adapter_image_embeds = lambda image, embeds, device, count, cfg: embeds.to(device)
    images = torch.cat([torch.zeros(B, 1, EMBED), torch.randn(B, 1, EMBED)])
    return pipe.to(DEVICE), dict(ip_adapter_image_embeds=images, max_sequence_length=16), \
        dict(ip_adapter_image_embeds=torch.zeros(2 * B, 1, EMBED))


PIPELINES = {"flux": flux_pipeline, "chroma": chroma_pipeline, "sd3": sd3_pipeline}


@pytest.mark.parametrize("build", PIPELINES.values(), ids=PIPELINES)
def test_in_the_stock_pipeline_the_fine_sample_equals_stock_and_coarse_steps_see_the_image_prompt(build, tmp_path):
    pipe, call, without = build(tmp_path)
    pipe.transformer.eval()

    def generate(**changes):
        return pipe(prompt=["a red circle", "a blue square"], num_inference_steps=STEPS, output_type="latent",
                    generator=[torch.Generator().manual_seed(s) for s in (0, 1)],
                    height=SIDE, width=SIDE, **{**call, **changes}).images

    stock = generate()
    assert (generate(**without) - stock).abs().max() > 1e-3  # the image prompt matters
    adapter = MultiPatchTransformer(pipe.transformer)
    ddit.enable(pipe, adapter, policy="baseline")
    assert torch.equal(generate(), stock)
    ddit.disable(pipe)

    ddit.enable(pipe, adapter, policy=SplitPolicy())  # a batch in groups of one size: the image prompt cut by rows
    mixed = generate()
    assert torch.allclose(mixed[1], stock[1], atol=ATOL, rtol=0) and (mixed[0] - stock[0]).abs().max() > 1e-3
    ddit.disable(pipe)

    ddit.enable(pipe, adapter, policy=FixedPolicy([4] * STEPS))
    coarse = generate()
    assert {r["patch_size"] for r in ddit.summary(pipe).records} == {4}
    assert (generate(**without) - coarse).abs().max() > 1e-3
    ddit.disable(pipe)
    assert torch.equal(generate(), stock)


def test_feature_caches_reuse_some_rows_beside_rows_that_run_with_their_image_prompts(tmp_path):
    """Sample 0 starts coarse, sample 1 fine: TaylorSeer warms up per size, so in some calls one row computes beside
    a row that reuses, and the computing row's image prompt is cut from the call's."""
    pipe, call, _ = flux_pipeline(tmp_path)
    ddit.enable(pipe, MultiPatchTransformer(pipe.transformer.eval()), policy=SplitPolicy(),
                cache=TaylorSeer(interval=3, warmup=2))
    out = pipe(prompt=["a red circle", "a blue square"], num_inference_steps=8, output_type="latent", height=SIDE,
               width=SIDE, generator=[torch.Generator().manual_seed(s) for s in (0, 1)], **call).images
    assert out.isfinite().all()
    cached = {}
    for r in ddit.summary(pipe).records:
        cached.setdefault((r["step"], r["branch"]), set()).add(r["cached"])
    assert any(len(hits) == 2 for hits in cached.values())  # a call where one row reused and the other computed


def test_unloading_the_ip_adapter_while_enabled_unloads_it_from_the_backbone(tmp_path):
    pipe, call, _ = flux_pipeline(tmp_path)
    adapter = MultiPatchTransformer(pipe.transformer.eval())
    ddit.enable(pipe, adapter, policy=FixedPolicy([4] * STEPS))
    pipe.unload_ip_adapter()
    assert adapter.backbone.encoder_hid_proj is None and "encoder_hid_proj" not in vars(pipe.transformer)
    assert pipe(prompt="a red circle", num_inference_steps=STEPS, output_type="latent", height=SIDE,
                width=SIDE).images.isfinite().all()


def test_sd3s_skip_layer_guidance_with_an_image_prompt_is_refused_naming_the_rows(tmp_path):
    pipe, call, _ = sd3_pipeline(tmp_path)
    ddit.enable(pipe, MultiPatchTransformer(pipe.transformer.eval()), policy=FixedPolicy([4] * 10))
    with pytest.raises(ValueError, match=r"4 rows of image prompt for 2 latent rows: skip-layer guidance"):
        pipe(prompt=["a red circle", "a blue square"], num_inference_steps=10, output_type="latent", height=SIDE,
             width=SIDE, skip_guidance_layers=[0], **call)  # its guidance's call at step 1 (from 1% to 20%)
    assert {r["step"] for r in ddit.summary(pipe).records} == {0, 1}  # it ran until then


def test_a_subclass_with_a_forward_of_its_own_takes_no_residuals_nor_image_prompt_unless_it_says_so():
    class Own(FluxSpec):
        def forward(self, tokens, grid, scale, args, references=()):
            return tokens

    class Says(Own):
        image_prompt = True

    assert (Own.residuals, Own.image_prompt) == ((), False) and Says.image_prompt
    assert FluxSpec.image_prompt and FluxSpec.residuals and ChromaSpec.image_prompt and not ChromaSpec.residuals
    assert not Flux2Spec.image_prompt and not Flux3Spec.residuals


def test_an_ip_adapter_loaded_while_enabled_goes_into_the_backbone(tmp_path):
    """``pipe.load_ip_adapter(...)`` after ``ddit.enable`` (FLUX.1; a state dict as diffusers' loader reads an
    IP-Adapter file, random weights, no image encoder): the same pipeline as one loaded before, and coarse steps
    see the image prompt."""
    folder = save_tiny_pipeline("flux", tmp_path)
    g = torch.Generator().manual_seed(0)
    width, inner = 32, 32  # the tiny FLUX.1's text width and inner width

    def weights(*shape):
        return 0.1 * torch.randn(*shape, generator=g)

    state = {"image_proj": {"proj.weight": weights(4 * width, EMBED), "proj.bias": weights(4 * width),
                            "norm.weight": 1 + weights(width), "norm.bias": weights(width)},
             "ip_adapter": {"0.to_k_ip.weight": weights(inner, width), "0.to_k_ip.bias": weights(inner),
                            "0.to_v_ip.weight": weights(inner, width), "0.to_v_ip.bias": weights(inner)}}
    images = torch.randn(B, 1, EMBED, generator=g)

    def pipeline():
        pipe = DiffusionPipeline.from_pretrained(folder).to(DEVICE)
        pipe.prepare_ip_adapter_image_embeds = lambda image, embeds, device, count: [e.to(device) for e in embeds]
        return pipe

    def load(pipe):
        pipe.load_ip_adapter(state, weight_name="ip_adapter.safetensors",
                             image_encoder_pretrained_model_name_or_path=None)

    def generate(pipe, embeds=images):
        return pipe(prompt=["a red circle", "a blue square"], num_inference_steps=STEPS, output_type="latent",
                    height=SIDE, width=SIDE, generator=[torch.Generator().manual_seed(s) for s in (0, 1)],
                    ip_adapter_image_embeds=[embeds], negative_ip_adapter_image_embeds=[0 * embeds]).images

    stock = pipeline()
    load(stock)
    pipe = pipeline()
    ddit.enable(pipe, MultiPatchTransformer(pipe.transformer), policy="baseline")
    load(pipe)
    assert pipe.transformer.adapter.backbone.encoder_hid_proj is not None
    assert "encoder_hid_proj" not in pipe.transformer._modules  # the wrapper holds none of its own
    assert torch.equal(generate(pipe), generate(stock))
    ddit.disable(pipe)
    ddit.enable(pipe, MultiPatchTransformer(pipe.transformer), policy=FixedPolicy([4] * STEPS))
    assert (generate(pipe, 0 * images) - generate(pipe)).abs().max() > 1e-3
