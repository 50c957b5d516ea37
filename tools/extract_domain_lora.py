"""Extract Domain LoRA from the command line: a full-copy domain's difference from its base as a LoRA.

Runs the same code as the node (nodes/extract_node.py -> lora_hooks/extract.py), with the host's
own loaders. From the pack's folder (ComfyUI/custom_nodes/<pack>):

    $COMFYUI_PATH/.venv/bin/python -m tools.extract_domain_lora \\
        --checkpoint v1-5-pruned-emaonly.safetensors --domain porcelain.safetensors \\
        --rank 64 --save-name porcelain_lora

The base is a checkpoint (--checkpoint) or a diffusion model (--unet), named as in ComfyUI's
checkpoints / diffusion_models folders or as a path; the domain (--domain) is a full-copy domain file
in the folders Load Domain UNet lists (models/diffusion_models, models/domain_unets) or a path. Only
safetensors are read. The LoRA is written to models/loras/<save-name>.safetensors, its error (per
layer, and over the whole difference) logged and kept in the file's metadata.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

try:  # python -m tools.extract_domain_lora (from the pack's folder)
    from tools.cli_options import Help, host_options, number
    from tools.train_domain import model_file, pickled_file, start_host
except ImportError:  # python tools/extract_domain_lora.py
    from cli_options import Help, host_options, number
    from train_domain import model_file, pickled_file, start_host

log = logging.getLogger("indomain.extract")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=Help)
    src = p.add_argument_group("the base (one of)")
    src.add_argument("--checkpoint", help="base checkpoint (name in models/checkpoints, or a path)")
    src.add_argument("--unet", help="base diffusion model (name in models/diffusion_models, or a path)")
    p.add_argument("--domain", required=True, help="the full-copy domain (name in models/diffusion_models or models/domain_unets, or a path)")
    number(p, "--rank", int, 1, 4096, 64, "the LoRA's rank per layer")
    p.add_argument("--save-name", required=True, help="file name in models/loras (subfolders allowed, no '..')")
    p.add_argument("--save-dtype", choices=["fp16", "bf16", "fp32"], default="fp16", help="dtype of the file's tensors")
    p.add_argument("--biases-and-norms", action="store_true",
                   help="also store the differences of biases and norm weights whole (the domain then runs as a weight hook)")
    host_options(p, "compute on the CPU", "models/ lives there")
    p.add_argument("--verbose", action="store_true", help="log each layer's error")
    return p


# The node's input names in its errors, as this tool's options.
OPTION_NAMES = {"domain_model": "--domain", "base_model": "the base", "save_name": "--save-name", "save name": "--save-name"}


def as_options(message: str) -> str:
    for name, option in OPTION_NAMES.items():
        message = message.replace(name, option)
    return message


def check_args(p: argparse.ArgumentParser, args) -> None:
    """Before anything loads (the parser has checked --rank's range): one base, safetensors names only."""
    if bool(args.checkpoint) == bool(args.unet):
        p.error("give the base as one of --checkpoint or --unet")
    if (wrong := pickled_file(args, ("checkpoint", "unet", "domain"))) is not None:
        p.error(wrong)


def main(argv=None) -> int:
    p = parser()
    args = p.parse_args(argv)
    check_args(p, args)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    for name in ("PIL", "filelock", "urllib3"):  # their own debug lines are not this tool's
        logging.getLogger(name).setLevel(logging.WARNING)
    start_host(args)  # ComfyUI's folders and device (args.cpu), this pack as comfyui_indomain
    import comfy.sd
    from comfyui_indomain.nodes.domain_files import DomainModelError, load_domain_unet
    from comfyui_indomain.nodes.extract_node import extract_to_file, lora_path
    from comfyui_indomain.nodes.folders import FOLDER

    try:
        lora_path(args.save_name)  # a bad save name stops before anything loads
        if args.checkpoint:
            base = comfy.sd.load_checkpoint_guess_config(model_file("checkpoints", args.checkpoint, "checkpoint"),
                                                         output_vae=False, output_clip=False)[0]
        else:
            base = comfy.sd.load_diffusion_model(model_file("diffusion_models", args.unet, "unet"))
        domain_path = model_file(FOLDER, args.domain, "domain")
        domain = load_domain_unet(domain_path, base=base)
        path, result, _ = extract_to_file(base, domain, args.rank, args.save_name, args.save_dtype,
                                          args.biases_and_norms, domain_name=os.path.basename(domain_path))
    except (ValueError, DomainModelError) as e:
        log.error("%s", as_options(str(e)))
        return 2
    log.info("wrote %s: relative error %.4g over %d layers", path, result.total_error, len(result.layer_errors))
    return 0


if __name__ == "__main__":
    sys.exit(main())
