"""Load Domain UNet's weight_dtype (issue 37): a full-copy domain kept in fp8, as the host's Load
Diffusion Model keeps a model (its weight_dtype, the same model_options to the host's loader)."""
import logging
import os

import pytest
import torch

from tests.support import tiny_nodes as tiny
from tests.support.graphs import close, loader, text_to_image
from tests.support.host import HostError

FP8 = {"fp8_e4m3fn": torch.float8_e4m3fn, "fp8_e4m3fn_fast": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}
# Measured on the CPU (ComfyUI 0.8.0 and 0.33 alike, the tiny SD1 UNet, 4 Euler steps, cfg 5, domain_scale 2): max
# |fp8 - fp32| / max |fp32| of the sampled latent 0.0055 (e4m3fn, _fast the same on the CPU: no fp8
# matmuls there) and 0.0093 (e5m2); a domain stored in fp16: 2.7e-5. The bounds: about 3x those.
FP8_TOLERANCE = {"fp8_e4m3fn": 0.02, "fp8_e4m3fn_fast": 0.02, "fp8_e5m2": 0.03}
FP16_TOLERANCE = 1e-4
# The same weights computed the same way: float32 on the CPU; on a GPU, fp16 compute from fp8 or fp16
# weights may take other kernels (held on an H100 under ComfyUI 0.8.0). Under 0.33's dynamic VRAM the fp8
# domain was 0.0019 (e4m3fn) and 0.0041 (e5m2) from the domain rounded to fp8 in full: that host stages a
# layer whose file tensors take at most 16 KiB as they are in the file (its model_patcher force-loads
# them with no cast) and casts only the larger ones to fp8, so there the reference is rounded the same way
# (staged_as_the_host_rounds).
SAME = {False: 1e-5, True: 1e-3}
SMALL_LAYER_BYTES = 16 * 1024  # ComfyUI 0.33's model_patcher: `module_mem > 16 * 1024` gets a staging buffer


@pytest.fixture(scope="module")
def files(comfy):
    """A full-copy domain; the same weights rounded to fp8 and back (float32 file); a LoRA."""
    d = comfy.model_dir("domain_unets")
    sd = tiny.domain_state_dict()
    names = {"full": "dtype_domain.safetensors", "lora": "dtype_lora.safetensors", "fp16": "dtype_domain_fp16.safetensors"}
    tiny.write_safetensors(os.path.join(d, names["full"]), sd)
    tiny.write_safetensors(os.path.join(d, names["fp16"]), {k: v.half() for k, v in sd.items()})
    tiny.write_safetensors(os.path.join(d, names["lora"]), tiny.lora_state_dict(seed=6))
    for option, dtype in FP8.items():
        names[f"rounded_{option}"] = f"dtype_domain_rounded_{dtype}.safetensors".replace("torch.", "")
        tiny.write_safetensors(os.path.join(d, names[f"rounded_{option}"]), {k: v.to(dtype).float() for k, v in sd.items()})
    return names


def domain_loader(name, weight_dtype=None, base=("ckpt", 0)):
    node = loader(name, base=base)
    if weight_dtype is not None:
        node["inputs"]["weight_dtype"] = weight_dtype
    return node


def loaded(comfy, name, weight_dtype=None, base=("ckpt", 0)):
    prompt = {"ckpt": {"class_type": "TestTinyCheckpoint", "inputs": {"ckpt_name": "tiny"}},
              "dom": domain_loader(name, weight_dtype, base),
              "cap": {"class_type": "TestCapture", "inputs": {"value": ["dom", 0], "label": "dom"}}}
    return comfy.run(prompt)["captured"]["dom"]


def sample(comfy, name, weight_dtype=None):
    prompt = text_to_image(domain=["dom", 0], domain_scale=2.0, extra={"dom": domain_loader(name, weight_dtype)})
    return comfy.run(prompt)["captured"]["out"]["samples"]


@pytest.fixture(scope="module")
def reference(comfy, files):
    """Samples of the float32 domain, of the same domain stored in fp16, and without the domain term."""
    no_domain = comfy.run(text_to_image(domain=["dom", 0], domain_scale=0.0, extra={"dom": domain_loader(files["full"])}))
    return {"full": sample(comfy, files["full"]), "fp16": sample(comfy, files["fp16"]),
            "no_domain": no_domain["captured"]["out"]["samples"]}


def staged_as_the_host_rounds(model, sd: dict, dtype: torch.dtype) -> dict:
    """`sd` rounded to `dtype` where ComfyUI 0.33's dynamic VRAM rounds it when it stages the weights on
    the device: every cast layer whose file tensors take more than SMALL_LAYER_BYTES; the small ones keep
    the file's values (they are computed from those, cast to the compute dtype)."""
    kept = set()
    for name, module in model.model.diffusion_model.named_modules():
        if hasattr(module, "comfy_cast_weights"):
            keys = [f"{name}.{p}" for p, _ in module.named_parameters(recurse=False)]
            assert all(k in sd for k in keys), f"{name}: its weights are not in the file's keys"
            if sum(sd[k].nbytes for k in keys) <= SMALL_LAYER_BYTES:
                kept.update(keys)
    return {k: v if k in kept else v.to(dtype).float() for k, v in sd.items()}


def weight_dtypes(model) -> set:
    return {p.dtype for p in model.model.diffusion_model.parameters()}


def kept_dtypes(model) -> set:
    """The dtypes the host computes the weights from: each parameter's own, or, where the host keeps the
    file's tensors and casts them to the layer's dtype as it stages them on the device (ComfyUI 0.33+'s
    dynamic VRAM: the layer's dtype is `<name>_comfy_model_dtype`), that dtype."""
    return {getattr(m, f"{n}_comfy_model_dtype", None) or p.dtype
            for m in model.model.diffusion_model.modules() for n, p in m.named_parameters(recurse=False)}


def test_the_input_comes_last_and_optional_so_saved_workflows_keep_their_widget_values(comfy):
    info = comfy.nodes["InDomainUNetLoader"].GET_NODE_INFO_V1()
    assert list(info["input"]["required"]) == ["unet_name", "lora_strength"]
    assert list(info["input"]["optional"])[-1] == "weight_dtype"
    options = info["input"]["optional"]["weight_dtype"]
    assert list(options[0] if isinstance(options[0], list) else options[1]["options"]) == \
        ["default", "fp8_e4m3fn", "fp8_e4m3fn_fast", "fp8_e5m2"]  # the host's Load Diffusion Model's
    assert options[1]["default"] == "default"


@pytest.mark.parametrize("option", list(FP8))
def test_an_fp8_full_copy_is_loaded_with_fp8_weights(comfy, files, option):
    model = loaded(comfy, files["full"], option)
    assert kept_dtypes(model) == {FP8[option]}  # as the host's loader keeps them: every weight
    assert model.model.manual_cast_dtype is not None  # computed in the host's dtype for the device
    assert model.model.model_config.optimizations.get("fp8", False) is option.endswith("_fast")


def test_without_the_input_a_saved_workflow_loads_as_before(comfy, files, on_gpu):
    before = loaded(comfy, files["full"])  # a prompt saved before the input existed
    default = loaded(comfy, files["full"], "default")
    assert weight_dtypes(before) == weight_dtypes(default)
    assert on_gpu or weight_dtypes(before) == {torch.float32}  # the host's choice on the CPU
    assert torch.equal(sample(comfy, files["full"]), sample(comfy, files["full"], "default"))


@pytest.mark.parametrize("option", list(FP8))
def test_an_fp8_domain_samples_as_its_rounded_weights_and_near_the_full_precision_domain(comfy, files, reference, option, on_gpu):
    full, fp16 = reference["full"], reference["fp16"]
    fp8 = sample(comfy, files["full"], option)
    rounded = sample(comfy, files[f"rounded_{option}"])  # its weights rounded to fp8, kept in float32
    model = loaded(comfy, files["full"], option)
    staged = comfy.pack("nodes.dynamic_vram").patcher_is_dynamic(model)  # (0.33's dynamic VRAM stages the layers)
    if staged:  # rounded where the host rounds as it stages the layers
        name = f"dtype_domain_staged_{option}.safetensors"
        tiny.write_safetensors(os.path.join(comfy.model_dir("domain_unets"), name),
                               staged_as_the_host_rounds(model, tiny.domain_state_dict(), FP8[option]))
        rounded = sample(comfy, name)
    logging.getLogger(__name__).info(
        "%s: sampled latent vs the fp32 domain's %r (the domain term itself moves it %r); fp16 domain vs fp32 %r",
        option, close(fp8, full), close(reference["no_domain"], full), close(fp16, full))
    assert torch.isfinite(fp8).all()

    def seen() -> str:  # (evaluated only when the assertion fails)
        return (f"staged as the host rounds: {staged}; fp8 vs rounded {close(fp8, rounded)!r}; fp8 vs fp32 {close(fp8, full)!r}; rounded vs fp32 "
                f"{close(rounded, full)!r}; weights {weight_dtypes(model)}, kept {kept_dtypes(model)}, computed in "
                f"{model.model.manual_cast_dtype}")

    assert close(fp8, rounded, rel=SAME[on_gpu]), seen()  # the host computes with exactly the fp8 values
    assert not close(fp8, full, rel=1e-4)  # fp8 was applied
    assert close(fp8, full, rel=FP8_TOLERANCE[option])
    assert close(fp16, full, rel=FP16_TOLERANCE)


def test_the_base_check_still_refuses_another_family_in_fp8(comfy):
    name = "dtype_sd2_domain.safetensors"
    tiny.write_safetensors(os.path.join(comfy.model_dir("domain_unets"), name), tiny.unet_state_dict(5, "sd2"))
    with pytest.raises(HostError) as e:
        loaded(comfy, name, "fp8_e4m3fn")
    assert name in e.value.exception_message and "SD20" in e.value.exception_message and "SD15" in e.value.exception_message


def test_a_reloaded_input_reloads_the_model_in_that_dtype(comfy, files):
    """The host's cache keys the node by its inputs: switching weight_dtype loads the file again."""
    executor = comfy.executor()
    prompt = {"ckpt": {"class_type": "TestTinyCheckpoint", "inputs": {"ckpt_name": "tiny"}},
              "dom": domain_loader(files["full"], "default"),
              "cap": {"class_type": "TestCapture", "inputs": {"value": ["dom", 0], "label": "dom"}}}
    first = comfy.run(prompt, executor=executor)["captured"]["dom"]
    prompt["dom"]["inputs"]["weight_dtype"] = "fp8_e5m2"
    second = comfy.run(prompt, executor=executor)["captured"]["dom"]
    assert kept_dtypes(second) == {torch.float8_e5m2} and kept_dtypes(first) != kept_dtypes(second)


def test_a_lora_domain_ignores_the_weight_dtype_and_says_so(comfy, files, caplog, on_gpu):
    with caplog.at_level(logging.INFO):
        lora = loaded(comfy, files["lora"], "fp8_e4m3fn")
    assert "is a LoRA: weight_dtype" in caplog.text and "does not apply" in caplog.text
    assert lora.patches and weight_dtypes(lora) == weight_dtypes(tiny.tiny_model())  # the base's own weights
    assert close(sample(comfy, files["lora"], "fp8_e4m3fn"), sample(comfy, files["lora"]), rel=SAME[on_gpu] / 10)


def test_a_null_text_unet_of_the_papers_code_loads_in_fp8_too(comfy):
    from tests.test_host_paper_format import paper_file

    name, _, _ = paper_file(comfy, "dtype_paper_null_text.safetensors")
    model = loaded(comfy, name, "fp8_e4m3fn")
    assert kept_dtypes(model) == {torch.float8_e4m3fn}
    out = sample(comfy, name, "fp8_e4m3fn")
    assert close(out, sample(comfy, name), rel=FP8_TOLERANCE["fp8_e4m3fn"])
