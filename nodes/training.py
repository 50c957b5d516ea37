"""Train Domain UNet node: adapts the host's MODEL, VAE, CONDITIONING/CLIP and IMAGE to training.train.

Everything the loop needs comes from the host: the UNet module (weights with the base's LoRAs
merged, loaded by the host's model management), the VAE encode, the latent scaling and the
noise schedule and prediction type of the base's own model_sampling, the empty-prompt
conditioning (with SDXL's size embedding from the base's extra_conds), ProgressBar and the
interrupt. Files go to models/domain_unets (or its first folder from extra_model_paths.yaml):

    <save_name>.safetensors          the domain UNet (full state dict, or a LoRA), rewritten at
                                     every checkpoint, atomically
    <save_name>.indomain-state       the training state (weights, AdamW, EMA, step): resume
    .latent-cache/<sha256>.latent    VAE latents, reused by every run on the same images and VAE

None of these extensions but the first is listed by the host's model pickers.
"""
from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import sys
import time

import torch
from PIL import Image

import comfy.model_management
import comfy.sample
import comfy.utils
import folder_paths
from comfy_api.latest import io

from ..training import TrainConfig, safe_join, save_model_file, train
from .loader import FOLDER, apply_lora, load_full
from .plot import loss_curve_image
from .sampling import CATEGORY

log = logging.getLogger(__name__)

STATE_EXTENSION = ".indomain-state"
CACHE_FOLDER = ".latent-cache"
FILE_FORMAT = "indomain-domain-unet/1"
PRECISIONS = ("bf16", "fp16", "fp32")
PREVIEW_STEPS = 20


# --- host objects -> what training.train takes -----------------------------------------------

def domain_folder() -> str:
    """The folder trained files are written to: the first registered domain_unets folder."""
    folder = folder_paths.get_folder_paths(FOLDER)[0]
    os.makedirs(folder, exist_ok=True)
    return folder


def output_paths(save_name: str) -> tuple[str, str]:
    """(model file, state file) for a save name, inside the domain_unets folder (never outside)."""
    save_name = save_name.strip()
    stem, ext = os.path.splitext(save_name)
    if ext.lower() in (".safetensors", ".sft"):
        save_name = stem
    if not save_name or save_name.endswith(("/", "\\")):
        raise ValueError(f"save name {save_name!r} is empty; give a file name such as 'my_domain'")
    model_path = safe_join(domain_folder(), save_name + ".safetensors")
    return model_path, os.path.splitext(model_path)[0] + STATE_EXTENSION


def fingerprint(module: torch.nn.Module) -> str:
    """A short content hash of a module's weights: every name and shape, and a strided sample of
    every tensor's values (hashing all of an SDXL UNet would take seconds)."""
    h = hashlib.sha256()
    for name, t in module.state_dict().items():
        flat = t.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 256)][:256].float().cpu()
        h.update(f"{name}{list(t.shape)}".encode())
        h.update(sample.numpy().tobytes())
    return h.hexdigest()[:16]


def prediction_type(model) -> str:
    name = model.model.model_type.name
    kinds = {"EPS": "eps", "V_PREDICTION": "v"}
    if name not in kinds:
        raise ValueError(f"model: training supports eps- and v-prediction models (SD1.x, SD2.x, SDXL); this one is {name}")
    return kinds[name]


def alphas_cumprod(model) -> torch.Tensor:
    """The base's training schedule from its own model_sampling: alpha_bar = 1 / (1 + sigma^2)."""
    sigmas = model.get_model_object("model_sampling").sigmas.detach().double().cpu()  # [T]
    return 1.0 / (1.0 + sigmas**2)


def empty_prompt(null_conditioning, clip) -> tuple[torch.Tensor, dict]:
    """The empty prompt's cross-attention [1, tokens, dim] and extras (e.g. pooled_output)."""
    if null_conditioning is None:
        if clip is None:
            raise ValueError("null_conditioning / clip: connect the empty-prompt conditioning, or a CLIP to encode \"\" with")
        null_conditioning = clip.encode_from_tokens_scheduled(clip.tokenize(""))
    if not null_conditioning:
        raise ValueError("null_conditioning is empty; connect CLIP Text Encode of an empty string")
    cross_attn, extras = null_conditioning[0][0], dict(null_conditioning[0][1])
    return cross_attn[:1].clone(), extras


def cond_function(model, cross_attn: torch.Tensor, extras: dict):
    """(height_px, width_px) -> the UNet's keyword inputs for the empty prompt at that size,
    built by the base's own extra_conds (SDXL's size embedding 'y' included)."""
    def cond_for(height: int, width: int) -> dict[str, torch.Tensor]:
        conds = model.model.extra_conds(cross_attn=cross_attn, pooled_output=extras.get("pooled_output"),
                                        width=width, height=height, target_width=width, target_height=height,
                                        device=torch.device("cpu"))
        unknown = sorted(set(conds) - {"c_crossattn", "y"})
        if unknown:
            raise ValueError(f"model: this model needs extra inputs {unknown} (an inpainting or edit model?); "
                             "train from a plain text-to-image base")
        out = {"context": conds["c_crossattn"].cond}
        if "y" in conds:
            out["y"] = conds["y"].cond
        return {k: v.detach().clone().float() for k, v in out.items()}
    return cond_for


def check_vae(vae, model) -> None:
    """The VAE must make the latents the model denoises: same channel count, image (not video) latents."""
    want = model.model.latent_format.latent_channels
    got = getattr(vae, "latent_channels", None)
    if got != want or getattr(vae, "latent_dim", 2) != 2:
        raise ValueError(f"vae: it makes {got}-channel latents, but the model ({type(model.model.model_config).__name__}) "
                         f"denoises {want}-channel image latents; use the VAE of the base checkpoint")


def encode_function(vae, model):
    """IMAGE [1, H, W, 3] -> the model's latents [1, C, h, w] (VAE encode, then the latent scaling)."""
    def encode(pixels: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return model.model.process_latent_in(vae.encode(pixels)).float().clone()
    return encode


@torch.no_grad()
def make_autograd_safe(module: torch.nn.Module) -> int:
    """Replace weights created under the host's inference mode (which autograd refuses to save for
    backward) by ordinary copies with the same values. Returns how many were replaced."""
    replaced = 0
    for owner in module.modules():
        for store in (owner._parameters, owner._buffers):
            for name, t in store.items():
                if t is not None and t.is_inference():
                    copy = t.detach().clone()
                    store[name] = torch.nn.Parameter(copy, requires_grad=t.requires_grad) if isinstance(t, torch.nn.Parameter) else copy
                    replaced += 1
    return replaced


def checkpointed_blocks(unet: torch.nn.Module) -> tuple[str, ...]:
    """The UNet layers whose activations are recomputed in backward: every layer (ResBlock,
    SpatialTransformer, up/downsampling) of every input, middle and output block. The layers, not
    the blocks: the host's UNet calls a block's layers one by one (forward_timestep_embed)."""
    names = []
    for name, child in unet.named_children():
        if name in ("input_blocks", "output_blocks"):
            names += [f"{name}.{i}.{j}" for i, block in enumerate(child) for j in range(len(block))]
        elif name == "middle_block":
            names += [f"{name}.{j}" for j in range(len(child))]
    return tuple(names)


def pack_version() -> str:
    """The pack's version, from pyproject.toml (the one place it is written)."""
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "pyproject.toml")
    try:
        with open(path, encoding="utf-8") as f:
            found = re.search(r'^version\s*=\s*"([^"]+)"', f.read(), re.MULTILINE)
    except OSError:
        found = None
    return found.group(1) if found else "unknown"


def file_metadata(model, config: TrainConfig, step: int, image_count: int, base_fp: str) -> dict[str, str]:
    return {
        "indomain.format": FILE_FORMAT,
        "indomain.pack_version": pack_version(),
        "indomain.mode": config.mode,
        "indomain.architecture": type(model.model.model_config).__name__,
        "indomain.prediction_type": prediction_type(model),
        "indomain.base_fingerprint": base_fp,
        "indomain.steps": str(step),
        "indomain.learning_rate": repr(config.lr),
        "indomain.lr_schedule": config.lr_schedule,
        "indomain.batch_size": str(config.batch_size),
        "indomain.resolution": str(config.resolution),
        "indomain.image_count": str(image_count),
        "indomain.ema_decay": repr(config.ema_decay),
        "indomain.lora": json.dumps({"rank": config.lora_rank, "alpha": config.lora_alpha}) if config.mode == "lora" else "",
        "indomain.date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def deliverable(weights: dict[str, torch.Tensor], config: TrainConfig, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The file's tensors: a full UNet in the base's storage dtype; a LoRA as trained (float32)."""
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        dtype = torch.float16  # e.g. an fp8-stored base: keep the trained weights in 16 bits
    if config.mode == "full":
        return {k: v.to(dtype) if v.is_floating_point() else v for k, v in weights.items()}
    return weights


def preview_function(model, vae, cross_attn, extras, config: TrainConfig, save_name: str, bar):
    """(step, module being trained) -> one sample of the domain model on the empty prompt (what
    KSampler (Domain Guidance) gives with cfg 0 and domain_scale 1), from the host's own sampler
    with a fixed seed, shown on the node and saved to output/indomain_previews/<save_name>/."""
    null = [[cross_attn, extras]]
    folder = os.path.join(folder_paths.get_output_directory(), "indomain_previews", save_name)
    side = config.resolution // getattr(vae, "downscale_ratio", 8)

    @torch.no_grad()
    def preview(step: int, module: torch.nn.Module) -> None:
        latent = torch.zeros([1, model.model.latent_format.latent_channels, side, side])
        noise = comfy.sample.prepare_noise(latent, config.seed)
        original = model.model.diffusion_model
        if config.mode == "full":  # the trained copy stands in for the base's UNet while sampling
            model.model.diffusion_model = module
        try:
            samples = comfy.sample.sample(model, noise, PREVIEW_STEPS, 1.0, "euler", "normal", null, null, latent,
                                          disable_pbar=True, seed=config.seed)
        finally:
            model.model.diffusion_model = original
        pixels = vae.decode(samples)[0].clamp(0, 1).mul(255).round().byte().cpu().numpy()  # [H, W, 3]
        image = Image.fromarray(pixels.reshape(pixels.shape[-3:]))
        os.makedirs(folder, exist_ok=True)
        image.save(os.path.join(folder, f"step_{step:06d}.png"))
        bar.update_absolute(step, config.steps, ("PNG", image, 512))
    return preview


def progress_reporter(bar, node_id, steps: int):
    """Progress(stage, ...) -> the host's progress bar, and a text line (step, loss, images/s, ETA)."""
    server = getattr(sys.modules.get("server"), "PromptServer", None)  # the running ComfyUI server, if any
    send_text = getattr(getattr(server, "instance", None), "send_progress_text", None)

    def report(p) -> None:
        if p.stage == "cache":
            text = f"encoding images {p.step}/{p.total}"
        else:
            bar.update_absolute(p.step, steps)
            text = f"step {p.step}/{p.total}  loss {p.loss:.4f}  {p.images_per_s:.1f} img/s  ETA {p.eta_s:.0f} s"
        if send_text is not None and node_id is not None:
            send_text(text, node_id)
    return report


def run_training(*, model, vae, null_conditioning=None, clip=None, images=None, image_folder="", config: TrainConfig,
                 save_name: str, resume: bool = True, node_id=None, on_progress=None):
    """Train, write the domain UNet file, and return (domain MODEL, losses, start step, model file path)."""
    sources = []
    if images is not None:
        sources.append(images)
    if image_folder and image_folder.strip():
        folder = image_folder.strip()
        sources.append(folder if os.path.isabs(folder) else os.path.join(folder_paths.get_input_directory(), folder))
    if not sources:
        raise ValueError("images / image_folder: connect an IMAGE batch or give a folder of domain images")
    model_path, state_path = output_paths(save_name)
    pred = prediction_type(model)
    check_vae(vae, model)
    cross_attn, extras = empty_prompt(null_conditioning, clip)
    if not resume and os.path.exists(state_path):
        log.info("resume is off: starting over, replacing %s", state_path)
        os.remove(state_path)

    with torch.inference_mode(False):
        comfy.model_management.load_models_gpu([model], force_full_load=True)
        unet = model.model.diffusion_model
        make_autograd_safe(unet)
        if config.gradient_checkpointing == ("all",):
            config = TrainConfig(**{**config.__dict__, "gradient_checkpointing": checkpointed_blocks(unet)})
        base_fp = fingerprint(unet)
        storage = model.model.get_dtype()
        counted = {}

        def write(step: int, weights: dict[str, torch.Tensor]) -> None:
            save_model_file(model_path, deliverable(weights, config, storage),
                            file_metadata(model, config, step, counted.get("images", 0), base_fp))

        def count_images(p) -> None:
            if p.stage == "cache":
                counted["images"] = p.step
            report(p)
            if on_progress is not None:
                on_progress(p)

        bar = comfy.utils.ProgressBar(config.steps, node_id=node_id)
        report = progress_reporter(bar, node_id, config.steps)
        preview = preview_function(model, vae, cross_attn, extras, config, os.path.splitext(os.path.basename(model_path))[0], bar)
        try:
            result = train(
                unet, sources if len(sources) > 1 else sources[0],
                encode=encode_function(vae, model),
                vae_id=f"{fingerprint(vae.first_stage_model)}|{type(model.model.latent_format).__name__}",
                cond_for=cond_function(model, cross_attn, extras),
                alphas_cumprod=alphas_cumprod(model), prediction_type=pred, config=config,
                cache_dir=os.path.join(domain_folder(), CACHE_FOLDER), state_path=state_path,
                check_interrupt=comfy.model_management.throw_exception_if_processing_interrupted,
                on_progress=count_images, on_checkpoint=write, on_preview=preview,
                device=comfy.model_management.get_torch_device(),
            )
        except torch.OutOfMemoryError as e:
            raise RuntimeError(_kept(state_path, f"out of memory while training ({e}). Lower batch_size or resolution, "
                                                 "turn on gradient_checkpointing, use bf16, or use mode lora")) from e
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise RuntimeError(_kept(state_path, f"the disk is full while writing {e.filename or 'a checkpoint'}; "
                                                     "free space and run again to resume")) from e
            raise
        final = result.ema_weights if result.ema_weights is not None else result.weights
        write(result.step, final)

    name = os.path.basename(model_path)
    if config.mode == "full":
        domain = load_full(deliverable(final, config, storage), {}, name)
    else:
        domain = apply_lora(model, final, name)
    return domain, result.losses, result.start_step, model_path


def _kept(state_path: str, message: str) -> str:
    if os.path.exists(state_path):
        return f"{message}. The last checkpoint {os.path.basename(state_path)} is kept."
    return f"{message}. No checkpoint had been written yet."


# --- the node ---------------------------------------------------------------------------------

class DomainTrainer(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="InDomainTrainUNet",
            display_name="Train Domain UNet",
            category=CATEGORY,
            description="Learns a visual domain from captionless images: a text-free copy of the base UNet (full) or "
                        "LoRA adapters on it, trained with every image on the empty prompt. Writes "
                        "models/domain_unets/<save_name>.safetensors and resumes from its checkpoint when run again.",
            is_output_node=True,
            inputs=[
                io.Model.Input("model", tooltip="The base MODEL (from Load Checkpoint). Its noise schedule and prediction type are used."),
                io.Vae.Input("vae", tooltip="The base checkpoint's VAE; images are encoded once and cached on disk."),
                io.Combo.Input("mode", options=["lora", "full"], default="lora",
                               tooltip="lora: small adapters on the base (fast, about 8 GiB at SD1.5). "
                                       "full: the paper's text-free copy of the whole UNet (about 16 GiB at SD1.5 bs 8)."),
                io.Int.Input("steps", default=1000, min=1, max=1_000_000, tooltip="Total optimizer steps (a resumed run continues up to this)."),
                io.Int.Input("batch_size", default=4, min=1, max=256, tooltip="Images per step (all from one aspect-ratio bucket)."),
                io.Float.Input("learning_rate", default=1e-4, min=1e-7, max=1.0, step=1e-6, round=1e-7,
                               tooltip="Peak learning rate (AdamW). About 1e-4 for lora, 1e-5 to 2e-5 for full."),
                io.Combo.Input("lr_schedule", options=["constant", "cosine"], default="constant",
                               tooltip="After warm-up: keep the learning rate, or decay it to 0 along a cosine."),
                io.Int.Input("warmup_steps", default=0, min=0, max=100_000, tooltip="Steps of linear warm-up to the learning rate."),
                io.Int.Input("seed", default=0, min=0, max=2**63 - 1, control_after_generate=False,
                             tooltip="Seed of all training randomness (images, flips, timesteps, noise): the same seed gives the same weights."),
                io.Int.Input("resolution", default=512, min=64, max=4096, step=64,
                             tooltip="Training area: buckets of about resolution x resolution pixels (512 for SD1, 768 for SD2, 1024 for SDXL). "
                                     "Images of any size are resized and centre-cropped to the nearest aspect-ratio bucket."),
                io.Boolean.Input("flip", default=True, tooltip="Horizontal-flip augmentation (off for text, logos or asymmetric subjects)."),
                io.Combo.Input("training_dtype", options=list(PRECISIONS), default="bf16",
                               tooltip="Autocast precision. bf16 on recent GPUs; fp16 uses loss scaling; fp32 is slow but exact."),
                io.Boolean.Input("gradient_checkpointing", default=True,
                                 tooltip="Recompute activations in backward: much less memory, about 30% slower."),
                io.Float.Input("ema_decay", default=0.0, min=0.0, max=0.99999, step=0.0001, round=0.00001,
                               tooltip="Exponential moving average of the weights (e.g. 0.999); the file and the output use it. 0 = off."),
                io.Int.Input("lora_rank", default=16, min=1, max=1024, tooltip="LoRA rank (mode lora only)."),
                io.Float.Input("lora_alpha", default=16.0, min=0.01, max=4096.0, step=0.5, tooltip="LoRA alpha; the update is scaled by alpha / rank (mode lora only)."),
                io.String.Input("save_name", default="my_domain",
                                tooltip="File name in models/domain_unets (subfolders allowed, no '..'). Running again with the same name resumes."),
                io.Int.Input("checkpoint_every", default=250, min=0, max=1_000_000,
                             tooltip="Save the model file and the resumable state every N steps (0: only at the end)."),
                io.Int.Input("preview_every", default=0, min=0, max=1_000_000,
                             tooltip="Every N steps, sample the domain model on the empty prompt (20 Euler steps, fixed seed), show it "
                                     "on the node and save it to output/indomain_previews/<save_name>/. 0 = off."),
                io.Boolean.Input("resume", default=True,
                                 tooltip="On: continue from save_name's last checkpoint if there is one. Off: start over and replace it."),
                io.Conditioning.Input("null_conditioning", optional=True,
                                      tooltip="CLIP Text Encode of an empty string (the condition of every training sample). Or connect clip."),
                io.Clip.Input("clip", optional=True, tooltip="Used to encode the empty prompt when null_conditioning is not connected."),
                io.Image.Input("images", optional=True, tooltip="Domain images as an IMAGE batch (e.g. Load Image). Can be combined with image_folder."),
                io.String.Input("image_folder", default="", optional=True,
                                tooltip="A folder of domain images (png, jpg, webp, bmp); relative paths are inside ComfyUI's input folder. "
                                        "Unreadable files are skipped with a warning."),
                io.Boolean.Input("torch_compile", default=False, optional=True,
                                 tooltip="Compile the trained UNet with torch.compile (needs a C++ compiler / Triton): the first step takes "
                                         "2-3 minutes, then about 1.4x faster at batch 32 with less memory (mode full, no gradient "
                                         "checkpointing; docs/BENCHMARKS.md). Pays for long runs."),
            ],
            outputs=[
                io.Model.Output(display_name="domain_model", tooltip="The trained domain UNet, for KSampler (Domain Guidance)."),
                io.Image.Output(display_name="loss_curve", tooltip="The training loss per step of this run."),
            ],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, model, vae, mode, steps, batch_size, learning_rate, lr_schedule, warmup_steps, seed, resolution,
                flip, training_dtype, gradient_checkpointing, ema_decay, lora_rank, lora_alpha, save_name,
                checkpoint_every, preview_every, resume, null_conditioning=None, clip=None, images=None, image_folder="",
                torch_compile=False) -> io.NodeOutput:
        config = TrainConfig(
            steps=steps, mode=mode, lora_rank=lora_rank, lora_alpha=lora_alpha, lr=learning_rate, lr_schedule=lr_schedule,
            warmup_steps=warmup_steps, batch_size=batch_size, resolution=resolution, flip=flip, seed=seed,
            precision=training_dtype, ema_decay=ema_decay, checkpoint_every=checkpoint_every, preview_every=preview_every,
            gradient_checkpointing=("all",) if gradient_checkpointing else (), compile=torch_compile,
        )
        domain, losses, start, _ = run_training(model=model, vae=vae, null_conditioning=null_conditioning, clip=clip,
                                                images=images, image_folder=image_folder, config=config,
                                                save_name=save_name, resume=resume, node_id=cls.hidden.unique_id)
        return io.NodeOutput(domain, loss_curve_image(losses, start))
