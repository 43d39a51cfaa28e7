"""The ``ddit`` command line: thin argument parsing over the library."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from .weights import lora_argument, transformer_file_argument


def _train_base(args) -> None:
    from .testbed.train_base import BaseTrainConfig, train_base

    config = BaseTrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                             seed=args.seed, num_images=args.num_images, bf16=args.bf16)
    export = train_base(args.out, config, resume=args.resume, checkpoint_minutes=args.checkpoint_minutes)
    print(f"EMA weights written to {export}")


def _train_evaluator(args) -> None:
    from .testbed.evaluator import EvaluatorTrainConfig, train_evaluator

    report = train_evaluator(args.out, EvaluatorTrainConfig(steps=args.steps, seed=args.seed),
                             resume=args.resume, checkpoint_minutes=args.checkpoint_minutes)
    print(json.dumps(report, indent=1))


def _eval(args) -> None:
    from .testbed.base_model import load_base_model
    from .testbed.evaluate import evaluate_model
    from .testbed.evaluator import load_evaluator

    if args.num < 2 or args.steps < 1:
        raise ValueError(f"--num must be at least 2 (a Fréchet distance needs two images) and --steps at least 1, "
                         f"got --num {args.num}, --steps {args.steps}")
    model = load_base_model(args.model) if args.model else load_base_model()
    evaluator = load_evaluator(args.evaluator) if args.evaluator else load_evaluator()
    result = evaluate_model(model, evaluator, num=args.num, steps=args.steps, guidance=args.guidance,
                            seed=args.seed, progress=True)
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print(f"adherence {result['adherence']:.3f}  spectral FD {result['sfd']:.3f} "
              f"(real-vs-real floor {result['sfd_real_floor']:.3f})  FD {result['fd']:.3f} "
              f"(floor {result['fd_real_floor']:.3f})")
        for prompt, value in result["adherence_per_class"].items():
            print(f"  {prompt:<10} {value:.3f}")


def _ship_base(args) -> None:
    from .testbed.evaluator import load_evaluator
    from .testbed.model_card import ship_base

    quality = ship_base(args.run, load_evaluator(), num=args.num)
    print(json.dumps(quality, indent=1))


def _adapter_error(args) -> None:
    from .adapter import MultiPatchTransformer
    from .distill import sampler_sigmas
    from .testbed.adapter_card import relative_errors
    from .testbed.base_model import SHIPPED_BASE, load_base_model

    sigmas = sampler_sigmas(args.steps)[::5]
    print("adapter\tpatch\t" + "\t".join(f"t={s:.2f}" for s in sigmas.tolist()) + "\tmean")
    for folder in args.adapters:
        model = MultiPatchTransformer.from_pretrained(load_base_model(args.base or SHIPPED_BASE), folder).eval()
        for size, errors in relative_errors(model, sigmas).items():
            print(f"{folder}\t{size}\t" + "\t".join(f"{e:.3f}" for e in errors) + f"\t{sum(errors) / len(errors):.3f}")


def _ship_adapter(args) -> None:
    from .testbed.adapter_card import ship_adapter
    from .testbed.evaluator import load_evaluator

    report = ship_adapter(args.run, load_evaluator())
    print(json.dumps({k: v for k, v in report.items() if k != "distill"}, indent=1))


def _generate(args) -> None:
    from .images import save_grid
    from .testbed.base_model import generate, load_base_model
    from .testbed.data import class_id

    if args.num < 1 or args.steps < 1:
        raise ValueError(f"--num and --steps must be at least 1, got --num {args.num}, --steps {args.steps}")
    if not args.guidance >= 1:
        raise ValueError(f"--guidance must be at least 1 (1: no classifier-free guidance), got {args.guidance}")
    labels = torch.full((args.num,), class_id(args.prompt))
    model = load_base_model(args.model) if args.model else load_base_model()
    images = generate(model, labels, seed=args.seed, steps=args.steps, guidance=args.guidance, progress=True).images
    save_grid(images, args.out)
    print(f"wrote {args.out}")


def _distill(args) -> None:
    from accelerate import PartialState

    from .adapter import MultiPatchTransformer
    from .distill import DistillConfig, LatentDataset, distill
    from .weights import load_pretrained_transformer, load_safetensors

    sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else None
    if args.pipeline:
        export = _self_distill(args, sizes)
    else:
        if args.prompts or args.cpu_offload or args.lora or args.transformer:
            raise ValueError("--prompts, --cpu-offload, --lora and --transformer need --pipeline: the pipeline folder "
                             "to run them through")
        if args.backbone:
            if not args.latents:
                raise ValueError("--backbone needs --latents: a safetensors file with 'latents' "
                                 "and the forward arguments to condition on (e.g. 'class_labels')")
            backbone = load_pretrained_transformer(args.backbone)
            tensors = load_safetensors(args.latents)
            if "latents" not in tensors:
                raise ValueError(f"{args.latents} holds {sorted(tensors)}, but no 'latents'")
            data = LatentDataset(tensors.pop("latents"), **tensors)
        else:
            from .testbed.adapter import distillation_data
            from .testbed.base_model import SHIPPED_BASE, load_base_model

            backbone = load_base_model(args.base or SHIPPED_BASE)
            data = distillation_data(seed=args.seed)
        model = MultiPatchTransformer(backbone, sizes, rank=args.rank, shared_lora=args.shared_lora)
        batch_size = 32 if args.batch_size is None else args.batch_size
        config = DistillConfig(steps=args.steps, batch_size=batch_size, lr=args.lr,
                               num_inference_steps=args.num_inference_steps or 50,
                               timestep_scale=args.timestep_scale, seed=args.seed)
        export = distill(model, data, args.out, config, resume=args.resume,
                         checkpoint_minutes=args.checkpoint_minutes)
    if PartialState().is_main_process:
        print(f"adapter written to {export}")


def _self_distill(args, sizes):
    import torch

    from .distill import DistillConfig
    from .pipeline_call import call_arguments, named_values, read_prompts
    from .processes import processes
    from .self_distill import self_distill
    from .weights import check_lora_pipeline, load_loras, load_pipeline, pipeline_folder

    if args.base or args.backbone or args.latents:
        raise ValueError("--pipeline distils the pipeline's own transformer; drop --base, --backbone and --latents")
    if not args.prompts:
        raise ValueError("--pipeline needs --prompts: a text file with one prompt per line (or a .jsonl file)")
    prompts = read_prompts(args.prompts)
    call = call_arguments(args.pipeline_arg, num_inference_steps=args.num_inference_steps, height=args.height,
                          width=args.width, num_frames=args.num_frames, guidance_scale=args.guidance)
    on_policy = None
    if args.on_policy:
        from .policies import get_policy

        on_policy = get_policy(args.on_policy, **named_values(args.on_policy_param, "--on-policy-param"))
    accelerator = processes()  # first: it sets up the processes of `accelerate launch`
    # a Hub repository id: its download (without the transformer weights that --transformer replaces)
    folder = pipeline_folder(args.pipeline, without=("transformer",) if args.transformer else ())
    if args.lora:
        check_lora_pipeline(folder)
    # on the CPU until self_distill has checked its input (offload keeps it there too)
    pipe = load_pipeline(folder, getattr(torch, args.dtype) if args.dtype else None,
                         device=accelerator.device if args.cpu_offload else None, cpu_offload=args.cpu_offload,
                         transformer_file=args.transformer)
    load_loras(pipe, args.lora)
    config = DistillConfig(steps=args.steps, batch_size=4 if args.batch_size is None else args.batch_size,
                           lr=args.lr, num_inference_steps=None, timestep_scale=None, seed=args.seed)
    return self_distill(pipe, prompts, args.out, call=call, patch_sizes=sizes, rank=args.rank,
                        shared_lora=args.shared_lora, config=config, seed=args.seed, resume=args.resume,
                        checkpoint_minutes=args.checkpoint_minutes, on_policy=on_policy, accelerator=accelerator)


def _tiny_pipeline(args) -> None:
    from .tiny_pipelines import TINY_CALL, save_tiny_pipeline

    folder = save_tiny_pipeline(args.kind, args.out)
    image = (" with image=... (a first frame)" if "i2v" in args.kind
             else " with control_image=..." if args.kind.endswith("-controlnet") else "")
    print(f"wrote a tiny random {args.kind} pipeline to {folder}; run it at {TINY_CALL[args.kind]}{image}")


def _calibrate_teacache(args) -> None:
    if args.pipeline:
        coefficients = _calibrate_teacache_on_pipeline(args)
        guide = {share: delta for share, delta in
                 json.loads(Path(args.out).read_text())["delta_for_skipped_share"].items() if delta is not None}
        print("On these prompts' trajectories (every step computed; a skip moves them a little), TeaCache skips "
              + (", ".join(f"{float(share):.0%} of the steps at delta {delta:.6g}" for share, delta in guide.items())
                 or "20% of the steps at no delta (too few steps between the first and the last?)")
              + "; measure the real trade-off with ddit-ablate --sweep \"teacache.delta=[...]\"")
    else:
        from .caches import write_teacache_fit
        from .testbed.base_model import SHIPPED_BASE, load_base_model
        from .testbed.teacache import calibrate_teacache

        if args.prompts or args.pipeline_arg or args.height or args.width or args.num_frames or args.dtype \
                or args.device or args.cpu_offload or args.transformer or args.lora:
            raise ValueError("--prompts, --height, --width, --num-frames, --dtype, --device, --cpu-offload, "
                             "--transformer, --lora and --pipeline-arg need --pipeline")
        steps, guidance = args.steps or 50, 2.0 if args.guidance is None else args.guidance
        coefficients = calibrate_teacache(load_base_model(args.model or SHIPPED_BASE), per_class=args.per_class,
                                          steps=steps, guidance=guidance, seed=args.seed, progress=True)
        write_teacache_fit(coefficients, args.out, command="ddit calibrate teacache", per_class=args.per_class,
                           steps=steps, guidance=guidance, seed=args.seed)
    print(f"TeaCache fit {coefficients} written to {args.out}")


def _calibrate_teacache_on_pipeline(args) -> list[float]:
    import torch
    from accelerate import PartialState

    from .calibration import TWO_EXPERTS, calibrate_teacache_on_pipeline
    from .pipeline_call import call_arguments, read_prompts
    from .weights import check_lora_pipeline, has_two_experts, load_loras, load_pipeline, pipeline_folder

    if args.model:
        raise ValueError("--model is the testbed's; with --pipeline the fit is the pipeline's transformer's")
    if not args.prompts:
        raise ValueError("--pipeline needs --prompts: a text file with one prompt per line (or a .jsonl file)")
    prompts = read_prompts(args.prompts)
    call = call_arguments(args.pipeline_arg, num_inference_steps=args.steps, height=args.height, width=args.width,
                          num_frames=args.num_frames, guidance_scale=args.guidance)
    folder = pipeline_folder(args.pipeline, without=("transformer",) if args.transformer else ())
    if has_two_experts(folder):
        raise ValueError(TWO_EXPERTS)
    if args.lora:
        check_lora_pipeline(folder)
    pipe = load_pipeline(folder, getattr(torch, args.dtype) if args.dtype else None,
                         device=args.device or PartialState().device, cpu_offload=args.cpu_offload,
                         transformer_file=args.transformer)
    load_loras(pipe, args.lora)  # a styled model's fit is its own
    return calibrate_teacache_on_pipeline(pipe, prompts, args.out, call=call, seed=args.seed)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ddit", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="ddit: dynamic patch sizes for diffusion transformers (DDiT), on diffusers.",
        epilog="The ablation harness is its own command: ddit-ablate --help (docs/ablation.md).\n"
               "In Python, on a stock diffusers pipeline: ddit.enable(pipe, adapter) (docs/pipelines.md).")
    commands = parser.add_subparsers(dest="command", required=True)

    testbed = commands.add_parser("testbed", help="build and evaluate the embedded testbed")
    testbed_commands = testbed.add_subparsers(dest="testbed_command", required=True)

    p = testbed_commands.add_parser("train-base", help="train the testbed's base DiT")
    p.add_argument("--out", required=True, help="folder for checkpoints and the exported EMA model")
    p.add_argument("--steps", type=int, default=2400)
    p.add_argument("--batch-size", type=int, help="per process (default: 32 on the testbed and latents, 4 with "
                   "--pipeline)")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-images", type=int, default=20000)
    p.add_argument("--bf16", action="store_true",
                   help="bf16 autocast; faster only on CPUs with native bf16 (AVX512-BF16, AMX)")
    p.add_argument("--checkpoint-minutes", type=float, default=3.0)
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.set_defaults(func=_train_base)

    p = testbed_commands.add_parser("train-evaluator", help="train the testbed's evaluator network")
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--checkpoint-minutes", type=float, default=3.0)
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.set_defaults(func=_train_evaluator)

    p = testbed_commands.add_parser("eval", help="adherence and FD of the base model")
    p.add_argument("--num", type=int, default=512, help="images, balanced over the classes")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance", type=float, default=2.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", help="folder of a base model (default: the shipped one)")
    p.add_argument("--evaluator", help="folder of an evaluator (default: the shipped one)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=_eval)

    p = testbed_commands.add_parser("ship-base", help="place a finished train-base run in the package, "
                                    "with its loss curve, samples, measured quality and model card")
    p.add_argument("--run", required=True, help="the --out folder of train-base")
    p.add_argument("--num", type=int, default=512, help="images for the quality measurement")
    p.set_defaults(func=_ship_base)

    p = testbed_commands.add_parser("adapter-error", help="relative error of testbed adapters to the base model, "
                                    "per coarse size, at every 5th noise level of the sampler")
    p.add_argument("adapters", nargs="+", help="adapter folders (OUT/adapter of ddit distill)")
    p.add_argument("--base", help="testbed base model folder (default: the shipped one)")
    p.add_argument("--steps", type=int, default=50, help="the sampler's step count")
    p.set_defaults(func=_adapter_error)

    p = testbed_commands.add_parser("ship-adapter", help="place a finished distill run of the testbed in the "
                                    "package, with its error before/after, sample grids and card")
    p.add_argument("--run", required=True, help="the --out folder of ddit distill")
    p.set_defaults(func=_ship_adapter)

    p = commands.add_parser("distill", help="train a multi-patch adapter against its frozen backbone (Eq. 1): "
                            "on the testbed, on given latents, or on a pipeline's own inputs (--pipeline)")
    p.add_argument("--out", required=True, help="folder for checkpoints and the adapter (OUT/adapter)")
    p.add_argument("--pipeline", help="a diffusers pipeline folder (modular too) or Hub id (owner/name): run it on "
                   "--prompts, record its transformer's inputs (OUT/states) and distil on them")
    p.add_argument("--prompts", help="with --pipeline: a text file, one prompt per line; or a .jsonl file, one "
                   '{"prompt": ..., "image": "cat.png"} per line, for a pipeline that needs an image per prompt')
    p.add_argument("--height", type=int, help="with --pipeline: image height (default: the pipeline's)")
    p.add_argument("--width", type=int, help="with --pipeline: image width (default: the pipeline's)")
    p.add_argument("--num-frames", type=int, help="with --pipeline: frames of a video pipeline (Wan)")
    p.add_argument("--guidance", type=float, help="with --pipeline: its guidance_scale (default: the pipeline's)")
    p.add_argument("--pipeline-arg", action="append", default=[], metavar="NAME=VALUE",
                   help="with --pipeline: any other argument of the pipeline call, as a Python literal "
                        "(e.g. max_sequence_length=256); repeatable")
    p.add_argument("--on-policy", metavar="POLICY", help="with --pipeline: a second round, recorded with the "
                   "adapter enabled under this policy (e.g. fixed), so that training also sees the latents coarse "
                   "steps lead to; the adapter is then OUT/on-policy/adapter")
    p.add_argument("--on-policy-param", action="append", default=[], metavar="NAME=VALUE",
                   help="a parameter of the --on-policy policy, e.g. fraction=0.5 (repeatable)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                   help="with --pipeline: load it in this dtype (default: as saved)")
    p.add_argument("--cpu-offload", action="store_true",
                   help="with --pipeline: diffusers' model CPU offload (pipe.enable_model_cpu_offload()): each "
                        "component on the GPU only while it runs, for a GPU that holds the transformer but not "
                        "every component at once")
    p.add_argument("--transformer", type=transformer_file_argument, metavar="FILE",
                   help="with --pipeline: its transformer from this file instead of the folder's, with the folder's "
                        "config: a GGUF file (e.g. flux1-dev-Q4_0.gguf, quantized as saved, computing in --dtype) or "
                        "a .safetensors file")
    p.add_argument("--lora", action="append", default=[], type=lora_argument, metavar="PATH[:SCALE]",
                   help="with --pipeline: a LoRA (a file or folder in diffusers' format) loaded into it, unfused, "
                        "weighted SCALE (default 1): the adapter is distilled for the model with it; repeatable")
    p.add_argument("--base", help="testbed base model folder (default: the shipped one)")
    p.add_argument("--backbone", help="a diffusers transformer folder, instead of the testbed")
    p.add_argument("--latents", help="with --backbone: safetensors with 'latents' and conditioning tensors")
    p.add_argument("--sizes", help="patch sizes in latent pixels, e.g. 4,8 (default: 2p,4p)")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank")
    p.add_argument("--shared-lora", action="store_true", help="one LoRA for every coarse size, not one per size")
    p.add_argument("--steps", type=int, default=2000, help="training steps")
    p.add_argument("--batch-size", type=int, help="per process (default: 32 on the testbed and latents, 4 with "
                   "--pipeline)")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--num-inference-steps", type=int,
                   help="the sampler's steps: with --pipeline, the pipeline's (default: its own); otherwise t is "
                        "drawn from the noise levels of a sampler with this many steps (default 50)")
    p.add_argument("--timestep-scale", type=float, default=1000.0, help="model timestep = t * scale (Flux: 1)")
    p.add_argument("--seed", type=int, default=0, help="training seed; with --pipeline, prompt i records from "
                   "seed + i")
    p.add_argument("--checkpoint-minutes", type=float, default=3.0)
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.set_defaults(func=_distill)

    p = commands.add_parser("tiny-pipeline", help="write a tiny random, complete pipeline folder to try ddit "
                            "offline")
    p.add_argument("kind", help="flux, flux2 (FLUX.2 [klein]), chroma, qwenimage (Qwen-Image), zimage (Z-Image), "
                   "sd3, pixart (PixArt-Sigma), sana, hunyuanimage (HunyuanImage 2.1), wan, wan-i2v (its "
                   "image-to-video: call it with an image too), wan22 (Wan 2.2's two experts), wan22-i2v, "
                   "hunyuanvideo15, ltx (LTX-Video), ltx2 (LTX-2, video and audio), skyreels (SkyReels-V2), "
                   "skyreels-i2v (its image-to-video: call it with an image too), skyreels-df (its diffusion "
                   "forcing), or flux-controlnet, sd3-controlnet, qwenimage-controlnet or sana-controlnet (a "
                   "ControlNet pipeline: call it with a control_image too)")
    p.add_argument("out", help="folder to write")
    p.set_defaults(func=_tiny_pipeline)

    calibrate = commands.add_parser("calibrate", help="fit what a method needs to a model")
    calibrate_commands = calibrate.add_subparsers(dest="calibrate_command", required=True)
    p = calibrate_commands.add_parser("teacache", help="fit TeaCache's rescaling polynomial on the testbed, or on "
                                      "a pipeline's generations of prompts (--pipeline)")
    p.add_argument("--model", help="testbed base model folder (default: the shipped one)")
    p.add_argument("--per-class", type=int, default=8, help="calibration samples per class (testbed)")
    p.add_argument("--pipeline", help="a diffusers pipeline folder (modular too) or Hub id (owner/name): fit its "
                   "transformer on --prompts")
    p.add_argument("--prompts", help="with --pipeline: a text file, one prompt per line (or a .jsonl file)")
    p.add_argument("--steps", type=int, help="sampler steps (default: 50 on the testbed, the pipeline's own)")
    p.add_argument("--guidance", type=float, help="guidance scale (default: 2.0 on the testbed, the pipeline's)")
    p.add_argument("--height", type=int, help="with --pipeline: image height (default: the pipeline's)")
    p.add_argument("--width", type=int, help="with --pipeline: image width (default: the pipeline's)")
    p.add_argument("--num-frames", type=int, help="with --pipeline: frames of a video pipeline")
    p.add_argument("--pipeline-arg", action="append", default=[], metavar="NAME=VALUE",
                   help="with --pipeline: any other argument of the pipeline call, as a Python literal; repeatable")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                   help="with --pipeline: load it in this dtype (default: as saved)")
    p.add_argument("--cpu-offload", action="store_true",
                   help="with --pipeline: diffusers' model CPU offload (pipe.enable_model_cpu_offload()): each "
                        "component on the GPU only while it runs, for a GPU that holds the transformer but not "
                        "every component at once")
    p.add_argument("--transformer", type=transformer_file_argument, metavar="FILE",
                   help="with --pipeline: its transformer from this file instead of the folder's, with the folder's "
                        "config: a GGUF file (e.g. flux1-dev-Q4_0.gguf, quantized as saved, computing in --dtype) or "
                        "a .safetensors file")
    p.add_argument("--lora", action="append", default=[], type=lora_argument, metavar="PATH[:SCALE]",
                   help="with --pipeline: a LoRA (a file or folder in diffusers' format) loaded into it, unfused, "
                        "weighted SCALE (default 1): the fit is the styled model's; repeatable")
    p.add_argument("--device", help="with --pipeline: where it runs (default: accelerate's device, a GPU if any)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="teacache.json",
                   help="JSON file (default: teacache.json here; to ship the testbed's, copy it over "
                        "src/ddit/testbed/assets/teacache.json)")
    p.set_defaults(func=_calibrate_teacache)

    p = commands.add_parser("generate", help="sample a grid of images of one testbed prompt")
    p.add_argument("--prompt", required=True, help="a testbed class name, e.g. moon")
    p.add_argument("--num", type=int, default=16)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance", type=float, default=2.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", help="folder of a base model (default: the shipped one)")
    p.add_argument("--out", default="grid.png", help="PNG to write")
    p.set_defaults(func=_generate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except KeyboardInterrupt:
        print("ddit: interrupted (a training run resumes from its last checkpoint with --resume)", file=sys.stderr)
        return 130
    except (ValueError, RuntimeError, FileNotFoundError) as err:
        print(f"ddit: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
