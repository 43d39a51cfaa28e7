"""A pipeline call as the command lines describe it: prompts, arguments, and the checks on both
that must pass before any work starts (``ddit distill --pipeline``, ``ddit-ablate --pipeline``).

A prompts file is text, one prompt per line; or JSON Lines (``.jsonl``), one object per
line: ``{"prompt": "...", "image": "cat.png"}``, whose other keys are that prompt's own
pipeline arguments (an image-to-video pipeline's ``image``). A text value that names an
image file (``IMAGE_SUFFIXES``, relative to the prompts file) is loaded as that image.
"""

from __future__ import annotations

import ast
import hashlib
import inspect
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@dataclass(frozen=True)
class Prompt:
    """A prompt, and the pipeline arguments of this prompt alone (``inputs``, images loaded); ``key`` is what
    a recording or a run checks on resume (the text alone for a plain prompt, else the text with each
    argument's value, an image by its content's digest), ``label`` what tables and plots show."""

    text: str
    inputs: dict = field(default_factory=dict, repr=False, compare=False)
    key: str = ""
    label: str = ""

    def __post_init__(self):
        object.__setattr__(self, "key", self.key or self.text)
        object.__setattr__(self, "label", self.label or self.text)


def as_prompts(prompts: Iterable[str | Prompt]) -> list[Prompt]:
    """Prompts as ``Prompt``s; plain text becomes a prompt with no arguments of its own."""
    return [p if isinstance(p, Prompt) else Prompt(p) for p in prompts]


def read_prompts(path: str | os.PathLike) -> list[Prompt]:
    """The prompts of a text file (one per line; blank lines are skipped) or of a ``.jsonl`` file."""
    path = Path(path)
    try:
        lines = [(n, line.strip()) for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
                 if line.strip()]
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"cannot read the prompts file {path} ({err}); pass a UTF-8 text file, "
                         "one prompt per line") from None
    if not lines:
        raise ValueError(f"the prompts file {path} holds no prompt; write one prompt per line")
    if path.suffix.lower() != ".jsonl":
        return [Prompt(line) for _, line in lines]
    return [_json_prompt(path, n, line) for n, line in lines]


def _json_prompt(path: Path, n: int, line: str) -> Prompt:
    """Line ``n`` of a ``.jsonl`` prompts file: its images loaded, its key holding their digests."""
    from diffusers.utils import load_image

    where = f"{path}, line {n}"
    try:
        given = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"{where} is not JSON ({err.msg}); write one object per line, e.g. "
                         '{"prompt": "a cat", "image": "cat.png"}') from None
    if not isinstance(given, dict) or not isinstance(given.get("prompt"), str) or not given["prompt"].strip():
        raise ValueError(f'{where} needs a "prompt" with text, e.g. {{"prompt": "a cat", "image": "cat.png"}}')
    text = given.pop("prompt").strip()
    inputs, identity = {}, {}
    for name, value in given.items():
        inputs[name] = identity[name] = value
        if isinstance(value, str) and value.lower().endswith(IMAGE_SUFFIXES):
            file = path.parent / value
            try:
                inputs[name] = load_image(str(file))
                identity[name] = "sha256:" + hashlib.sha256(file.read_bytes()).hexdigest()
            except (OSError, ValueError) as err:
                raise ValueError(f"{where}: cannot read the image {file} for {name} ({err}); image paths are "
                                 "relative to the prompts file") from None
    if not given:
        return Prompt(text)
    shown = ", ".join(f"{name}={value}" for name, value in given.items())
    return Prompt(text, inputs, key=json.dumps({"prompt": text, **identity}, sort_keys=True),
                  label=f"{text} [{shown}]")


def image_size(pipe, call: dict) -> tuple[int, int, int] | None:
    """Height and width of the image the call makes and the VAE's factor, when the pipeline says (else None):
    the call's, else its signature's defaults, its ``default_sample_size``, or the size HunyuanVideo 1.5
    picks from the call's image (image-to-video) or else from its default aspect ratio."""
    factor = getattr(pipe, "vae_scale_factor_spatial", None) or getattr(pipe, "vae_scale_factor", None)
    defaults = inspect.signature(pipe.__call__).parameters
    picked = None
    if hasattr(pipe, "target_size") and hasattr(pipe, "video_processor"):  # HunyuanVideo 1.5
        width, height = getattr(call.get("image"), "size", None) or getattr(pipe, "default_aspect_ratio", (0, 0))
        if height and width:
            picked = pipe.video_processor.calculate_default_height_width(height, width, pipe.target_size)
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


def check_resolution(pipe, call: dict, patch_sizes: Sequence[int], prompts: Sequence[Prompt] = ()) -> None:
    """Refuse a resolution whose latent some patch size does not divide, before any work (per prompt where its
    image sets the size); and resolution binning, which would change the resolution after this check (most of
    Sana's 1024 bins fail its sizes)."""
    if bins_resolution(pipe, call):
        raise ValueError(f"{type(pipe).__name__} moves the requested size to its nearest resolution bin, which "
                         "the patch sizes may not divide: pass --pipeline-arg use_resolution_binning=False, with "
                         "a --height and --width the sizes divide")
    for prompt in prompts or [Prompt("")]:
        size = image_size(pipe, {**call, **prompt.inputs})
        if size is None:
            raise ValueError(f"ddit cannot tell which size {type(pipe).__name__} makes by default: pass --height "
                             "and --width")
        height, width, factor = size
        latent = (height // factor, width // factor)
        bad = [s for s in patch_sizes if latent[0] % s or latent[1] % s]
        if bad:
            sized = (f"; {type(pipe).__name__} sizes its output after the image of {prompt.label!r}"
                     if "height" not in inspect.signature(pipe.__call__).parameters and prompt.inputs else "")
            raise ValueError(f"patch sizes {bad} do not divide the {latent[0]}x{latent[1]} latent of a "
                             f"{height}x{width} image{sized}; choose --height and --width that are multiples of "
                             f"{max(patch_sizes) * factor}, or smaller --sizes")


def check_call(pipe, call: dict, prompts: Sequence[Prompt] = ()) -> None:
    """Refuse a pipeline that takes no prompt or needs an argument in every call that neither the run nor every
    prompt gives, arguments the pipeline does not take, given twice, or ones ddit sets itself, and values a run
    cannot record as its settings (JSON)."""
    taken = inspect.signature(pipe.__call__).parameters
    if "prompt" not in taken:
        raise ValueError(f"{type(pipe).__name__} takes no prompt: ddit distill and ddit-ablate --pipeline run "
                         "pipelines from prompts (text-to-image, text-to-video, image-to-video)")
    own = {name: prompt for prompt in prompts for name in prompt.inputs}  # a prompt that gives each
    unknown = [name for name in call if name not in taken]
    if unknown:
        raise ValueError(f"{type(pipe).__name__} takes no {', '.join(unknown)}; drop the option")
    unknown = [name for name in own if name not in taken]
    if unknown:
        raise ValueError(f"{type(pipe).__name__} takes no {', '.join(unknown)}, which the prompts file gives "
                         f"(for {own[unknown[0]].label!r}); drop it from the file")
    ours = [name for name in ("prompt", "prompt_embeds", "generator", "output_type", "num_images_per_prompt")
            if name in call or name in own]
    if ours:
        raise ValueError(f"ddit sets {', '.join(ours)} itself (one sample per prompt and seed); drop it from the "
                         "call and the prompts file")
    twice = [name for name in own if name in call]
    if twice:
        raise ValueError(f"{', '.join(twice)} is given both as an option and in the prompts file; give it in one")
    needed = [name for name, p in taken.items() if name not in ("self", "prompt", "generator", "output_type")
              and p.default is p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and name not in call]
    if needed:
        lacking = [p for p in prompts if any(name not in p.inputs for name in needed)]
        if not prompts or lacking:
            which = f" ({lacking[0].label!r} has none)" if prompts and lacking else ""
            raise ValueError(f"{type(pipe).__name__} needs {', '.join(needed)} in every call{which}: give each "
                             'prompt its own in a .jsonl prompts file, one object per line, e.g. {"prompt": '
                             f'"a cat", "{needed[0]}": "cat.png"}}')
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
