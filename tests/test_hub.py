"""Adapters on the Hugging Face Hub: ``ddit.enable(pipe, "owner/name")``, ``from_pretrained`` and
``push_to_hub``. No Hub is reachable here: downloads are served from huggingface_hub's own cache, laid out as it
lays out a download (offline mode), and uploads are caught at ``HfApi``."""

import fnmatch
import shutil

import huggingface_hub
import pytest
import torch
from huggingface_hub import constants
from safetensors.torch import load_file
from tiny_pipelines import build, latents

import ddit
from ddit.adapter import WEIGHTS_NAME
from ddit.checkpoint import CheckpointError
from ddit.pipelines import ADAPTER_FOLDER
from ddit.policies import FixedPolicy

REVISION = "0123456789abcdef0123456789abcdef01234567"
COARSE_FIRST = [4, 4, 2, 2, 2, 2]


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """An offline Hub cache; ``hub(repo_id, folder)`` puts ``folder``'s files there as repo_id's main revision."""
    cache = tmp_path / "hub-cache"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)

    def publish(repo_id, folder):
        repo = cache / f"models--{repo_id.replace('/', '--')}"
        shutil.copytree(folder, repo / "snapshots" / REVISION)
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text(REVISION)

    return publish


def test_an_adapter_on_the_hub_enables_a_pipeline_as_its_folder_does(hub, tmp_path, monkeypatch):
    pipe, kwargs = build("flux")
    ddit.MultiPatchTransformer(pipe.transformer).save_pretrained(tmp_path / "adapter")
    pipe, kwargs = build("flux")  # LoRA-free again
    ddit.enable(pipe, tmp_path / "adapter", policy=FixedPolicy(COARSE_FIRST))
    expected = latents(pipe(**kwargs(batch=1, steps=6)))
    ddit.disable(pipe)

    hub("someone/tiny-flux-ddit", tmp_path / "adapter")
    ddit.enable(pipe, "someone/tiny-flux-ddit", policy=FixedPolicy(COARSE_FIRST))
    assert torch.equal(latents(pipe(**kwargs(batch=1, steps=6))), expected)
    assert ddit.summary(pipe).coarse_fraction == pytest.approx(2 / 6)
    ddit.disable(pipe)

    # a repository holding a whole pipeline saved while enabled: its adapter folder, and nothing else, is fetched
    pipeline_repo = tmp_path / "pipeline-repo"
    shutil.copytree(tmp_path / "adapter", pipeline_repo / ADAPTER_FOLDER)
    (pipeline_repo / "transformer").mkdir()
    (pipeline_repo / "transformer" / "diffusion_pytorch_model.safetensors").write_bytes(b"large weights")
    hub("someone/tiny-flux-pipeline", pipeline_repo)
    asked = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo_id, real=huggingface_hub.snapshot_download,
                        **k: asked.append(k["allow_patterns"]) or real(repo_id, **k))
    adapters = ddit.load_adapters(pipe, "someone/tiny-flux-pipeline")
    assert set(adapters) == {"transformer"}
    adapters["transformer"].detach()
    files = [str(p.relative_to(pipeline_repo)) for p in pipeline_repo.rglob("*") if p.is_file()]
    fetched = {f for f in files if any(fnmatch.fnmatch(f, pattern) for pattern in asked[0])}
    assert fetched == {f for f in files if f.startswith(ADAPTER_FOLDER)} and len(fetched) == 3


def test_a_repository_that_cannot_be_had_is_refused_naming_it(hub, tmp_path):
    pipe, _ = build("flux")
    original = pipe.transformer
    with pytest.raises(CheckpointError, match="no folder someone/missing here, and the Hub repository "
                                              "someone/missing cannot be had"):
        ddit.enable(pipe, "someone/missing")
    assert pipe.transformer is original
    with pytest.raises(CheckpointError, match="cannot be had"):
        ddit.MultiPatchTransformer.from_pretrained(original, "someone/missing", revision="v1")
    # a missing folder given as a Path, or as ./x/y, is a missing folder: never a repository
    for missing in (tmp_path.relative_to(tmp_path.parent) / "adapter", "./someone/missing"):
        with pytest.raises(CheckpointError, match="no multi-patch adapter at"):
            ddit.MultiPatchTransformer.from_pretrained(original, missing)


def test_push_to_hub_uploads_what_from_pretrained_reads_back(hub, tmp_path, monkeypatch):
    pipe, _ = build("flux")
    adapter = ddit.MultiPatchTransformer(pipe.transformer)
    for p in adapter.trainable_parameters():
        torch.nn.init.normal_(p, std=0.01)
    calls = []

    def upload_folder(self, *, repo_id, folder_path, commit_message, delete_patterns):
        calls.append(("upload", repo_id, delete_patterns))
        shutil.copytree(folder_path, tmp_path / "uploaded")
        return huggingface_hub.CommitInfo(commit_url=f"https://huggingface.co/{repo_id}/commit/{REVISION}",
                                          commit_message=commit_message, commit_description="", oid=REVISION)

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo",
                        lambda self, repo_id, private=None, exist_ok=False: calls.append(("create", repo_id, private)))
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    monkeypatch.setattr(huggingface_hub.HfApi, "file_exists", lambda self, repo_id, name: False)
    url = adapter.push_to_hub("someone/tiny-flux-ddit", private=True, base_model="black-forest-labs/FLUX.1-dev")
    assert url.endswith(REVISION) and [c[0] for c in calls] == ["create", "upload"] and calls[0][2] is True
    assert calls[1][2] == ["transformer_2/*"]  # an earlier second expert's adapter would load beside this one
    saved = load_file(tmp_path / "uploaded" / WEIGHTS_NAME)
    card = huggingface_hub.ModelCard.load(tmp_path / "uploaded" / "README.md")
    assert card.data.base_model == "black-forest-labs/FLUX.1-dev" and "FluxTransformer2DModel" in card.data.tags
    assert 'ddit.enable(pipe, "someone/tiny-flux-ddit"' in card.text and "patch sizes 4 and 8" in card.text

    with pytest.raises(ValueError, match="is not a Hub repository id"):  # before anything is uploaded
        adapter.push_to_hub("someone/tiny-flux-ddit", base_model="./runs/flux/pipeline")
    assert len(calls) == 2
    monkeypatch.setattr(huggingface_hub.HfApi, "file_exists", lambda self, repo_id, name: name == "README.md")
    shutil.rmtree(tmp_path / "uploaded")
    adapter.push_to_hub("someone/tiny-flux-ddit")  # a card already there (perhaps edited) stays
    assert not (tmp_path / "uploaded" / "README.md").exists() and (tmp_path / "uploaded" / WEIGHTS_NAME).is_file()
    adapter.detach()

    hub("someone/tiny-flux-ddit", tmp_path / "uploaded")
    pipe, _ = build("flux")
    loaded = ddit.MultiPatchTransformer.from_pretrained(pipe.transformer, "someone/tiny-flux-ddit")
    state = loaded.adapter_state_dict()
    assert state.keys() == saved.keys() and all(torch.equal(state[k], saved[k]) for k in saved)


def test_a_pipeline_on_the_hub_loads_by_its_id_for_the_commands(hub, tmp_path, capsys):
    """``ddit distill --pipeline owner/name`` (and ``ddit-ablate``, ``ddit calibrate``) take a Hub id, as
    ``from_pretrained`` does: diffusers' own download picks the pipeline's files; a modular pipeline's index is
    fetched alone, and its components from where it points."""
    import json

    from diffusers import FluxPipeline
    from diffusers.modular_pipelines import ModularPipeline

    from ddit.cli import main
    from ddit.tiny_pipelines import save_tiny_pipeline
    from ddit.weights import load_pipeline, transformer_source

    hub("someone/tiny-flux", save_tiny_pipeline("flux", tmp_path / "flux"))
    pipe = load_pipeline("someone/tiny-flux")
    assert isinstance(pipe, FluxPipeline) and REVISION in str(pipe.config._name_or_path)

    modular = ModularPipeline.from_pretrained(str(tmp_path / "flux"))
    modular.load_components(dtype=torch.bfloat16)
    modular.save_pretrained(str(tmp_path / "modular"), overwrite_modular_index=True)
    index = json.loads((tmp_path / "modular" / "modular_model_index.json").read_text())
    (tmp_path / "index-only").mkdir()  # the index alone, pointing at the saved components
    (tmp_path / "index-only" / "modular_model_index.json").write_text(json.dumps(index))
    hub("someone/tiny-flux-modular", tmp_path / "index-only")
    loaded = load_pipeline("someone/tiny-flux-modular")
    assert type(loaded).__name__ == "FluxModularPipeline"
    assert loaded.transformer.dtype == torch.bfloat16  # as saved, read where the index points
    assert transformer_source(loaded, tmp_path / "index-only") == tmp_path / "modular" / "transformer"

    index["transformer"][2]["pretrained_model_name_or_path"] = "someone/tiny-flux"  # on the Hub: dtype unknown
    (tmp_path / "index-only" / "modular_model_index.json").write_text(json.dumps(index))
    hub("someone/elsewhere", tmp_path / "index-only")
    with pytest.raises(CheckpointError, match="lies elsewhere .*someone/tiny-flux.*pass --dtype"):
        load_pipeline("someone/elsewhere")
    assert load_pipeline("someone/elsewhere", dtype=torch.float32).transformer.dtype == torch.float32

    index["transformer"][2]["pretrained_model_name_or_path"] = str(tmp_path / "gone")
    (tmp_path / "index-only" / "modular_model_index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=f"could not load transformer \\({tmp_path / 'gone'}, transformer\\)"):
        load_pipeline(tmp_path / "index-only", dtype=torch.float32)  # load_components only logs it

    hub("someone/no-pipeline", tmp_path / "flux" / "transformer")
    with pytest.raises(CheckpointError, match="someone/no-pipeline holds no diffusers pipeline"):
        load_pipeline("someone/no-pipeline")
    (tmp_path / "prompts.txt").write_text("a red circle\n")
    assert main(["distill", "--pipeline", "someone/missing", "--prompts", str(tmp_path / "prompts.txt"), "--out",
                 str(tmp_path / "run")]) == 2
    assert "the Hub repository someone/missing cannot be had" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
