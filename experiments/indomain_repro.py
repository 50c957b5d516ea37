"""Small-scale reproduction of guidance forgetting and decoupled domain guidance.

    python -m experiments.indomain_repro --config cpu --out DIR     # 16x16, one CPU thread
    python -m experiments.indomain_repro --config gpu --out DIR     # 32x32, uses CUDA when present

What it does, from scratch and with fixed seeds (docs/EVIDENCE.md has the result and details):

1. renders a labelled shape data set (classes = shapes, random colours on flat backgrounds) and
   a *domain*: one fixed style (orange shapes on navy/teal diagonal stripes) whose labels are
   never shown to a diffusion model;
2. trains a small class-conditional UNet (v-prediction, cosine DDPM alphas_cumprod, a null
   class with condition dropout so classifier-free guidance works) on the labelled base data,
   with the project's loss (training/noise.py);
3. trains a full copy of it on the domain images with the null condition for every sample,
   through the project's training loop, training.train() (images as an IMAGE batch, average
   pooling as the "VAE"). That one run is both the paper's "naive fine-tune" (sampled alone
   with CFG) and its text-free "domain model" (used only as the domain term): the two are the
   same training procedure, so it is run once and the methods differ only in how they sample;
4. samples (a) the base alone with CFG, (b) the fine-tuned model alone with CFG and
   (c) ours: guidance.decoupled_guidance with the base for u and c (negative = empty) and the
   fine-tuned copy as the domain term d, over a grid of domain weights;
5. measures control accuracy (a shape classifier trained on held-out labelled images of both
   styles: is a sample requested as class k classified as k?), domain rate (the same network's
   style head: fraction of samples that look like the domain) and the Frechet distance to
   held-out domain images in that network's penultimate features;
6. writes results.json, results.md and samples.png into --out.
"""
from __future__ import annotations

import argparse
import ast
import copy
import dataclasses
import json
import logging
import math
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from guidance import (GuidanceTerm, TermInterval, add_domain_differences, decoupled_guidance, is_active,
                      recompute_domain)
from lora_hooks import merged_weight
from training import TrainConfig, denoising_loss, prediction_target, q_sample, train

from .shapes import BASE_STYLE, CLASSES, DOMAIN_STYLE, make_set
from .unet import SmallUNet

log = logging.getLogger("indomain_repro")


# --------------------------------------------------------------------------------------------
# configuration


@dataclass(frozen=True)
class Config:
    name: str
    size: int = 16
    channels: tuple = (32, 64)
    patch: int = 2
    emb_dim: int = 64
    timesteps: int = 1000
    classes: tuple = CLASSES  # shape names (experiments.shapes.CLASSES); label i is classes[i]
    threads: int = 1  # CPU threads (torch.set_num_threads) while it runs; 0 = leave torch's setting
    base_backgrounds: tuple = (0,)  # background kinds of the base style (indices into shapes.BACKGROUNDS)
    # data
    n_base_train: int = 6000
    n_domain_train: int = 1000
    n_domain_ref: int = 1000
    n_cls_train_per_style: int = 2000
    n_cls_test_per_style: int = 400
    # base model
    base_steps: int = 900
    base_lr: float = 2e-3
    batch: int = 64
    cond_drop: float = 0.15
    ema: float = 0.995
    # fine-tune (naive == text-free domain model, see the module docstring)
    ft_steps: int = 300
    ft_lr: float = 1e-3
    ft_ema: float = 0.98
    # evaluation network
    cls_steps: int = 500
    cls_batch: int = 128
    # sampling
    samples_per_class: int = 64
    sample_steps: int = 20
    cfg: float = 7.5  # Stable Diffusion's usual guidance scale
    domain_weights: tuple = (1.5,)
    headline_weight: float = 1.5
    domain_every: tuple = ()  # extra rows "ours" at headline_weight with the speed dial k (guidance.recompute_domain)
    # extra rows "ours" at headline_weight with the domain term on part of the run only: (domain_start,
    # domain_end) as fractions of the run, the nodes' inputs (the host's percent_to_sigma, guidance.is_active)
    domain_intervals: tuple = ((0.0, 0.5), (0.5, 1.0))
    # the competitors (docs/EVIDENCE.md): each samples with the networks above, from the same noise
    competitors: bool = True
    lora_rank: int = 8  # style LoRA of the base: training.train(mode="lora") on the domain images, null condition
    lora_lr: float = 2e-3  # (same steps, batch and data as the full fine-tune)
    lora_targets: tuple = ("conv1", "conv2", "emb")  # every ResBlock's convolutions and its embedding projection
    dog_weights: tuple = (1.5, 7.5)  # Domain Guidance: u_base + w (c_ft - u_base)
    autoguidance_weight: float = 2.0  # AutoGuidance: c_weak + w (c_ft - c_weak)
    weak_fraction: float = 0.25  # the weak model: the fine-tune's EMA after this fraction of its steps
    rectified_weights: tuple = (1.0, 1.5)  # the paper's domain-only generation: u_base + w (d - u_base), no class
    seed: int = 0
    grid_per_cell: int = 4


CONFIGS = {
    "cpu": Config(name="cpu", domain_weights=(1.0, 1.5, 2.0)),
    # every field given: the table in docs/EVIDENCE.md came from exactly this configuration
    "gpu": Config(
        name="gpu",
        classes=CLASSES,
        base_backgrounds=(0,),
        timesteps=1000,
        cond_drop=0.15,
        cfg=7.5,
        headline_weight=1.5,
        seed=0,
        grid_per_cell=4,
        size=32,
        channels=(64, 128, 256),
        patch=2,
        emb_dim=256,
        threads=0,
        n_base_train=30000,
        n_domain_train=2000,
        n_domain_ref=4000,
        n_cls_train_per_style=10000,
        n_cls_test_per_style=2000,
        base_steps=4000,
        base_lr=1e-3,
        batch=256,
        ema=0.999,
        ft_steps=1000,
        ft_lr=5e-4,
        ft_ema=0.995,
        cls_steps=1000,
        cls_batch=256,
        samples_per_class=500,
        sample_steps=50,
        domain_weights=(0.5, 1.0, 1.5, 2.0),
        # the competitors (issue 19; not in the committed single-seed table): the style LoRA's lr twice
        # the fine-tune's, as on the CPU
        lora_rank=16,
        lora_lr=1e-3,
    ),
}


# --------------------------------------------------------------------------------------------
# diffusion: the noise schedule, and the base model's class-conditional training
# (the loss itself is the project's: training.noise.q_sample / prediction_target / denoising_loss)


def cosine_alphas_cumprod(timesteps: int, s: float = 0.008) -> torch.Tensor:
    """DDPM alphas_cumprod of the cosine schedule (Nichol & Dhariwal), float64 [T]."""
    t = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps
    f = torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2
    betas = (1 - f[1:] / f[:-1]).clamp(max=0.999)
    return torch.cumprod(1 - betas, dim=0)


def conditional_loss(model, x0, y, alphas_cumprod, generator) -> torch.Tensor:
    """The project's denoising loss (training/noise.py, v-prediction) at uniform timesteps, with
    class labels y (the null class where dropped)."""
    n, dev = x0.shape[0], generator.device
    t = torch.randint(0, alphas_cumprod.shape[0], (n,), generator=generator, device=dev)
    eps = torch.randn(x0.shape, generator=generator, device=dev)
    a_t = alphas_cumprod.to(dev)[t].to(torch.float32)
    x_t = q_sample(x0, eps, a_t)
    prediction = model(x_t, t.to(torch.float32), y=y)
    return denoising_loss(prediction, prediction_target(x0, eps, a_t, "v"))


def device_generator(g: torch.Generator, device, seed: int) -> torch.Generator:
    """The generator for per-sample randomness (timesteps, noise, augmentation): `g` itself on
    the CPU, a generator on the device elsewhere (no host-to-device copy of every batch's noise)."""
    if torch.device(device).type == "cpu":
        return g
    return torch.Generator(device=device).manual_seed(seed + 7919)


class EMA:
    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.shadow = copy.deepcopy(model).eval()
        for p in self.shadow.parameters():
            p.requires_grad_(False)
        self.steps = 0

    @torch.no_grad()
    def update(self, model: nn.Module):
        self.steps += 1
        d = min(self.decay, (1 + self.steps) / (10 + self.steps))
        torch._foreach_lerp_(list(self.shadow.parameters()), list(model.parameters()), 1 - d)
        for s, b in zip(self.shadow.buffers(), model.buffers()):
            s.copy_(b)


def train_base(model, images, labels, cfg: "Config", alphas_cumprod, seed, device) -> nn.Module:
    """The class-conditional base: condition dropout (a label becomes the null class with
    probability cfg.cond_drop) so that classifier-free guidance works. Returns the EMA copy."""
    g = torch.Generator().manual_seed(seed)
    gd = device_generator(g, device, seed)
    images, labels = images.to(device), labels.to(device)
    model.train()
    steps = cfg.base_steps
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.base_lr, weight_decay=0.0)
    warmup = max(1, steps // 20)
    # linear warm-up, then cosine down to 10%
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * (0.55 + 0.45 * math.cos(math.pi * min(1.0, s / steps))))
    ema = EMA(model, cfg.ema)
    null = model.null_class
    n = images.shape[0]
    t0 = time.time()
    for step in range(steps):
        idx = torch.randint(0, n, (cfg.batch,), generator=g)
        drop = torch.rand(cfg.batch, generator=g) < cfg.cond_drop
        idx, drop = idx.to(device), drop.to(device)
        y = torch.where(drop, null, labels[idx])
        loss = conditional_loss(model, images[idx], y, alphas_cumprod, gd)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        ema.update(model)
        if (step + 1) % max(1, steps // 5) == 0 or step == 0:
            log.info("base step %d/%d loss %.4f (%.1fs)", step + 1, steps, loss.item(), time.time() - t0)
    return ema.shadow


# --------------------------------------------------------------------------------------------
# the text-free domain copy: the project's training loop, training.train()


def to_image_batch(images: torch.Tensor, factor: int) -> torch.Tensor:
    """[N, 3, s, s] in [-1, 1] -> a ComfyUI IMAGE batch [N, s*factor, s*factor, 3] in [0, 1]
    (nearest upscaling: every "latent" pixel becomes a factor x factor block)."""
    x = F.interpolate((images.clamp(-1, 1) + 1) / 2, scale_factor=factor, mode="nearest")
    return x.permute(0, 2, 3, 1).contiguous()


def pooling_encoder(factor: int):
    """The stand-in VAE handed to training.train(): IMAGE [1, H, W, 3] in [0, 1] ->
    [1, 3, H/factor, W/factor] in [-1, 1] by average pooling (exactly inverts to_image_batch,
    up to train()'s 8-bit pixels)."""

    def encode(image: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(image.permute(0, 3, 1, 2).float(), factor) * 2.0 - 1.0

    return encode


TRAIN_RESOLUTION = 64  # training.train()'s smallest bucket: images go in at 64 x 64 pixels


def train_text_free_copy(base: nn.Module, domain_images: torch.Tensor, cfg: "Config", alphas_cumprod, seed, device,
                         mode: str = "full", snapshot_at: int | None = None):
    """The base trained by training.train() on the unlabelled domain images, every sample on the null
    condition (the empty prompt); returns its EMA weights in a copy of the base.

    mode "full": all parameters (the paper's naive fine-tune == its text-free domain model);
    mode "lora": a LoRA of the base (cfg.lora_rank, on cfg.lora_targets, lr cfg.lora_lr), merged into
    the copy the way the host's LoraLoader merges it (lora_hooks.merged_weight): a style LoRA.
    snapshot_at = k: also return the EMA weights after step k (the weak model of AutoGuidance), as
    (model, snapshot); the checkpoint that gives them does not change the training run.
    """
    if TRAIN_RESOLUTION % cfg.size:
        raise ValueError(f"size={cfg.size}: must divide {TRAIN_RESOLUTION} (training.train()'s bucket side)")
    factor = TRAIN_RESOLUTION // cfg.size
    null = torch.tensor([base.null_class])
    lora = mode == "lora"
    config = TrainConfig(
        steps=cfg.ft_steps, mode=mode, lr=cfg.lora_lr if lora else cfg.ft_lr, weight_decay=0.0, lr_schedule="constant",
        warmup_steps=max(1, cfg.ft_steps // 20), batch_size=cfg.batch, resolution=TRAIN_RESOLUTION,
        flip=False,  # a mirror image turns the domain's 45 degree stripes into 135 degree ones
        seed=seed, precision="fp32", ema_decay=cfg.ft_ema,
        lora_rank=cfg.lora_rank, lora_alpha=float(cfg.lora_rank), lora_targets=tuple(cfg.lora_targets),
        checkpoint_every=snapshot_at or 0,
    )
    t0 = time.time()
    snapshots = {}

    def progress(p):
        if p.stage == "train" and (p.step % max(1, p.total // 5) == 0 or p.step == 1):
            log.info("%s step %d/%d loss %.4f (%.1fs)", "style LoRA" if lora else "domain copy", p.step, p.total,
                     p.loss, time.time() - t0)

    def to_model(weights):
        model = copy.deepcopy(base)
        if lora:
            merge_lora_(model, weights)
        else:
            model.load_state_dict(weights)
        return model.eval()

    with tempfile.TemporaryDirectory(prefix="indomain_cache_") as cache_dir:
        result = train(
            base, to_image_batch(domain_images, factor), encode=pooling_encoder(factor), vae_id=f"avgpool{factor}",
            cond_for=lambda h, w: {"y": null}, alphas_cumprod=alphas_cumprod.float(), prediction_type="v",
            config=config, cache_dir=cache_dir, on_progress=progress, device=device,
            state_path=str(Path(cache_dir) / "state.safetensors") if snapshot_at else None,
            on_checkpoint=lambda step, weights: snapshots.setdefault(step, weights),
        )
    model = to_model(result.ema_weights if result.ema_weights is not None else result.weights)
    if snapshot_at:
        return model, to_model(snapshots[snapshot_at])
    return model


def merge_lora_(model: nn.Module, lora: dict) -> None:
    """Merge LoRA tensors (ComfyUI's format, from training.train(mode="lora")) into model's weights."""
    modules = dict(model.named_modules())
    with torch.no_grad():
        for key, down in lora.items():
            if key.endswith(".lora_down.weight"):
                prefix = key[: -len(".lora_down.weight")]
                layer = modules[prefix[len("diffusion_model."):]]
                layer.weight.copy_(merged_weight(layer.weight, down.to(layer.weight.device),
                                                 lora[prefix + ".lora_up.weight"].to(layer.weight.device),
                                                 float(lora[prefix + ".alpha"])))


# --------------------------------------------------------------------------------------------
# evaluation: a shape classifier with a style head


class EvalNet(nn.Module):
    """Shape classifier with a style head; its penultimate layer is the feature space for FD."""

    def __init__(self, num_classes: int, width: int = 16, feat: int = 64):
        super().__init__()
        w = width
        self.body = nn.Sequential(
            nn.Conv2d(3, w, 3, padding=1), nn.GroupNorm(8, w), nn.SiLU(),
            nn.Conv2d(w, 2 * w, 3, stride=2, padding=1), nn.GroupNorm(8, 2 * w), nn.SiLU(),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.GroupNorm(8, 2 * w), nn.SiLU(),
            nn.Conv2d(2 * w, 4 * w, 3, stride=2, padding=1), nn.GroupNorm(8, 4 * w), nn.SiLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
            nn.Linear(4 * w, feat), nn.SiLU(),
        )
        self.shape_head = nn.Linear(feat, num_classes)
        self.style_head = nn.Linear(feat, 2)

    def forward(self, x):
        f = self.body(x)
        return f, self.shape_head(f), self.style_head(f)


def _augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Noise and blur, so that the classifier judges imperfect samples by shape and style."""
    n = x.shape[0]
    blur = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    mix = torch.rand(n, 1, 1, 1, generator=g, device=g.device) * 0.7
    x = x * (1 - mix) + blur * mix
    sigma = torch.rand(n, 1, 1, 1, generator=g, device=g.device) * 0.2
    return x + sigma * torch.randn(x.shape, generator=g, device=g.device)


def train_evalnet(images, shapes, styles, cfg: Config, seed, device) -> EvalNet:
    g = torch.Generator().manual_seed(seed)
    gd = device_generator(g, device, seed)
    torch.manual_seed(seed)
    net = EvalNet(len(cfg.classes)).to(device)
    images, shapes, styles = images.to(device), shapes.to(device), styles.to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=cfg.cls_steps)
    n = images.shape[0]
    for step in range(cfg.cls_steps):
        idx = torch.randint(0, n, (cfg.cls_batch,), generator=g).to(device)
        x = _augment(images[idx], gd)
        _, ls, lt = net(x)
        loss = F.cross_entropy(ls, shapes[idx]) + F.cross_entropy(lt, styles[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    log.info("eval net: final loss %.4f", loss.item())
    return net.eval()


@torch.no_grad()
def evaluate(net: EvalNet, images: torch.Tensor, device, batch: int = 1024):
    feats, shapes, styles = [], [], []
    for i in range(0, images.shape[0], batch):
        f, ls, lt = net(images[i:i + batch].to(device))
        feats.append(f.double().cpu())
        shapes.append(ls.argmax(1).cpu())
        styles.append(lt.argmax(1).cpu())
    return torch.cat(feats).numpy(), torch.cat(shapes), torch.cat(styles)


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to feature sets a [N, D] and b [M, D]."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    ca, cb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    w, v = np.linalg.eigh(ca)
    ca_half = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    m = ca_half @ cb @ ca_half
    tr_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(ca) + np.trace(cb) - 2 * tr_sqrt)


# --------------------------------------------------------------------------------------------
# sampling


def sampling_timesteps(timesteps: int, steps: int) -> list[int]:
    """The timesteps DDIM visits, noisiest first (it ends on the clean image, a = 1)."""
    return torch.linspace(timesteps - 1, 0, steps).round().long().tolist()


@torch.no_grad()
def ddim_sample(predict_v, labels: torch.Tensor, cfg: Config, alphas_cumprod, seed, device,
                clamp: bool = True) -> torch.Tensor:
    """Deterministic DDIM (eta 0) from seeded noise; predict_v(x, t [B], y [B]) is the guided v.
    Each step's x0 is clamped to the data range [-1, 1] (clamp=False: not; then it is the host's
    Euler sampler on this schedule's sigmas, tests/test_host_repro_equivalence.py)."""
    g = torch.Generator().manual_seed(seed)
    n = labels.shape[0]
    x = torch.randn((n, 3, cfg.size, cfg.size), generator=g).to(device)
    y = labels.to(device)
    T = alphas_cumprod.shape[0]
    ts = sampling_timesteps(T, cfg.sample_steps)
    ac = alphas_cumprod.tolist()
    x0 = x
    for i, t in enumerate(ts):
        ab = ac[t]
        ab_prev = ac[ts[i + 1]] if i + 1 < len(ts) else 1.0
        v = predict_v(x, torch.full((n,), t, device=device, dtype=torch.long), y)
        x0 = math.sqrt(ab) * x - math.sqrt(1 - ab) * v
        x0 = x0.clamp(-1, 1) if clamp else x0
        eps = (x - math.sqrt(ab) * x0) / math.sqrt(1 - ab)
        x = math.sqrt(ab_prev) * x0 + math.sqrt(1 - ab_prev) * eps
    return x0.cpu()


def host_sigmas(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """The noise level sigma = sqrt((1 - a) / a) of every timestep, in float32 as the host's
    ModelSamplingDiscrete keeps them (a host model of this schedule compares exactly these)."""
    return (((1 - alphas_cumprod) / alphas_cumprod) ** 0.5).float()


def percent_to_sigma(sigmas: torch.Tensor, percent: float) -> float:
    """The host's ModelSamplingDiscrete.percent_to_sigma: a fraction of the run (0 = first step)
    -> the noise level where it is reached (log-linear between timesteps, float32)."""
    if percent <= 0.0:
        return 999999999.9
    if percent >= 1.0:
        return 0.0
    t = torch.tensor((1.0 - percent) * (len(sigmas) - 1))
    low, high, w = t.floor().long(), t.ceil().long(), t.frac()
    log_sigmas = sigmas.log()
    return float(((1 - w) * log_sigmas[low] + w * log_sigmas[high]).exp())


def guided_predictor(cond_model, domain_model, cfg_scale: float, domain_weight: float, every: int = 1,
                     steps: int = 1, interval: tuple | None = None, alphas_cumprod=None):
    """v prediction of one method.

    cond_model gives u and c (the base for (a) and ours, the fine-tuned copy for naive (b));
    domain_model, when given, adds the domain term domain_weight * (d - u) with d its
    null-condition prediction. The negative prompt is the empty one (n = u). every = k > 1: the
    speed dial of the nodes' domain_every: d - u computed at steps 0, k, 2k, ... of each run of
    `steps` steps and reused in between (guidance.add_domain_differences), as the DomainGuider reuses
    it: in the host's parametrisation, the denoised image x0 = sqrt(a) x - sqrt(1 - a) v (needs
    alphas_cumprod; a v difference reused as it is would weigh it by sqrt(1 - a) of another step). interval = (start, end):
    the nodes' domain_start / domain_end, the domain term only where the step's noise level lies in
    [percent_to_sigma(end), percent_to_sigma(start)] (guidance.is_active, as the DomainGuider decides;
    needs alphas_cumprod).
    """
    calls, last = [0], {}
    window, sigmas = None, None
    if every > 1 and alphas_cumprod is None:
        raise ValueError("domain_every > 1 needs alphas_cumprod (the difference is reused in x0 units)")
    if interval is not None:
        if every > 1:
            raise ValueError("an interval with domain_every > 1 is not part of the experiment")
        sigmas = host_sigmas(alphas_cumprod)
        window = TermInterval(percent_to_sigma(sigmas, interval[0]), percent_to_sigma(sigmas, interval[1]))

    def predict(x, t, y):
        null = torch.full_like(y, cond_model.null_class)
        u, c = cond_model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([null, y])).chunk(2)
        step, calls[0] = calls[0] % steps, calls[0] + 1
        if domain_model is None or (window is not None and not is_active(window, float(sigmas[int(t[0])]))):
            return decoupled_guidance(u, c, None, cfg_scale)
        if every > 1:  # x0 = sqrt(a) x - sqrt(1 - a) v: a difference of v times -sqrt(1 - a) is one of x0
            to_x0 = -math.sqrt(1.0 - float(alphas_cumprod[int(t[0])]))
            if not recompute_domain(step, every):
                return add_domain_differences(decoupled_guidance(u, c, None, cfg_scale),
                                              [(last["delta_x0"] / to_x0, domain_weight)])
        d = domain_model(x, t, null)
        if every > 1:
            last["delta_x0"] = (d - u) * to_x0
        return decoupled_guidance(u, c, None, cfg_scale, terms=[GuidanceTerm(d, domain_weight)])

    return predict


# The competitors (docs/EVIDENCE.md): other ways to sample the domain with the same networks.
# (naive fine-tuning and the style LoRA are guided_predictor(model, None, cfg, 0): CFG with one model.)


def dog_predictor(base, finetuned, weight: float):
    """Domain Guidance (DoG, Zhong et al., ICLR 2025): u_base + w (c_ft - u_base), c_ft the fine-tuned
    model on the class, u_base the base on the empty condition."""

    def predict(x, t, y):
        u = base(x, t, torch.full_like(y, base.null_class))
        return u + weight * (finetuned(x, t, y) - u)

    return predict


def autoguidance_predictor(strong, weak, weight: float):
    """AutoGuidance (Karras et al., 2024): weak(c) + w (strong(c) - weak(c)), the weak model a less
    trained version of the strong one (the fine-tune's EMA early in its run), both on the class."""

    def predict(x, t, y):
        w_c = weak(x, t, y)
        return w_c + weight * (strong(x, t, y) - w_c)

    return predict


def rectified_predictor(base, domain, weight: float):
    """The paper's domain-only ("rectified") generation u_base + w (d - u_base), no class: the
    decoupled formula at cfg 0 (guidance.decoupled_guidance)."""

    def predict(x, t, y):
        null = torch.full_like(y, base.null_class)
        u = base(x, t, null)
        return decoupled_guidance(u, None, None, 0.0, terms=[GuidanceTerm(domain(x, t, null), weight)])

    return predict


def _sample_in_chunks(predict, labels, cfg, ac, seed, device, chunk):
    out = []
    for i in range(0, labels.shape[0], chunk):
        out.append(ddim_sample(predict, labels[i:i + chunk], cfg, ac, seed + i, device))
    return torch.cat(out)


# --------------------------------------------------------------------------------------------
# outputs


def save_grid(rows: list[tuple[str, torch.Tensor, torch.Tensor]], path: Path, per_cell: int, scale: int,
              classes=CLASSES):
    """rows: (label, images [N,3,S,S] in [-1,1], labels [N]); columns = classes, per_cell each."""
    from PIL import Image, ImageDraw

    S = rows[0][1].shape[-1]
    k = len(classes)
    pad, label_w, head_h = 4, 150, 16
    cell_w = per_cell * S * scale
    W = label_w + k * (cell_w + pad)
    H = head_h + len(rows) * (S * scale + pad)
    canvas = Image.new("RGB", (W, H), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for j, name in enumerate(classes):
        draw.text((label_w + j * (cell_w + pad) + 2, 2), name, fill=(0, 0, 0))
    for r, (label, imgs, labs) in enumerate(rows):
        y0 = head_h + r * (S * scale + pad)
        draw.text((2, y0 + S * scale // 2 - 6), label, fill=(0, 0, 0))
        for j in range(k):
            sel = imgs[labs == j][:per_cell]
            for m in range(sel.shape[0]):
                arr = ((sel[m].permute(1, 2, 0).clamp(-1, 1) + 1) * 127.5).round().byte().numpy()
                tile = Image.fromarray(arr).resize((S * scale, S * scale), Image.NEAREST)
                canvas.paste(tile, (label_w + j * (cell_w + pad) + m * S * scale, y0))
    # an adaptive 256-colour palette: the figure stays small enough to commit
    canvas.quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(path, optimize=True)


def method_label(name: str, weight) -> str:
    return name if weight is None else f"{name} w={weight:g}"


def _num(value, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def markdown_table(results: dict) -> str:
    lines = [
        f"cfg = {results['config']['cfg']}, {results['n_samples_per_method']} samples per method "
        f"({results['config']['samples_per_class']} per class), config `{results['config']['name']}`, "
        f"seed {results['config']['seed']}",
        "",
        "| method | domain weight | control accuracy | domain rate | FD to domain | mean abs. diff. to exact |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for m in results["methods"]:
        w = _num(m["domain_weight"], "g")
        diff = _num(m.get("mean_abs_diff_to_exact"), ".4f")
        lines.append(f"| {m['method']} | {w} | {_num(m['control_accuracy'], '.3f')} | {m['domain_rate']:.3f} "
                     f"| {m['fd_domain']:.2f} | {diff} |")
    ref = results["reference"]
    lines += [
        "",
        "Reference (real images, same sample count): "
        f"FD(real domain, held-out domain) = {ref['fd_real_domain']:.2f}, "
        f"FD(real base style, held-out domain) = {ref['fd_real_base']:.2f}; "
        f"eval net on held-out real images: shape accuracy {ref['shape_acc_real']:.3f}, "
        f"style accuracy {ref['style_acc_real']:.3f}.",
    ]
    return "\n".join(lines) + "\n"


METRICS = ("control_accuracy", "domain_rate", "fd_domain")
REFERENCE = ("fd_real_domain", "fd_real_base", "shape_acc_real", "style_acc_real")


def _mean_std(values: list) -> dict | None:
    """Mean and sample standard deviation (n - 1) over seeds; None where the metric does not apply."""
    if any(v is None for v in values):
        return None
    a = np.asarray(values, dtype=np.float64)
    return {"mean": float(a.mean()), "std": float(a.std(ddof=1)) if len(a) > 1 else 0.0, "values": a.tolist()}


def aggregate(per_seed: list[dict]) -> dict:
    """Every method's metrics over seeds (mean, standard deviation, the per-seed values)."""
    first = per_seed[0]
    rows = []
    for i, m in enumerate(first["methods"]):
        runs = [r["methods"][i] for r in per_seed]
        assert all((r["method"], r["domain_weight"]) == (m["method"], m["domain_weight"]) for r in runs)
        rows.append({"method": m["method"], "domain_weight": m["domain_weight"],
                     **{k: _mean_std([r[k] for r in runs]) for k in METRICS}})
    return {
        "config": {**first["config"], "seed": None},
        "seeds": [r["config"]["seed"] for r in per_seed],
        "n_samples_per_method": first["n_samples_per_method"],
        "device": first["device"],
        "torch": first["torch"],
        "methods": rows,
        "reference": {k: _mean_std([r["reference"][k] for r in per_seed]) for k in REFERENCE},
        "timings_s": {k: _mean_std([r["timings_s"][k] for r in per_seed]) for k in first["timings_s"]},
    }


def markdown_seeds_table(agg: dict) -> str:
    def ms(v, fmt):
        return "-" if v is None else f"{format(v['mean'], fmt)} ± {format(v['std'], fmt)}"

    seeds = agg["seeds"]
    lines = [
        f"cfg = {agg['config']['cfg']}, {agg['n_samples_per_method']} samples per method and seed, config "
        f"`{agg['config']['name']}`, seeds {', '.join(map(str, seeds))}: mean ± standard deviation over the "
        f"{len(seeds)} seeds (data, training and sampling seeds all varied)",
        "",
        "| method | weight | control accuracy | domain rate | FD to domain |",
        "| --- | --- | --- | --- | --- |",
    ]
    for m in agg["methods"]:
        lines.append(f"| {m['method']} | {_num(m['domain_weight'], 'g')} | {ms(m['control_accuracy'], '.3f')} "
                     f"| {ms(m['domain_rate'], '.3f')} | {ms(m['fd_domain'], '.2f')} |")
    ref = agg["reference"]
    lines += [
        "",
        f"Reference (real images, same sample count): FD(real domain, held-out domain) = {ms(ref['fd_real_domain'], '.2f')}, "
        f"FD(real base style, held-out domain) = {ms(ref['fd_real_base'], '.2f')}; eval net on held-out real images: "
        f"shape accuracy {ms(ref['shape_acc_real'], '.3f')}, style accuracy {ms(ref['style_acc_real'], '.3f')}.",
    ]
    return "\n".join(lines) + "\n"


def run_seeds(cfg: Config, seeds: list[int], out: Path, device: str | None = None) -> dict:
    """The experiment once per seed (out/seed<N>/), then results.json (per-seed values, mean and
    standard deviation), results.md (the table) and samples.png (the first seed's figure) in out.
    A seed whose out/seed<N>/results.json has this very configuration is read, not run again (so
    the seeds can be run in several calls: --seeds 0 1 2, then --seeds 0 1 2 3 4 into the same --out)."""
    out = Path(out)
    per_seed = []
    for seed in seeds:
        cfg_seed, folder = dataclasses.replace(cfg, seed=seed), out / f"seed{seed}"
        done = folder / "results.json"
        if done.exists() and json.loads(done.read_text())["config"] == json.loads(json.dumps(dataclasses.asdict(cfg_seed))):
            log.info("seed %d: already in %s (same configuration), not run again", seed, folder)
            per_seed.append(json.loads(done.read_text()))
        else:
            per_seed.append(run(cfg_seed, folder, device))
    agg = aggregate(per_seed)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(agg, indent=2))
    (out / "results.md").write_text(markdown_seeds_table(agg))
    (out / "samples.png").write_bytes((out / f"seed{seeds[0]}" / "samples.png").read_bytes())
    return agg


# --------------------------------------------------------------------------------------------
# the experiment


def run(cfg: Config, out: Path, device: str | None = None) -> dict:
    """The whole experiment; writes results.json, results.md and samples.png into `out`."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    threads = torch.get_num_threads()
    if device == "cpu" and cfg.threads:
        torch.set_num_threads(cfg.threads)  # 1 thread: the same numbers on any machine, no oversubscription
    try:
        return _run(cfg, Path(out), device)
    finally:
        torch.set_num_threads(threads)


def _run(cfg: Config, out: Path, device: str) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    timings = {}
    t_start = time.time()
    s = cfg.seed * 1000
    K = len(cfg.classes)

    # 1. data -------------------------------------------------------------------------------
    def data(n, style, seed):
        return make_set(n, style, cfg.size, seed, classes=cfg.classes, base_kinds=cfg.base_backgrounds)

    t0 = time.time()
    x_base, y_base = data(cfg.n_base_train, BASE_STYLE, s + 1)
    x_dom, _ = data(cfg.n_domain_train, DOMAIN_STYLE, s + 2)  # labels discarded
    x_ref, _ = data(cfg.n_domain_ref, DOMAIN_STYLE, s + 3)
    xc_b, yc_b = data(cfg.n_cls_train_per_style, BASE_STYLE, s + 4)
    xc_d, yc_d = data(cfg.n_cls_train_per_style, DOMAIN_STYLE, s + 5)
    xt_b, yt_b = data(cfg.n_cls_test_per_style, BASE_STYLE, s + 6)
    xt_d, yt_d = data(cfg.n_cls_test_per_style, DOMAIN_STYLE, s + 7)
    timings["data"] = time.time() - t0
    log.info("data: %d base, %d domain (unlabelled) images of %dx%d (%.1fs)", len(x_base), len(x_dom), cfg.size, cfg.size, timings["data"])

    # 2. evaluation network -----------------------------------------------------------------
    t0 = time.time()
    xc = torch.cat([xc_b, xc_d])
    net = train_evalnet(
        xc, torch.cat([yc_b, yc_d]),
        torch.cat([torch.full_like(yc_b, BASE_STYLE), torch.full_like(yc_d, DOMAIN_STYLE)]), cfg, s + 8, device,
    )
    _, sh_b, st_b = evaluate(net, xt_b, device)
    _, sh_d, st_d = evaluate(net, xt_d, device)
    shape_acc_real = float(torch.cat([sh_b == yt_b, sh_d == yt_d]).float().mean())
    style_acc_real = float(torch.cat([st_b == BASE_STYLE, st_d == DOMAIN_STYLE]).float().mean())
    timings["eval_net"] = time.time() - t0
    log.info("eval net: held-out shape acc %.3f, style acc %.3f (%.1fs)", shape_acc_real, style_acc_real, timings["eval_net"])

    # 3. base model ---------------------------------------------------------------------------
    t0 = time.time()
    ac = cosine_alphas_cumprod(cfg.timesteps)
    torch.manual_seed(s + 9)
    base = SmallUNet(3, cfg.channels, K, cfg.emb_dim, cfg.patch).to(device)
    base_ema = train_base(base, x_base, y_base, cfg, ac, s + 10, device)
    timings["base_train"] = time.time() - t0

    # 4. the text-free copy: training.train() on the domain images, null condition only --------
    #    (with the competitors: its EMA early in the run too, AutoGuidance's weak model)
    t0 = time.time()
    weak_at = max(1, round(cfg.ft_steps * cfg.weak_fraction)) if cfg.competitors else None
    ft_ema = train_text_free_copy(base_ema, x_dom, cfg, ac, s + 11, device, snapshot_at=weak_at)
    if cfg.competitors:
        ft_ema, ft_weak = ft_ema
    timings["finetune"] = time.time() - t0
    if cfg.competitors:  # a style LoRA of the base: the same data, steps and batch, the null condition
        t0 = time.time()
        lora = train_text_free_copy(base_ema, x_dom, cfg, ac, s + 15, device, mode="lora")
        timings["lora"] = time.time() - t0

    # 5. sampling -------------------------------------------------------------------------------
    t0 = time.time()
    n_per = cfg.samples_per_class
    labels = torch.arange(K).repeat_interleave(n_per)
    chunk = 512 if device == "cpu" else 4096
    T = cfg.sample_steps
    # (name, domain weight or None, v predictor, conditional on the class?)
    methods = [("base", None, guided_predictor(base_ema, None, cfg.cfg, 0.0), True),
               ("naive fine-tune", None, guided_predictor(ft_ema, None, cfg.cfg, 0.0), True)]
    methods += [("ours", w, guided_predictor(base_ema, ft_ema, cfg.cfg, w), True) for w in cfg.domain_weights]
    methods += [(f"ours, domain_every {k}", cfg.headline_weight,
                 guided_predictor(base_ema, ft_ema, cfg.cfg, cfg.headline_weight, k, T, alphas_cumprod=ac), True)
                for k in cfg.domain_every]
    methods += [(f"ours, domain {a:g}-{b:g}", cfg.headline_weight,
                 guided_predictor(base_ema, ft_ema, cfg.cfg, cfg.headline_weight, interval=(a, b), alphas_cumprod=ac), True)
                for a, b in cfg.domain_intervals]
    if cfg.competitors:
        methods += [("style LoRA", None, guided_predictor(lora, None, cfg.cfg, 0.0), True)]
        methods += [("DoG", w, dog_predictor(base_ema, ft_ema, w), True) for w in cfg.dog_weights]
        methods += [("AutoGuidance", cfg.autoguidance_weight, autoguidance_predictor(ft_ema, ft_weak, cfg.autoguidance_weight), True)]
        methods += [("rectified (no class)", w, rectified_predictor(base_ema, ft_ema, w), False) for w in cfg.rectified_weights]
    samples = []
    for name, w, pred, conditional in methods:
        imgs = _sample_in_chunks(pred, labels, cfg, ac, s + 12, device, chunk)  # same noise for all
        samples.append((name, w, imgs, conditional))
    exact = next((imgs for name, w, imgs, _ in samples if name == "ours" and w == cfg.headline_weight), None)
    timings["sampling"] = time.time() - t0

    # 6. metrics -------------------------------------------------------------------------------
    t0 = time.time()
    f_ref, _, _ = evaluate(net, x_ref, device)
    n_gen = labels.shape[0]
    f_real_dom, _, _ = evaluate(net, data(n_gen, DOMAIN_STYLE, s + 13)[0], device)
    f_real_base, _, _ = evaluate(net, data(n_gen, BASE_STYLE, s + 14)[0], device)
    reference = {
        "fd_real_domain": frechet_distance(f_real_dom, f_ref),
        "fd_real_base": frechet_distance(f_real_base, f_ref),
        "shape_acc_real": shape_acc_real,
        "style_acc_real": style_acc_real,
    }
    rows = []
    for name, w, imgs, conditional in samples:
        f, sh, st = evaluate(net, imgs, device)
        per_class = [float((sh[labels == k] == k).float().mean()) for k in range(K)]
        rows.append({
            "method": name,
            "domain_weight": w,
            # (None for unconditional samples: no class was requested)
            "control_accuracy": float((sh == labels).float().mean()) if conditional else None,
            "control_accuracy_per_class": per_class if conditional else None,
            "domain_rate": float((st == DOMAIN_STYLE).float().mean()),
            "fd_domain": frechet_distance(f, f_ref),
            # against the exact formula's samples (same noise, same weight): mean |difference| in [-1, 1] pixels
            "mean_abs_diff_to_exact": (float((imgs - exact).abs().mean())
                                       if exact is not None and w == cfg.headline_weight
                                       and (name == "ours" or name.startswith("ours, domain_every"))
                                       else None),
        })
    timings["metrics"] = time.time() - t0
    timings["total"] = time.time() - t_start

    results = {
        "config": dataclasses.asdict(cfg),
        "device": device,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "n_samples_per_method": n_gen,
        "headline_weight": cfg.headline_weight,
        "methods": rows,
        "reference": reference,
        "timings_s": timings,
        "training": "base: experiments.indomain_repro.train_base with training.noise's loss; "
                    "domain copy: training.train (mode full, prediction v, null condition)",
    }
    (out / "results.json").write_text(json.dumps(results, indent=2))
    table = markdown_table(results)
    (out / "results.md").write_text(table)
    grid_rows = [(method_label(name, w), imgs, labels) for name, w, imgs, _ in samples]
    save_grid(grid_rows, out / "samples.png", cfg.grid_per_cell, scale=3 if cfg.size <= 16 else 2, classes=cfg.classes)
    log.info("wrote %s (total %.1fs)", out, timings["total"])
    return results


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", choices=sorted(CONFIGS), default="cpu")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--seed", type=int, default=None, help="override the config's seed")
    ap.add_argument("--seeds", type=int, nargs="+", default=None, metavar="N",
                    help="run once per seed (out/seed<N>/) and write the table of mean ± std over them into --out")
    ap.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="override one Config field (a Python literal), e.g. --set ft_steps=600")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    cfg = CONFIGS[args.config]
    if args.seed is not None:
        cfg = dataclasses.replace(cfg, seed=args.seed)
    for item in args.set:
        key, _, value = item.partition("=")
        if key not in {f.name for f in dataclasses.fields(Config)}:
            ap.error(f"--set {item}: Config has no field {key!r}")
        cfg = dataclasses.replace(cfg, **{key: ast.literal_eval(value)})
    if args.seeds:
        sys.stdout.write(markdown_seeds_table(run_seeds(cfg, args.seeds, args.out, args.device)))
        return 0
    results = run(cfg, args.out, args.device)
    sys.stdout.write(markdown_table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
