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

try:  # python -m tools.train_domain (from the pack's folder)
    from tools.cli_options import train_parser as parser
except ImportError:  # python tools/train_domain.py
    from cli_options import train_parser as parser

PACK = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
log = logging.getLogger("indomain.train")


def find_comfyui(explicit: str | None) -> str:
    for candidate in (explicit, os.environ.get("COMFYUI_PATH"), os.path.dirname(os.path.dirname(PACK))):
        if candidate and os.path.isfile(os.path.join(candidate, "comfy", "samplers.py")):
            return os.path.abspath(candidate)
    sys.exit("No ComfyUI found: pass --comfyui PATH, set COMFYUI_PATH, or run from ComfyUI/custom_nodes/<pack>/tools")


def parse_args(argv=None) -> argparse.Namespace:
    return parser().parse_args(argv)


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
            save_name=args.save_name, resume=not args.restart, on_progress=log_progress, headless=True,
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
