"""Train Domain UNet for every model family (issue 17): tiny random-weight models of the host's own
classes (tests/support/tiny_families.py), a tiny VAE of the family's latent channels, the empty prompt.

For each family: a LoRA file written with the family's prediction type, whose adapters the host's
own LoRA loader applies to the base's weights; a run stopped and resumed ends with the weights of
an uninterrupted one. For the flow families: the loss falls; full mode gives a MODEL of the base's
family and sampling.
"""
import os

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from tests.support import tiny_families as fam
from tests.support import tiny_nodes as tiny
from tests.support.graphs import TRAIN_DEFAULTS, reproducible_dtype, saved
from tests.support.tiny_nodes import domain_images

# (Flux.2, Chroma, Qwen-Image, HunyuanImage 2.1: tests/support/tiny_newer_families.py)
FAMILIES = [*fam.FAMILIES, "flux2", "chroma", "qwen_image", "hunyuan_image"]
FLOW = ("sd3", "flux_dev", "flux_schnell", "zimage", "flux2", "chroma", "qwen_image", "hunyuan_image")
DITS = ["sd3", "flux_dev", "zimage", "flux2", "chroma", "qwen_image", "hunyuan_image"]  # (SD2-v, SDXL: test_host_training.py)


def vae_node(family) -> dict:
    """A tiny VAE of the family's latents: the host's Wan 2.1 VAE for Qwen-Image (video-shaped latents,
    one frame per image), else the host's TAESD of the family's channel count."""
    if family == "qwen_image":
        return {"class_type": "TestTinyWan21VAE", "inputs": {}}
    return {"class_type": "TestTinyTAESD", "inputs": {"latent_channels": fam.LATENT_CHANNELS[family]}}


@pytest.fixture(scope="module", autouse=True)
def setup(comfy):
    import folder_paths

    fam.register()
    domain_images(os.path.join(folder_paths.get_input_directory(), "family_domain"))


def train_graph(family, **options) -> dict:
    inputs = {**TRAIN_DEFAULTS, "image_folder": "family_domain", "save_name": f"fam_{family}", **options,
              "model": ["base", 0], "vae": ["vae", 0], "null_conditioning": ["null", 0]}
    return {
        "base": {"class_type": "TestFamilyModel", "inputs": {"family": family, "seed": 0}},
        "vae": vae_node(family),
        "null": {"class_type": "TestFamilyConditioning", "inputs": {"family": family, "text": "", "guidance": -1.0}},
        "train": {"class_type": "InDomainTrainUNet", "inputs": inputs},
        "cap_model": {"class_type": "TestCapture", "inputs": {"value": ["train", 0], "label": "trained"}},
        "cap_loss": {"class_type": "TestCapture", "inputs": {"value": ["train", 1], "label": "curve"}},
    }


def model_file(comfy, family, name=None) -> str:
    return saved((name or f"fam_{family}") + ".safetensors")  # models/loras or models/diffusion_models


from test_host_training import shown_losses as losses  # noqa: E402


@pytest.fixture(scope="module")
def two_step_lora(comfy):
    """family -> the file of a 2-step LoRA run of that family (trained once, on first use)."""
    paths = {}

    def get(family) -> str:
        if family not in paths:
            comfy.run(train_graph(family, steps=2, checkpoint_every=0, resume=False))
            paths[family] = model_file(comfy, family)
        return paths[family]

    return get


@pytest.mark.parametrize("family", FAMILIES)
def test_a_lora_is_written_with_the_familys_prediction_type_and_the_hosts_lora_loader_applies_it(comfy, family,
                                                                                                 two_step_lora):
    path = two_step_lora(family)
    with safe_open(path, "pt") as f:
        meta = f.metadata()
    assert meta["indomain.prediction_type"] == ("flow" if family in FLOW else "v" if family == "sd2_v" else "eps")
    weights = load_file(path)
    assert weights and all(torch.isfinite(v).all() for v in weights.values())
    adapted = {k[:-len(".lora_down.weight")] for k in weights if k.endswith(".lora_down.weight")}
    assert len(adapted) >= 4  # the family's attention and feed-forward projections (nodes/training/families.py)
    # the host's LoraLoaderModelOnly finds the file and patches exactly those weights of the base
    base = fam.family_model(family)
    lora = comfy.nodes["LoraLoaderModelOnly"]().load_lora_model_only(base, os.path.basename(path), 1.0)[0]
    assert set(lora.patches) == {k + ".weight" for k in adapted}
    assert set(lora.patches) <= set(base.model.state_dict())


@pytest.mark.parametrize("family", ["flux_dev", "zimage", "flux2", "chroma", "qwen_image", "hunyuan_image"])
def test_lora_training_runs_on_a_base_stored_in_fp8(comfy, family):
    """The large families fit a 24 GiB card for LoRA training only with their weights stored in fp8
    (UNETLoader's weight_dtype fp8_e4m3fn; the host casts each layer to the compute dtype). Training
    on such a base writes finite adapters of the family's layers that the host's LoRA loader applies
    to that base. (Found on the H200: reading the base's fingerprint used torch.take, which has no
    fp8 kernel, on the GPU or the CPU.)"""
    graph = train_graph(family, steps=2, checkpoint_every=0, resume=False, save_name=f"fam_fp8_{family}")
    graph["base"]["inputs"]["weight_dtype"] = "float8_e4m3fn"
    base = fam.family_model(family, 0, "float8_e4m3fn")
    stored = [p.dtype for p in base.model.diffusion_model.parameters()]
    assert stored.count(torch.float8_e4m3fn) > len(stored) / 2, stored  # the base it trains on
    comfy.run(graph)
    assert [p.dtype for p in base.model.diffusion_model.parameters()] == stored  # left as it was
    weights = load_file(model_file(comfy, family, f"fam_fp8_{family}"))
    assert weights and all(torch.isfinite(v).all() for v in weights.values())
    assert any(not torch.equal(v, torch.zeros_like(v)) for k, v in weights.items() if "lora_up" in k)  # it trained
    lora = comfy.nodes["LoraLoaderModelOnly"]().load_lora_model_only(base, f"fam_fp8_{family}.safetensors", 1.0)[0]
    assert len(lora.patches) >= 4


@pytest.fixture(scope="module")
def full_run(comfy):
    """family -> (the losses shown, the MODEL output) of a 30-step full-mode run (trained once, on first use)."""
    runs = {}

    def get(family):
        if family not in runs:
            comfy.run(train_graph(family, mode="full", steps=30, batch_size=2, learning_rate=1e-3, checkpoint_every=0,
                                  resume=False, save_name=f"fam_full_{family}"))
            runs[family] = losses(comfy), comfy.captured["trained"]
        return runs[family]

    return get


@pytest.mark.parametrize("family", DITS)
def test_the_loss_falls_in_full_mode(family, full_run):
    curve, _ = full_run(family)
    assert len(curve) == 30, curve
    first, last = np.mean(curve[:8]), np.mean(curve[-8:])
    assert last < 0.85 * first, f"{family}: mean loss {first:.4f} -> {last:.4f}"  # (measured: 0.70 to 0.79 for SD2-v, SDXL)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_resumed_run_ends_with_the_weights_of_an_uninterrupted_one(comfy, family, monkeypatch, on_gpu):
    options = dict(steps=4, checkpoint_every=2, learning_rate=1e-3, training_dtype=reproducible_dtype(on_gpu))
    comfy.run(train_graph(family, save_name=f"fam_whole_{family}", resume=False, **options))
    whole = load_file(model_file(comfy, family, f"fam_whole_{family}"))
    comfy.run(train_graph(family, save_name=f"fam_split_{family}", resume=False, **{**options, "steps": 2}))
    comfy.run(train_graph(family, save_name=f"fam_split_{family}", resume=True, **options))
    split = load_file(model_file(comfy, family, f"fam_split_{family}"))
    assert whole.keys() == split.keys()
    assert all(torch.equal(whole[k], split[k]) for k in whole)


@pytest.mark.parametrize("family", DITS)
def test_full_mode_gives_a_model_of_the_bases_family(comfy, family, full_run):
    domain, base = full_run(family)[1], fam.family_model(family)
    assert type(domain.model) is type(base.model)
    ours, theirs = domain.get_model_object("model_sampling"), base.get_model_object("model_sampling")
    assert type(ours).__bases__ == type(theirs).__bases__ and ours.shift == theirs.shift  # (a class per model)
    trained = load_file(model_file(comfy, family, f"fam_full_{family}"))
    assert trained.keys() == base.model.diffusion_model.state_dict().keys()
    assert any(not torch.equal(trained[k].float(), v.float().cpu()) for k, v in base.model.diffusion_model.state_dict().items())


@pytest.mark.parametrize("family", DITS)
def test_gradient_checkpointing_of_the_familys_blocks_trains_the_same_weights(comfy, family, two_step_lora):
    """The family's blocks (joint, double/single, refiner and main layers) recomputed in backward:
    the same LoRA weights as without checkpointing (the 2-step run, which has it off)."""
    assert TRAIN_DEFAULTS["gradient_checkpointing"] is False
    name = f"fam_ckpt_{family}_1"
    comfy.run(train_graph(family, steps=2, checkpoint_every=0, resume=False, save_name=name, gradient_checkpointing=True))
    runs = {False: load_file(two_step_lora(family)), True: load_file(model_file(comfy, family, name))}
    assert runs[True].keys() == runs[False].keys()
    assert all(torch.allclose(runs[True][k], runs[False][k], rtol=1e-5, atol=1e-7) for k in runs[True])
    assert any(not torch.equal(v, torch.zeros_like(v)) for k, v in runs[True].items() if "lora_up" in k)  # it trained


def test_a_base_of_a_family_the_trainer_does_not_know_is_refused_listing_the_supported_ones(comfy):
    family_of = comfy.pack("nodes.training.families").family_of
    unknown = type("Model", (), {"diffusion_model": torch.nn.Linear(2, 2), "model_config": object()})()
    with pytest.raises(ValueError) as e:
        family_of(type("Patcher", (), {"model": unknown})())
    message = str(e.value)
    assert message.startswith("model: training supports") and "a Linear" in message
    assert all(name in message for name in ("SD1.x", "SDXL", "SD3", "Flux.1", "Z-Image"))


def test_flux2_is_not_taken_for_flux1_though_the_host_builds_both_on_one_class(comfy):
    """Flux.2's diffusion model is the host's Flux.1 class with other parameters (image_model "flux2"):
    it gets its own row, told apart by the model config, not Flux.1's (which takes a pooled `y`)."""
    family_of = comfy.pack("nodes.training.families").family_of
    flux1, flux2 = fam.family_model("flux_dev"), fam.family_model("flux2")
    assert type(flux2.model.diffusion_model) is type(flux1.model.diffusion_model)
    assert family_of(flux1).name.startswith("Flux.1") and family_of(flux2).name.startswith("Flux.2")
    assert "y" in family_of(flux1).conds and "y" not in family_of(flux2).conds


def detected_as(patcher, config_class: str, unet_config: dict):
    """A MODEL with `patcher`'s diffusion model as the host would hand over another model it builds on the
    same class: a model config of class `config_class` with `unet_config` (what family_of reads)."""
    config = type(config_class, (), {"unet_config": unet_config})()
    model = type("Model", (), {"diffusion_model": patcher.model.diffusion_model, "model_config": config})()
    return type("Patcher", (), {"model": model})()


def test_chroma_radiance_on_chromas_class_is_not_taken_for_chroma(comfy):
    """Chroma Radiance denoises pixels on the host's Chroma class (image_model "chroma_radiance"):
    Chroma's row, which trains on VAE latents, refuses it."""
    family_of = comfy.pack("nodes.training.families").family_of
    chroma = fam.family_model("chroma")
    assert family_of(chroma).name == "Chroma"
    with pytest.raises(ValueError, match="ChromaRadiance"):
        family_of(detected_as(chroma, "ChromaRadiance", {"image_model": "chroma_radiance"}))


@pytest.mark.parametrize("image_model, config_class", [("zimage_pixel", "ZImagePixelSpace"), ("ming_image", "MingImage")])
def test_other_models_on_z_images_class_are_not_taken_for_z_image(comfy, image_model, config_class):
    """The host builds Z-Image's pixel-space model (0.33: a subclass of Z-Image's NextDiT, image_model
    "zimage_pixel", denoising RGB patches, no VAE latents) and newer hosts Ming-Image (frame latents) on
    Z-Image's class: Z-Image's row, which trains on VAE latents, refuses them, naming the model."""
    family_of = comfy.pack("nodes.training.families").family_of
    zimage = fam.family_model("zimage")
    assert family_of(zimage).name.startswith("Z-Image")
    config = {**zimage.model.model_config.unet_config, "image_model": image_model}
    with pytest.raises(ValueError, match=f"this model \\({config_class}, a NextDiT\\) is none of them"):
        family_of(detected_as(zimage, config_class, config))


def test_hunyuanimage21s_row_takes_neither_hunyuanvideo_nor_the_distilled_checkpoint(comfy):
    """The host builds HunyuanVideo (and its 1.5, and HunyuanImage 2.1's refiner) on HunyuanImage 2.1's
    class with the same image_model ("hunyuan_video"), on 3-D patches; the distilled HunyuanImage 2.1
    (meanflow) embeds the sampler's next sigma too. HunyuanImage 2.1's row refuses both, naming them."""
    family_of = comfy.pack("nodes.training.families").family_of
    image = fam.family_model("hunyuan_image")
    assert family_of(image).name.startswith("HunyuanImage 2.1")
    config = image.model.model_config.unet_config
    for name, changed in (("HunyuanVideo", {"patch_size": [1, 2, 2]}), ("HunyuanImage21", {"meanflow": True})):
        with pytest.raises(ValueError, match=f"this model \\({name}, a HunyuanVideo\\) is none of them"):
            family_of(detected_as(image, name, {**config, **changed}))


def test_qwen_image_layered_on_qwen_images_class_and_config_is_not_taken_for_qwen_image(comfy):
    """The host detects Qwen-Image Layered (a stack of RGBA layers per image) as Qwen-Image's class and
    image_model with use_additional_t_cond set: Qwen-Image's row refuses it, naming it."""
    family_of = comfy.pack("nodes.training.families").family_of
    image = fam.family_model("qwen_image")
    assert family_of(image).name.startswith("Qwen-Image")
    config = {**image.model.model_config.unet_config, "use_additional_t_cond": True}
    with pytest.raises(ValueError, match="this model \\(QwenImage, a QwenImageTransformer2DModel\\) is none of them"):
        family_of(detected_as(image, "QwenImage", config))


@pytest.mark.parametrize("family, vae, message", [
    ("qwen_image", {"class_type": "TestTinyTAESD", "inputs": {"latent_channels": 16}},
     "16-channel image latents, but the model (QwenImage) denoises 16-channel video-shaped latents"),
    ("flux_dev", {"class_type": "TestTinyWan21VAE", "inputs": {}},
     "16-channel video-shaped latents, but the model (Flux) denoises 16-channel image latents"),
])
def test_a_vae_of_the_right_channels_but_the_other_latent_shape_is_refused(comfy, family, vae, message):
    """Qwen-Image denoises Wan 2.1's video-shaped latents (an image one frame), Flux.1 image latents,
    both of 16 channels: each refuses the other's VAE before training, saying which latents it takes."""
    from tests.support.host import HostError

    graph = train_graph(family, steps=2, checkpoint_every=0, resume=False, save_name=f"fam_vae_{family}")
    graph["vae"] = vae
    with pytest.raises(HostError) as e:
        comfy.run(graph)
    assert message in e.value.exception_message
    assert not os.path.exists(model_file(comfy, family, f"fam_vae_{family}"))


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_previews_of_a_family_of_video_shaped_latents_are_sampled_and_decoded_by_the_host(comfy, mode):
    """Qwen-Image's previews: the host samples the domain model on a one-frame latent and its Wan 2.1 VAE
    decodes it (whose downscale ratio is per axis), a picture of the training resolution per preview."""
    import folder_paths
    from PIL import Image

    name = f"fam_preview_qwen_{mode}"
    comfy.run(train_graph("qwen_image", mode=mode, steps=2, checkpoint_every=0, resume=False, preview_every=1, save_name=name))
    folder = os.path.join(folder_paths.get_output_directory(), "indomain_previews", name)
    assert sorted(os.listdir(folder)) == ["step_000001.png", "step_000002.png"]
    sizes = [Image.open(os.path.join(folder, f)).size for f in sorted(os.listdir(folder))]
    assert sizes == [(TRAIN_DEFAULTS["resolution"],) * 2] * 2


@pytest.mark.parametrize("family, cfg", [("qwen_image", 4.0), ("flux_dev", 1.0)])
def test_validation_samples_of_a_flow_family_at_its_usual_cfg(comfy, family, cfg):
    """The validation grid of rectified-flow families (Qwen-Image's video-shaped latents decoded by its
    Wan 2.1 VAE; Flux.1 dev, guidance-distilled): sampled at the family's usual cfg with scheduler
    simple, each image of the training resolution."""
    import json

    import folder_paths
    from PIL import Image

    name = f"fam_samples_{family}"
    graph = train_graph(family, steps=1, checkpoint_every=0, resume=False, save_name=name,
                        validation_prompts="a teapot\na house", validation_steps=2)
    graph["clip"] = {"class_type": "TestFamilyCLIP", "inputs": {"family": family}}
    graph["train"]["inputs"]["clip"] = ["clip", 0]
    comfy.run(graph)
    path = os.path.join(folder_paths.get_output_directory(), "indomain_previews", name, "validation_step_000001.png")
    with Image.open(path) as image:
        record = json.loads(image.text["indomain.validation"])
        size = image.size
    assert (record["cfg"], record["scheduler"], record["domain_scales"]) == (cfg, "simple", [0.0, 1.0, 2.0])
    side = TRAIN_DEFAULTS["resolution"]
    layout = comfy.pack("nodes.training.samples").GridLayout(2, 3, side, side)
    assert size == layout.size


def test_a_lora_trained_on_another_family_is_refused_naming_the_file(comfy):
    from tests.support.host import HostError

    path = tiny.write_safetensors(os.path.join(comfy.model_dir("domain_unets"), "fam_other_flux_lora.safetensors"),
                                  fam.lora_state_dict("flux_dev"))
    graph = train_graph("sd3")  # (only its base and conditioning)
    prompt = {k: graph[k] for k in ("base",)}
    prompt["dom"] = {"class_type": "InDomainUNetLoader", "inputs": {"unet_name": os.path.basename(path),
                                                                    "lora_strength": 1.0, "base_model": ["base", 0]}}
    prompt["cap"] = {"class_type": "TestCapture", "inputs": {"value": ["dom", 0], "label": "dom"}}
    with pytest.raises(HostError) as e:
        comfy.run(prompt)
    assert "fam_other_flux_lora" in e.value.exception_message and "another base model" in e.value.exception_message
