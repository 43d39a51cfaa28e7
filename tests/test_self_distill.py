"""Self-distillation from a complete pipeline folder: prompts in, an adapter that ``ddit.enable`` takes out."""

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from accelerate.utils import DistributedType
from diffusers import DiffusionPipeline

import ddit
from ddit.backbones import as_batch
from ddit.cli import main
from ddit.adapter import MultiPatchTransformer
from ddit.distill import DistillConfig, DistillationLoss
from ddit.pipeline_call import Prompt
from ddit.policies import get_policy
from ddit.recorded_states import RecordingError
from ddit.self_distill import lora_identity, self_distill
from ddit.tiny_pipelines import KINDS, TINY_CALL, save_tiny_pipeline

PROMPTS = ["a red circle", "blue stripes on white"]
#: Short text: the tiny T5s would otherwise pad every prompt to the pipelines' 226 to 512 tokens. Qwen-Image
#: and Z-Image never pad: their text is not cut. HunyuanVideo 1.5's call takes no max_sequence_length; Wan 2.1
#: I2V's blocks take the last 512 text tokens as the text.
SHORT_TEXT = {"flux": 16, "flux2": 16, "chroma": 16, "qwenimage": 512, "zimage": 512, "sd3": 16, "wan": 16,
              "wan22": 16, "wan22-i2v": 16, "pixart": 16, "sana": 16, "ltx": 16, "ltx2": 16, "skyreels": 16,
              "skyreels-df": 16}
CONFIG = DistillConfig(steps=2, batch_size=2, num_inference_steps=None, timestep_scale=None)
#: An image-to-video pipeline's first frame, which each of its prompts carries (a .jsonl prompts file's image:
#: tests/test_image_prompts.py).
FIRST_FRAME = {"image": torch.rand(1, 3, 128, 128, generator=torch.Generator().manual_seed(5))}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return {kind: save_tiny_pipeline(kind, tmp_path_factory.mktemp(kind)) for kind in KINDS}


def load(folder):
    pipe = DiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def call(kind, steps=3):
    text = {"max_sequence_length": SHORT_TEXT[kind]} if kind in SHORT_TEXT else {}
    return {**TINY_CALL[kind], "num_inference_steps": steps, **text}


@pytest.mark.parametrize("kind", KINDS)
def test_an_adapter_distilled_from_a_pipeline_runs_coarse_steps_in_it(kind, folders, tmp_path):
    pipe = load(folders[kind])
    before = {n: p.clone() for n, p in pipe.transformer.named_parameters()}
    first_frame = FIRST_FRAME if kind.endswith("i2v") else {}
    prompts = [Prompt(p, first_frame) for p in PROMPTS]
    export = self_distill(pipe, prompts, tmp_path, call=call(kind), config=CONFIG, progress=False)

    report = json.loads((tmp_path / "distill.json").read_text())
    assert report["data"]["prompts"] == 2 and report["steps"] == 2
    assert torch.isfinite(torch.tensor(report["losses"])).all()
    assert report["config"]["num_inference_steps"] is None  # recorded states carry their own timesteps

    kept = {n.replace(".base_layer", ""): p for n, p in pipe.transformer.named_parameters() if ".lora_" not in n}
    assert kept.keys() == before.keys() and all(torch.equal(p, before[n]) for n, p in kept.items())  # frozen
    fresh = load(folders[kind])
    ddit.enable(fresh, export, policy="fixed", fraction=0.5)
    out = fresh(prompt=PROMPTS[0], generator=torch.Generator().manual_seed(0), output_type="latent",
                **call(kind, steps=4), **first_frame)
    assert ddit.summary(fresh).coarse_fraction == 0.5
    assert torch.isfinite(out.frames if hasattr(out, "frames") else out.images).all()


def test_a_pipeline_under_model_cpu_offload_distils_the_same_adapter_and_stays_offloaded(folders, tmp_path,
                                                                                          monkeypatch):
    """Recorded under the pipeline's offload hooks (the on-policy round too), trained with them off (the
    transformer alone on the device), put back after. Onto the CPU here, where the hooks copy the weights
    between ``cpu`` and ``cpu:0``: the adapters are those without offload, to float tolerance."""
    import ddit.self_distill
    from safetensors.torch import load_file

    on_policy = dict(call=call("flux"), config=CONFIG, progress=False, on_policy=get_policy("fixed", fraction=0.5))
    plain = self_distill(load(folders["flux"]), PROMPTS, tmp_path / "plain", **on_policy)
    pipe = load(folders["flux"])
    pipe.enable_model_cpu_offload(device="cpu")
    pipe._offload_gpu_id = 1  # as an offload onto cuda:1 leaves it, which diffusers keeps when given index 0
    hooks_while_training = []
    monkeypatch.setattr(ddit.self_distill, "distill", lambda *a, real=ddit.self_distill.distill, **k:
                        hooks_while_training.append(len(pipe._all_hooks)) or real(*a, **k))
    offloaded = self_distill(pipe, PROMPTS, tmp_path / "offloaded", **on_policy)
    assert hooks_while_training == [0, 0]  # both rounds
    weights = sorted(p.relative_to(plain) for p in plain.rglob("*.safetensors"))
    assert weights and weights == sorted(p.relative_to(offloaded) for p in offloaded.rglob("*.safetensors"))
    for name in weights:
        a, b = load_file(plain / name), load_file(offloaded / name)
        assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-3, rtol=0) for k in a)
    assert pipe._all_hooks and "_hf_hook" in vars(pipe.transformer)  # still under model CPU offload
    assert pipe._offload_device == torch.device("cpu", 0)  # onto this process's device, not index 1


def test_a_default_size_no_coarse_patch_divides_is_refused_before_recording(folders, tmp_path):
    """HunyuanVideo 1.5 picks its size itself when given none (480x848 here, a 30x53 latent)."""
    pipe = load(folders["hunyuanvideo15"])
    with pytest.raises(ValueError, match="do not divide the 30x53 latent of a 480x848 image"):
        self_distill(pipe, PROMPTS, tmp_path, call={"num_frames": 5, "num_inference_steps": 2}, config=CONFIG,
                     progress=False)
    assert not list(tmp_path.rglob("*.safetensors"))


def test_the_cli_records_once_and_resumes_training(folders, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(["a red circle", "", "blue stripes on white"]) + "\n")
    args = ["distill", "--pipeline", str(folders["flux"]), "--prompts", str(prompts), "--out", str(tmp_path / "run"),
            "--num-inference-steps", "3", "--height", "128", "--width", "128", "--batch-size", "2",
            "--pipeline-arg", "max_sequence_length=16"]
    assert main([*args, "--steps", "2"]) == 0
    recorded = sorted((tmp_path / "run" / "states").glob("*.safetensors"))
    assert [p.name for p in recorded] == ["00000.safetensors", "00001.safetensors"]
    stamps = [p.stat().st_mtime_ns for p in recorded]

    assert main([*args, "--steps", "3", "--resume", "--cpu-offload"]) == 0  # offloading changes no option
    assert [p.stat().st_mtime_ns for p in recorded] == stamps  # nothing recorded twice
    report = json.loads((tmp_path / "run" / "distill.json").read_text())
    assert report["steps"] == 3 and len(report["losses"]) == 3
    assert "adapter written to" in capsys.readouterr().out


@pytest.mark.parametrize("extra, message", [
    (["--height", "120", "--width", "128"], "do not divide the 15x16 latent of a 120x128 image; choose --height "
                                            "and --width that are multiples of 64"),
    (["--num-frames", "5"], "FluxPipeline takes no num_frames; drop the option"),
    (["--pipeline-arg", "max_sequence_length"], "is not name=value"),
    (["--sizes", "3"], "--sizes 3: patch sizes are multiples of the base patch size 2"),
    (["--sizes", "0,4"], "--sizes 0,4: patch sizes are multiples"),
    (["--rank", "0"], "--rank must be at least 1"),
    (["--pipeline-arg", "ip_adapter_image='face.png'"], "ip_adapter_image: distillation records the "
                                                        "transformer's inputs, and an IP-Adapter's image prompt"),
    (["--pipeline-arg", "negative_ip_adapter_image='face.png'"], "negative_ip_adapter_image: distillation records"),
])
def test_bad_options_fail_before_anything_is_recorded(extra, message, folders, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n")
    out = tmp_path / "run"
    assert main(["distill", "--pipeline", str(folders["flux"]), "--prompts", str(prompts), "--out", str(out),
                 *extra]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_resolution_binning_is_refused_before_anything_is_recorded(folders, tmp_path, capsys):
    """PixArt and Sana move the size to a bin after every check (most of Sana's 1024 bins fail its sizes)."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n")
    out = tmp_path / "run"
    assert main(["distill", "--pipeline", str(folders["pixart"]), "--prompts", str(prompts), "--out", str(out),
                 "--height", "128", "--width", "128"]) == 2
    assert "moves the requested size to its nearest resolution bin" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("content, message", [("\n  \n", "holds no prompt"), (b"\xff\xfe\x00", "cannot read")])
def test_empty_or_unreadable_prompts_are_refused(content, message, folders, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes(content.encode() if isinstance(content, str) else content)
    assert main(["distill", "--pipeline", str(folders["flux"]), "--prompts", str(prompts),
                 "--out", str(tmp_path / "run")]) == 2
    assert message in capsys.readouterr().err


def test_a_folder_recorded_with_other_options_is_refused(folders, tmp_path):
    pipe = load(folders["sd3"])
    self_distill(pipe, PROMPTS[:1], tmp_path, call=call("sd3", steps=2), config=CONFIG, progress=False)
    with pytest.raises(RecordingError, match="was recorded with .* use the same options, or another --out"):
        self_distill(load(folders["sd3"]), PROMPTS[:1], tmp_path, call=call("sd3", steps=3), config=CONFIG,
                     progress=False)


def test_a_transformer_without_a_spec_is_named_with_the_supported_ones(tmp_path):
    class Pipe:
        transformer = torch.nn.Linear(2, 2)

        def __call__(self, prompt, generator=None, output_type=None):
            pass

    with pytest.raises(ValueError, match="no backbone spec for Linear; supported: .*FluxTransformer2DModel.*plugin"):
        self_distill(Pipe(), PROMPTS, tmp_path, progress=False)


#: Each kind's size arguments for the CLI; Wan 2.2 with 4 steps, 2 on each expert.
CLI_SIZE = {"sd3": ["--num-inference-steps", "2"], "flux": ["--num-inference-steps", "2"],
            "wan22": ["--num-inference-steps", "4", "--num-frames", "5"]}


@pytest.mark.parametrize("kind", ["sd3", "wan22"])
def test_two_processes_share_the_prompts_and_train_one_adapter(kind, folders, tmp_path):
    """``accelerate launch`` with two CPU processes (gloo): each records its half of the prompts; Wan 2.2 trains
    an adapter per expert."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\nblue stripes\na green moon\n")
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0"]
    done = subprocess.run([*launch, "-m", "ddit.cli", "distill", "--pipeline", str(folders[kind]),
                           "--prompts", str(prompts), "--out", str(tmp_path / "run"), "--steps", "2",
                           "--batch-size", "2", *CLI_SIZE[kind], "--height", "128", "--width", "128",
                           "--pipeline-arg", "max_sequence_length=16"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    experts = ["", "transformer_2"] if kind == "wan22" else [""]
    for sub in experts:
        states = tmp_path / "run" / "states" / sub
        assert sorted(p.name for p in states.glob("*.safetensors")) == [f"{i:05d}.safetensors" for i in range(3)]
        report = json.loads((tmp_path / "run" / sub / "distill.json").read_text())
        assert report["data"]["prompts"] == 3 and report["steps"] == 2
    pipe = load(folders[kind])
    ddit.enable(pipe, tmp_path / "run" / "adapter", policy="fixed", fraction=1.0)
    out = pipe(prompt=PROMPTS[0], generator=torch.Generator().manual_seed(0), output_type="latent",
               **call(kind, 4 if kind == "wan22" else 2))
    assert torch.isfinite(out.frames if kind == "wan22" else out.images).all()
    assert ddit.summary(pipe).coarse_fraction == 1.0  # Wan 2.2: the second expert's steps too


FSDP_CLI = """
import json, sys
from accelerate import Accelerator, FullyShardedDataParallelPlugin, PartialState
from accelerate.utils import DistributedType
import ddit.processes
from ddit.cli import main

plugin = FullyShardedDataParallelPlugin()  # from the environment accelerate launch set from the config file
accelerator = Accelerator(fsdp_plugin=plugin)
# accelerate turns FSDP on only for accelerators: these CPU processes take the same path
accelerator.state.distributed_type, accelerator.state.fsdp_plugin = DistributedType.FSDP, plugin
PartialState._shared_state["distributed_type"] = DistributedType.FSDP
units, prepare = [], accelerator.prepare  # the FSDP unit types of each prepared model


def spy(*objects):
    prepared = prepare(*objects)
    units.append(sorted({type(m).__name__ for m in prepared[0].modules() if type(m).__name__.startswith("FSDP")}))
    return prepared


accelerator.prepare = spy
ddit.processes.processes = lambda: accelerator  # what `ddit distill` asks for
main(sys.argv[2:])
if accelerator.is_main_process:
    (open(sys.argv[1], "w")).write(json.dumps(units))
"""


@pytest.mark.parametrize(("kind", "blocks"), [("flux", ["FSDPFluxSingleTransformerBlock", "FSDPFluxTransformerBlock"]),
                                             ("wan22", ["FSDPWanTransformerBlock"])])
def test_the_documented_fsdp_config_shards_every_block_and_writes_a_whole_adapter(kind, blocks, folders, tmp_path):
    """``accelerate launch --config_file docs/fsdp.yaml`` on two CPU processes, bfloat16: each of the tiny
    transformer's blocks is its own FSDP unit (from its ``_no_split_modules``), and the adapter saved is whole
    (Wan 2.2: both experts', trained one after the other)."""
    config = Path(__file__).parents[1] / "docs" / "fsdp.yaml"
    script, prompts, units = tmp_path / "fsdp.py", tmp_path / "prompts.txt", tmp_path / "units.json"
    script.write_text(FSDP_CLI)
    prompts.write_text("a red circle\nblue stripes\na green moon\n")
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
              "--num_processes", "2", "--main_process_port", "0"]
    side = "64" if kind == "flux" else "128"
    done = subprocess.run([*launch, str(script), str(units), "distill", "--pipeline", str(folders[kind]),
                           "--prompts", str(prompts), "--out", str(tmp_path / "run"), "--steps", "2",
                           "--batch-size", "2", *CLI_SIZE[kind], "--dtype", "bfloat16", "--height", side,
                           "--width", side, "--pipeline-arg", "max_sequence_length=16"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    experts = 2 if kind == "wan22" else 1  # one training run, and one prepared model, per expert
    assert json.loads(units.read_text()) == [["FSDPDistillationLoss", *blocks]] * experts
    pipe = load(folders[kind])
    ddit.enable(pipe, tmp_path / "run" / "adapter", policy="fixed", fraction=1.0)  # both experts' steps coarse
    out = pipe(prompt=PROMPTS[0], generator=torch.Generator().manual_seed(0), output_type="latent",
               **call(kind, 4 if kind == "wan22" else 2))
    assert torch.isfinite(out.frames if kind == "wan22" else out.images).all()
    assert ddit.summary(pipe).coarse_fraction == 1.0


def test_an_on_policy_round_under_fsdp_is_refused_before_recording(folders, tmp_path):
    fsdp = SimpleNamespace(distributed_type=DistributedType.FSDP)
    with pytest.raises(ValueError, match="--on-policy .* FSDP"):
        self_distill(load(folders["sd3"]), PROMPTS, tmp_path, call=call("sd3"), config=CONFIG, accelerator=fsdp,
                     on_policy=get_policy("fixed", fraction=0.5))
    assert not any(tmp_path.iterdir())


def test_a_bfloat16_pipeline_trains_its_adapter_in_float32_and_keeps_its_dtype(folders, tmp_path, monkeypatch):
    seen, timesteps = [], []
    original, forward = torch.optim.AdamW.step, DistillationLoss.forward

    def step(self, *args, **kwargs):
        seen.extend(p.dtype for group in self.param_groups for p in group["params"])
        return original(self, *args, **kwargs)

    def loss(self, z_t, kwargs):
        timesteps.append(kwargs["timestep"])
        return forward(self, z_t, kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    monkeypatch.setattr(DistillationLoss, "forward", loss)
    pipe = DiffusionPipeline.from_pretrained(folders["sd3"], dtype=torch.bfloat16)
    pipe.set_progress_bar_config(disable=True)
    export = self_distill(pipe, PROMPTS[:1], tmp_path, call=call("sd3", steps=2), config=CONFIG, progress=False)
    assert seen and set(seen) == {torch.float32}  # the optimizer updated float32 weights
    assert {t.dtype for t in timesteps} == {torch.float32}  # as SD3 passes them: not rounded to bf16
    assert {p.dtype for p in pipe.transformer.parameters()} == {torch.bfloat16}
    losses = torch.tensor(json.loads((tmp_path / "distill.json").read_text())["losses"])
    assert torch.isfinite(losses).all()

    fresh = DiffusionPipeline.from_pretrained(folders["sd3"], dtype=torch.bfloat16)
    fresh.set_progress_bar_config(disable=True)
    ddit.enable(fresh, export, policy="fixed", fraction=0.5)
    out = fresh(prompt=PROMPTS[0], generator=torch.Generator().manual_seed(0), output_type="latent",
                **call("sd3", steps=4))
    assert out.images.dtype == torch.bfloat16 and torch.isfinite(out.images.float()).all()


# Qwen-Image: text of each prompt's length, masked; Z-Image: lists of per-sample latents and prompts; Wan 2.1
# image-to-video: each prompt with its own first frame, in both rounds
@pytest.mark.parametrize("kind", ["flux", "qwenimage", "zimage", "wan-i2v"])
def test_an_on_policy_round_records_the_latents_coarse_steps_lead_to(kind, folders, tmp_path):
    from ddit.policies import get_policy
    from ddit.recorded_states import RecordedStates

    pipe = load(folders[kind])
    first_frame = FIRST_FRAME if kind.endswith("i2v") else {}
    prompts = [Prompt(p, first_frame) for p in PROMPTS]
    export = self_distill(pipe, prompts, tmp_path, call=call(kind, steps=4), config=CONFIG, progress=False,
                          on_policy=get_policy("fixed", fraction=0.5))
    assert export == tmp_path / "on-policy" / "adapter"
    stock, visited = RecordedStates(tmp_path / "states"), RecordedStates(tmp_path / "on-policy" / "states")
    assert len(visited) == len(stock)  # the same prompts and steps, once more
    z_stock, _ = stock.draw(torch.Generator().manual_seed(0), len(stock))
    z_visited, _ = visited.draw(torch.Generator().manual_seed(0), len(visited))
    assert not torch.equal(as_batch(z_stock), as_batch(z_visited))  # coarse steps took the latents elsewhere
    report = json.loads((tmp_path / "on-policy" / "distill.json").read_text())
    assert report["data"]["prompts"] == 4 and report["steps"] == CONFIG.steps  # both recordings, 2 prompts each
    fresh = load(folders[kind])
    ddit.enable(fresh, export, policy="fixed", fraction=0.5)
    fresh(prompt=PROMPTS[0], generator=torch.Generator().manual_seed(0), output_type="latent", **call(kind, steps=4),
          **first_frame)


def test_a_resume_goes_on_with_rounds_that_had_not_started(folders, tmp_path):
    """Killed while recording (no checkpoint yet), then while the on-policy round recorded: each --resume goes on.
    The first round's adapter is the same in every run (its LoRA starts from the training seed), so the on-policy
    recording, stamped with it, is the run's own."""
    from ddit.recorded_states import record_states

    record_states(load(folders["sd3"]), PROMPTS[:1], tmp_path / "states", call("sd3", steps=2))  # killed after one
    on_policy = dict(call=call("sd3", steps=2), config=CONFIG, progress=False, resume=True)
    self_distill(load(folders["sd3"]), PROMPTS, tmp_path, **on_policy)
    assert json.loads((tmp_path / "distill.json").read_text())["steps"] == CONFIG.steps
    export = self_distill(load(folders["sd3"]), PROMPTS, tmp_path, on_policy=get_policy("fixed", fraction=0.5),
                          **on_policy)
    assert json.loads((tmp_path / "on-policy" / "distill.json").read_text())["data"]["prompts"] == 4
    again = self_distill(load(folders["sd3"]), PROMPTS, tmp_path / "again", call=call("sd3", steps=2),
                         config=CONFIG, progress=False)
    first = MultiPatchTransformer.from_pretrained(load(folders["sd3"]).transformer, tmp_path / "adapter")
    second = MultiPatchTransformer.from_pretrained(load(folders["sd3"]).transformer, again)
    assert all(torch.equal(v, second.adapter_state_dict()[k]) for k, v in first.adapter_state_dict().items())
    assert export == tmp_path / "on-policy" / "adapter"


def test_recordings_of_a_longer_prompts_file_in_the_folder_are_not_trained_on(folders, tmp_path):
    self_distill(load(folders["sd3"]), PROMPTS, tmp_path, call=call("sd3", steps=2), config=CONFIG, progress=False)
    self_distill(load(folders["sd3"]), PROMPTS[:1], tmp_path, call=call("sd3", steps=2), config=CONFIG,
                 progress=False)
    assert json.loads((tmp_path / "distill.json").read_text())["data"]["prompts"] == 1


def test_wan22_distils_an_adapter_for_each_expert_on_its_own_steps_and_on_policy(folders, tmp_path):
    """Its transformer takes the steps at t >= 750 (2 of 4 here), transformer_2 the others."""
    from ddit.recorded_states import RecordedStates

    pipe = load(folders["wan22"])
    export = self_distill(pipe, PROMPTS, tmp_path, call=call("wan22", steps=4), config=CONFIG, progress=False,
                          on_policy=get_policy("fixed", fraction=0.5))
    for recording in (tmp_path / "states", tmp_path / "on-policy" / "states"):
        high, low = RecordedStates(recording), RecordedStates(recording / "transformer_2")
        assert len(high) == len(low) == 2 * 2 * 2  # 2 prompts x 2 steps x 2 CFG calls each
        _, kw_high = high.draw(torch.Generator().manual_seed(0), len(high))
        _, kw_low = low.draw(torch.Generator().manual_seed(0), len(low))
        assert kw_high["timestep"].min() >= 750 > kw_low["timestep"].max()
    for run in (tmp_path, tmp_path / "on-policy"):  # one training run per expert
        assert json.loads((run / "transformer_2" / "distill.json").read_text())["steps"] == CONFIG.steps
    assert (export / "transformer_2" / "multipatch_config.json").exists()

    fresh = load(folders["wan22"])
    ddit.enable(fresh, export, policy="fixed", fraction=0.5)
    out = fresh(prompt=PROMPTS[0], generator=torch.Generator().manual_seed(0), output_type="latent",
                **call("wan22", steps=4))
    assert torch.isfinite(out.frames).all()
    records = ddit.summary(fresh).records
    assert sorted({r["step"] for r in records}) == [0, 1, 2, 3]  # both experts' steps run under the policy
    assert type(fresh.transformer_2).__name__ == "DynamicPatchTransformer"


def test_a_recording_where_every_step_falls_on_one_expert_is_refused(folders, tmp_path):
    pipe = load(folders["wan22"])
    with pytest.raises(RecordingError, match="pipe.transformer_2 ran no step .* record with more steps"):
        self_distill(pipe, PROMPTS, tmp_path, call=call("wan22", steps=1), config=CONFIG, progress=False)


def test_an_image_to_video_pipeline_without_images_and_unrecordable_call_values_are_refused(folders, tmp_path):
    """WanImageToVideoPipeline needs image= in every call (a .jsonl prompts file gives each prompt its own); a
    run's call is recorded as JSON."""
    with pytest.raises(ValueError, match="WanImageToVideoPipeline needs image in every call \\('a red circle' has "
                                         "none\\): give each prompt its own in a .jsonl prompts file"):
        self_distill(load(folders["wan22-i2v"]), PROMPTS, tmp_path, call=call("wan22-i2v"), config=CONFIG,
                     progress=False)
    with pytest.raises(ValueError, match="the call's attention_kwargs \\(dict\\) cannot be written as JSON"):
        self_distill(load(folders["wan"]), PROMPTS, tmp_path, config=CONFIG, progress=False,
                     call={**call("wan"), "attention_kwargs": {"t": torch.ones(1)}})
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("kind", ["wan-i2v", "skyreels-i2v"])
def test_wan21_image_to_video_keeps_its_512_text_tokens(kind, folders, tmp_path):
    """diffusers' Wan attention (and SkyReels-V2's) takes all but the last 512 context tokens as the image's:
    shorter text would silently send image tokens through the text projections."""
    prompts = [Prompt(p, FIRST_FRAME) for p in PROMPTS]
    with pytest.raises(ValueError, match="keep max_sequence_length at 512"):
        self_distill(load(folders[kind]), prompts, tmp_path, config=CONFIG, progress=False,
                     call={**TINY_CALL[kind], "max_sequence_length": 16})
    own = [prompts[0], Prompt(PROMPTS[1], {**FIRST_FRAME, "max_sequence_length": 16})]  # a .jsonl prompt's own
    with pytest.raises(ValueError, match="keep max_sequence_length at 512"):
        self_distill(load(folders[kind]), own, tmp_path, config=CONFIG, progress=False, call=TINY_CALL[kind])
    assert not any(tmp_path.iterdir())


def test_a_lora_on_the_text_encoder_is_part_of_the_recording(folders, tmp_path):
    """A LoRA's text-encoder part changes the conditioning the transformer is recorded with: a recording made with
    it does not resume without it."""
    from peft import LoraConfig, inject_adapter_in_model
    from peft.tuners.lora import LoraLayer

    pipe = load(folders["flux"])
    # peft's layers, as a LoRA's text-encoder part loads them (transformers' own loader wants peft 0.22)
    inject_adapter_in_model(LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False),
                            pipe.text_encoder, adapter_name="style")
    self_distill(pipe, PROMPTS[:1], tmp_path, call=call("flux", steps=2), config=CONFIG, progress=False)
    recording = json.loads((tmp_path / "states" / "recording.json").read_text())
    assert list(recording["loras"]) == ["text_encoder"] and list(recording["loras"]["text_encoder"]) == ["style"]
    for layer in pipe.text_encoder.modules():
        if isinstance(layer, LoraLayer):
            layer.enable_adapters(False)
    with pytest.raises(RecordingError, match="was recorded with"):
        self_distill(pipe, PROMPTS[:1], tmp_path, call=call("flux", steps=2), config=CONFIG, progress=False,
                     resume=True)


def test_a_style_lora_is_distilled_beside_and_is_part_of_the_recording(folders, tmp_path, capsys):
    """``--lora``: the pipeline runs with the LoRA loaded unfused, and the adapter is trained beside it (its own
    weights only); a recording made without it, or with another weight, does not resume."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import load_file

    source = load(folders["flux"])
    torch.manual_seed(0)
    source.transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "add_q_proj"],
                                              init_lora_weights=False), adapter_name="style")
    lora = tmp_path / "style"
    type(source).save_lora_weights(lora, transformer_lora_layers=get_peft_model_state_dict(source.transformer,
                                                                                         adapter_name="style"))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n")
    args = ["distill", "--pipeline", str(folders["flux"]), "--prompts", str(prompts), "--out", str(tmp_path / "run"),
            "--num-inference-steps", "2", "--height", "128", "--width", "128", "--batch-size", "2", "--steps", "2",
            "--pipeline-arg", "max_sequence_length=16"]
    assert main([*args, "--lora", f"{lora}:0.5"]) == 0
    recording = json.loads((tmp_path / "run" / "states" / "recording.json").read_text())
    assert list(recording["loras"]["transformer"]) == ["lora0"]
    assert recording["loras"]["transformer"]["lora0"].endswith(" scale 0.5")
    saved = load_file(tmp_path / "run" / "adapter" / "multipatch.safetensors")
    assert saved and not any("lora0" in name for name in saved)
    assert main([*args[:6], str(tmp_path / "plain"), *args[7:]]) == 0  # the same run without the LoRA
    losses = [json.loads((tmp_path / run / "distill.json").read_text())["losses"] for run in ("run", "plain")]
    assert losses[0] != losses[1]  # the LoRA changes what is recorded and trained on
    capsys.readouterr()
    for other in ([], ["--lora", f"{lora}:1"]):
        assert main([*args, "--resume", *other]) == 2
        assert "was recorded with" in capsys.readouterr().err
    styled = load(folders["flux"])
    styled.load_lora_weights(lora, adapter_name="style")
    ddit.enable(styled, tmp_path / "run" / "adapter")  # the adapter runs beside the LoRA it was distilled with
    assert main(["distill", "--lora", str(lora), "--out", str(tmp_path / "x")]) == 2
    assert "--lora and --transformer need --pipeline" in capsys.readouterr().err

    source = load(folders["flux"])  # a LoRA on the patch embedding: refused before anything is recorded
    source.transformer.add_adapter(LoraConfig(r=2, target_modules=["x_embedder", "to_q"]), adapter_name="embed")
    type(source).save_lora_weights(tmp_path / "embed", transformer_lora_layers=get_peft_model_state_dict(
        source.transformer, adapter_name="embed"))
    out = tmp_path / "embedded"
    assert main([*args[:6], str(out), *args[7:], "--lora", str(tmp_path / "embed")]) == 2
    assert "x_embedder carries an adapter" in capsys.readouterr().err and not (out / "states").exists()
    assert main(["distill", "--pipeline", str(folders["wan22"]), "--prompts", str(prompts), "--out", str(out),
                 "--lora", str(lora)]) == 2
    assert "has two experts" in capsys.readouterr().err

    styled.transformer.adapter.detach()  # an earlier ddit adapter left in it: not part of the LoRAs' identity
    adapter = ddit.MultiPatchTransformer(styled.transformer.adapter.backbone)
    assert list(lora_identity(adapter.backbone)) == ["style"]
