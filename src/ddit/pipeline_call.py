"""A pipeline call as the command lines describe it: prompts, arguments, and the checks on both
that must pass before any work starts (``ddit distill --pipeline``, ``ddit-ablate --pipeline``).

A prompts file is text, one prompt per line; or JSON Lines (``.jsonl``), one object per
line: ``{"prompt": "...", "image": "cat.png"}``, whose other keys are that prompt's own
pipeline arguments (an image-to-video pipeline's ``image``). A text value that names an
image file (``IMAGE_SUFFIXES``, relative to the prompts file) is loaded as that image.

The pipeline is a ``DiffusionPipeline`` or one of diffusers' modular pipelines (FLUX.3 runs in
those only): ``call_parameters`` and ``run_pipeline`` read and call either alike.
"""

from __future__ import annotations

import ast
import hashlib
import inspect
import io
import json
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from copy import deepcopy
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType, SimpleNamespace
from typing import Sequence

import numpy as np
import torch
from diffusers.modular_pipelines import ModularPipeline
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
#: What a run makes, which is one size for all its prompts: set once, by an option, never per prompt.
SIZE_ARGUMENTS = ("height", "width", "num_frames")
EXIF_ORIENTATION = 0x0112


@dataclass(frozen=True)
class ImageFile:
    """An image a prompts file names: read, checked and hashed with the file, decoded only for its call (a
    thousand 720p frames decoded at once would hold 2.7 GB in every process)."""

    path: Path
    shown: str  # as the prompts file writes it
    sha256: str
    size: tuple[int, int]  # (width, height) as the pipeline will see it (EXIF rotation applied)

    @classmethod
    def read(cls, path: Path, shown: str) -> ImageFile:
        if not path.is_file():
            raise ValueError("no such file")
        data = path.read_bytes()
        try:
            with Image.open(io.BytesIO(data)) as image:  # reads the header alone
                width, height = image.size
                turned = image.getexif().get(EXIF_ORIENTATION) in (5, 6, 7, 8)
        except UnidentifiedImageError:
            raise ValueError("not an image file PIL can read") from None
        return cls(path, shown, hashlib.sha256(data).hexdigest(), (height, width) if turned else (width, height))

    def load(self) -> Image.Image:
        """The image as diffusers' ``load_image`` gives it (EXIF rotation applied, RGB), if unchanged since read."""
        data = self.path.read_bytes()
        if hashlib.sha256(data).hexdigest() != self.sha256:
            raise ValueError(f"{self.path} changed after the prompts file was read; restart the run")
        return ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")


@dataclass(frozen=True)
class Prompt:
    """A prompt, and the pipeline arguments of this prompt alone (``inputs``: an image-to-video pipeline's
    ``image``). ``key`` is what a recording or a run checks on resume: the text alone for a plain prompt,
    else the text with each argument's value, an image or a tensor by its content's digest; ``label`` is
    what tables and plots show."""

    text: str
    inputs: dict = field(default_factory=dict, repr=False, compare=False)
    key: str = field(init=False)
    label: str = field(init=False, compare=False)

    def __post_init__(self):
        key = json.dumps({"prompt": self.text, **{k: _identity(k, v) for k, v in self.inputs.items()}},
                         sort_keys=True)
        shown = ", ".join(f"{name}={_shown(value)}" for name, value in self.inputs.items())
        object.__setattr__(self, "key", key if self.inputs else self.text)
        object.__setattr__(self, "label", f"{self.text} [{shown}]" if self.inputs else self.text)

    def call_inputs(self) -> dict:
        """The arguments as the pipeline takes them: image files decoded."""
        return {k: v.load() if isinstance(v, ImageFile) else v for k, v in self.inputs.items()}


def _identity(name: str, value):
    """A prompt argument's value as its key holds it: images and tensors by the digest of their content."""
    if isinstance(value, ImageFile):
        return "sha256:" + value.sha256
    if isinstance(value, Image.Image):
        value = torch.from_numpy(np.asarray(value.convert("RGB")).copy())
    if isinstance(value, (torch.Tensor, np.ndarray)):
        value = torch.as_tensor(value).detach().cpu().contiguous()
        digest = hashlib.sha256(str((value.dtype, tuple(value.shape))).encode() + value.numpy().tobytes())
        return "sha256:" + digest.hexdigest()
    try:
        json.dumps(value)
    except TypeError:
        raise ValueError(f"a prompt's {name} ({type(value).__name__}) cannot be told apart from another's; give "
                         "numbers, text, images or tensors") from None
    return value


def _shown(value) -> str:
    if isinstance(value, ImageFile):
        return value.shown
    if isinstance(value, Image.Image):
        return f"<image {value.width}x{value.height}>"
    if isinstance(value, (torch.Tensor, np.ndarray)):
        return f"<tensor {'x'.join(map(str, value.shape))}>"
    return json.dumps(value)


def as_prompts(prompts: Iterable[str | Prompt]) -> list[Prompt]:
    """Prompts as ``Prompt``s; plain text becomes a prompt with no arguments of its own."""
    return [p if isinstance(p, Prompt) else Prompt(p) for p in prompts]


def read_prompts(path: str | os.PathLike) -> list[Prompt]:
    """The prompts of a text file (one per line; blank lines are skipped) or of a ``.jsonl`` file, whose lines
    must all give the same arguments (a run makes one size, and compares like with like)."""
    path = Path(path)
    jsonl = path.suffix.lower() == ".jsonl"
    try:
        text = path.read_text(encoding="utf-8-sig")  # a byte-order mark is not part of the first prompt
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"cannot read the prompts file {path} ({err}); pass a UTF-8 text file, "
                         "one prompt per line") from None
    lines = [(n, line.strip()) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    if not lines:
        raise ValueError(f"the prompts file {path} holds no prompt; write one prompt per line")
    if not jsonl:
        return [Prompt(line) for _, line in lines]
    prompts = [_json_prompt(path, n, line) for n, line in lines]
    for (n, _), prompt in zip(lines, prompts):
        if prompt.inputs.keys() != prompts[0].inputs.keys():
            names = [", ".join(p.inputs) or "no argument" for p in (prompts[0], prompt)]
            raise ValueError(f"{path}, line {n} gives {names[1]}, but line {lines[0][0]} gives {names[0]}: every "
                             "line must give the same arguments")
    return prompts


def _json_prompt(path: Path, n: int, line: str) -> Prompt:
    """Line ``n`` of a ``.jsonl`` prompts file: its images read and hashed, not yet decoded."""
    where = f"{path}, line {n}"
    example = '{"prompt": "a cat", "image": "cat.png"}'
    try:
        given = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"{where} is not JSON ({err.msg}); write one object per line, e.g. {example}") from None
    if not isinstance(given, dict) or not isinstance(given.get("prompt"), str) or not given["prompt"].strip():
        raise ValueError(f'{where} needs a "prompt" with text, e.g. {example}')
    text = given.pop("prompt").strip()
    sized = [name for name in SIZE_ARGUMENTS if name in given]
    if sized:
        raise ValueError(f"{where} gives {', '.join(sized)}: a run makes one size for all its prompts; give it "
                         "once, as an option (--height, --width, --num-frames), not per prompt")
    for name, value in given.items():
        if isinstance(value, str) and value.lower().endswith(IMAGE_SUFFIXES):
            if "://" in value:
                raise ValueError(f"{where}: {name} {value!r} is a URL; download the image and give its path, "
                                 "relative to the prompts file")
            try:
                given[name] = ImageFile.read(path.parent / value, value)
            except (OSError, ValueError) as err:
                raise ValueError(f"{where}: cannot read the image {path.parent / value} for {name} ({err}); "
                                 "image paths are relative to the prompts file") from None
    return Prompt(text, given)


#: Added to a call's seed for torch's global random state (``seeded_globally``): apart from its generators' seeds.
GLOBAL_SEED_OFFSET = 10**7


@contextmanager
def seeded_globally(seed: int, device: torch.device | str) -> Iterator[None]:
    """torch's global random state seeded for one pipeline call, and the caller's put back after: a pipeline that
    draws from it besides its generator (SD3's ControlNet pipeline samples its control image's latent so) draws the
    same in every run of that call, as a row's and its baseline twin's."""
    device = torch.device(device)
    accelerator = getattr(torch, device.type) if device.type != "cpu" else None
    devices = list(range(accelerator.device_count())) if accelerator is not None else []
    with torch.random.fork_rng(devices=devices, device_type=device.type if accelerator is not None else "cuda"):
        torch.manual_seed(seed)
        yield


@contextmanager
def progress_bars_off(pipe) -> Iterator[None]:
    """No progress bar per pipeline call while inside (one bar over the prompts instead): a modular pipeline's
    bars belong to its blocks, nested (its denoise loop inside a sequence of blocks)."""
    owners, todo = [], [pipe._blocks] if isinstance(pipe, ModularPipeline) else [pipe]
    while todo:
        owner = todo.pop()
        owners.append(owner)
        todo.extend((getattr(owner, "sub_blocks", None) or {}).values())
    owners = [o for o in owners if hasattr(o, "set_progress_bar_config")]
    saved = [dict(getattr(o, "_progress_bar_config", {})) for o in owners]
    for owner in owners:
        owner.set_progress_bar_config(disable=True)
    try:
        yield
    finally:
        for owner, config in zip(owners, saved):
            owner._progress_bar_config = config


def call_parameters(pipe) -> MappingProxyType:
    """The arguments a pipeline call takes, with their defaults: its ``__call__``'s, or a modular pipeline's block
    inputs (each optional here: their ``required`` flag also marks what earlier blocks make, such as latents)."""
    if not isinstance(pipe, ModularPipeline):
        return inspect.signature(pipe.__call__).parameters
    return MappingProxyType({p.name: inspect.Parameter(p.name, inspect.Parameter.KEYWORD_ONLY, default=p.default)
                             for p in pipe._blocks.inputs if p.name})  # pipe.blocks would be a deep copy


def run_pipeline(pipe, *, output_type: str = "pil", **call):
    """``pipe(**call, output_type=output_type)``, whose output has ``.images`` (``.frames`` for a video), for a
    ``DiffusionPipeline`` or a modular one. A modular pipeline is asked for its ``latents`` (``"latent"``, without
    running its decode step; unpacked, where a stock pipeline's may be packed into tokens) or its decoded
    ``images`` or ``videos`` (and the ``audio`` beside them, LTX-2's, where its blocks make some); a one-prompt list
    is passed as its text (FLUX.3's text encoder takes one prompt per call, as a string)."""
    if not isinstance(pipe, ModularPipeline):
        return pipe(**call, output_type=output_type)
    prompt = call.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        call["prompt"] = prompt[0]
    if output_type == "latent":
        with _undecoded(pipe):
            return SimpleNamespace(images=pipe(**call, output="latents"))
    outputs = {o.name for o in pipe._blocks.outputs}
    name, field = ("videos", "frames") if "videos" in outputs else ("images", "images")
    if "audio" in outputs:
        out = pipe(**call, output_type=output_type, output=[name, "audio"])
        return SimpleNamespace(**{field: out[name], "audio": out["audio"]})
    return SimpleNamespace(**{field: pipe(**call, output_type=output_type, output=name)})


@contextmanager
def _undecoded(pipe) -> Iterator[None]:
    """A modular pipeline without its decode step (every family's last) while inside: asked for latents, it would
    decode them all the same, and a video's VAE decode costs seconds per call."""
    blocks = pipe._blocks
    if "decode" not in blocks.sub_blocks:
        yield
        return
    lean = deepcopy(blocks)
    lean.sub_blocks.pop("decode")
    pipe._blocks = lean
    try:
        yield
    finally:
        pipe._blocks = blocks


#: Edit pipelines that size their output after the call's image unless the call gives a height and width.
SIZED_BY_IMAGE = ("Flux2Pipeline", "Flux2KleinPipeline", "QwenImageEditPipeline", "QwenImageEditPlusPipeline")
#: Edit inpainting pipelines that size their output after the call's image whatever size the call gives.
ALWAYS_SIZED_BY_IMAGE = ("FluxKontextInpaintPipeline", "Flux2KleinInpaintPipeline", "QwenImageEditInpaintPipeline")


def sized_by_image(pipe, call: dict) -> bool:
    """Whether this call of an edit pipeline takes its output's size from its image, which ddit does not predict
    (a modular pipeline given an image: several families' do, FLUX.2's and Qwen-Image-Edit's among them)."""
    name = type(pipe).__name__
    by_image = name in SIZED_BY_IMAGE or isinstance(pipe, ModularPipeline)
    return name in ALWAYS_SIZED_BY_IMAGE or (by_image and call.get("image") is not None
                                             and (call.get("height") is None or call.get("width") is None))


def latent_factor(pipe) -> int | None:
    """Image pixels per latent pixel where the transformer takes the latent (before any packing into tokens), when
    the pipeline says. Z-Image's modular pipeline gives its image processor's factor (its VAE's 8 times its 2x2
    packing) as ``vae_scale_factor_spatial``, and its VAE's as ``vae_scale_factor``."""
    names = ("vae_scale_factor_spatial", "vae_scale_factor", "vae_spatial_compression_ratio")  # the last: LTX's
    if type(pipe).__name__ == "ZImageModularPipeline":
        names = names[1:]
    return next((getattr(pipe, name) for name in names if isinstance(getattr(pipe, name, None), int)), None)


def image_size(pipe, call: dict) -> tuple[int, int, int] | None:
    """Height and width of the image the call makes and the VAE's factor, when the pipeline says (else None):
    the call's, else its signature's defaults, its ``default_sample_size``, the size HunyuanVideo 1.5
    picks from the call's image (image-to-video) or else from its default aspect ratio, or a modular
    pipeline's ``default_height`` and ``default_width``."""
    factor = latent_factor(pipe)
    defaults = call_parameters(pipe)
    if sized_by_image(pipe, call):
        return None
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
        if value is None and isinstance(getattr(pipe, f"default_{name}", None), int):
            value = getattr(pipe, f"default_{name}")
        sizes.append(value)
    if factor is None or None in sizes:
        return None
    if "max_area" in defaults:  # FLUX.1 Kontext: the size's aspect ratio at max_area, in multiples of 2 x factor
        area, aspect, multiple = call.get("max_area", defaults["max_area"].default), sizes[1] / sizes[0], 2 * factor
        sizes = [round(side) // multiple * multiple for side in ((area / aspect) ** 0.5, (area * aspect) ** 0.5)]
    return sizes[0], sizes[1], factor


def bins_resolution(pipe, call: dict) -> bool:
    """Whether the call moves the size it is given to one of the pipeline's bins (PixArt, Sana by default)."""
    parameter = call_parameters(pipe).get("use_resolution_binning")
    return parameter is not None and call.get("use_resolution_binning", parameter.default) is True


def check_resolution(pipe, call: dict, patch_sizes: Sequence[int], prompts: Sequence[Prompt] = ()) -> None:
    """Refuse a resolution whose latent some patch size does not divide, before any work; where each prompt's
    image sets the size (HunyuanVideo 1.5 I2V), at each prompt's size, which must be one for all (a run's
    samples stack, and its recordings batch). And resolution binning, which would change the resolution after
    this check (most of Sana's 1024 bins fail its sizes)."""
    if bins_resolution(pipe, call):
        raise ValueError(f"{type(pipe).__name__} moves the requested size to its nearest resolution bin, which "
                         "the patch sizes may not divide: pass --pipeline-arg use_resolution_binning=False, with "
                         "a --height and --width the sizes divide")
    by_image = "height" not in call_parameters(pipe) and any(p.inputs for p in prompts)
    sizes = {}
    for prompt in prompts or [Prompt("")]:
        size = image_size(pipe, {**call, **prompt.inputs})
        if size is None and type(pipe).__name__ in ALWAYS_SIZED_BY_IMAGE:
            raise ValueError(f"{type(pipe).__name__} sizes its output after each prompt's image, whatever size it is "
                             "given, and ddit could check that size only after the work: distil and ablate on the "
                             "same model's edit pipeline without inpainting, then ddit.enable(pipe, adapter) here")
        if size is None and sized_by_image(pipe, {**call, **prompt.inputs}):
            raise ValueError(f"{type(pipe).__name__} sizes its output after each prompt's image unless given a size "
                             "(one that ddit could check only after the work): pass --height and --width")
        if size is None:
            raise ValueError(f"ddit cannot tell which size {type(pipe).__name__} makes by default: pass --height "
                             "and --width")
        sizes.setdefault(size, prompt)
    if len(sizes) > 1:
        (a, first), (b, second) = list(sizes.items())[:2]
        raise ValueError(f"{type(pipe).__name__} sizes its output after the image: {a[0]}x{a[1]} for "
                         f"{first.label!r}, {b[0]}x{b[1]} for {second.label!r}; a run makes one size, so give "
                         "images of one aspect ratio, or split the prompts file")
    (height, width, factor), prompt = next(iter(sizes.items()))
    latent = (height // factor, width // factor)
    bad = [s for s in patch_sizes if latent[0] % s or latent[1] % s]
    if bad:
        fix = (f"{type(pipe).__name__} sizes its output after the image (of {prompt.label!r} here): use images "
               f"whose size it picks is a multiple of {max(patch_sizes) * factor}" if by_image else
               f"choose --height and --width that are multiples of {max(patch_sizes) * factor}")
        raise ValueError(f"patch sizes {bad} do not divide the {latent[0]}x{latent[1]} latent of a {height}x{width} "
                         f"image; {fix}, or smaller --sizes")


def check_call(pipe, call: dict, prompts: Sequence[Prompt] = (), sets: Sequence[str] = ()) -> None:
    """Refuse a pipeline that takes no prompt or needs an argument in every call that neither the run nor every
    prompt gives, arguments the pipeline does not take, given twice, or ones ddit sets itself (``sets``: the
    command's own, such as ``ddit-ablate``'s steps), and values a run cannot record as its settings (JSON)."""
    taken = call_parameters(pipe)
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
    schedule = ("sigmas", "timesteps") if "num_inference_steps" in sets else ()  # they override the step count
    ours = [name for name in ("prompt", "prompt_embeds", "generator", "latents", "output_type", "return_dict",
                              "callback_on_step_end", "callback_on_step_end_tensor_inputs", "num_images_per_prompt",
                              "num_videos_per_prompt", *sets, *schedule) if name in call or name in own]
    if ours:
        raise ValueError(f"ddit sets {', '.join(ours)} itself (one sample per prompt and seed, its output, the "
                         "steps of each row); drop it from the options and the prompts file")
    twice = [name for name in own if name in call]
    if twice:
        raise ValueError(f"{', '.join(twice)} is given both as an option and in the prompts file; give it in one")
    needed = [name for name, p in taken.items() if name not in ("self", "prompt", "generator", "output_type")
              and p.default is p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and name not in call]
    lacking = [p for p in prompts if any(name not in p.inputs for name in needed)]
    if needed and (lacking or not prompts):
        which = f" ({lacking[0].label!r} has none)" if lacking else ""
        value = '"cat.png"' if "image" in needed[0] else "..."
        raise ValueError(f"{type(pipe).__name__} needs {', '.join(needed)} in every call{which}: give each prompt "
                         'its own in a .jsonl prompts file, one object per line, e.g. {"prompt": "a cat", '
                         f'"{needed[0]}": {value}}}, or one value for all with --pipeline-arg NAME=VALUE')
    transformer = getattr(pipe, "transformer", None)
    family = {"WanTransformer3DModel": "Wan 2.1", "SkyReelsV2Transformer3DModel": "SkyReels-V2"}.get(
        type(transformer).__name__)
    lengths = {p.inputs.get("max_sequence_length", call.get("max_sequence_length", 512)) for p in prompts}
    lengths.add(call.get("max_sequence_length", 512))
    if family and transformer.config.get("added_kv_proj_dim") and lengths != {512}:  # diffusers splits at 512
        raise ValueError(f"{family} image-to-video's blocks take the last 512 text tokens as the text and the ones "
                         "before as the image's: keep max_sequence_length at 512 (drop the option, and the prompts "
                         "file's)")
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
