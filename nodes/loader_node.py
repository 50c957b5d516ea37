"""Load Domain UNet node: declarations; the file logic is domain_files."""
from __future__ import annotations

import os

import folder_paths
from comfy_api.latest import io

from .domain_files import WEIGHT_DTYPES, load_domain_unet, weight_dtype_options
from .folders import FOLDER
from .host_schema import CATEGORY, advanced, schema


class DomainUNetLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return schema(
            node_id="InDomainUNetLoader",
            search_aliases=["domain unet", "domain lora", "in-domain", "text-free", "domain guidance"],
            display_name="Load Domain UNet",
            category=CATEGORY,
            description="Loads a text-free domain UNet: a LoRA of the base (models/loras, applied to a copy of base_model) "
                        "or a full UNet state dict (models/diffusion_models; files of older versions: models/domain_unets). "
                        "With base_model connected, checks that the domain UNet has the base's architecture and latent format.",
            inputs=[
                io.Combo.Input("unet_name", options=folder_paths.get_filename_list(FOLDER),
                               tooltip="A .safetensors file: models/domain_unets, then models/loras (where Train Domain UNet writes a LoRA), "
                                       "then models/diffusion_models (a full copy); extra_model_paths.yaml folders too."),
                io.Model.Input("base_model", optional=True,
                               tooltip="The base MODEL. Required for a LoRA file; for a full UNet it enables the compatibility check."),
                io.Float.Input("lora_strength", default=1.0, min=-10.0, max=10.0, step=0.01,
                               tooltip="Strength of a LoRA domain file (ignored for a full UNet)."),
                # last, and optional: a workflow saved before it loads with its widget values in place, at "default"
                io.Combo.Input("weight_dtype", options=list(WEIGHT_DTYPES), default="default", optional=True,
                               tooltip="How a full-copy domain keeps its weights, as Load Diffusion Model does: default (the "
                                       "host's choice for the device), or fp8 (half of fp16's memory, at some loss of "
                                       "precision; _fast also uses fp8 matrix multiplies where the GPU has them). "
                                       "Does not apply to a LoRA domain, which runs on the base's weights (noted in the log).",
                               **advanced()),
            ],
            outputs=[io.Model.Output(display_name="domain_model",
                                           tooltip="The domain UNet, for the domain_model input of KSampler (Domain Guidance), Domain Guider or Domain Term.")],
        )

    @classmethod
    def fingerprint_inputs(cls, unet_name, **kwargs):
        """The file's size and modification time: a file rewritten (e.g. by a training run with the
        same save_name) is loaded again; an unchanged one is the host's cached model."""
        path = folder_paths.get_full_path(FOLDER, unet_name)
        try:
            st = os.stat(path)
        except (OSError, TypeError):  # missing: execute names the error
            return None
        return f"{path}|{st.st_size}|{st.st_mtime_ns}"

    @classmethod
    def execute(cls, unet_name, lora_strength, base_model=None, weight_dtype="default") -> io.NodeOutput:
        path = folder_paths.get_full_path_or_raise(FOLDER, unet_name)
        return io.NodeOutput(load_domain_unet(path, base=base_model, strength=lora_strength,
                                              model_options=weight_dtype_options(weight_dtype)))
