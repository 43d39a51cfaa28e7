import json

import torch
from conftest import TINY_DIT

from ddit.adapter import MultiPatchTransformer
from ddit.cli import main
from ddit.distill import DistillConfig, distill
from ddit.testbed.adapter import distillation_data
from ddit.testbed.adapter_card import ship_adapter
from ddit.testbed.base_model import build_base_model
from ddit.testbed.evaluator import Evaluator


def test_ship_adapter_measures_before_and_after(tmp_path, capsys):
    base = build_base_model(**TINY_DIT)
    for p in base.parameters():  # a teacher that says something
        torch.nn.init.normal_(p, std=0.05)
    base.save_pretrained(tmp_path / "base")
    model = MultiPatchTransformer(base, [4])
    distill(model, distillation_data(64), tmp_path / "run",
            DistillConfig(steps=20, batch_size=8, lr=3e-3, num_inference_steps=10), progress=False)

    report = ship_adapter(tmp_path / "run", Evaluator(), tmp_path / "shipped", base=tmp_path / "base",
                          steps=10, per_class=1)
    before, after = report["relative_error_before"][4], report["relative_error_after"][4]
    assert len(before) == len(after) == 2  # every 5th of the 10 noise levels
    assert sum(after) < sum(before)  # distillation brought the coarse path closer to the teacher
    for name in ("README.md", "relative_error.png", "samples_patch2.png", "samples_patch4.png", "card.json"):
        assert (tmp_path / "shipped" / name).is_file(), name
    assert json.loads((tmp_path / "shipped" / "card.json").read_text())["distill"]["steps"] == 20

    assert main(["testbed", "adapter-error", str(tmp_path / "shipped"), "--base", str(tmp_path / "base"),
                 "--steps", "10"]) == 0
    header, line = capsys.readouterr().out.splitlines()[-2:]
    assert header.startswith("adapter\tpatch\tt=1.00") and line.split("\t")[1] == "4"
    assert float(line.split("\t")[-1]) == round(sum(after) / 2, 3)
