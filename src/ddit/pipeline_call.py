"""A pipeline call as the command lines describe it: prompts, arguments, and the checks on both
that must pass before any work starts (``ddit distill --pipeline``, ``ddit-ablate --pipeline``)."""

from __future__ import annotations

import ast
import inspect
import json
import os
from pathlib import Path
from typing import Sequence


def read_prompts(path: str | os.PathLike) -> list[str]:
    """One prompt per line; blank lines are skipped."""
    path = Path(path)
    try:
        prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"cannot read the prompts file {path} ({err}); pass a UTF-8 text file, "
                         "one prompt per line") from None
    if not prompts:
        raise ValueError(f"the prompts file {path} holds no prompt; write one prompt per line")
    return prompts


def image_size(pipe, call: dict) -> tuple[int, int, int] | None:
    """Height and width of the image the call makes and the VAE's factor, when the pipeline says (else None):
    the call's, else its signature's defaults, its ``default_sample_size``, or the size HunyuanVideo 1.5
    picks from its default aspect ratio."""
    factor = getattr(pipe, "vae_scale_factor_spatial", None) or getattr(pipe, "vae_scale_factor", None)
    defaults = inspect.signature(pipe.__call__).parameters
    picked = None
    if hasattr(pipe, "default_aspect_ratio") and hasattr(pipe, "target_size"):  # HunyuanVideo 1.5
        aspect = pipe.default_aspect_ratio
        picked = pipe.video_processor.calculate_default_height_width(aspect[1], aspect[0], pipe.target_size)
    sizes = []
    for i, name in enumerate(("height", "width")):
        value = call.get(name)
        if value is None:
            default = defaults[name].default if name in defaults else None
            value = default if isinstance(default, int) else None
        if value is None and getattr(pipe, "default_sample_size", None) and factor:
            value = pipe.default_sample_size * factor
        if value is None and picked is not None:
            value = picked[i]
        sizes.append(value)
    if factor is None or None in sizes:
        return None
    return sizes[0], sizes[1], factor


def bins_resolution(pipe, call: dict) -> bool:
    """Whether the call moves the size it is given to one of the pipeline's bins (PixArt, Sana by default)."""
    parameter = inspect.signature(pipe.__call__).parameters.get("use_resolution_binning")
    return parameter is not None and call.get("use_resolution_binning", parameter.default) is True


def check_resolution(pipe, call: dict, patch_sizes: Sequence[int]) -> None:
    """Refuse a resolution whose latent some patch size does not divide, before any work; and resolution
    binning, which would change the resolution after this check (most of Sana's 1024 bins fail its sizes)."""
    if bins_resolution(pipe, call):
        raise ValueError(f"{type(pipe).__name__} moves the requested size to its nearest resolution bin, which "
                         "the patch sizes may not divide: pass --pipeline-arg use_resolution_binning=False, with "
                         "a --height and --width the sizes divide")
    size = image_size(pipe, call)
    if size is None:
        raise ValueError(f"ddit cannot tell which size {type(pipe).__name__} makes by default: pass --height and "
                         "--width")
    height, width, factor = size
    latent = (height // factor, width // factor)
    bad = [s for s in patch_sizes if latent[0] % s or latent[1] % s]
    if bad:
        raise ValueError(f"patch sizes {bad} do not divide the {latent[0]}x{latent[1]} latent of a {height}x{width} "
                         f"image; choose --height and --width that are multiples of {max(patch_sizes) * factor}, "
                         "or smaller --sizes")


def check_call(pipe, call: dict) -> None:
    """Refuse a pipeline that takes no prompt or needs an argument in every call that a run cannot give,
    arguments the pipeline does not take, the ones ddit sets itself, and values a run cannot record as its
    settings (JSON)."""
    taken = inspect.signature(pipe.__call__).parameters
    if "prompt" not in taken:
        raise ValueError(f"{type(pipe).__name__} takes no prompt: ddit distill and ddit-ablate --pipeline run "
                         "pipelines from text prompts (text-to-image, text-to-video)")
    unknown = [name for name in call if name not in taken]
    if unknown:
        raise ValueError(f"{type(pipe).__name__} takes no {', '.join(unknown)}; drop the option")
    ours = [name for name in ("prompt", "prompt_embeds", "generator", "output_type", "num_images_per_prompt")
            if name in call]
    if ours:
        raise ValueError(f"ddit sets {', '.join(ours)} itself (one sample per prompt and seed); drop it from the "
                         "call")
    needed = [name for name, p in taken.items() if name not in ("self", "prompt", "generator", "output_type")
              and p.default is p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and name not in call]
    if needed:
        i2v = ("image-to-video pipelines are not supported by ddit distill and ddit-ablate --pipeline yet; "
               if "image" in needed else "")
        raise ValueError(f"{type(pipe).__name__} needs {', '.join(needed)} in every call, which ddit's pipeline "
                         f"runs cannot give (one value for all prompts, recorded as JSON): {i2v}ddit.enable(pipe, "
                         "adapter) runs it from Python")
    for name, value in call.items():
        try:
            json.dumps(value)
        except TypeError:
            raise ValueError(f"the call's {name} ({type(value).__name__}) cannot be written as JSON; a run records "
                             "its call's settings to resume and compare, so they must be numbers, True/False, "
                             "text, or lists and dicts of them") from None


def named_values(items: list[str], flag: str = "--pipeline-arg") -> dict:
    """``name=value`` pairs, each value a Python literal (``256``, ``False``, ``'text'``)."""
    args = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name.isidentifier():
            raise ValueError(f"{flag} {item!r} is not name=value, e.g. {flag} max_sequence_length=256")
        try:
            args[name] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            raise ValueError(f"{flag} {item!r}: {value!r} is not a Python literal (a number, True or "
                             "False, or text in quotes)") from None
    return args


def call_arguments(items: list[str], **options) -> dict:
    """The pipeline's arguments: the options given (``height=None``: the pipeline's default), then
    ``--pipeline-arg NAME=VALUE`` items."""
    return {**{name: value for name, value in options.items() if value is not None}, **named_values(items)}
