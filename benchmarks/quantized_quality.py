"""Does the adapter distilled on the full-precision model keep its quality on a quantized copy? On the testbed.

ddit runs the full-precision model's adapter on a quantized transformer (docs/pipelines.md, "Quantized
transformers"): its heads and LoRA were trained against the full model, and a quantized model answers a little
differently at every step. This measures it on the testbed: the shipped base model stored by torchao (int8 weights)
and quanto (int8, int4), each with the shipped adapter (made on the float32 model) under two policies.

Quality: FD of the testbed evaluator's features and the spectral FD (which sees residual noise) of each row against
its own storage's baseline (what ddit adds on that model), and against the float32 baseline (where the user ends
up); SSIM against each sample's baseline twin (same label and seed) of its own storage. The seeds are apart from
every training seed. Prints a markdown table and writes OUT/results.json; each model's baseline samples and each
row (OUT/rows.jsonl) are kept in OUT, so a rerun measures only what is missing. Quality only: these quantizers
dequantize on the CPU at every call, which says nothing of a GPU's speed.

    python benchmarks/quantized_quality.py --out runs/quantized-quality
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from diffusers import DiTTransformer2DModel, QuantoConfig, TorchAoConfig
from safetensors.torch import load_file, save_file
from torchmetrics.functional.image import structural_similarity_index_measure as ssim

from ddit.adapter import MultiPatchTransformer
from ddit.policies import FixedPolicy, get_policy
from ddit.testbed.adapter import SHIPPED_ADAPTER
from ddit.testbed.base_model import SHIPPED_BASE, disable_label_dropout, generate, load_base_model
from ddit.testbed.evaluate import balanced_labels
from ddit.testbed.evaluator import frechet_distance, load_evaluator
from ddit.testbed.spectrum import spectral_fd

EVAL_SEED = 50_000  # apart from every training seed


def stored(kind: str) -> DiTTransformer2DModel:
    """The shipped base model in float32 (``kind`` "float32") or loaded through a diffusers quantizer."""
    if kind == "float32":
        return load_base_model()
    if kind == "torchao int8":
        from torchao.quantization import Int8WeightOnlyConfig

        config = TorchAoConfig(Int8WeightOnlyConfig())
    else:
        config = QuantoConfig(weights_dtype=kind.split()[1])
    model = DiTTransformer2DModel.from_pretrained(SHIPPED_BASE, quantization_config=config, torch_dtype=torch.float32)
    return disable_label_dropout(model).eval()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="folder for the baselines' samples and results.json (resumed)")
    p.add_argument("--num", type=int, default=256, help="samples per row (balanced over the classes)")
    p.add_argument("--steps", type=int, default=50, help="sampling steps")
    p.add_argument("--storages", default="float32,torchao int8,quanto int8,quanto int4",
                   help="comma-separated: float32, torchao int8, quanto int8, quanto int4")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    settings, saved = {"num": args.num, "steps": args.steps}, out / "settings.json"  # what the kept rows were made with
    if saved.exists() and json.loads(saved.read_text()) != settings:
        raise SystemExit(f"{out} holds rows made with {saved.read_text()}, not {settings}: use another --out")
    saved.write_text(json.dumps(settings))
    evaluator = load_evaluator()
    labels = balanced_labels(args.num)
    policies = {"fixed half at 4": lambda: FixedPolicy(fraction=0.5, size=4),
                "third_order": lambda: get_policy("third_order")}
    done = {}
    if (out / "rows.jsonl").exists():
        done = {(r["storage"], r["policy"]): r for r in map(json.loads, (out / "rows.jsonl").read_text().splitlines())}

    def baseline(kind: str, model) -> torch.Tensor:
        path = out / f"baseline-{kind.replace(' ', '-')}.safetensors"
        if not path.exists():
            save_file({"images": generate(model, labels, seed=EVAL_SEED, steps=args.steps).images}, path)
        return load_file(path)["images"]

    def measured(kind: str, policy: str, images, own, full, coarse: float) -> dict:
        row = {"storage": kind, "policy": policy, "coarse_step_fraction": round(coarse, 3),
               "fd_vs_own_baseline": round(frechet_distance(evaluator, own, images), 2),
               "spectral_fd_vs_own_baseline": round(spectral_fd(own, images), 4),
               "ssim_vs_own_twin": round(ssim((images + 1) / 2, (own + 1) / 2, data_range=1.0).item(), 4),
               "fd_vs_float32_baseline": round(frechet_distance(evaluator, full, images), 2),
               "spectral_fd_vs_float32_baseline": round(spectral_fd(full, images), 4)}
        with (out / "rows.jsonl").open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(row, flush=True)
        return row

    full = baseline("float32", load_base_model())
    rows = []
    for kind in args.storages.split(","):
        todo = [name for name in ["baseline", *policies] if (kind, name) not in done]
        if not todo:
            rows += [done[kind, name] for name in ["baseline", *policies]]
            continue
        model = stored(kind)
        own = baseline(kind, model)
        rows.append(done.get((kind, "baseline")) or measured(kind, "baseline", own, own, full, 0.0))
        adapter = MultiPatchTransformer.from_pretrained(model, SHIPPED_ADAPTER).eval()  # made on float32
        for name, policy in policies.items():
            if (kind, name) in done:
                rows.append(done[kind, name])
                continue
            samples = generate(adapter, labels, seed=EVAL_SEED, steps=args.steps, policy=policy())
            coarse = sum(r["patch_size"] > 2 for t in samples.traces for r in t) / sum(map(len, samples.traces))
            rows.append(measured(kind, name, samples.images, own, full, coarse))
    (out / "results.json").write_text(json.dumps({"rows": rows, "args": vars(args)}, indent=1))
    print("\n| storage | policy | coarse steps | FD vs own baseline | spectral FD vs own | SSIM vs own twin | "
          "FD vs float32 baseline | spectral FD vs float32 |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['storage']} | {r['policy']} | {r['coarse_step_fraction']:.0%} | {r['fd_vs_own_baseline']} | "
              f"{r['spectral_fd_vs_own_baseline']} | {r['ssim_vs_own_twin']} | {r['fd_vs_float32_baseline']} | "
              f"{r['spectral_fd_vs_float32_baseline']} |")


if __name__ == "__main__":
    main()
