"""The command-line options of the headless tools (train_domain.py, extract_domain_lora.py): help
lines with their defaults, numbers with the node inputs' ranges, refused outside them."""
from __future__ import annotations

import argparse


def span(lo, hi) -> str:
    return f"{lo} to {hi}" if isinstance(lo, int) else f"{lo:g} to {hi:g}"


class Help(argparse.ArgumentDefaultsHelpFormatter):
    """Each option's default after its help line, where it has one (not for flags and names)."""

    def _get_help_string(self, action):
        return action.help if action.default is None or action.default is False or action.required else super()._get_help_string(action)


def within(kind, lo, hi):
    """An argparse type: a number of `kind` from lo to hi (the node's input range), refused with the
    range otherwise; `lo` and `hi` stay on it for the help line and the test that compares them."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"{text} is outside {span(lo, hi)}")
        return value
    parse.lo, parse.hi = lo, hi
    return parse


def number(group, flag: str, kind, lo, hi, default, help: str) -> None:
    """A numeric option whose help line ends with its range (the default follows, from the formatter)."""
    group.add_argument(flag, type=within(kind, lo, hi), default=default, metavar=kind.__name__.upper(),
                       help=f"{help} ({span(lo, hi)})")


def train_parser() -> argparse.ArgumentParser:
    """tools/train_domain.py's options, each with a help line, its default and (numbers) its range:
    the node's input of the same name, as its tooltip states it (a test compares them). Choices are
    written out: they are parsed before the pack is importable (a test checks them against
    training.config)."""
    p = argparse.ArgumentParser(description="Headless training: Train Domain UNet from the command line, with the "
                                            "host's own loaders.", formatter_class=Help)
    src = p.add_argument_group("models (a checkpoint, or --unet with --vae and --clip)")
    src.add_argument("--checkpoint", help="base checkpoint (name in models/checkpoints, or a path)")
    src.add_argument("--unet", help="base diffusion model (name in models/diffusion_models, or a path)")
    src.add_argument("--vae", help="VAE (name in models/vae, or a path); overrides the checkpoint's")
    src.add_argument("--clip", help="text encoder for the empty prompt (name in models/text_encoders, or a path)")
    src.add_argument("--clip-type", default="stable_diffusion", help="the host's CLIPLoader type (stable_diffusion, sdxl needs two files...)")
    p.add_argument("--images", required=True, help="folder of domain images (png, jpg, webp, bmp)")
    p.add_argument("--save-name", required=True, help="file name in models/loras (lora) or models/diffusion_models (full); the same name resumes")
    recipe_options(p.add_argument_group("the training recipe"))
    output_options(p.add_argument_group("checkpoints, previews and logs"))
    validation_options(p.add_argument_group("validation"))
    speed_options(p.add_argument_group("speed and memory"))
    host = p.add_argument_group("the host")
    host_options(host, "train on the CPU", "models/, input/ live there")
    host.add_argument("--lowvram", action="store_true", help="the host's low-VRAM mode (the UNet loaded in parts, unloaded for the VAE)")
    return p


def recipe_options(recipe) -> None:
    recipe.add_argument("--mode", choices=["lora", "full"], default="lora",
                        help="lora: small adapters on the base (little memory, small files); full: the paper's text-free "
                             "copy of the whole UNet (the most memory)")
    number(recipe, "--steps", int, 1, 1_000_000, 1000, "total optimizer steps (a resumed run continues up to this)")
    number(recipe, "--batch-size", int, 1, 256, 4, "images per optimizer step: the global batch (over every GPU and micro-batch)")
    number(recipe, "--gradient-accumulation", int, 1, 256, 1,
           "compute each step in this many micro-batches of batch-size / K images (their gradients added up): a batch "
           "larger than fits, the same training; may change on resume")
    number(recipe, "--learning-rate", float, 1e-7, 1.0, 1e-4, "peak learning rate (AdamW): about 1e-4 for lora, 1e-5 to 2e-5 for full")
    recipe.add_argument("--lr-schedule", choices=["constant", "cosine"], default="constant",
                        help="after warm-up: keep the learning rate, or decay it to 0 along a cosine")
    number(recipe, "--warmup-steps", int, 0, 100_000, 0, "steps of linear warm-up to the learning rate")
    number(recipe, "--seed", int, 0, 2**63 - 1, 0, "seed of all training randomness: the same seed gives the same weights")
    number(recipe, "--resolution", int, 64, 4096, 512,
           "training area: buckets of about resolution x resolution pixels (512 for SD1, 768 for SD2, 1024 for SDXL)")
    recipe.add_argument("--no-flip", action="store_true", help="turn off horizontal-flip augmentation (text, logos, asymmetric subjects)")
    recipe.add_argument("--training-dtype", choices=["bf16", "fp16", "fp32"], default="bf16",
                        help="autocast precision: bf16 on recent GPUs, fp16 with loss scaling, fp32 full precision (slow)")
    recipe.add_argument("--no-gradient-checkpointing", action="store_true",
                        help="keep activations for backward instead of recomputing them: faster steps, much more memory")
    number(recipe, "--ema-decay", float, 0.0, 0.99999, 0.0,
           "exponential moving average of the weights (e.g. 0.999), used for the file; 0: off")
    number(recipe, "--lora-rank", int, 1, 1024, 16, "LoRA rank (--mode lora)")
    number(recipe, "--lora-alpha", float, 0.01, 4096.0, 16.0, "LoRA alpha: the update is scaled by alpha / rank (--mode lora)")


def output_options(out) -> None:
    number(out, "--checkpoint-every", int, 0, 1_000_000, 250, "save the model file and the resumable state every N steps; 0: only at the end")
    number(out, "--preview-every", int, 0, 1_000_000, 0, "save a preview sample to output/indomain_previews every N steps; 0: off")
    out.add_argument("--restart", action="store_true", help="start over instead of resuming save-name's checkpoint")
    number(out, "--log-every", int, 1, 1_000_000, 10, "log progress every N steps")
    out.add_argument("--tensorboard", action="store_true",
                     help="write TensorBoard logs to output/indomain_logs/<save-name>/ (pip install tensorboard)")


def validation_options(val) -> None:
    number(val, "--validation-share", float, 0.0, 0.5, 0.0,
           "hold this share of the images out of training and log their loss (fixed noise and timesteps) at the start, "
           "every checkpoint and the end; 0: off")
    val.add_argument("--validation-prompts", metavar="FILE",
                     help="a text file of prompts, one per line, sampled at every checkpoint with the domain being "
                          "trained (as Load Domain UNet + KSampler (Domain Guidance) sample it): one grid per checkpoint "
                          "in output/indomain_previews/<save-name>/validation_step_N.png")
    val.add_argument("--validation-domain-scales", default="0, 1, 2",
                     help="the domain_scale of each column of the validation grid, separated by commas (0: the base alone)")
    number(val, "--validation-seed", int, 0, 0xffffffffffffffff, 0, "the seed of every validation sample")
    number(val, "--validation-steps", int, 1, 200, 20, "sampling steps of each validation sample")
    number(val, "--validation-cfg", float, 0.0, 100.0, 0.0,
           "cfg of the validation samples; 0: the model family's usual (7 for SD1.x/SDXL, 1 for Flux.1 dev ...)")


def speed_options(speed) -> None:
    speed.add_argument("--compile", action="store_true", help="torch.compile the trained UNet (slow first step, then faster)")
    speed.add_argument("--cuda-graphs", action="store_true",
                       help="full mode too: replay each step's forward and backward as a CUDA graph (LoRA mode does so "
                            "wherever it can: one GPU, bf16/fp32, no --compile, no accumulation; INDOMAIN_TRAIN_GRAPHS=0 "
                            "turns that off); else trains without and says why")
    speed.add_argument("--optimizer", choices=["adamw", "adamw8bit"], default="adamw",
                       help="adamw8bit: bitsandbytes' 8-bit AdamW, the paper's recipe (2 bytes of state per trained "
                            "parameter instead of 8; pip install bitsandbytes)")
    speed.add_argument("--shard-optimizer", action="store_true",
                       help="under torchrun: each GPU keeps 1/N of AdamW's state (ZeroRedundancyOptimizer; full mode on large models)")
    speed.add_argument("--fsdp", action="store_true",
                       help="full mode: shard the weights, gradients and AdamW states over the GPUs (FSDP2), each GPU "
                            "holding 1/N; its checkpoint is a folder of parts that resumes on any number of GPUs")
    speed.add_argument("--cpu-offload", action="store_true",
                       help="with --fsdp: keep the shards, gradients and AdamW states in CPU memory (a large model's full "
                            "copy on one GPU; slower)")


def host_options(p, cpu_help: str, folders_help: str) -> None:
    """The options start_host reads (--lowvram defaults to off where a tool does not offer it)."""
    p.add_argument("--comfyui", help="the ComfyUI folder (default: COMFYUI_PATH, else two folders above this pack)")
    p.add_argument("--base-directory", help=f"ComfyUI's --base-directory ({folders_help})")
    p.add_argument("--extra-model-paths", help="an extra_model_paths.yaml to read")
    p.add_argument("--cpu", action="store_true", help=cpu_help)
    p.set_defaults(lowvram=False)
