"""API-format prompt builders for the host tests (the shapes a user's graph has)."""
from __future__ import annotations

import copy


class Closeness:
    """The outcome of close(): true or false, and on a failed assert the numbers it compared."""

    def __init__(self, diff: float, scale: float, rel: float):
        self.diff, self.scale, self.rel = diff, scale, rel

    def __bool__(self) -> bool:
        return self.diff <= self.rel * self.scale

    def __repr__(self) -> str:
        return f"<max|a-b| {self.diff:.3g} = {self.diff / max(self.scale, 1e-30):.3g} x max|b| {self.scale:.3g}; rel {self.rel:g}>"


def close(a, b, rel=1e-5) -> Closeness:
    """max |a - b| <= rel * max |b|: the tolerance the issue sets for 'the same latents'."""
    return Closeness((a - b).abs().max().item(), b.abs().max().item(), rel)


def text_to_image(*, sampler="InDomainKSampler", positive="a photo of a cat", negative="blurry, low quality",
                  seed=7, steps=4, cfg=5.0, sampler_name="euler", scheduler="normal", width=64, height=64,
                  batch=1, domain=None, domain_scale=1.0, denoise=1.0, extra=None, label="out"):
    """Tiny checkpoint -> prompts -> (Domain) KSampler -> capture the LATENT.

    domain: None, or a node input link/value for domain_model (e.g. ["dom", 0]).
    """
    p = {
        "ckpt": {"class_type": "TestTinyCheckpoint", "inputs": {"ckpt_name": "tiny"}},
        "pos": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["ckpt", 1], "text": positive}},
        "neg": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["ckpt", 1], "text": negative}},
        "null": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["ckpt", 1], "text": ""}},
        "latent": {"class_type": "EmptyLatentImage", "inputs": {"width": width, "height": height, "batch_size": batch}},
        "cap": {"class_type": "TestCapture", "inputs": {"value": ["sample", 0], "label": label}},
    }
    inputs = {"model": ["ckpt", 0], "seed": seed, "steps": steps, "cfg": cfg, "sampler_name": sampler_name,
              "scheduler": scheduler, "positive": ["pos", 0], "negative": ["neg", 0], "latent_image": ["latent", 0],
              "denoise": denoise}
    if sampler == "InDomainKSampler":
        inputs.update({"null_conditioning": ["null", 0], "domain_scale": domain_scale, "domain_start": 0.0,
                       "domain_end": 1.0, "control_in_domain": False})
        if domain is not None:
            inputs["domain_model"] = domain
    p["sample"] = {"class_type": sampler, "inputs": inputs}
    for k, v in (extra or {}).items():
        p[k] = copy.deepcopy(v)
    return p


def loader(unet_name, base=("ckpt", 0), strength=1.0):
    inputs = {"unet_name": unet_name, "lora_strength": strength}
    if base is not None:
        inputs["base_model"] = list(base)
    return {"class_type": "InDomainUNetLoader", "inputs": inputs}


TRAIN_DEFAULTS = dict(mode="lora", steps=4, batch_size=2, learning_rate=1e-3, lr_schedule="constant", warmup_steps=0,
                      seed=0, resolution=64, flip=True, training_dtype="fp32", gradient_checkpointing=False,
                      ema_decay=0.0, lora_rank=4, lora_alpha=4.0, save_name="dom", checkpoint_every=2, preview_every=0, resume=True,
                      image_folder="domain")


def train_graph(label="trained", unet_dtype="host default", **options):
    """Tiny checkpoint (its UNet weights as tiny_nodes.UNET_DTYPES says) -> empty prompt -> Train Domain
    UNet (images from input/<image_folder>) -> capture both outputs."""
    inputs = {**TRAIN_DEFAULTS, **options, "model": ["ckpt", 0], "vae": ["ckpt", 2], "null_conditioning": ["null", 0]}
    inputs = {k: v for k, v in inputs.items() if v is not None}
    return {
        "ckpt": {"class_type": "TestTinyCheckpoint", "inputs": {"ckpt_name": "tiny", "unet_dtype": unet_dtype}},
        "null": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["ckpt", 1], "text": ""}},
        "train": {"class_type": "InDomainTrainUNet", "inputs": inputs},
        "cap_model": {"class_type": "TestCapture", "inputs": {"value": ["train", 0], "label": label}},
        "cap_loss": {"class_type": "TestCapture", "inputs": {"value": ["train", 1], "label": label + "_loss"}},
    }


# On a GPU, training in fp32 is not reproducible: two uninterrupted runs of the same LoRA
# training (6 steps, lr 1e-2) differed by up to 0.72% of a tensor's largest value on an H200
# (float32 backward kernels that add in a varying order; Adam magnifies it where gradients are near
# zero), while the same runs in bf16 were bit for bit the same. Tests that compare two training
# runs therefore train in bf16 on a GPU.
def eager_training_steps(monkeypatch) -> None:
    """Every training step through training.loop.denoising_step, as a test that patches that function
    needs: on a GPU, LoRA mode replays each step as a CUDA graph (nodes/training/run.with_cuda_graphs),
    which never enters a patched Python function again (the graphed steps' own cancel and failure
    handling: tests/test_cudagraph.py)."""
    monkeypatch.setenv("INDOMAIN_TRAIN_GRAPHS", "0")


def reproducible_dtype(on_gpu: bool) -> str:
    """The training_dtype whose runs repeat bit for bit on this device (the defaults' fp32 on the CPU)."""
    return "bf16" if on_gpu else TRAIN_DEFAULTS["training_dtype"]


def saved(name: str) -> str:
    """Where Train Domain UNet wrote a file (e.g. "dom.safetensors", "dom.indomain-state"): models/loras
    (mode lora) or models/diffusion_models (mode full); the loras path when in neither."""
    import os

    import folder_paths

    paths = [os.path.join(folder_paths.models_dir, kind, name) for kind in ("loras", "diffusion_models")]
    return next((p for p in paths if os.path.exists(p)), paths[0])


def written(name: str) -> list[str]:
    """The files Train Domain UNet wrote for save name `name` (model and state), in any of its folders."""
    import glob
    import os

    import folder_paths

    folders = [os.path.join(folder_paths.models_dir, kind) for kind in ("loras", "diffusion_models", "domain_unets")]
    return sorted(os.path.basename(p) for f in folders for p in glob.glob(os.path.join(f, name + ".*")))
