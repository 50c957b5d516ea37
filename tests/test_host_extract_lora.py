"""Extract Domain LoRA (issue 37): a full-copy domain's difference from its base as a LoRA file in
models/loras, which Load Domain UNet and the host's LoraLoader apply; and tools/extract_domain_lora.py."""
import json
import logging
import os
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from tests.support import tiny_nodes as tiny
from tests.support.graphs import close, loader, text_to_image
from tests.support.host import HostError, find_host

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DECAY = 0.9  # the spectrum domain's singular values per layer: DECAY ** i
FULL = 4096  # above every layer's smaller side: full rank
# Sampled latents of the LoRA and of the full copy: float32 on the CPU; on a GPU the host keeps fp16 weights
# and computes in fp16, where the adapters and the merged weights round differently (not yet run on a GPU).
SAME = {False: 1e-5, True: 2e-3}
log = logging.getLogger(__name__)


def spectrum_domain(seed: int = 3, amount: float = 0.3) -> dict[str, torch.Tensor]:
    """The base with every weight of 2+ dimensions moved by a difference whose singular values fall as
    DECAY ** i (a layer's difference of Frobenius norm amount * ||W||); biases and norms unchanged."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, w in tiny.unet_state_dict(0).items():
        if w.ndim < 2:
            out[key] = w
            continue
        m, n = w.shape[0], w[0].numel()
        q = min(m, n)
        u = torch.linalg.qr(torch.randn(m, q, generator=g, dtype=torch.float64))[0]
        v = torch.linalg.qr(torch.randn(n, q, generator=g, dtype=torch.float64))[0]
        delta = (u * DECAY ** torch.arange(q, dtype=torch.float64)) @ v.T
        out[key] = (w + (amount * w.norm() / delta.norm() * delta).reshape(w.shape).float()).contiguous()
    return out


def optimum(delta: torch.Tensor, rank: int) -> float:
    """Eckart-Young: the relative Frobenius error of the best rank-`rank` approximation of `delta`."""
    sv = torch.linalg.svdvals(delta.flatten(1).double())
    return (sv[rank:].square().sum() / sv.square().sum()).sqrt().item()


def held(state: dict, out: dict) -> dict:
    """`state` as the host holds those weights for the node (the dtype of the model it output: float32 on the
    CPU, the host's half precision on a GPU), back in float32: the difference the node reads is of these."""
    dtype = next(out["model"].model.diffusion_model.parameters()).dtype
    return {k: v.to(dtype).float() if v.is_floating_point() else v for k, v in state.items()}


def tail(rank: int, q: int) -> float:
    """The relative error of the best rank-`rank` approximation of a q-wide spectrum DECAY ** i."""
    total = sum(DECAY ** (2 * i) for i in range(q))
    return (sum(DECAY ** (2 * i) for i in range(min(rank, q), q)) / total) ** 0.5


@pytest.fixture(scope="module")
def files(comfy):
    """Full-copy domains in models/diffusion_models (Load Domain UNet lists them)."""
    tiny.tiny_model()  # its file written now, not inside a test that checks what was written
    d = comfy.model_dir("diffusion_models")
    names = {"spectrum": "xl_spectrum_domain.safetensors", "all": "xl_all_domain.safetensors",
             "sd2": "xl_sd2_domain.safetensors"}
    tiny.write_safetensors(os.path.join(d, names["spectrum"]), spectrum_domain())
    tiny.write_safetensors(os.path.join(d, names["all"]), tiny.domain_state_dict())  # biases and norms moved too
    tiny.write_safetensors(os.path.join(d, names["sd2"]), tiny.unet_state_dict(5, "sd2"))
    tiny.write_safetensors(os.path.join(comfy.model_dir("domain_unets"), "xl_lora.safetensors"), tiny.lora_state_dict(seed=8))
    return names


def loras_dir(comfy) -> str:
    return comfy.model_dir("loras")


def extract(domain, rank, save_name, save_dtype="fp32", biases_and_norms=False, domain_node=None):
    """Tiny checkpoint -> Load Domain UNet (the full copy, checked against the base) -> Extract Domain
    LoRA -> capture its three outputs."""
    return {
        "ckpt": {"class_type": "TestTinyCheckpoint", "inputs": {"ckpt_name": "tiny"}},
        "dom": domain_node or loader(domain),
        "ext": {"class_type": "InDomainExtractLoRA", "inputs": {
            "base_model": ["ckpt", 0], "domain_model": ["dom", 0], "rank": rank, "save_name": save_name,
            "save_dtype": save_dtype, "biases_and_norms": biases_and_norms}},
        "cap_model": {"class_type": "TestCapture", "inputs": {"value": ["ext", 0], "label": "model"}},
        "cap_error": {"class_type": "TestCapture", "inputs": {"value": ["ext", 1], "label": "error"}},
        "cap_report": {"class_type": "TestCapture", "inputs": {"value": ["ext", 2], "label": "report"}},
    }


def metadata(path) -> dict:
    with safe_open(path, framework="pt") as f:
        return f.metadata()


def samples(comfy, domains: dict[str, dict]) -> dict[str, torch.Tensor]:
    """KSampler (Domain Guidance), domain_scale 2, once per domain node (one prompt)."""
    prompt = text_to_image(domain=None)
    del prompt["sample"], prompt["cap"]
    for label, node in domains.items():
        one = text_to_image(domain=[f"dom_{label}", 0], domain_scale=2.0, label=label, extra={f"dom_{label}": node})
        prompt[f"sample_{label}"] = {**one["sample"]}
        prompt[f"cap_{label}"] = {"class_type": "TestCapture", "inputs": {"value": [f"sample_{label}", 0], "label": label}}
        prompt[f"dom_{label}"] = one[f"dom_{label}"]
    return {k: v["samples"] for k, v in comfy.run(prompt)["captured"].items()}


def host_lora_sample(comfy, lora_name=None, full_copy=None) -> torch.Tensor:
    """The host's own KSampler on the base with the host's LoraLoaderModelOnly, or on a full copy."""
    if lora_name:
        extra = {"m": {"class_type": "LoraLoaderModelOnly", "inputs": {"model": ["ckpt", 0], "lora_name": lora_name, "strength_model": 1.0}}}
    else:
        extra = {"m": loader(full_copy, base=None)}
    prompt = text_to_image(sampler="KSampler", extra=extra)
    prompt["sample"]["inputs"]["model"] = ["m", 0]
    return comfy.run(prompt)["captured"]["out"]["samples"]


def merged(lora_path: str, base: dict) -> dict[str, torch.Tensor]:
    """The base's weights with the file merged as the host merges it: W + (alpha / rank) up @ down
    (flattened to matrices, reshaped to W's shape), and W + diff."""
    lora = {k: v.float() for k, v in load_file(lora_path).items()}
    out = dict(base)
    for key, value in lora.items():
        if key.endswith(".lora_down.weight"):
            layer = key[len("diffusion_model."): -len(".lora_down.weight")]
            up, alpha = lora[f"diffusion_model.{layer}.lora_up.weight"], float(lora[f"diffusion_model.{layer}.alpha"])
            w = out[layer + ".weight"]
            out[layer + ".weight"] = w + alpha / value.shape[0] * (up.flatten(1) @ value.flatten(1)).reshape(w.shape)
        for suffix, target in ((".diff_b", ".bias"), (".diff", ".weight")):
            if key.endswith(suffix):
                name = key[len("diffusion_model."): -len(suffix)] + target
                out[name] = out[name] + value
    return out


def files_under(root: str) -> set[str]:
    return {os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs}


def test_at_full_rank_the_lora_is_the_full_copy(comfy, files, on_gpu):
    graph = extract(files["spectrum"], FULL, "xl_full_rank")  # and the node's domain_model output sampled
    out = comfy.run(text_to_image(domain=["ext", 0], domain_scale=2.0, label="node", extra=graph))["captured"]
    path = os.path.join(loras_dir(comfy), "xl_full_rank.safetensors")
    meta = metadata(path)
    errors = json.loads(meta["indomain.extraction.layer_errors"])
    assert len(errors) == sum(1 for v in tiny.unet_state_dict(0).values() if v.ndim >= 2)  # every Linear and Conv
    assert max(errors.values()) < 1e-5 and out["error"] < 1e-5
    assert float(meta["indomain.extraction.relative_error"]) == out["error"]
    assert json.loads(meta["indomain.extraction.left_out"]) == {}  # only weights of 2+ dimensions differ
    assert meta["indomain.format"] == comfy.pack("nodes.training.files").FILE_FORMAT and meta["indomain.mode"] == "lora"
    assert "xl_full_rank.safetensors" in out["report"] and "relative error" in out["report"]
    domain = held(spectrum_domain(), out)
    weights = merged(path, held(tiny.unet_state_dict(0), out))
    worst = max((weights[k] - domain[k]).abs().max().item() / domain[k].abs().max().item() for k in domain)
    log.info("full rank: the weights merged as the host merges them vs the full copy's: max relative %.3g", worst)
    assert worst < 1e-4  # float32 factors: the Frobenius error is ~1e-6, an element's up to ~1e-5
    # Sampled: the file through Load Domain UNet, the node's own domain_model output, and the full copy
    got = samples(comfy, {"file": loader("xl_full_rank.safetensors"), "full": loader(files["spectrum"])})
    node = out["node"]["samples"]
    # The host's own LoraLoader and KSampler: as the host's KSampler on the full copy
    host = host_lora_sample(comfy, lora_name="xl_full_rank.safetensors")
    full = host_lora_sample(comfy, full_copy=files["spectrum"])
    log.info("full rank, sampled latents vs the full copy's: Load Domain UNet %r; the node's output %r; the host's "
             "LoraLoader %r", close(got["file"], got["full"]), close(node, got["full"]), close(host, full))
    assert close(got["file"], got["full"], rel=SAME[on_gpu])
    assert close(node, got["full"], rel=SAME[on_gpu])
    assert close(host, full, rel=SAME[on_gpu])
    assert not close(host, comfy.run(text_to_image(sampler="KSampler"))["captured"]["out"]["samples"], rel=1e-3)


def test_the_error_falls_as_the_rank_grows_as_the_truncated_svd_says(comfy, files, on_gpu):
    """At each rank every layer's error is the optimum of the difference the node read (Eckart-Young; on
    the CPU, where the host holds float32 weights, the spectrum's own DECAY ** i tail), and falls as the rank
    grows, in the file's tensors and in the sampled latents."""
    totals = {}
    spectrum, base_weights = spectrum_domain(), tiny.unet_state_dict(0)
    for rank in (1, 4, 16, 64):
        name = f"xl_rank_{rank}"
        out = comfy.run(extract(files["spectrum"], rank, name))["captured"]
        totals[rank] = out["error"]
        domain, base = held(spectrum, out), held(base_weights, out)
        path = os.path.join(loras_dir(comfy), name + ".safetensors")
        errors = json.loads(metadata(path)["indomain.extraction.layer_errors"])
        lora = load_file(path)
        for layer, error in errors.items():
            delta = domain[layer + ".weight"] - base[layer + ".weight"]
            q = min(delta.shape[0], delta[0].numel())
            best = optimum(delta, rank)
            assert abs(error - best) < 1e-5, (layer, error, best)
            assert on_gpu or abs(error - tail(rank, q)) < 1e-4, (layer, error, tail(rank, q))
            assert lora[f"diffusion_model.{layer}.lora_down.weight"].shape[0] == min(rank, q)
        layer = "input_blocks.1.1.transformer_blocks.0.attn1.to_q"  # the stored tensors give the reported error
        delta = domain[layer + ".weight"] - base[layer + ".weight"]
        approx = lora[f"diffusion_model.{layer}.lora_up.weight"] @ lora[f"diffusion_model.{layer}.lora_down.weight"]  # alpha = rank
        assert abs(((delta - approx).norm() / delta.norm()).item() - errors[layer]) < 1e-5
    got = samples(comfy, {"full": loader(files["spectrum"]), **{str(r): loader(f"xl_rank_{r}.safetensors") for r in (1, 64)}})
    full, sampled = got.pop("full"), {int(r): s for r, s in got.items()}  # (the ranks compared below)
    log.info("relative error by rank: %s; sampled latent vs the full copy's: %s", totals,
             {r: f"{close(s, full).diff / close(s, full).scale:.3g}" for r, s in sampled.items()})
    ranks = sorted(totals)
    assert all(totals[a] > totals[b] for a, b in zip(ranks, ranks[1:]))  # falls with every step up
    assert totals[1] > 0.8 and totals[64] < 0.01
    assert close(sampled[64], full, rel=1e-3 + SAME[on_gpu]) and not close(sampled[1], full, rel=1e-2)


def test_biases_and_norms_are_left_out_and_counted_or_stored_whole(comfy, files, on_gpu):
    """The tiny domain_state_dict moves every tensor: off (and fp16, the default dtype), the biases and norms
    are the whole error at full rank; on, the file is the full copy (its domain runs as a weight hook)."""
    off = comfy.run(extract(files["all"], FULL, "xl_no_biases", save_dtype="fp16"))["captured"]
    path = os.path.join(loras_dir(comfy), "xl_no_biases.safetensors")
    meta, lora = metadata(path), load_file(path)
    left_out = json.loads(meta["indomain.extraction.left_out"])
    share = sum(v * v for v in left_out.values()) ** 0.5
    assert left_out and all(k.endswith(".bias") or tiny.unet_state_dict(0)[k].ndim == 1 for k in left_out)
    assert abs(off["error"] - share) < 1e-3 * share and "left out (biases_and_norms off)" in off["report"]
    assert {t.dtype for k, t in lora.items() if not k.endswith(".alpha")} == {torch.float16}
    assert max(json.loads(meta["indomain.extraction.layer_errors"]).values()) < 1e-3  # fp16's rounding at full rank
    on = comfy.run(extract(files["all"], FULL, "xl_with_biases", biases_and_norms=True))["captured"]
    path = os.path.join(loras_dir(comfy), "xl_with_biases.safetensors")
    assert on["error"] < 1e-5 and json.loads(metadata(path)["indomain.extraction.left_out"]) == {}
    lora = load_file(path)
    assert any(k.endswith(".diff_b") for k in lora) and any(k.endswith(".diff") for k in lora)
    domain, weights = held(tiny.domain_state_dict(), on), merged(path, held(tiny.unet_state_dict(0), on))
    assert max((weights[k] - domain[k]).abs().max().item() / domain[k].abs().max().item() for k in domain) < 1e-5
    got = samples(comfy, {"file": loader("xl_with_biases.safetensors"), "full": loader(files["all"])})
    assert close(got["file"], got["full"], rel=SAME[on_gpu])
    assert close(host_lora_sample(comfy, lora_name="xl_with_biases.safetensors"), host_lora_sample(comfy, full_copy=files["all"]),
                 rel=SAME[on_gpu])


def other_family(files):
    return {"class_type": "UNETLoader", "inputs": {"unet_name": files["sd2"], "weight_dtype": "default"}}


BAD = {
    "another family": (lambda f: extract(None, 8, "xl_bad", domain_node=other_family(f)), ["domain_model", "SD20", "SD15"]),
    "a LoRA domain": (lambda f: extract("xl_lora.safetensors", 8, "xl_bad"), ["domain_model is a LoRA"]),
    "the base itself": (lambda f: extract(None, 8, "xl_bad", domain_node={"class_type": "TestTinyCheckpoint",
                                                                          "inputs": {"ckpt_name": "tiny"}}), ["domain_model is base_model"]),
    "rank 0": (lambda f: extract(f["spectrum"], 0, "xl_bad"), ["rank", "smaller than min"]),
    "rank -3": (lambda f: extract(f["spectrum"], -3, "xl_bad"), ["rank", "smaller than min"]),
    "a save name outside the folder": (lambda f: extract(f["spectrum"], 8, "../xl_escape"), ["save name '../xl_escape.safetensors' leaves the folder"]),
    "an absolute save name": (lambda f: extract(f["spectrum"], 8, "/tmp/xl_escape"), ["save name '/tmp/xl_escape.safetensors' must be a relative name"]),
    "a hidden file": (lambda f: extract(f["spectrum"], 8, "sub/.hidden"), ["save name 'sub/.hidden' does not end in a plain file name"]),
    "a user's own LoRA": (lambda f: extract(f["spectrum"], 8, "users_own"), ["save name 'users_own'", "not written by"]),
    "a training run's LoRA": (lambda f: extract(f["spectrum"], 8, "trained_run"), ["save name 'trained_run' is the LoRA of a training run"]),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_inputs_are_errors_naming_the_input_and_nothing_is_written(comfy, files, case):
    folder = loras_dir(comfy)
    tiny.write_safetensors(os.path.join(folder, "users_own.safetensors"), tiny.lora_state_dict(seed=9))
    trained = {"indomain.format": comfy.pack("nodes.training.files").FILE_FORMAT}
    tiny.write_safetensors(os.path.join(folder, "trained_run.safetensors"), tiny.lora_state_dict(seed=9), trained)
    with open(os.path.join(folder, "trained_run.indomain-state"), "wb") as f:
        f.write(b"state")
    before = {p: os.path.getmtime(os.path.join(comfy.base_dir, p)) for p in files_under(comfy.base_dir)}
    graph, words = BAD[case]
    with pytest.raises(HostError) as e:
        comfy.run(graph(files))
    message = str(e.value)
    assert all(w in message for w in words), message
    after = {p: os.path.getmtime(os.path.join(comfy.base_dir, p)) for p in files_under(comfy.base_dir)}
    assert after == before  # no file added, none rewritten
    assert not os.path.exists(os.path.join(os.path.dirname(comfy.base_dir), "xl_escape.safetensors"))
    assert not os.path.exists("/tmp/xl_escape.safetensors")


def test_the_function_checks_its_rank_as_the_node_does(comfy, files):
    extract_to_file = comfy.pack("nodes.extract_node").extract_to_file
    model = tiny.tiny_model()
    for rank in (0, -1):
        with pytest.raises(ValueError, match=f"rank {rank} must be 1 or more"):
            extract_to_file(model, model, rank, "xl_bad")
    with pytest.raises(ValueError, match="save_dtype 'fp8' is not one of"):
        extract_to_file(model, model, 4, "xl_bad", save_dtype="fp8")
    assert not os.path.exists(os.path.join(loras_dir(comfy), "xl_bad.safetensors"))


def run_tool(base_dir, *args):
    cmd = [sys.executable, "-m", "tools.extract_domain_lora", "--comfyui", find_host(), "--base-directory", str(base_dir), "--cpu", *args]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_the_command_line_tool_writes_the_same_file(comfy, tmp_path):
    models = tmp_path / "models"
    tiny.write_safetensors(str(models / "diffusion_models" / "tiny_unet.safetensors"), tiny.unet_state_dict(0))
    tiny.write_safetensors(str(models / "diffusion_models" / "cli_domain.safetensors"), spectrum_domain())
    ok = run_tool(tmp_path, "--unet", "tiny_unet.safetensors", "--domain", "cli_domain.safetensors", "--rank", "16",
                  "--save-name", "cli/spectrum16", "--save-dtype", "fp32")
    assert ok.returncode == 0, ok.stderr[-3000:]
    path = models / "loras" / "cli" / "spectrum16.safetensors"
    meta = metadata(str(path))
    assert meta["indomain.extracted_from"] == "cli_domain.safetensors"
    assert abs(float(meta["indomain.extraction.relative_error"]) - tail(16, 320)) < 0.05
    assert "relative error" in ok.stderr and "worst layer" in ok.stderr
    for args, words in ((["--rank", "0"], "argument --rank: 0 is outside 1 to 4096"),
                        (["--rank", "4", "--save-name", "../escape"], "--save-name '../escape.safetensors' leaves the folder"),
                        (["--rank", "4", "--domain", "tiny_unet.ckpt"], "only .safetensors files are read")):
        options = {"--domain": "cli_domain.safetensors", "--save-name": "cli/bad"}
        options.update(dict(zip(args[::2], args[1::2])))
        before = files_under(str(tmp_path))
        bad = run_tool(tmp_path, "--unet", "tiny_unet.safetensors", *[x for kv in options.items() for x in kv])
        assert bad.returncode != 0 and words in bad.stderr, bad.stderr[-2000:]
        assert files_under(str(tmp_path)) == before and not (tmp_path.parent / "escape.safetensors").exists()


def test_the_math_alone_conv_shapes_capped_ranks_and_its_errors():
    """lora_hooks.extract without the host: a Conv's factors have the host's LoRA shapes, a rank above a
    layer's smaller side is capped there (and exact), and bad inputs are ValueErrors that say why."""
    from lora_hooks.extract import extract_lora

    g = torch.Generator().manual_seed(0)
    base = {"conv.weight": torch.randn(8, 3, 3, 3, generator=g), "lin.weight": torch.randn(5, 7, generator=g),
            "lin.bias": torch.zeros(5), "steps": torch.tensor([1, 2])}
    domain = {k: (v + torch.randn(v.shape, generator=g) if v.is_floating_point() else v) for k, v in base.items()}
    out = extract_lora(base, domain, 6, dtype=torch.float32)
    t = out.tensors
    assert t["diffusion_model.conv.lora_up.weight"].shape == (8, 6, 1, 1) and t["diffusion_model.conv.lora_down.weight"].shape == (6, 3, 3, 3)
    assert t["diffusion_model.lin.lora_down.weight"].shape == (5, 7) and float(t["diffusion_model.lin.alpha"]) == 5.0
    assert out.ranks == {"conv": 6, "lin": 5} and out.layer_errors["lin"] < 1e-6 and 0 < out.layer_errors["conv"] < 1
    assert set(out.left_out) == {"lin.bias"}  # differs, no low-rank form, not stored
    assert "diffusion_model.lin.diff_b" in extract_lora(base, domain, 6, others=True).tensors
    with pytest.raises(ValueError, match="rank 0 must be 1 or more"):
        extract_lora(base, domain, 0)
    with pytest.raises(ValueError, match="equal the base's"):
        extract_lora(base, base, 4)
    with pytest.raises(ValueError, match=r"lin.weight has shape \[5, 6\], the base's \[5, 7\]"):
        extract_lora(base, {**domain, "lin.weight": torch.zeros(5, 6)}, 4)
    with pytest.raises(ValueError, match=r"missing \['steps'\]"):
        extract_lora(base, {k: v for k, v in domain.items() if k != "steps"}, 4)
