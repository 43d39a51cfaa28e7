"""Does an adapter distilled on the base model suit a styled model? A style LoRA beside ddit's adapter, on the testbed.

ddit runs an unfused style LoRA beside its own adapter (docs/pipelines.md, "Style LoRAs"), but the adapter was
distilled on the base model: at coarse steps the styled model may need another correction. This measures it on the
testbed, where everything can be trained here:

1. a style LoRA (peft, on the base model's attention and feed-forward layers) trained on the testbed's images
   recoloured (channels rotated: red becomes green...), with the base model's flow-matching loss;
2. the shipped adapter (distilled on the base model), the same adapter distilled further beside the LoRA on the
   recoloured images, with the styled model as the teacher (what ``ddit distill --pipeline ... --lora`` does), and,
   as a control for the extra steps, the same number of steps more on the base model without the LoRA;
3. samples (seeds apart from every training seed) of the styled model at its own patch size, the reference, and of
   the styled model with each adapter under two policies; the same rows on the base model, without the LoRA, say
   how close coarse steps stay without a style.

Quality: FD of the testbed evaluator's features and the spectral FD (which sees residual noise) against the matching
baseline's samples, and SSIM against each sample's baseline twin (same label and seed). Prints a markdown table and
writes OUT/results.json; the LoRA, the adapters, the baselines' samples and each row (OUT/rows.jsonl) are kept in
OUT, so a rerun measures only what is missing.

    python benchmarks/style_lora.py --out runs/style-lora
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model, set_peft_model_state_dict
from safetensors.torch import load_file, save_file
from torchmetrics.functional.image import structural_similarity_index_measure as ssim
from tqdm import tqdm

from ddit.adapter import MultiPatchTransformer
from ddit.distill import DistillConfig, LatentDataset, distill
from ddit.policies import FixedPolicy, get_policy
from ddit.testbed.adapter import SHIPPED_ADAPTER
from ddit.testbed.base_model import NULL_LABEL, PROMPTS, generate, load_base_model
from ddit.testbed.data import make_dataset
from ddit.testbed.evaluate import balanced_labels
from ddit.testbed.evaluator import frechet_distance, load_evaluator
from ddit.testbed.spectrum import spectral_fd
from ddit.testbed.train_base import flow_matching_loss

STYLE_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"]
TRAIN_SEED, DISTILL_SEED, EVAL_SEED = 101, 202, 50_000  # the evaluation's seeds are apart from every training's


def styled(images: torch.Tensor) -> torch.Tensor:
    """The style: the colour channels rotated (red -> green -> blue -> red)."""
    return images[:, [2, 0, 1]]


def with_style(model, lora: Path, train_steps: int, batch_size: int, lr: float):
    """``model`` with the style LoRA: trained into ``lora`` first if that file is missing."""
    # DiT's diffusers class takes no add_adapter: peft's own injection, as diffusers' loaders do
    inject_adapter_in_model(LoraConfig(r=16, lora_alpha=16, target_modules=STYLE_TARGETS), model, adapter_name="style")
    if lora.exists():
        set_peft_model_state_dict(model, load_file(lora), adapter_name="style")
        return model.eval()
    images, labels = make_dataset(8000, seed=TRAIN_SEED)
    images = styled(images)
    g = torch.Generator().manual_seed(TRAIN_SEED)
    params = [p for n, p in model.named_parameters() if ".style." in n]
    optimizer = torch.optim.AdamW(params, lr=lr)
    model.train()
    for _ in tqdm(range(train_steps), desc="style LoRA"):
        pick = torch.randint(len(images), (batch_size,), generator=g)
        drop = torch.rand(batch_size, generator=g) < 0.1  # the unconditional branch is styled too
        loss = flow_matching_loss(model, images[pick], torch.where(drop, NULL_LABEL, labels[pick]), g)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    lora.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in get_peft_model_state_dict(model, adapter_name="style").items()}, lora)
    return model.eval()


def distilled_further(model, style, out: Path, steps: int, batch_size: int) -> Path:
    """The shipped adapter distilled ``steps`` more over ``model`` (the styled model: beside the LoRA) on the
    testbed's images, recoloured by ``style`` if given; returns the adapter's folder."""
    if not (out / "adapter").exists():
        adapter = MultiPatchTransformer.from_pretrained(model, SHIPPED_ADAPTER)
        images, labels = make_dataset(8000, seed=DISTILL_SEED)
        drop = torch.rand(len(labels), generator=torch.Generator().manual_seed(DISTILL_SEED + 1)) < 0.1
        data = LatentDataset(style(images) if style else images, class_labels=torch.where(drop, NULL_LABEL, labels))
        distill(adapter, data, out, DistillConfig(steps=steps, batch_size=batch_size, seed=DISTILL_SEED),
                resume=(out / "checkpoint.pt").exists())
        adapter.detach()
    return out / "adapter"


def detached(model, folder: Path) -> MultiPatchTransformer:
    """The adapter at ``folder`` over ``model``, detached until its rows run."""
    adapter = MultiPatchTransformer.from_pretrained(model, folder).eval()
    adapter.detach()
    return adapter


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="folder for the LoRA, the adapter and results.json (resumed)")
    p.add_argument("--lora-steps", type=int, default=400, help="style LoRA training steps")
    p.add_argument("--distill-steps", type=int, default=400, help="steps of distillation beside the LoRA")
    p.add_argument("--num", type=int, default=256, help="samples per row (balanced over the classes)")
    p.add_argument("--steps", type=int, default=50, help="sampling steps")
    args = p.parse_args()
    out = Path(args.out)
    torch.manual_seed(0)
    evaluator = load_evaluator()
    labels = balanced_labels(args.num)
    policies = {"fixed half at 4": lambda: FixedPolicy(fraction=0.5, size=4), "third_order": lambda: get_policy(
        "third_order")}

    done = {}  # rows already measured (OUT/rows.jsonl): a rerun measures only the missing ones
    if (out / "rows.jsonl").exists():
        done = {(r["model"], r["adapter"], r["policy"]): r
                for r in map(json.loads, (out / "rows.jsonl").read_text().splitlines())}

    def reference_of(model, model_name: str) -> torch.Tensor:
        path = out / f"reference-{model_name}.safetensors"
        if not path.exists():
            out.mkdir(parents=True, exist_ok=True)
            save_file({"images": generate(model, labels, seed=EVAL_SEED, steps=args.steps).images}, path)
        return load_file(path)["images"]

    def rows(model, adapters: dict, model_name: str):
        """Each adapter (by a function that builds it, detached) over ``model`` in turn under each policy, against
        ``model``'s own samples."""
        reference = reference_of(model, model_name)
        found = []
        for adapter_name, build in adapters.items():
            todo = [name for name in policies if (model_name, adapter_name, name) not in done]
            if todo:
                adapter = build()
                adapter.attach()
            for policy_name in policies:
                if policy_name not in todo:
                    found.append(done[model_name, adapter_name, policy_name])
                    continue
                samples = generate(adapter, labels, seed=EVAL_SEED, steps=args.steps, policy=policies[policy_name]())
                coarse = sum(r["patch_size"] > 2 for t in samples.traces for r in t) / sum(map(len, samples.traces))
                found.append({"model": model_name, "adapter": adapter_name, "policy": policy_name,
                              "coarse_step_fraction": round(coarse, 3),
                              "fd_vs_baseline": round(frechet_distance(evaluator, reference, samples.images), 2),
                              "spectral_fd_vs_baseline": round(spectral_fd(reference, samples.images), 4),
                              "ssim_vs_twin": round(ssim((samples.images + 1) / 2, (reference + 1) / 2,
                                                         data_range=1.0).item(), 4)})
                with (out / "rows.jsonl").open("a") as f:
                    f.write(json.dumps(found[-1]) + "\n")
                print(found[-1], flush=True)
            if todo:
                adapter.detach()
        return found, reference

    base = load_base_model()
    plain, plain_reference = rows(base, {"shipped (base model)": lambda: detached(base, SHIPPED_ADAPTER)}, "base")
    further = distilled_further(load_base_model(), None, out / "distill-base", args.distill_steps, 16)

    model = with_style(load_base_model(), out / "style_lora.safetensors", args.lora_steps, 32, 1e-3)
    beside = distilled_further(model, styled, out / "distill", args.distill_steps, 16)
    found, styled_reference = rows(model, {
        "shipped (base model)": lambda: detached(model, SHIPPED_ADAPTER),
        f"+{args.distill_steps} steps on the base model": lambda: detached(model, further),
        "distilled beside the LoRA": lambda: detached(model, beside)}, "styled")
    style_size = {"fd": round(frechet_distance(evaluator, plain_reference, styled_reference), 2),
                  "spectral_fd": round(spectral_fd(plain_reference, styled_reference), 4)}
    results = {"rows": plain + found, "style_vs_base_baselines": style_size, "args": vars(args),
               "classes": len(PROMPTS)}
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print(f"\nthe styled baseline against the base one: FD {style_size['fd']}, spectral FD "
          f"{style_size['spectral_fd']}\n")
    print("| model | adapter | policy | coarse steps | FD vs its baseline | spectral FD | SSIM vs twin |")
    print("|---|---|---|---|---|---|---|")
    for r in results["rows"]:
        print(f"| {r['model']} | {r['adapter']} | {r['policy']} | {r['coarse_step_fraction']:.0%} | "
              f"{r['fd_vs_baseline']} | {r['spectral_fd_vs_baseline']} | {r['ssim_vs_twin']} |")


if __name__ == "__main__":
    main()
