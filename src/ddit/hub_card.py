"""The model card of an adapter pushed to the Hub: what it is for, what it was made for, how to load it.

Why: a repository without a card says nothing on the Hub, and without ``base_model`` the Hub
cannot list the adapter under the model it runs on.
"""

from __future__ import annotations

from huggingface_hub import ModelCard, ModelCardData

TEMPLATE = """---
{metadata}
---

# {title}

A multi-patch adapter made with ddit (after DDiT: Dynamic Patch Scheduling for Efficient Diffusion
Transformers). It lets `{backbone}` run a denoising step at patch sizes {coarse} besides its own
{base}: a coarse step runs on {fewer} fewer tokens, and a patch policy picks, per sample and step, where the latent
changes slowly enough for one. Its weights are small per-size patch embeddings and output heads, and LoRA on the
blocks ({lora}); the backbone's own weights are not in it and are not changed.

It loads only onto `{backbone}` with the config it was made for (config hash `{config_hash}`).

```python
import ddit
from diffusers import DiffusionPipeline

pipe = DiffusionPipeline.from_pretrained("{base_model}")
ddit.enable(pipe, "{repo_id}", policy="third_order")
out = pipe("a photo of a red fox in the snow")
print(ddit.summary(pipe))  # which steps ran coarse, and the tokens saved
```
"""


def adapter_card(adapter, repo_id: str, base_model: str | None = None) -> ModelCard:
    """The card of ``adapter`` (a ``MultiPatchTransformer``) as ``repo_id``; ``base_model``: the Hub id of the
    model it was distilled for, which the card's metadata and example name."""
    from .adapter import config_hash

    backbone = type(adapter.backbone).__name__
    data = ModelCardData(library_name="ddit", base_model=base_model,
                         tags=["ddit", "dynamic-patch", "lora", "diffusers", backbone])
    coarse = adapter.patch_sizes[1:]
    fewer = " or ".join(f"{(size // adapter.base_patch_size) ** 2}x" for size in coarse)
    config = adapter.lora_config
    lora = f"rank {config.r}, {'one LoRA for every size' if adapter.shared_lora else 'one LoRA per size'}"
    return ModelCard(TEMPLATE.format(
        metadata=data.to_yaml(), title=f"ddit adapter for {base_model or backbone}", backbone=backbone,
        coarse=" and ".join(map(str, coarse)), base=adapter.base_patch_size, fewer=fewer, lora=lora,
        config_hash=config_hash(adapter.backbone), base_model=base_model or "BASE_MODEL_FOLDER_OR_ID",
        repo_id=repo_id))
