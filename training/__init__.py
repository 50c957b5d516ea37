"""Training a domain UNet (Cao et al., "Image is All You Need to Empower Large-scale Diffusion
Models for In-Domain Generation"): a copy of a Stable Diffusion UNet, or LoRA adapters on it,
trained text-free (every sample on the empty-prompt embedding) on captionless domain images
with the ordinary denoising loss.

Host independent: torch, numpy, safetensors, the standard library, and Pillow (only in
data.py, to read image files; ComfyUI ships it). Nothing here imports ComfyUI; graphed.py takes
its graph capture from the sibling package cudagraph/, trainable.py its LoRA adapters (forward
hooks, ComfyUI's LoRA file format) from the sibling package lora_hooks/.

The modules, in the order of a run:

    loop.py         train(): the recipe, stage by stage (data -> trainable, optimizer, EMA -> steps -> result)
    config.py       TrainConfig, its validation, what a state file records of it (run_config)
    data.py         the training images: a folder or an IMAGE batch, each image fitted to a bucket
    latents.py      the latent cache: each image VAE-encoded once, read from disk per batch
    plan.py         the batch plan: which images each step trains on, its flips, timesteps and noise
    validation.py   the held-out images (validation_share) and their loss at fixed draws
    noise.py        the objective: the denoising loss for the base's schedule (eps, v, flow)
    denoise.py      one batch's loss: its conditioning expanded, x0 noised to x_t, the prediction under autocast
    trainable.py    what the optimizer trains (a full copy or LoRA adapters), gradient checkpointing, EMA
    optimizer.py    AdamW (fused, sharded or 8-bit) and the learning rate of each update
    graphed.py      a step's forward and backward replayed as CUDA graphs (opt-in)
    hooks.py        after an update: progress; when due the validation loss, the state file, the samples, the preview
    checkpoint.py   the files: the training state, the deliverable model file, safe paths, atomic writes
    distributed.py  torchrun: ranks, the per-step agreement, stops and failures every rank agrees on
    results.py      what train() reports and returns: Progress, TrainResult, TrainingDiverged

The host interface: `train(unet, images, *, ...)` (loop.py) takes

    unet             nn.Module called as unet(x, timesteps, **cond) -> the raw model output, shaped
                     like x (ComfyUI's UNetModel: forward(x, timesteps, context=None, y=None, ...)).
                     x: [B, C, h, w] float32 latents; timesteps: [B] float32 in 0..T-1.
                     "lora" mode hooks adapters onto it and takes them off (and restores its
                     requires_grad flags) before returning, also on error; "full" mode trains a
                     float32 deep copy and never modifies it.
    images           a folder path (png/jpg/jpeg/webp/bmp) or an IMAGE batch [B, H, W, 3] float 0..1.
    encode           images [1, H, W, 3] float 0..1 (CPU) -> latents [1, C, H/f, W/f]: the VAE
                     encode including the latent scaling (e.g. x 0.18215 for SD1).
    vae_id           str naming the VAE (part of every latent-cache key).
    cond_for         (height_px, width_px) -> {name: tensor [1, ...]}: the empty prompt's
                     conditioning for one bucket, e.g. {"context": [1, 77, 768]}, plus "y" [1, 2816]
                     for SDXL (its size embedding depends on the image size). Called once per bucket;
                     each tensor is expanded to the batch and passed as unet(x, t, **cond) (plain numbers,
                     e.g. Z-Image's token count, as they are).
    alphas_cumprod   1-D tensor [T] (usually T = 1000): the training noise schedule (None for "flow").
    prediction_type  "eps", "v" or "flow" (rectified flow: SD3, Flux, Z-Image; noise.py).
    flow             for "flow": FlowSchedule(sigma=u -> sigma, timestep=sigma -> the model's timestep
                     input, name=what a resumed run must agree on): the base's own shift (noise.py).
    config           TrainConfig (mode, lora rank/alpha/targets, lr, schedule, warm-up, batch size (the
                     global batch of an update) and its gradient accumulation (micro-batches of
                     batch_size / k), resolution, flip, seed, precision, EMA decay (warmed up: trainable.ema_decay_at),
                     checkpoint/preview periods, gradient-checkpointed submodules, the optimizer
                     (AdamW, or bitsandbytes' 8-bit AdamW), torch.compile or CUDA graphs of the
                     steps (graphed.py), the validation share (validation.py)).
    cache_dir        folder for the latent cache (`<sha256>.latent` files, reused across runs).
    state_path       the training-state file (one safetensors file, any extension): saved every
                     config.checkpoint_every steps and at the end; if it exists, training resumes
                     from it (a differing config raises ResumeMismatch naming the keys; lr,
                     lr_schedule, warmup_steps and precision may change, and the change is logged).
    check_interrupt  () -> None; raises the host's interrupt exception. Called at the start of each
                     step, once more before each optimizer update, and before each image is encoded.
    on_progress      Progress(stage, step, total, loss, images_per_s, eta_s, lr) -> None: after each
                     encoded image (stage "cache"), each step (stage "train", with its learning rate)
                     and each validation loss (stage "validation": step 0, checkpoints, the end).
    on_preview       (step, module) -> None every config.preview_every steps; module is what is
                     being trained (the full copy, or the host's UNet with the adapters on).
    on_checkpoint    (step, weights) -> None after each state save: the deliverable as of that step (the
                     EMA weights when EMA is on), for the host to write its model file.
    on_samples       (step, weights, resumed) -> None after each checkpoint (and at the end): the same
                     deliverable, with the trainable suspended for the call (the host's module
                     computes as before training: LoRA adapters off), for the host to sample its base
                     beside those weights; also once at the start of a resumed run (resumed=True, the
                     state's weights), so that the host can make what a stopped run left undone.
    device           where to train; default the device of unet's first parameter.
    release_base     () -> None, full mode: called once the copy is made; the host may take the base's
                     weights off the device (the run does not read them again).

and returns TrainResult(weights, ema_weights, losses, step, start_step, validation): `weights` is what to save
with `save_model_file(safe_join(folder, name), weights, metadata)`: the UNet's state dict (its own
keys, no prefix) in "full" mode, or ComfyUI LoRA tensors (diffusion_model.<path>.lora_up.weight,
.lora_down.weight, .alpha) in "lora" mode.

Errors: TrainingDiverged (a NaN/inf loss or weight; the state file keeps its last good content),
ResumeMismatch, ValueError naming the bad input; the host's interrupt exception passes through.

Under torchrun (a torch.distributed process group initialized by the caller, e.g. the headless
trainer) the same call on every rank trains one model: config.batch_size is the global batch, each
rank takes its slice, DDP averages the gradients (config.shard_optimizer: ZeroRedundancyOptimizer),
latents are encoded sharded across ranks, rank 0 alone writes the state file and calls on_progress,
on_checkpoint, on_samples and on_preview; a stop another rank caused raises distributed.StoppedByPeer, and
distributed.report_stop logs a stop once for all ranks (distributed.py, loop.py).
"""
from .checkpoint import ResumeMismatch, atomic_save, read_state_header, safe_join, save_model_file
from .data import ImageSet, make_buckets, nearest_bucket
from .latents import cache_latents
from .config import TrainConfig
from .loop import train
from .results import Progress, TrainingDiverged, TrainResult
from .noise import DiscreteSchedule, FlowSchedule, denoising_loss, flow_sample, flow_target, prediction_target, q_sample, v_target
from .optimizer import learning_rate

__all__ = [
    "DiscreteSchedule",
    "FlowSchedule",
    "ImageSet",
    "Progress",
    "ResumeMismatch",
    "TrainConfig",
    "TrainResult",
    "TrainingDiverged",
    "atomic_save",
    "cache_latents",
    "denoising_loss",
    "flow_sample",
    "flow_target",
    "learning_rate",
    "make_buckets",
    "nearest_bucket",
    "prediction_target",
    "q_sample",
    "read_state_header",
    "safe_join",
    "save_model_file",
    "train",
    "v_target",
]
