"""``ddit-ablate``: patch policies x feature caches against the baseline, resumable, with a report.

    ddit-ablate --policies third_order,mean --caches none,teacache --steps 50 \\
        --num-per-class 64 --seed 0 --out runs/NAME

Rerunning the same command resumes an interrupted run; another configuration in the
same --out is refused. See docs/ablation.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rich.console import Console

from ..weights import lora_argument, transformer_file_argument


def _names(text: str) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()]


def _steps(text: str) -> tuple[int, ...]:
    return tuple(int(s) for s in _names(text))


def _switches(text: str) -> tuple[float | str, ...]:
    """Switch levels as numbers; anything else (``delta=0.05``) is read, and checked, by the rows."""
    def number(s: str) -> float | str:
        try:
            return float(s)
        except ValueError:
            return s
    return tuple(number(s) for s in _names(text))


def build_parser() -> argparse.ArgumentParser:
    from ..caches import available_caches, diffusers_caches
    from ..policies import available_policies

    p = argparse.ArgumentParser(prog="ddit-ablate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output folder (resumed if it holds this configuration)")
    p.add_argument("--policies", type=_names, default=["third_order"],
                   help=f"comma-separated patch policies, of: {', '.join(available_policies())} (plugins "
                        "included; default: third_order)")
    p.add_argument("--caches", type=_names, default=["none", "teacache"],
                   help=f"comma-separated feature caches, of: none, {', '.join(available_caches())}; none = the "
                        "policy alone (default: none,teacache); with --pipeline also diffusers' hooks: "
                        f"{', '.join(diffusers_caches())}")
    p.add_argument("--policy-param", action="append", default=[], metavar="POLICY.PARAM=VALUE",
                   help="a policy parameter, e.g. third_order.tau=1e-3 (repeatable)")
    p.add_argument("--cache-param", action="append", default=[], metavar="CACHE.PARAM=VALUE",
                   help="a cache parameter, e.g. teacache.delta=0.4 (repeatable)")
    p.add_argument("--sweep", action="append", default=[], metavar="NAME.PARAM=[V1,V2,...]",
                   help="one row per value of a policy or cache parameter, e.g. third_order.tau=[3e-4,6e-4] "
                   "(repeatable; several on one name give every combination)")
    p.add_argument("--steps", type=int, default=50, help="denoising steps of every row but the fewer-steps ones")
    p.add_argument("--fewer-steps", type=_steps, default=(28, 15),
                   help="step counts of the fewer-steps baselines; those below --steps run (default: 28,15)")
    p.add_argument("--progressive", type=_switches,
                   help="rows of progressive resolution (the training-free reference: half resolution, then "
                        "full), each a switch noise level or delta=TOL for the paper's spectral rule (e.g. "
                        "0.4,delta=0.05); '' for none (default: 0.4 on the testbed; none with --pipeline, where FLUX "
                        "and SD3 take switch levels)")
    p.add_argument("--num-per-class", type=int,
                   help="testbed: samples per class and row (default 16: a few minutes on 2 CPU cores)")
    p.add_argument("--seed", type=int, default=0, help="sample i of every row starts from seed + i")
    p.add_argument("--guidance", type=float, help="classifier-free guidance scale, >= 1 (default: 2 on the "
                   "testbed, the pipeline's own with --pipeline)")
    p.add_argument("--batch-size", type=int,
                   help="samples per batch; part of the configuration (default: 64 on the testbed, 1 with --pipeline)")
    p.add_argument("--backbone", help="a diffusers class-conditional DiT folder (default: the testbed base)")
    p.add_argument("--adapter", help="its multi-patch adapter folder (default: the testbed adapter); with "
                   "--pipeline also a Hub repository id, owner/name")
    p.add_argument("--evaluator", help="an evaluator folder (default: the testbed's)")
    pipe = p.add_argument_group("on a diffusers pipeline instead of the testbed")
    pipe.add_argument("--pipeline", help="a diffusers pipeline folder (modular too) or Hub id (owner/name); needs "
                      "--adapter (e.g. OUT/adapter of `ddit distill --pipeline`) and --prompts")
    pipe.add_argument("--prompts", help="a text file, one prompt per line; or a .jsonl file, one "
                      '{"prompt": ..., "image": "cat.png"} per line, for a pipeline that needs an image per prompt')
    pipe.add_argument("--num-per-prompt", type=int, help="samples per prompt and row (default 1)")
    pipe.add_argument("--height", type=int, help="image height (default: the pipeline's)")
    pipe.add_argument("--width", type=int, help="image width (default: the pipeline's)")
    pipe.add_argument("--num-frames", type=int, help="frames of a video pipeline (Wan)")
    pipe.add_argument("--pipeline-arg", action="append", default=[], metavar="NAME=VALUE",
                      help="any other argument of the pipeline call, as a Python literal (repeatable)")
    pipe.add_argument("--lora", action="append", default=[], type=lora_argument, metavar="PATH[:SCALE]",
                      help="a LoRA (a file or folder in diffusers' format) loaded into the pipeline, unfused, for "
                           "every row, the baseline included, weighted SCALE (default 1); repeat for several")
    pipe.add_argument("--transformer", type=transformer_file_argument, metavar="FILE",
                      help="the pipeline's transformer from this file instead of the folder's, with the folder's "
                           "config: a GGUF file (e.g. flux1-dev-Q4_0.gguf, quantized as saved, computing in --dtype) "
                           "or a .safetensors file; the adapter made on the full-precision model runs on it")
    pipe.add_argument("--cpu-offload", action="store_true", default=None,  # None: not given (PIPELINE_ONLY)
                      help="diffusers' model CPU offload (pipe.enable_model_cpu_offload()): each component on the "
                           "GPU only while it runs, for a GPU that holds the transformer but not every component at "
                           "once; wall times then include the moves, on every row")
    p.add_argument("--device", help="where the model runs, e.g. cuda or cuda:1 (default: cpu on the testbed; "
                   "with --pipeline, accelerate's device for this process)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                   help="the model's dtype (default: float32 on the testbed, as saved with --pipeline; on a GPU, "
                        "bfloat16 is the usual choice)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's); on a shared CPU, 1 "
                   "keeps small coarse-patch calls from waiting on busy cores. Keep it when resuming")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


#: Options of one kind of run only: given to the other, they would be ignored.
PIPELINE_ONLY = ("prompts", "num_per_prompt", "height", "width", "num_frames", "pipeline_arg", "cpu_offload",
                 "lora", "transformer")
TESTBED_ONLY = ("num_per_class", "backbone", "evaluator")


def run(args: argparse.Namespace, console: Console) -> None:
    if not args.caches:
        raise ValueError("--caches is empty: give at least one (none: the policies without a cache)")
    given = [name for name in (TESTBED_ONLY if args.pipeline else PIPELINE_ONLY) if getattr(args, name) not in (None, [])]
    if given:
        option = "--" + given[0].replace("_", "-")
        raise ValueError(f"{option} is for the testbed only: drop it with --pipeline" if args.pipeline else
                         f"{option} needs --pipeline (a run on your own pipeline); the testbed does not take it")
    if args.pipeline:
        return run_on_pipeline(args, console)
    from ..testbed.evaluator import load_evaluator
    from .config import build_config, parse_params
    from .models import fingerprint, folders, load_model
    from .report import summarize, table
    from .runner import run_ablation

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    args.device, args.dtype = args.device or "cpu", args.dtype or "float32"
    device = _device(args.device)
    found = folders(args.backbone, args.adapter)
    from ..policies import ProgressiveResolution

    progressive = args.progressive  # by default 0.4, unless the progressive policy is a row already
    if progressive is None:
        progressive = () if "progressive" in args.policies else (ProgressiveResolution.switch,)
    config = build_config(args.policies, args.caches, steps=args.steps, fewer_steps=args.fewer_steps,
                          progressive=progressive,
                          policy_params=parse_params(args.policy_param, "--policy-param"),
                          cache_params=parse_params(args.cache_param, "--cache-param"),
                          sweeps=parse_params(args.sweep, "--sweep"),
                          num_per_class=16 if args.num_per_class is None else args.num_per_class,
                          seed=args.seed,
                          guidance=2.0 if args.guidance is None else args.guidance,
                          batch_size=64 if args.batch_size is None else args.batch_size,
                          model=fingerprint(found), device=args.device,
                          dtype=args.dtype)
    evaluator = load_evaluator(args.evaluator) if args.evaluator else load_evaluator()
    model = load_model(found).to(device=device, dtype=getattr(torch, args.dtype))
    run_ablation(config, model, args.out, progress=not args.no_progress)
    console.print(table(summarize(config, args.out, evaluator)))
    console.print(f"report: {args.out}/report.md")


def run_on_pipeline(args: argparse.Namespace, console: Console) -> None:
    """The same rows through ``ddit.enable`` inside a stock pipeline, on the user's prompts."""
    import torch
    from accelerate import PartialState

    from ..pipelines import adapter_folder, load_adapters
    from ..processes import processes
    from ..pipeline_call import call_arguments, check_call, check_resolution, read_prompts
    from ..weights import check_lora_pipeline, load_loras, load_pipeline, pipeline_folder, transformer_source
    from .config import build_rows, parse_params
    from .models import fingerprint
    from .pipeline_report import summarize_pipeline, table
    from .pipeline_runner import PipelineAblationConfig, check_batch, run_pipeline_ablation

    if not args.adapter:
        raise ValueError("--pipeline needs --adapter: the adapter folder of that pipeline's transformer "
                         "(OUT/adapter of `ddit distill --pipeline`)")
    if not args.prompts:
        raise ValueError("--pipeline needs --prompts: a text file, one prompt per line (or a .jsonl file)")
    if args.guidance is not None and not args.guidance >= 1:
        raise ValueError(f"--guidance must be at least 1, got {args.guidance}")
    args.num_per_prompt = 1 if args.num_per_prompt is None else args.num_per_prompt
    if args.num_per_prompt < 1 or (args.batch_size is not None and args.batch_size < 1):
        raise ValueError("--num-per-prompt and --batch-size must be at least 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    prompts = read_prompts(args.prompts)
    check_batch(args.batch_size or 1, prompts)
    call = call_arguments(args.pipeline_arg, height=args.height, width=args.width, num_frames=args.num_frames,
                          guidance_scale=args.guidance)
    rows = build_rows(args.policies, args.caches, steps=args.steps, fewer_steps=args.fewer_steps,
                      policy_params=parse_params(args.policy_param, "--policy-param"),
                      cache_params=parse_params(args.cache_param, "--cache-param"),
                      sweeps=parse_params(args.sweep, "--sweep"), progressive=args.progressive or (),
                      testbed=False)
    if "num_inference_steps" in call:
        raise ValueError("--pipeline-arg num_inference_steps: the rows' steps come from --steps and --fewer-steps")
    processes()  # sets up the processes of `accelerate launch` (and reads its ACCELERATE_USE_CPU)
    state = PartialState()
    device = _device(args.device) if args.device else state.device
    if state.num_processes > 1 and device.type == "cuda":
        device = state.device  # one GPU per process, whatever --device says
    folder = pipeline_folder(args.pipeline, without=("transformer",) if args.transformer else ())  # Hub id: download
    if args.lora:
        check_lora_pipeline(folder)
    pipe = load_pipeline(folder, getattr(torch, args.dtype) if args.dtype else None, device=device,
                         cpu_offload=args.cpu_offload, transformer_file=args.transformer)
    load_loras(pipe, args.lora)  # before the adapters, which then run beside them
    check_call(pipe, call, prompts, sets=("num_inference_steps",))  # the rows' steps
    adapters = load_adapters(pipe, args.adapter)  # Wan 2.2's second expert's from its transformer_2 subfolder
    for adapter in adapters.values():
        adapter.eval().detach()  # the baseline rows run the stock transformers
    check_resolution(pipe, call, adapters["transformer"].patch_sizes, prompts)
    found = adapter_folder(args.adapter)  # a pipeline folder saved while enabled holds it in ddit_adapter
    source = transformer_source(pipe, folder)  # a modular pipeline's may lie outside the folder, or on the Hub
    models = {"pipeline": args.transformer or (source if isinstance(source, Path) else folder / "transformer"),
              "adapter": found}
    if "transformer_2" in adapters:
        models.update(pipeline_2=folder / "transformer_2", adapter_2=found / "transformer_2")
    models.update({f"lora{i}": Path(path) for i, (path, _) in enumerate(args.lora)})
    config = PipelineAblationConfig(rows=rows, prompts=prompts, steps=args.steps, num_per_prompt=args.num_per_prompt,
                                    seed=args.seed, batch_size=args.batch_size or 1, call=call,
                                    model={**fingerprint(models, configs=folder), **(
                                        {} if args.transformer or isinstance(source, Path) else {"pipeline": source})},
                                    device=device.type, dtype=str(pipe.transformer.dtype).removeprefix("torch."),
                                    cpu_offload=bool(args.cpu_offload),
                                    loras=[[Path(path).name, scale] for path, scale in args.lora],  # bytes: model
                                    transformer_file=args.transformer and args.transformer.name)  # bytes: model
    run_pipeline_ablation(config, pipe, adapters, args.out, progress=not args.no_progress)
    if state.is_main_process:
        console.print(table(summarize_pipeline(config, args.out)))
        console.print(f"report: {args.out}/report.md")


def _device(name: str):
    """``--device`` as a torch device, refused before any work if this machine lacks it."""
    import torch

    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a device name; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: this machine has no CUDA GPU that torch can use; use --device cpu")
    return device


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    console = Console(width=None if sys.stdout.isatty() else 160)  # logs get the whole table
    try:
        run(args, console)
    except KeyboardInterrupt:
        print(f"ddit-ablate: interrupted; finished samples are kept in {args.out}: "
              "rerun the same command to resume", file=sys.stderr)
        return 130
    except (ValueError, RuntimeError, FileNotFoundError) as err:
        print(f"ddit-ablate: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
