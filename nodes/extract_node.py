"""Extract Domain LoRA node: a full-copy domain's difference from its base as a LoRA file in
models/loras (the math: lora_hooks/extract.py; the file: nodes/training/files.py's rules for what
Train Domain UNet writes). tools/extract_domain_lora.py runs the same from the command line."""
from __future__ import annotations

import json
import logging
import os
import time

import torch

import comfy.model_management
import comfy.utils
from comfy_api.latest import io

from ..lora_hooks.extract import Extraction, extract_lora
from ..training import save_model_file
from ..training.checkpoint import fingerprint
from .domain_files import DomainModelError, apply_lora, check_compatible, describe
from .host_schema import CATEGORY, advanced, schema
from .training.files import FILE_FORMAT, output_paths, pack_version

log = logging.getLogger(__name__)

SAVE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def check_models(base, domain) -> None:
    """DomainModelError naming the input unless `domain` is a full copy of `base`'s architecture and
    both are as loaded (no LoRA patches: the difference of their stored weights is what is extracted)."""
    if getattr(domain, "patches", None):
        raise DomainModelError("domain_model is a LoRA of a base (a copy of it with weight patches), not a full copy: "
                               "it is a LoRA already; connect a full-copy domain (Load Domain UNet of a file in "
                               "models/diffusion_models, or Load Diffusion Model)")
    if getattr(base, "patches", None):
        raise DomainModelError("base_model carries weight patches (a LoRA applied to it): connect the base as its "
                               "loader gives it; the LoRA is the difference of the two models' stored weights")
    if domain.model is base.model:
        raise DomainModelError("domain_model is base_model itself: connect the full-copy domain trained from it")
    check_compatible(domain, base, what="domain_model")


def lora_path(save_name: str) -> str:
    """models/loras/<save_name>.safetensors, by Train Domain UNet's rules (files.output_paths: inside
    the folder, not another file's name, not a file the pack did not write), and not the LoRA of a
    training run (one with its resumable state beside it)."""
    path, state = output_paths(save_name, "lora")
    if os.path.exists(state):
        raise ValueError(f"save name {save_name!r} is the LoRA of a training run ({os.path.basename(state)} is beside "
                         f"it, and the run resumes from it): choose another save_name")
    return path


def report(path: str, rank: int, result: Extraction) -> str:
    """The error as text: the whole difference, the worst layers, what was left out, then every layer."""
    worst = sorted(result.layer_errors.items(), key=lambda kv: -kv[1])
    lines = [f"{os.path.basename(path)}: rank {rank}, {len(result.layer_errors)} layers, relative error "
             f"{result.total_error:.4g} (||difference - LoRA|| / ||difference||, Frobenius, over every weight that differs)"]
    lines += [f"worst layer: {k} {e:.4g} (rank {result.ranks[k]})" for k, e in worst[:5]]
    if result.left_out:
        share = sum(v * v for v in result.left_out.values()) ** 0.5
        lines.append(f"left out (biases_and_norms off): {len(result.left_out)} tensors that differ (biases, norms ...), "
                     f"{share:.4g} of the difference")
    lines.append("per layer (relative error, rank):")
    lines += [f"  {k} {e:.4g} {result.ranks[k]}" for k, e in sorted(result.layer_errors.items())]
    return "\n".join(lines)


def extract_to_file(base, domain, rank: int, save_name: str, save_dtype: str = "fp16", biases_and_norms: bool = False,
                    domain_name: str = "") -> tuple[str, Extraction, str]:
    """Write domain - base as a LoRA at `rank` to models/loras/<save_name>.safetensors, atomically; every
    input is checked before anything is computed or written. Returns (path, the extraction, its report)."""
    if not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank {rank!r} must be 1 or more (the LoRA's rank per layer)")
    if save_dtype not in SAVE_DTYPES:
        raise ValueError(f"save_dtype {save_dtype!r} is not one of {list(SAVE_DTYPES)}")
    path = lora_path(save_name)
    check_models(base, domain)
    base_sd = base.model.diffusion_model.state_dict()
    domain_sd = domain.model.diffusion_model.state_dict()
    if any(t.is_floating_point() and t.dtype.itemsize == 1 for t in domain_sd.values()) and \
            not any(t.is_floating_point() and t.dtype.itemsize == 1 for t in base_sd.values()):
        log.warning("domain_model holds 8-bit (fp8) weights, the base does not: the difference includes their "
                    "rounding (load the domain at weight_dtype default to extract what was trained)")
    bar = comfy.utils.ProgressBar(len(base_sd))

    def step(done: int, total: int) -> None:
        comfy.model_management.throw_exception_if_processing_interrupted()
        bar.update_absolute(done, total)

    try:
        result = extract_lora(base_sd, domain_sd, rank, dtype=SAVE_DTYPES[save_dtype], others=biases_and_norms,
                              device=comfy.model_management.get_torch_device(), progress=step)
    except ValueError as e:
        raise DomainModelError(f"domain_model: {e}") from e
    metadata = {
        "indomain.format": FILE_FORMAT,
        "indomain.pack_version": pack_version(),
        "indomain.mode": "lora",
        "indomain.architecture": describe(base),
        "indomain.prediction_type": base.model.model_type.name,
        "indomain.base_fingerprint": fingerprint(base.model.diffusion_model),
        "indomain.lora": json.dumps({"rank": rank, "alpha": "each layer's rank (scale 1)"}),
        "indomain.extracted_from": domain_name,
        "indomain.extraction.relative_error": repr(result.total_error),
        "indomain.extraction.layer_errors": json.dumps(result.layer_errors),
        "indomain.extraction.left_out": json.dumps(result.left_out),
        "indomain.extraction.dtype": save_dtype,
        "indomain.extraction.biases_and_norms": str(bool(biases_and_norms)).lower(),
        "indomain.date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    save_model_file(path, result.tensors, metadata)
    text = report(path, rank, result)
    log.info("Extract Domain LoRA: %s", text.split("\nper layer")[0])  # the summary; each layer at debug level
    for layer, error in sorted(result.layer_errors.items()):
        log.debug("  %s relative error %.4g (rank %d)", layer, error, result.ranks[layer])
    return path, result, text


class DomainLoRAExtractor(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return schema(
            node_id="InDomainExtractLoRA",
            search_aliases=["extract lora", "domain lora", "in-domain", "domain guidance", "svd", "lora from full copy"],
            display_name="Extract Domain LoRA",
            category=CATEGORY,
            description="Turns a full-copy domain into a LoRA of its base: the difference of their weights, each Linear "
                        "and Conv layer's at the chosen rank (truncated SVD). Writes models/loras/<save_name>.safetensors, "
                        "which Load Domain UNet and the host's Load LoRA apply, and reports how far it is from the full copy.",
            is_output_node=True,
            inputs=[
                io.Model.Input("base_model", tooltip="The base MODEL the domain was trained from (e.g. Load Checkpoint's), without LoRAs."),
                io.Model.Input("domain_model", tooltip="The full-copy domain (Load Domain UNet of a file in models/diffusion_models, "
                                                       "at weight_dtype default, or Load Diffusion Model)."),
                io.Int.Input("rank", default=64, min=1, max=4096,
                             tooltip="The LoRA's rank per layer: higher is closer to the full copy and a larger file. A layer "
                                     "whose smaller side is at most this is stored exactly."),
                io.String.Input("save_name", default="my_domain_lora",
                                tooltip="File name in models/loras (subfolders allowed, no '..'). An earlier extraction of "
                                        "that name is replaced; any other file of that name is kept and the node stops."),
                io.Combo.Input("save_dtype", options=list(SAVE_DTYPES), default="fp16",
                               tooltip="The dtype of the file's tensors: fp16 (usual for LoRAs), bf16, or fp32 (twice the size).",
                               **advanced()),
                io.Boolean.Input("biases_and_norms", default=False,
                                 tooltip="Also store the differences of biases and norm weights whole (a LoRA has no low-rank "
                                         "form for them): closer to the full copy, but the domain then runs as a weight hook "
                                         "on the base rather than as LoRA adapters (slower, more memory). Off: left out, and "
                                         "counted in the reported error.", **advanced()),
            ],
            outputs=[
                io.Model.Output(display_name="domain_model",
                                tooltip="The base with the extracted LoRA applied: the same domain Load Domain UNet gives for the file."),
                io.Float.Output(display_name="relative_error",
                                tooltip="||difference - LoRA|| / ||difference|| (Frobenius) over every weight that differs: 0 is the full copy."),
                io.String.Output(display_name="report", tooltip="The file, the error, the worst layers and each layer's relative error."),
            ],
        )

    @classmethod
    def execute(cls, base_model, domain_model, rank, save_name, save_dtype="fp16", biases_and_norms=False) -> io.NodeOutput:
        path, result, text = extract_to_file(base_model, domain_model, rank, save_name, save_dtype, biases_and_norms)
        return io.NodeOutput(apply_lora(base_model, result.tensors, os.path.basename(path)), result.total_error, text)
