import json

from conftest import TINY_DIT

from ddit.testbed.evaluator import Evaluator
from ddit.testbed.model_card import ship_base
from ddit.testbed.train_base import BaseTrainConfig, train_base


def test_ship_base_places_weights_and_measures_them(tmp_path):
    train_base(tmp_path / "run", BaseTrainConfig(steps=2, batch_size=4, num_images=32, warmup=1,
                                                 model_overrides=TINY_DIT), progress=False)
    quality = ship_base(tmp_path / "run", Evaluator(), tmp_path / "shipped", num=8, steps=2)
    for name in ("config.json", "diffusion_pytorch_model.safetensors", "loss.png", "samples.png",
                 "eval.json", "README.md"):
        assert (tmp_path / "shipped" / name).is_file(), name
    saved = json.loads((tmp_path / "shipped" / "eval.json").read_text())
    assert saved == quality and set(saved["adherence_per_class"]) == {"glow", "moon", "shapes", "stripes"}
    card = (tmp_path / "shipped" / "README.md").read_text()
    assert f"| adherence | {quality['adherence']:.3f} |" in card
    assert "--steps 2 " in card
