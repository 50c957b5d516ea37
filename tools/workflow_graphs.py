"""The templates tools/make_workflows.py writes (example_workflows/*.json), as compact graphs:
SD1.5's five, SDXL's and Flux.1 dev's two each, Qwen-Image's, its Edit's, Flux.2's and Wan 2.2's.

A widget a graph leaves out gets the node's default; "_title" (not a widget) names the node;
NOTE is the front end's text node.
"""
from __future__ import annotations

CKPT = "v1-5-pruned-emaonly.safetensors"
DOMAIN = "my_domain.safetensors"
NEG = "blurry, low quality, watermark"

# Each node: id -> (type, {widget: value}, {input: (node, slot)}, column). Columns are laid out
# left to right in the order of their numbers (unused numbers leave no gap); in a column the
# nodes are stacked in the order of their ids.
LAST = 9  # the output column: decode, then save
COMMON = {
    1: ("CheckpointLoaderSimple", {"ckpt_name": CKPT}, {}, 0),
    2: ("InDomainUNetLoader", {"unet_name": DOMAIN, "lora_strength": 1.0}, {"base_model": (1, 0)}, 1),
    4: ("CLIPTextEncode", {"text": NEG}, {"clip": (1, 1)}, 1),
    5: ("CLIPTextEncode", {"text": ""}, {"clip": (1, 1)}, 1),
    9: ("VAEDecode", {}, {"samples": (7, 0), "vae": (1, 2)}, LAST),
    10: ("SaveImage", {"filename_prefix": "indomain"}, {"images": (9, 0)}, LAST),
}


def sampler(positive=(3, 0), negative=(4, 0), latent=(6, 0), cfg=7.0, scale=1.5, denoise=1.0, column=2):
    return ("InDomainKSampler", {"seed": 42, "steps": 25, "cfg": cfg, "sampler_name": "euler", "scheduler": "normal",
                                 "denoise": denoise, "domain_scale": scale, "domain_start": 0.0, "domain_end": 1.0,
                                 "control_in_domain": False},
            {"model": (1, 0), "positive": positive, "negative": negative, "null_conditioning": (5, 0),
             "latent_image": latent, "domain_model": (2, 0)}, column)


EMPTY = ("EmptyLatentImage", {"width": 512, "height": 512, "batch_size": 1}, {}, 1)

# --- SDXL and Flux.1 dev: what a user of each family builds with the host's stock loaders ----------
# SDXL: one checkpoint (Load Checkpoint), 1024x1024, KSampler's usual 25 Euler steps at cfg 7; a domain
# LoRA trained at 1024 (the family's resolution).
SDXL_CKPT = "sd_xl_base_1.0.safetensors"
SDXL = {
    **COMMON,
    1: ("CheckpointLoaderSimple", {"ckpt_name": SDXL_CKPT}, {}, 0),
    2: ("InDomainUNetLoader", {"unet_name": "my_sdxl_domain.safetensors", "lora_strength": 1.0}, {"base_model": (1, 0)}, 1),
    6: ("EmptyLatentImage", {"width": 1024, "height": 1024, "batch_size": 1}, {}, 1),
}
# The training templates' validation prompts: sampled at every checkpoint (domain_scale 0, 1 and 2), a grid each
VALIDATION_PROMPTS = "a teapot on a wooden table\na city street at night"
SDXL_TRAIN = {"mode": "lora", "steps": 1000, "batch_size": 2, "learning_rate": 1e-4, "resolution": 1024,
              "gradient_checkpointing": True, "save_name": "my_sdxl_domain", "image_folder": "my_domain_images",
              "checkpoint_every": 250, "preview_every": 250, "validation_prompts": VALIDATION_PROMPTS}

# Flux.1 dev as the host's own Flux templates build it: Load Diffusion Model (flux1-dev), DualCLIPLoader
# (CLIP-L and T5-XXL, type flux), the Flux VAE (ae), an empty SD3 latent (16 channels) of 1024x1024,
# FluxGuidance 3.5 on the prompt and KSampler at cfg 1 (the negative, ConditioningZeroOut, is then not
# computed), 20 Euler steps, scheduler simple. The domain term is measured at the prompt's guidance.
FLUX = {
    1: ("UNETLoader", {"unet_name": "flux1-dev.safetensors", "weight_dtype": "default"}, {}, 0),
    15: ("DualCLIPLoader", {"clip_name1": "clip_l.safetensors", "clip_name2": "t5xxl_fp16.safetensors", "type": "flux"}, {}, 0),
    16: ("VAELoader", {"vae_name": "ae.safetensors"}, {}, 0),
    5: ("CLIPTextEncode", {"text": ""}, {"clip": (15, 0)}, 1),
    6: ("EmptySD3LatentImage", {"width": 1024, "height": 1024, "batch_size": 1}, {}, 1),
    9: ("VAEDecode", {}, {"samples": (7, 0), "vae": (16, 0)}, LAST),
    10: COMMON[10],
}
FLUX_SAMPLER = {"seed": 42, "steps": 20, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0,
                "domain_scale": 1.0, "domain_start": 0.0, "domain_end": 1.0, "control_in_domain": False}


def flux_prompt(text, column):
    """The prompt (3), its FluxGuidance (14) and the zeroed negative (17), as the host's Flux templates have them."""
    return {3: ("CLIPTextEncode", {"text": text}, {"clip": (15, 0)}, 1),
            14: ("FluxGuidance", {"guidance": 3.5}, {"conditioning": (3, 0)}, column),
            17: ("ConditioningZeroOut", {}, {"conditioning": (3, 0)}, column)}


def flux_sampler(domain, column):
    return ("InDomainKSampler", FLUX_SAMPLER,
            {"model": (1, 0), "positive": (14, 0), "negative": (17, 0), "null_conditioning": (5, 0),
             "latent_image": (6, 0), "domain_model": domain}, column)


FLUX_TRAIN = {"mode": "lora", "steps": 1000, "batch_size": 1, "learning_rate": 1e-4, "resolution": 1024,
              "gradient_checkpointing": True, "save_name": "my_flux_domain", "image_folder": "my_domain_images",
              "checkpoint_every": 250, "preview_every": 250, "validation_prompts": VALIDATION_PROMPTS}
VALIDATION_PREVIEW = ("PreviewImage", {"_title": "Validation samples"}, {"images": (20, 3)}, 3)

NOTE = "Note"  # a text node of the front end (not a host node): what the template needs and why it is set so


def note(text, column=0):
    return (NOTE, {"title": "Read me", "text": text.strip()}, {}, column)


SDXL_NOTE = note("""
SDXL with a domain.

Files: sd_xl_base_1.0.safetensors in models/checkpoints; the domain (a LoRA of this base, e.g. from the sdxl_train_domain template: models/loras/my_sdxl_domain.safetensors) in Load Domain UNet.

1024 x 1024 is SDXL's resolution. cfg steers towards the prompt with the base model only; domain_scale (about 1 to 2) adds w * (domain - base) on the empty prompt; 0 is KSampler bit for bit.
""")
SDXL_TRAIN_NOTE = note("""
Train an SDXL domain, then sample with it.

Put the domain images (no captions) in ComfyUI/input/my_domain_images. Train Domain UNet learns a LoRA of the base at 1024 px (gradient checkpointing, bf16) and writes models/loras/my_sdxl_domain.safetensors every 250 steps; queued again, it resumes from there (or, with the same images and settings, the host reuses its result). Load Domain UNet reads the file later.

At each checkpoint it samples its validation_prompts (one per line) at domain_scale 0, 1 and 2 as KSampler (Domain Guidance) would with that checkpoint: one grid each in output/indomain_previews/my_sdxl_domain/, the last one in Validation samples. Pick the checkpoint by eye.

File: sd_xl_base_1.0.safetensors in models/checkpoints.
""")
FLUX_NOTE = note("""
Flux.1 dev with a domain.

Files: flux1-dev.safetensors in models/diffusion_models; clip_l.safetensors and t5xxl_fp16.safetensors in models/text_encoders; ae.safetensors in models/vae; the domain (a LoRA of flux1-dev, e.g. from the flux_dev_train_domain template: models/loras/my_flux_domain.safetensors) in Load Domain UNet.

cfg 1, as Flux dev is run: FluxGuidance on the prompt steers it and the negative is not computed. domain_scale adds w * (domain - base) on the empty prompt, both at the prompt's guidance; 0 is KSampler bit for bit.
""")
FLUX_TRAIN_NOTE = note("""
Train a Flux.1 dev domain, then sample with it.

Put the domain images (no captions) in ComfyUI/input/my_domain_images. Train Domain UNet learns a LoRA of flux1-dev at 1024 px (gradient checkpointing, bf16) on the empty prompt at guidance 3.5 (the host's default) and writes models/loras/my_flux_domain.safetensors every 250 steps; queued again, it resumes from there.

At each checkpoint it samples its validation_prompts (one per line) at domain_scale 0, 1 and 2 (cfg 1, as Flux dev is run) as KSampler (Domain Guidance) would with that checkpoint: one grid each in output/indomain_previews/my_flux_domain/, the last one in Validation samples.

Files: flux1-dev.safetensors in models/diffusion_models; clip_l.safetensors and t5xxl_fp16.safetensors in models/text_encoders; ae.safetensors in models/vae.
""")

FAMILY_GRAPHS = {
    "sdxl_text_to_image_domain": {
        **SDXL, 3: ("CLIPTextEncode", {"text": "a cat sitting on a windowsill, in the domain's style"}, {"clip": (1, 1)}, 1),
        7: sampler(), 30: SDXL_NOTE},
    "sdxl_train_domain": {
        **{k: SDXL[k] for k in (1, 4, 5, 6, 9, 10)},
        3: ("CLIPTextEncode", {"text": "a teapot on a wooden table, in the domain's style"}, {"clip": (1, 1)}, 1),
        20: ("InDomainTrainUNet", SDXL_TRAIN, {"model": (1, 0), "vae": (1, 2), "null_conditioning": (5, 0), "clip": (1, 1)}, 2),
        21: ("PreviewImage", {}, {"images": (20, 1)}, 2), 22: VALIDATION_PREVIEW,
        7: ("InDomainKSampler", sampler()[1], {**sampler()[2], "domain_model": (20, 0)}, 3), 30: SDXL_TRAIN_NOTE},
    "flux_dev_text_to_image_domain": {
        **FLUX,
        2: ("InDomainUNetLoader", {"unet_name": "my_flux_domain.safetensors", "lora_strength": 1.0}, {"base_model": (1, 0)}, 1),
        **flux_prompt("a cat sitting on a windowsill, in the domain's style", 2),
        7: flux_sampler((2, 0), 3), 30: FLUX_NOTE},
    "flux_dev_train_domain": {
        **FLUX,
        **flux_prompt("a teapot on a wooden table, in the domain's style", 1),
        20: ("InDomainTrainUNet", FLUX_TRAIN, {"model": (1, 0), "vae": (16, 0), "null_conditioning": (5, 0), "clip": (15, 0)}, 2),
        21: ("PreviewImage", {}, {"images": (20, 1)}, 2), 22: VALIDATION_PREVIEW,
        7: flux_sampler((20, 0), 3), 30: FLUX_TRAIN_NOTE},
}


# --- the families users run now, as the host's own templates build them (comfyui-workflow-templates:
# image_qwen_image, image_qwen_image_edit, image_flux2_text_to_image, video_wan2_2_14B_t2v), their
# original settings (not the speed LoRAs' switches), with only nodes whose inputs are the same in
# ComfyUI 0.8.0 and 0.33 (a template is one file for both): CFGNorm, Create Video and Save Video are not.

def clip_loader(name, kind):
    return ("CLIPLoader", {"clip_name": name, "type": kind, "device": "default"}, {}, 0)


def domain_loader(name, base, column, title=None):
    widgets = {"unet_name": name, "lora_strength": 1.0, **({"_title": title} if title else {})}
    return ("InDomainUNetLoader", widgets, {"base_model": base}, column)


def guider(model, positive, negative, null, domain, cfg, column, title=None):
    widgets = {"cfg": cfg, "domain_scale": 1.0, "domain_start": 0.0, "domain_end": 1.0, "control_in_domain": False,
               "domain_every": 1, **({"_title": title} if title else {})}
    return ("InDomainGuider", widgets, {"model": model, "positive": positive, "negative": negative,
                                        "null_conditioning": null, "domain_model": domain}, column)


def custom_sampler(noise, guide, sampler, sigmas, latent, column, title=None):
    return ("SamplerCustomAdvanced", {"_title": title} if title else {},
            {"noise": noise, "guider": guide, "sampler": sampler, "sigmas": sigmas, "latent_image": latent}, column)


def ksampler(steps, cfg, positive, negative, null, latent, model=(11, 0), column=2):
    return ("InDomainKSampler", {"seed": 42, "steps": steps, "cfg": cfg, "sampler_name": "euler", "scheduler": "simple",
                                 "denoise": 1.0, "domain_scale": 1.0, "domain_start": 0.0, "domain_end": 1.0,
                                 "control_in_domain": False},
            {"model": model, "positive": positive, "negative": negative, "null_conditioning": null,
             "latent_image": latent, "domain_model": (2, 0)}, column)


QWEN_FILES = ("qwen_2.5_vl_7b_fp8_scaled.safetensors in models/text_encoders; qwen_image_vae.safetensors in models/vae")
# Qwen-Image: Load Diffusion Model, CLIPLoader (Qwen2.5-VL, type qwen_image), the Qwen-Image VAE,
# ModelSamplingAuraFlow shift 3.1, an empty SD3 latent of 1328 x 1328, KSampler 20 steps at cfg 4 (euler,
# simple) with the empty prompt as the negative. That empty prompt is null_conditioning too (one row).
QWEN = {
    1: ("UNETLoader", {"unet_name": "qwen_image_fp8_e4m3fn.safetensors", "weight_dtype": "default"}, {}, 0),
    15: clip_loader("qwen_2.5_vl_7b_fp8_scaled.safetensors", "qwen_image"),
    16: ("VAELoader", {"vae_name": "qwen_image_vae.safetensors"}, {}, 0),
    11: ("ModelSamplingAuraFlow", {"shift": 3.1}, {"model": (1, 0)}, 1),
    3: ("CLIPTextEncode", {"text": "a cat sitting on a windowsill, in the domain's style"}, {"clip": (15, 0)}, 1),
    5: ("CLIPTextEncode", {"text": "", "_title": "Empty prompt (negative, null_conditioning)"}, {"clip": (15, 0)}, 1),
    6: ("EmptySD3LatentImage", {"width": 1328, "height": 1328, "batch_size": 1}, {}, 1),
    2: domain_loader("my_qwen_image_domain.safetensors", (11, 0), 2),
    7: ksampler(20, 4.0, (3, 0), (5, 0), (5, 0), (6, 0)),
    9: ("VAEDecode", {}, {"samples": (7, 0), "vae": (16, 0)}, LAST),
    10: COMMON[10],
    30: note("""
Qwen-Image with a domain.

Files: qwen_image_fp8_e4m3fn.safetensors in models/diffusion_models; """ + QWEN_FILES + """; the domain (a LoRA of this Qwen-Image: models/loras/my_qwen_image_domain.safetensors, or a full copy in models/diffusion_models) in Load Domain UNet.

As the host's Qwen-Image template: shift 3.1, 1328 x 1328, 20 steps at cfg 4, the empty prompt as the negative; here it is null_conditioning too, and its row is computed once. domain_scale adds w * (domain - base) on the empty prompt; 0 is KSampler bit for bit.
"""),
}

# Qwen-Image Edit: the same loaders with the Edit model, shift 3, the picture to edit encoded with the
# prompt by TextEncodeQwenImageEdit (the reference image), the negative the same node with an empty
# prompt, the picture's latent as the start (VAEEncode), KSampler 20 steps at cfg 2.5. The empty prompt
# with the picture is null_conditioning: the domain rows keep the reference.
QWEN_EDIT = {
    1: ("UNETLoader", {"unet_name": "qwen_image_edit_fp8_e4m3fn.safetensors", "weight_dtype": "default"}, {}, 0),
    12: ("LoadImage", {"image": "source.png"}, {}, 0),
    15: QWEN[15], 16: QWEN[16],
    11: ("ModelSamplingAuraFlow", {"shift": 3.0}, {"model": (1, 0)}, 1),
    3: ("TextEncodeQwenImageEdit", {"prompt": "make it an evening scene, in the domain's style"},
        {"clip": (15, 0), "vae": (16, 0), "image": (12, 0)}, 1),
    5: ("TextEncodeQwenImageEdit", {"prompt": "", "_title": "Empty prompt + image (negative, null_conditioning)"},
        {"clip": (15, 0), "vae": (16, 0), "image": (12, 0)}, 1),
    6: ("VAEEncode", {}, {"pixels": (12, 0), "vae": (16, 0)}, 1),
    2: domain_loader("my_qwen_image_edit_domain.safetensors", (11, 0), 2),
    7: ksampler(20, 2.5, (3, 0), (5, 0), (5, 0), (6, 0)),
    9: QWEN[9], 10: COMMON[10],
    30: note("""
Qwen-Image Edit with a domain.

Files: qwen_image_edit_fp8_e4m3fn.safetensors in models/diffusion_models; """ + QWEN_FILES + """; the domain (a LoRA of this Qwen-Image Edit: models/loras/my_qwen_image_edit_domain.safetensors, or a full copy) in Load Domain UNet; the picture to edit in Load Image.

As the host's Qwen-Image Edit template: shift 3, 20 steps at cfg 2.5, the empty prompt with the picture as the negative; here it is null_conditioning too, so the domain term keeps the picture as its reference. The host's template also puts CFGNorm (strength 1) after the shift; its inputs differ between ComfyUI versions, so it is left out here (added, it acts on KSampler's part; the domain term is added after it).
"""),
}

# Flux.2 dev text to image: Load Diffusion Model, CLIPLoader (Mistral Small, type flux2), the Flux.2 VAE, an
# empty Flux.2 latent of 1024 x 1024, FluxGuidance 4 on the prompt, Flux2Scheduler 20 steps at the image's
# size, RandomNoise, euler, SamplerCustomAdvanced; the host's BasicGuider becomes the Domain Guider at cfg 1
# (the negative, ConditioningZeroOut, is then not computed).
FLUX2 = {
    1: ("UNETLoader", {"unet_name": "flux2_dev_fp8mixed.safetensors", "weight_dtype": "default"}, {}, 0),
    15: clip_loader("mistral_3_small_flux2_bf16.safetensors", "flux2"),
    16: ("VAELoader", {"vae_name": "flux2-vae.safetensors"}, {}, 0),
    2: domain_loader("my_flux2_domain.safetensors", (1, 0), 1),
    3: ("CLIPTextEncode", {"text": "a cat sitting on a windowsill, in the domain's style"}, {"clip": (15, 0)}, 1),
    5: ("CLIPTextEncode", {"text": ""}, {"clip": (15, 0)}, 1),
    6: ("EmptyFlux2LatentImage", {"width": 1024, "height": 1024, "batch_size": 1}, {}, 1),
    14: ("FluxGuidance", {"guidance": 4.0}, {"conditioning": (3, 0)}, 2),
    17: ("ConditioningZeroOut", {}, {"conditioning": (3, 0)}, 2),
    21: ("Flux2Scheduler", {"steps": 20, "width": 1024, "height": 1024}, {}, 2),
    23: ("RandomNoise", {"noise_seed": 42}, {}, 2),
    25: ("KSamplerSelect", {"sampler_name": "euler"}, {}, 2),
    7: guider((1, 0), (14, 0), (17, 0), (5, 0), (2, 0), 1.0, 3),
    8: custom_sampler((23, 0), (7, 0), (25, 0), (21, 0), (6, 0), 4),
    9: ("VAEDecode", {}, {"samples": (8, 0), "vae": (16, 0)}, LAST),
    10: COMMON[10],
    30: note("""
Flux.2 dev with a domain.

Files: flux2_dev_fp8mixed.safetensors in models/diffusion_models; mistral_3_small_flux2_bf16.safetensors in models/text_encoders; flux2-vae.safetensors in models/vae; the domain (a LoRA of flux2-dev, e.g. trained with Train Domain UNet: models/loras/my_flux2_domain.safetensors) in Load Domain UNet.

As the host's Flux.2 template: FluxGuidance 4 on the prompt, Flux2Scheduler at the latent's size (change both together), the Domain Guider where its BasicGuider is, at cfg 1 (the negative is not computed). domain_scale adds w * (domain - base) on the empty prompt, both at the prompt's guidance; 0 is the host's template bit for bit.
"""),
}

# Wan 2.2 A14B text to video: the high-noise and the low-noise expert (Load Diffusion Model each,
# ModelSamplingSD3 shift 8 each), umT5 (CLIPLoader, type wan), the Wan 2.1 VAE, an empty video latent of
# 640 x 640 x 81 frames, the host's negative prompt, 20 steps at cfg 3.5 (euler, simple) switching experts
# at step 10. The host's two KSamplerAdvanced become BasicScheduler -> SplitSigmas at step 10 and two
# SamplerCustomAdvanced (RandomNoise, then DisableNoise: the latent carries the leftover noise), each with
# a Domain Guider of its expert and that expert's domain. Save WEBM writes the video (the host's Create
# Video and Save Video have other inputs in 0.8.0 than in 0.33).
WAN_NEGATIVE = ("色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，JPEG压缩残留，丑陋的，"
                "残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，静止不动的画面，杂乱的背景，"
                "三条腿，背景人很多，倒着走，裸露，NSFW")
WAN_A14B = {  # (the ids set each column's order: the experts first)
    1: ("UNETLoader", {"unet_name": "wan2.2_t2v_high_noise_14B_fp8_scaled.safetensors", "weight_dtype": "default",
                       "_title": "High-noise expert"}, {}, 0),
    2: ("UNETLoader", {"unet_name": "wan2.2_t2v_low_noise_14B_fp8_scaled.safetensors", "weight_dtype": "default",
                       "_title": "Low-noise expert"}, {}, 0),
    15: clip_loader("umt5_xxl_fp8_e4m3fn_scaled.safetensors", "wan"),
    16: ("VAELoader", {"vae_name": "wan_2.1_vae.safetensors"}, {}, 0),
    3: ("ModelSamplingSD3", {"shift": 8.0}, {"model": (1, 0)}, 1),
    4: ("ModelSamplingSD3", {"shift": 8.0}, {"model": (2, 0)}, 1),
    5: ("CLIPTextEncode", {"text": "a cat walking along a windowsill, in the domain's style",
                           "_title": "CLIP Text Encode (Positive Prompt)"}, {"clip": (15, 0)}, 1),
    6: ("CLIPTextEncode", {"text": WAN_NEGATIVE, "_title": "CLIP Text Encode (Negative Prompt)"}, {"clip": (15, 0)}, 1),
    7: ("CLIPTextEncode", {"text": ""}, {"clip": (15, 0)}, 1),
    8: ("EmptyHunyuanLatentVideo", {"width": 640, "height": 640, "length": 81, "batch_size": 1}, {}, 1),
    11: domain_loader("my_wan_high_noise_domain.safetensors", (3, 0), 2, "Domain of the high-noise expert"),
    12: domain_loader("my_wan_low_noise_domain.safetensors", (4, 0), 2, "Domain of the low-noise expert"),
    21: ("BasicScheduler", {"scheduler": "simple", "steps": 20, "denoise": 1.0}, {"model": (3, 0)}, 2),
    22: ("SplitSigmas", {"step": 10}, {"sigmas": (21, 0)}, 2),
    23: ("RandomNoise", {"noise_seed": 42}, {}, 2),
    24: ("DisableNoise", {}, {}, 2),
    25: ("KSamplerSelect", {"sampler_name": "euler"}, {}, 2),
    13: guider((3, 0), (5, 0), (6, 0), (7, 0), (11, 0), 3.5, 3, "Domain Guider (high-noise expert)"),
    14: guider((4, 0), (5, 0), (6, 0), (7, 0), (12, 0), 3.5, 3, "Domain Guider (low-noise expert)"),
    17: custom_sampler((23, 0), (13, 0), (25, 0), (22, 0), (8, 0), 4, "Steps 0-10 (high-noise expert)"),
    18: custom_sampler((24, 0), (14, 0), (25, 0), (22, 1), (17, 0), 4, "Steps 10-20 (low-noise expert)"),
    9: ("VAEDecode", {}, {"samples": (18, 0), "vae": (16, 0)}, LAST),
    10: ("SaveWEBM", {"filename_prefix": "video/indomain", "codec": "vp9", "fps": 16.0, "crf": 32.0}, {"images": (9, 0)}, LAST),
    30: note("""
Wan 2.2 A14B text to video with a domain per expert.

Files: wan2.2_t2v_high_noise_14B_fp8_scaled.safetensors and wan2.2_t2v_low_noise_14B_fp8_scaled.safetensors in models/diffusion_models; umt5_xxl_fp8_e4m3fn_scaled.safetensors in models/text_encoders; wan_2.1_vae.safetensors in models/vae; a domain for each expert (a LoRA of it: models/loras/my_wan_high_noise_domain.safetensors and my_wan_low_noise_domain.safetensors, or full copies) in its Load Domain UNet.

As the host's Wan 2.2 14B template: shift 8, 640 x 640 x 81 frames, 20 steps at cfg 3.5, the high-noise expert for steps 0-10 and the low-noise one after. SplitSigmas (step 10) splits the high-noise model's schedule; the second sampler adds no noise. With domain_scale 0 in both guiders this is the host's two-KSamplerAdvanced template bit for bit. Save WEBM writes the video (the host's Create Video and Save Video differ between ComfyUI versions).
"""),
}

NEWER_GRAPHS = {
    "qwen_image_text_to_image_domain": QWEN,
    "qwen_image_edit_domain": QWEN_EDIT,
    "flux2_dev_text_to_image_domain": FLUX2,
    "wan22_14b_text_to_video_domain": WAN_A14B,
}


GRAPHS = {
    "text_to_image_domain": {
        **COMMON, 3: ("CLIPTextEncode", {"text": "a cat sitting on a windowsill, in the domain's style"}, {"clip": (1, 1)}, 1),
        6: EMPTY, 7: sampler()},
    "unconditional_domain": {
        **COMMON, 4: ("CLIPTextEncode", {"text": ""}, {"clip": (1, 1)}, 1),
        6: EMPTY, 7: sampler(positive=(5, 0), negative=(5, 0), cfg=0.0, scale=1.0)},
    "controlnet_domain": {
        **COMMON, 3: ("CLIPTextEncode", {"text": "a vase on a table"}, {"clip": (1, 1)}, 1),
        6: EMPTY,
        11: ("ControlNetLoader", {"control_net_name": "control_v11p_sd15_canny.safetensors"}, {}, 0),
        12: ("LoadImage", {"image": "control_hint.png"}, {}, 0),
        13: ("ControlNetApplyAdvanced", {"strength": 1.0, "start_percent": 0.0, "end_percent": 1.0},
             {"positive": (3, 0), "negative": (4, 0), "control_net": (11, 0), "image": (12, 0), "vae": (1, 2)}, 2),
        7: sampler(positive=(13, 0), negative=(13, 1), column=3)},
    "img2img_domain": {
        **COMMON, 3: ("CLIPTextEncode", {"text": "a portrait photo"}, {"clip": (1, 1)}, 1),
        12: ("LoadImage", {"image": "source.png"}, {}, 0),
        6: ("VAEEncode", {}, {"pixels": (12, 0), "vae": (1, 2)}, 1),
        7: sampler(denoise=0.6)},
    "train_domain": {
        1: COMMON[1], 4: COMMON[4], 5: COMMON[5], 9: COMMON[9], 10: COMMON[10],
        3: ("CLIPTextEncode", {"text": "a teapot on a wooden table, in the domain's style"}, {"clip": (1, 1)}, 1),
        20: ("InDomainTrainUNet", {"mode": "lora", "steps": 1000, "batch_size": 4, "learning_rate": 1e-4,
                                   "save_name": "my_domain", "image_folder": "my_domain_images", "checkpoint_every": 250,
                                   "preview_every": 250, "validation_prompts": VALIDATION_PROMPTS},
             {"model": (1, 0), "vae": (1, 2), "null_conditioning": (5, 0), "clip": (1, 1)}, 2),
        21: ("PreviewImage", {}, {"images": (20, 1)}, 2), 22: VALIDATION_PREVIEW,
        6: EMPTY,
        7: ("InDomainKSampler", sampler()[1], {**sampler()[2], "domain_model": (20, 0)}, 3)},
    **FAMILY_GRAPHS,
    **NEWER_GRAPHS,
}
