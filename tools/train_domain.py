"""Headless training: Train Domain UNet from the command line, with the host's own loaders.

Runs the same code as the node (nodes/training/run.py -> training/) without the UI, for servers:

    $COMFYUI_PATH/.venv/bin/python custom_nodes/comfyui-indomain/tools/train_domain.py \\
        --checkpoint v1-5-pruned-emaonly.safetensors --images /data/porcelain \\
        --mode full --steps 2000 --batch-size 8 --learning-rate 1e-5 --save-name porcelain

Model names are looked up in ComfyUI's model folders (checkpoints, diffusion_models, vae,
text_encoders) like the loader nodes do; a path to a file works too. Only safetensors are read.
The result is written to models/loras/<save-name>.safetensors (--mode lora) or
models/diffusion_models/<save-name>.safetensors (--mode full); running the same command
again resumes from its checkpoint; Ctrl-C stops after keeping the last complete checkpoint.
--validation-prompts FILE (one prompt per line) samples them with the domain at every checkpoint,
as the node's validation_prompts do (a grid per checkpoint in output/indomain_previews/).

On several GPUs, the same command under torchrun (one process per GPU, DistributedDataParallel):

    torchrun --nproc-per-node 2 custom_nodes/comfyui-indomain/tools/train_domain.py ... (the same options)

--batch-size is the global batch (each GPU takes batch-size / N images per step), so the learning
rate and step count mean what they mean on one GPU; with --gradient-accumulation K each step is
computed in K micro-batches (GPUs x micro-batch x K = batch-size), the same global batch at every
GPU count; --shard-optimizer keeps 1/N of AdamW's state
per GPU (ZeroRedundancyOptimizer, for full mode on large models). Rank 0 writes the files and the
progress; a run resumes on another number of GPUs that divides the batch size.

--fsdp (full mode) shards the weights, gradients and AdamW states over the GPUs (FSDP2: training/
sharded.py), for the models whose full copy does not fit one GPU (SDXL, Flux, SD3.5, Z-Image);
--cpu-offload keeps them in CPU memory, so one GPU can train them too (without torchrun, or under
torchrun --nproc-per-node 1). Its checkpoint is a folder of parts beside the state file, one per
GPU, that resumes on any number of GPUs; the model file is gathered at each checkpoint.

On several machines, torchrun's c10d rendezvous on each (the same command, one per machine):

    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST0:29500 \\
        --rdzv-id porcelain custom_nodes/comfyui-indomain/tools/train_domain.py ... --fsdp

The models folder (--base-directory), the images and the outputs must be on a filesystem every
machine mounts at the same path: the ranks read each other's latent cache files and checkpoint
parts, and global rank 0 (on whichever machine the rendezvous puts it) writes the files.
"""
from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import signal
import sys
import time

PACK = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
log = logging.getLogger("indomain.train")


def find_comfyui(explicit: str | None) -> str:
    for candidate in (explicit, os.environ.get("COMFYUI_PATH"), os.path.dirname(os.path.dirname(PACK))):
        if candidate and os.path.isfile(os.path.join(candidate, "comfy", "samplers.py")):
            return os.path.abspath(candidate)
    sys.exit("No ComfyUI found: pass --comfyui PATH, set COMFYUI_PATH, or run from ComfyUI/custom_nodes/<pack>/tools")


def parse_args(argv=None) -> argparse.Namespace:
    return parser().parse_args(argv)


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
    parse.lo, parse.hi, parse.__name__ = lo, hi, kind.__name__
    return parse


def number(group, flag: str, kind, lo, hi, default, help: str) -> None:
    """A numeric option whose help line ends with its range (the default follows, from the formatter)."""
    group.add_argument(flag, type=within(kind, lo, hi), default=default, metavar=kind.__name__.upper(),
                       help=f"{help} ({span(lo, hi)})")


def parser() -> argparse.ArgumentParser:
    """The options, each with a help line, its default and (numbers) its range: the node's input of
    the same name, as its tooltip states it (a test compares them). Choices are written out: they are
    parsed before the pack is importable (a test checks them against training.config)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=Help)
    src = p.add_argument_group("models (a checkpoint, or --unet with --vae and --clip)")
    src.add_argument("--checkpoint", help="base checkpoint (name in models/checkpoints, or a path)")
    src.add_argument("--unet", help="base diffusion model (name in models/diffusion_models, or a path)")
    src.add_argument("--vae", help="VAE (name in models/vae, or a path); overrides the checkpoint's")
    src.add_argument("--clip", help="text encoder for the empty prompt (name in models/text_encoders, or a path)")
    src.add_argument("--clip-type", default="stable_diffusion", help="the host's CLIPLoader type (stable_diffusion, sdxl needs two files...)")
    p.add_argument("--images", required=True, help="folder of domain images (png, jpg, webp, bmp)")
    p.add_argument("--save-name", required=True, help="file name in models/loras (lora) or models/diffusion_models (full); the same name resumes")
    recipe = p.add_argument_group("the training recipe")
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
    out = p.add_argument_group("checkpoints, previews and logs")
    number(out, "--checkpoint-every", int, 0, 1_000_000, 250, "save the model file and the resumable state every N steps; 0: only at the end")
    number(out, "--preview-every", int, 0, 1_000_000, 0, "save a preview sample to output/indomain_previews every N steps; 0: off")
    out.add_argument("--restart", action="store_true", help="start over instead of resuming save-name's checkpoint")
    number(out, "--log-every", int, 1, 1_000_000, 10, "log progress every N steps")
    out.add_argument("--tensorboard", action="store_true",
                     help="write TensorBoard logs to output/indomain_logs/<save-name>/ (pip install tensorboard)")
    val = p.add_argument_group("validation")
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
    speed = p.add_argument_group("speed and memory")
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
    host = p.add_argument_group("the host")
    host_options(host, "train on the CPU", "models/, input/ live there")
    host.add_argument("--lowvram", action="store_true", help="the host's low-VRAM mode (the UNet loaded in parts, unloaded for the VAE)")
    return p


def host_options(p, cpu_help: str, folders_help: str) -> None:
    """The options start_host reads (--lowvram defaults to off where a tool does not offer it)."""
    p.add_argument("--comfyui", help="the ComfyUI folder (default: COMFYUI_PATH, else two folders above this pack)")
    p.add_argument("--base-directory", help=f"ComfyUI's --base-directory ({folders_help})")
    p.add_argument("--extra-model-paths", help="an extra_model_paths.yaml to read")
    p.add_argument("--cpu", action="store_true", help=cpu_help)
    p.set_defaults(lowvram=False)


def start_distributed(args):
    """Under torchrun (WORLD_SIZE > 1): this process's GPU (before the host picks its device: the
    host uses the current CUDA device) and the process group (NCCL on GPUs, gloo with --cpu).
    Returns training.distributed.Ranks-like (rank, world), (0, 1) without torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 and not args.fsdp:
        return 0, 1
    import datetime

    import torch

    if world <= 1 and "MASTER_ADDR" not in os.environ:  # --fsdp in one process without torchrun: a group of one
        torch.distributed.init_process_group("nccl" if not args.cpu and torch.cuda.is_available() else "gloo",
                                             store=torch.distributed.HashStore(), rank=0, world_size=1)
        return 0, 1

    local = int(os.environ.get("LOCAL_RANK", "0"))
    gpu = not args.cpu and torch.cuda.is_available()
    if gpu:
        torch.cuda.set_device(local)
    torch.distributed.init_process_group("nccl" if gpu else "gloo", timeout=datetime.timedelta(minutes=30),
                                         **({"device_id": torch.device("cuda", local)} if gpu else {}))
    return torch.distributed.get_rank(), world  # the global rank (of every machine's processes): rank 0 writes


def stop_on_signals() -> None:
    """Under torchrun a Ctrl-C (SIGINT) or the launcher's SIGTERM must stop every rank at the same
    step: the signal sets the host's interrupt flag, which the training loop checks twice a step and
    agrees on with the other ranks. A second signal stops at once."""
    import threading

    import comfy.model_management as mm

    received = []

    def handler(signum, frame):
        received.append(signum)
        if len(received) > 1:
            raise KeyboardInterrupt
        # from a thread: the host's flag has a lock the interrupted main thread may be holding
        threading.Thread(target=mm.interrupt_current_processing, args=(True,), daemon=True).start()

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)


def kept_note(state_path: str) -> str:
    """What a stopped run keeps: the state file's step, or that none was written yet."""
    if not os.path.exists(state_path):
        return "No checkpoint had been written yet."
    try:
        from comfyui_indomain.training import read_state_header

        return f"The last complete checkpoint {state_path} (step {read_state_header(state_path).step}) is kept."
    except ValueError:
        return f"The checkpoint {state_path} is kept."


def start_host(args):
    """Import ComfyUI as its main.py would (folders, device), and this pack as a package."""
    sys.path.insert(0, find_comfyui(args.comfyui))
    from comfy.cli_args import args as host_args

    host_args.cpu = args.cpu
    host_args.lowvram = args.lowvram
    if args.base_directory:
        host_args.base_directory = os.path.abspath(args.base_directory)
    import folder_paths  # noqa: F401  (reads base_directory: the model folders)

    if args.extra_model_paths:
        from utils.extra_config import load_extra_path_config
        load_extra_path_config(args.extra_model_paths)
    spec = importlib.util.spec_from_file_location("comfyui_indomain", os.path.join(PACK, "__init__.py"),
                                                  submodule_search_locations=[PACK])
    pack = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = pack
    spec.loader.exec_module(pack)
    return importlib.import_module("comfyui_indomain.nodes.training.run")


def model_file(folder: str, name: str, what: str) -> str:
    import folder_paths

    path = name if os.path.isfile(name) else folder_paths.get_full_path(folder, name)
    if path is None:
        sys.exit(f"--{what} {name!r}: no such file, and not in the {folder} model folders {folder_paths.get_folder_paths(folder)}")
    if not path.lower().endswith((".safetensors", ".sft")):
        sys.exit(f"--{what} {name!r}: only .safetensors files are read (pickled files can run code when opened)")
    return path


def load_models(args):
    """MODEL, VAE and CLIP through the host's own loaders (as Load Checkpoint / Load Diffusion Model /
    Load VAE / Load CLIP do)."""
    import comfy.sd
    import comfy.utils
    import folder_paths

    model = vae = clip = None
    if args.checkpoint:
        model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(
            model_file("checkpoints", args.checkpoint, "checkpoint"), output_vae=True, output_clip=True,
            embedding_directory=folder_paths.get_folder_paths("embeddings"))
    if args.unet:
        model = comfy.sd.load_diffusion_model(model_file("diffusion_models", args.unet, "unet"))
    if args.vae:
        vae = comfy.sd.VAE(sd=comfy.utils.load_torch_file(model_file("vae", args.vae, "vae")))
    if args.clip:
        clip_type = getattr(comfy.sd.CLIPType, args.clip_type.upper())
        clip = comfy.sd.load_clip([model_file("text_encoders", args.clip, "clip")], clip_type=clip_type,
                                  embedding_directory=folder_paths.get_folder_paths("embeddings"))
    missing = [n for n, v in (("a model (--checkpoint or --unet)", model), ("a VAE (--vae)", vae), ("a text encoder (--clip)", clip)) if v is None]
    if missing:
        sys.exit("missing " + ", ".join(missing))
    return model, vae, clip


def pickled_file(args, options) -> str | None:
    """What is wrong with the first of `options` (argument names) that names a model file other than
    safetensors, or None: a file is only read as safetensors (a pickled one can run code when opened)."""
    for what in options:
        name = getattr(args, what)
        if name and not name.lower().endswith((".safetensors", ".sft")):
            return f"--{what} {name!r}: only .safetensors files are read (pickled files can run code when opened)"
    return None


def refuse_pickles(args) -> None:
    """Before anything loads: every model file named must be safetensors."""
    if (wrong := pickled_file(args, ("checkpoint", "unet", "vae", "clip"))) is not None:
        sys.exit(wrong)


def main(argv=None) -> int:
    args = parse_args(argv)
    refuse_pickles(args)
    rank, world = start_distributed(args)
    where = f" [rank {rank}/{world}]" if world > 1 else ""
    # rank 0 reports; the other ranks only their own failures (training.distributed.report_stop)
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, format=f"%(asctime)s %(levelname)s{where} %(message)s")
    code = train(args, rank, world)
    if world > 1:  # the process group is left to the OS: its teardown can abort a finished rank
        from comfyui_indomain.training.distributed import leave

        leave(code)
    return code


def train(args, rank: int, world: int) -> int:
    training_node = start_host(args)
    import comfy.model_management as mm
    from comfyui_indomain.nodes.training.files import output_paths
    from comfyui_indomain.nodes.training.samples import validation_settings
    from comfyui_indomain.training import TrainConfig
    from comfyui_indomain.training.distributed import ranks, report_stop

    if world > 1:
        stop_on_signals()
    if args.tensorboard:  # before the models load
        from comfyui_indomain.nodes.training.logs import require_tensorboard
        try:
            require_tensorboard()
        except ImportError as e:
            return report_stop(ranks(), e, log)

    model, vae, clip = load_models(args)
    config = TrainConfig(
        steps=args.steps, mode=args.mode, lora_rank=args.lora_rank, lora_alpha=args.lora_alpha, lr=args.learning_rate,
        lr_schedule=args.lr_schedule, warmup_steps=args.warmup_steps, batch_size=args.batch_size,
        resolution=args.resolution, flip=not args.no_flip, seed=args.seed, precision=args.training_dtype,
        ema_decay=args.ema_decay, checkpoint_every=args.checkpoint_every, preview_every=args.preview_every,
        gradient_checkpointing=() if args.no_gradient_checkpointing else ("all",), compile=args.compile,
        shard_optimizer=args.shard_optimizer, optimizer=args.optimizer, gradient_accumulation=args.gradient_accumulation,
        validation_share=args.validation_share, fsdp=args.fsdp, cpu_offload=args.cpu_offload,
    )
    last_cache_log = [0.0]

    def log_progress(p) -> None:  # rank 0 only: the loop reports progress there
        if p.stage == "train" and (p.step % args.log_every == 0 or p.step == p.total):
            log.info("step %d/%d  loss %.4f  %.1f img/s  ETA %.0f s", p.step, p.total, p.loss, p.images_per_s, p.eta_s)
        elif p.stage == "validation":
            log.info("validation loss %.4f at step %d", p.loss, p.step)
        elif p.stage == "cache" and (time.monotonic() - last_cache_log[0] >= 10 or p.step == p.total):
            last_cache_log[0] = time.monotonic()
            log.info("latents %d/%d  %.1f img/s  ETA %.0f s", p.step, p.total, p.images_per_s, p.eta_s)

    try:
        validation = validation_settings(read_prompts(args.validation_prompts), args.validation_domain_scales,
                                         args.validation_seed, args.validation_steps, args.validation_cfg)
        done = training_node.run_training(
            model=model, vae=vae, clip=clip, image_folder=os.path.abspath(args.images), config=config,
            save_name=args.save_name, resume=not args.restart, on_progress=log_progress, image_folder_anywhere=True,
            cuda_graphs=args.cuda_graphs, tensorboard=args.tensorboard, validation=validation)
        losses, start, path = done.losses, done.start, done.model_path
    except (KeyboardInterrupt, ValueError, RuntimeError, ImportError, mm.InterruptProcessingException) as e:
        if isinstance(e, mm.InterruptProcessingException):
            e = KeyboardInterrupt()
        try:
            kept = kept_note(output_paths(args.save_name, args.mode)[1])
        except ValueError:  # a bad save name: nothing was kept
            kept = ""
        return report_stop(ranks(), e, log, kept)
    if rank == 0:
        log.info("wrote %s (steps %d..%d)", path, start + 1, start + len(losses))
    return 0


def read_prompts(path: str | None) -> str:
    """The validation prompts file's text ("" without one); ValueError naming the option if unreadable."""
    if not path:
        return ""
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError as e:
        raise ValueError(f"--validation-prompts: cannot read {path!r} ({e})") from e


if __name__ == "__main__":
    sys.exit(main())
