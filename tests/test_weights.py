import pytest
import torch
from conftest import TINY_DIT

from ddit.checkpoint import CheckpointError
from ddit.testbed.base_model import build_base_model, load_base_model
from ddit.testbed.evaluator import load_evaluator


@pytest.fixture
def saved_model(tmp_path):
    build_base_model(**TINY_DIT).save_pretrained(tmp_path)
    return tmp_path


def test_saved_model_loads_with_label_dropout_off(saved_model):
    model = load_base_model(saved_model)
    assert all(b.norm1.emb.class_embedder.dropout_prob == 0 for b in model.transformer_blocks)
    assert not model.training


def test_truncated_weights_name_the_file(saved_model):
    weights = saved_model / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="diffusion_pytorch_model.safetensors.*truncated or corrupt"):
        load_base_model(saved_model)


def test_garbage_evaluator_weights_name_the_file(tmp_path):
    (tmp_path / "evaluator.safetensors").write_bytes(b"not a safetensors file at all")
    with pytest.raises(CheckpointError, match="evaluator.safetensors"):
        load_evaluator(tmp_path)


def test_missing_weights_say_so(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_evaluator(tmp_path)


def test_a_config_that_is_not_json_is_named(tmp_path):
    from ddit.weights import load_pretrained_transformer

    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"config.json is not valid JSON.*save_pretrained"):
        load_pretrained_transformer(tmp_path)


def test_a_pipeline_loads_in_its_transformers_saved_dtype_unless_told(tmp_path):
    """diffusers' own default is float32: a bf16 FLUX would take twice its memory."""
    from diffusers import DiffusionPipeline

    from ddit.tiny_pipelines import save_tiny_pipeline
    from ddit.weights import load_pipeline

    folder = save_tiny_pipeline("flux", tmp_path / "fp32")
    assert load_pipeline(folder).transformer.dtype == torch.float32
    DiffusionPipeline.from_pretrained(folder, dtype=torch.bfloat16).save_pretrained(tmp_path / "bf16")
    assert load_pipeline(tmp_path / "bf16").transformer.dtype == torch.bfloat16
    assert load_pipeline(tmp_path / "bf16", torch.float32).transformer.dtype == torch.float32
