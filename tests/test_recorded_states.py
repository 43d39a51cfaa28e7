"""Recording a stock pipeline's transformer inputs, and drawing them back as distillation batches."""

import json
from functools import partial

import pytest
import torch
from safetensors import safe_open

from ddit.recorded_states import RecordedStates, RecordingError, record_states
from tiny_pipelines import TEXT_LEN, build

STEPS = 3


class PromptPipe:
    """A tiny in-memory pipeline that takes a prompt: the prompt's length seeds its embeddings
    (the tiny pipelines have no text encoder; ``tests/test_self_distill.py`` runs real ones)."""

    def __init__(self, name):
        self.name, (self.pipe, self.call_kwargs) = name, build(name)
        self.transformer, self.device, self.calls = self.pipe.transformer, self.pipe.device, 0

    def __call__(self, prompt, generator, output_type, **call):
        self.calls += 1
        kwargs = self.call_kwargs(seeds=[len(prompt)], steps=STEPS)
        kwargs["generator"] = [generator]
        if self.name == "qwenimage":  # Qwen-Image trims its text to the prompt's length
            n = min(TEXT_LEN, 2 + len(prompt) // 2)
            kwargs.update(prompt_embeds=kwargs["prompt_embeds"][:, :n], prompt_embeds_mask=torch.ones(1, n))
        return self.pipe(**{**kwargs, **call})


@pytest.mark.parametrize("name", ["flux", "chroma", "qwenimage", "sd3", "pixart", "sana", "wan", "hunyuanvideo15"])
def test_drawn_states_reproduce_the_transformer_outputs_of_the_pipeline(name, tmp_path):
    """Every drawn row, fed back to the transformer, gives what the transformer returned inside the
    pipeline for that row: conditioning, timesteps, shared ids and CFG rows all come back right."""
    pipe = PromptPipe(name)
    seen = {}

    def key(x, text, mask):  # true CFG (Flux, Qwen-Image, Wan): two calls per step on one latent, told apart by
        text = text if mask is None else text[mask.bool()]  # the prompt, without the padding of a drawn batch
        return x.numpy().tobytes() + text.numpy().tobytes()

    def masks(kwargs):
        return kwargs.get("encoder_hidden_states_mask") if kwargs.get("encoder_hidden_states_mask") is not None \
            else [None] * len(kwargs["encoder_hidden_states"])

    def keep(module, args, kwargs, output):
        latents = args[0] if args else kwargs["hidden_states"]  # PixArt passes it by position
        for x, text, mask, y in zip(latents, kwargs["encoder_hidden_states"], masks(kwargs), output[0]):
            seen[key(x, text, mask)] = y.clone()

    handle = pipe.transformer.register_forward_hook(keep, with_kwargs=True)
    record_states(pipe, ["a red circle", "stripes"], tmp_path, progress=False)
    handle.remove()

    states = RecordedStates(tmp_path)
    per_branch = ("flux", "chroma", "qwenimage", "wan", "hunyuanvideo15")
    calls_per_prompt = STEPS * (2 if name in per_branch else 1)  # a call per CFG branch
    assert states.describe()["calls"] == 2 * calls_per_prompt
    assert len(states) == 2 * STEPS * 2  # every step, cond and uncond, two prompts
    z, kwargs = states.draw(torch.Generator().manual_seed(0), 5)
    with torch.no_grad():
        out = pipe.transformer(hidden_states=z, **kwargs, return_dict=False)[0]
    for x, text, mask, y in zip(z, kwargs["encoder_hidden_states"], masks(kwargs), out):
        torch.testing.assert_close(y, seen[key(x, text, mask)], rtol=1e-5, atol=1e-6)
    if name == "qwenimage":  # the two prompts' texts differ in length: the shorter is padded, masked out
        assert kwargs["encoder_hidden_states_mask"].sum(1).unique().tolist() == [5, 8]


def test_z_image_lists_of_per_sample_latents_and_prompts_come_back_as_lists(tmp_path):
    """Z-Image takes its latents and prompts (each of its own length) as lists of one tensor per sample: every
    drawn row, fed back, gives what the transformer returned for it inside the pipeline."""
    pipe = PromptPipe("zimage")
    seen = {}

    def key(x, text):
        return x.numpy().tobytes() + text.numpy().tobytes()

    def keep(module, args, output):
        for x, text, y in zip(args[0], args[2], output[0]):
            seen[key(x, text)] = y.clone()

    handle = pipe.transformer.register_forward_hook(keep)
    record_states(pipe, ["a red circle", "stripes"], tmp_path, progress=False)
    handle.remove()

    states = RecordedStates(tmp_path)
    assert states.describe()["calls"] == 2 * STEPS and len(states) == 2 * STEPS * 2  # CFG batched: 2 rows a call
    z, kwargs = states.draw(torch.Generator().manual_seed(0), 6)
    assert isinstance(z, list) and isinstance(kwargs["cap_feats"], list)
    assert len({len(c) for c in kwargs["cap_feats"]}) > 1  # prompts of different lengths in one batch
    with torch.no_grad():
        out = pipe.transformer(z, **kwargs, return_dict=False)[0]
    for x, text, y in zip(z, kwargs["cap_feats"], out):
        torch.testing.assert_close(y, seen[key(x, text)], rtol=1e-5, atol=1e-6)


def test_z_image_recordings_of_two_resolutions_are_drawn_in_batches_of_one_resolution(tmp_path):
    pipe = PromptPipe("zimage")
    record_states(pipe, ["a red circle", "stripes"], tmp_path, indices=[0], progress=False)
    record_states(pipe, ["a red circle", "stripes"], tmp_path, call=dict(height=128, width=128), indices=[1],
                  progress=False)
    states = RecordedStates(tmp_path)
    shapes = [{x.shape for x in states.draw(torch.Generator().manual_seed(seed), 8)[0]} for seed in range(12)]
    assert all(len(s) == 1 for s in shapes) and len(set.union(*shapes)) == 2


def test_prompt_embeddings_are_stored_once_per_prompt(tmp_path):
    record_states(PromptPipe("sd3"), ["one prompt"], tmp_path, progress=False)
    with safe_open(tmp_path / "00000.safetensors", "pt") as f:
        keys = list(f.keys())
        calls = json.loads(f.metadata()["calls"])
    assert sum(k.startswith("encoder_hidden_states.") for k in keys) == 1
    assert sum(k.startswith("hidden_states.") for k in keys) == STEPS
    assert [c["batch"] for c in calls] == [2] * STEPS  # cond and uncond in one batched call


def test_a_resumed_recording_runs_only_the_missing_prompts(tmp_path):
    prompts = ["a", "bb", "ccc"]
    record_states(PromptPipe("sd3"), prompts, tmp_path / "straight", progress=False)
    pipe = PromptPipe("sd3")
    record_states(pipe, prompts[:2], tmp_path / "resumed", progress=False)
    (tmp_path / "resumed" / "00000.safetensors").unlink()
    record_states(pipe, prompts, tmp_path / "resumed", progress=False)
    assert pipe.calls == 2 + 2
    for i in range(3):
        assert contents(tmp_path / "straight", i) == contents(tmp_path / "resumed", i)


def contents(folder, i):
    """A recording's metadata and tensors (its bytes are not comparable: safetensors orders metadata at random)."""
    with safe_open(folder / f"{i:05d}.safetensors", "pt") as f:
        return f.metadata(), {k: f.get_tensor(k).numpy().tobytes() for k in f.keys()}


def test_another_prompt_in_a_recorded_place_is_refused(tmp_path):
    record_states(PromptPipe("sd3"), ["a"], tmp_path, progress=False)
    with pytest.raises(RecordingError, match="recorded from another prompt than 'b'"):
        record_states(PromptPipe("sd3"), ["b"], tmp_path, progress=False)


def test_damaged_and_missing_recordings_are_named(tmp_path):
    with pytest.raises(RecordingError, match="holds no recorded states"):
        RecordedStates(tmp_path)
    record_states(PromptPipe("sd3"), ["a"], tmp_path, progress=False)
    path = tmp_path / "00000.safetensors"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(RecordingError, match="00000.safetensors is damaged.*only that prompt is recomputed"):
        RecordedStates(tmp_path)


def test_two_resolutions_in_one_folder_are_drawn_in_batches_of_one_resolution(tmp_path):
    """Each batch holds rows of one latent shape, its first row drawn among all."""
    record_states(PromptPipe("flux"), ["a"], tmp_path, progress=False)
    other = PromptPipe("flux")
    original = other.call_kwargs
    other.call_kwargs = lambda **kw: {**original(**kw), "height": 64, "width": 64}
    record_states(other, ["a", "b"], tmp_path, indices=[1], progress=False)
    states = RecordedStates(tmp_path)
    drawn = [states.draw(torch.Generator().manual_seed(seed), 4) for seed in range(12)]
    assert {len(z[0]) for z, _ in drawn} == {16, 64} and all(len(kw["img_ids"]) == z.shape[1] for z, kw in drawn)


def test_a_multipatch_model_records_the_base_inputs_of_every_call(tmp_path):
    """Recording a ``MultiPatchTransformer`` while a coarse schedule samples (the testbed's way to get
    on-policy states): every call is kept, whatever its size, by name and without ``patch_size``."""
    from ddit.adapter import MultiPatchTransformer
    from ddit.policies import get_policy
    from ddit.recorded_states import recording
    from ddit.testbed.base_model import NULL_LABEL, build_base_model, generate

    from conftest import TINY_DIT

    model = MultiPatchTransformer(build_base_model(**TINY_DIT)).eval()
    with recording(model) as log:
        generate(model, torch.tensor([0, 1]), steps=4, guidance=2.0, policy=get_policy("fixed", schedule=[8, 4, 2, 2]))
    log.save(tmp_path / "00000.safetensors", prompt="testbed")
    states = RecordedStates(tmp_path)
    batches = [call["batch"] for _, call in states.calls]
    assert batches.count(4) == 4  # one call per step: 2 samples x 2 CFG branches (the rest: FLOP counting)
    z, kwargs = states.draw(torch.Generator().manual_seed(0), 6)
    assert set(kwargs) == {"timestep", "class_labels"} and z.shape == (6, 3, 32, 32)
    assert (kwargs["class_labels"] == NULL_LABEL).any() and (kwargs["class_labels"] != NULL_LABEL).any()
    with torch.no_grad():
        assert model(z, **kwargs, patch_size=4, return_dict=False)[0].shape == z.shape


@pytest.mark.parametrize("first", [None, {}])
def test_calls_that_pass_different_arguments_are_drawn_apart(first, tmp_path):
    """As SD3's skip-layer guidance adds skip_layers to some calls: rows are batched with rows of calls that pass
    the same arguments, inside the attention kwargs too."""
    pipe, other = PromptPipe("sd3"), PromptPipe("sd3")
    for p, value in ((pipe, first), (other, {"scale": 1.0})):
        p.call_kwargs = partial(lambda original, value, **kw: {**original(**kw), "joint_attention_kwargs": value},
                                p.call_kwargs, value)
    record_states(pipe, ["a"], tmp_path, progress=False)
    record_states(other, ["a", "b"], tmp_path, indices=[1], progress=False)
    states = RecordedStates(tmp_path)
    drawn = [states.draw(torch.Generator().manual_seed(seed), 4)[1].get("joint_attention_kwargs") for seed in range(12)]
    assert {json.dumps(d, sort_keys=True) for d in drawn} == {json.dumps(first), json.dumps({"scale": 1.0})}


def test_flux2_recordings_of_transposed_sizes_are_drawn_apart_by_their_ids(tmp_path):
    """FLUX.2 passes its ids per sample: 128x64 and 64x128 give as many tokens, on other grids. The backbone reads
    one row of ids for all, so a batch's rows must hold the same: ``shared`` names them (its spec's unbatched)."""
    for i, (height, width) in enumerate(((128, 64), (64, 128))):
        pipe = PromptPipe("flux2")
        pipe.call_kwargs = partial(lambda original, size, **kw: {**original(**kw), **size}, pipe.call_kwargs,
                                   dict(height=height, width=width))
        record_states(pipe, ["a", "b"], tmp_path, indices=[i], progress=False)
    states = RecordedStates(tmp_path, shared=("img_ids", "txt_ids"))
    drawn = [states.draw(torch.Generator().manual_seed(seed), 4)[1]["img_ids"] for seed in range(12)]
    assert all((ids == ids[:1]).all() for ids in drawn)
    assert len({ids[0].numpy().tobytes() for ids in drawn}) == 2

