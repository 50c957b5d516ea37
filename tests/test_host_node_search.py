"""Node search and folded inputs, where the host's V3 schema has them (ComfyUI 0.33: search_aliases
and advanced inputs), and a pack that still loads where it has not (0.8.0)."""
from __future__ import annotations

import pytest

PACK_NODES = ["InDomainUNetLoader", "InDomainKSampler", "InDomainGuider", "InDomainTerm", "InDomainTrainUNet",
              "InDomainExtractLoRA"]
ADVANCED_TRAINING_INPUTS = {"lr_schedule", "warmup_steps", "seed", "flip", "training_dtype", "gradient_checkpointing",
                            "ema_decay", "lora_rank", "lora_alpha", "checkpoint_every", "preview_every", "torch_compile",
                            "optimizer", "cuda_graphs", "gradient_accumulation", "validation_share", "tensorboard",
                            "validation_domain_scales", "validation_seed", "validation_steps", "validation_cfg"}


def host_version() -> tuple[int, ...]:
    import comfyui_version
    return tuple(int(p) for p in comfyui_version.__version__.split(".")[:3])


def node_info(comfy, node_id) -> dict:
    """What /object_info sends the page for a node."""
    return comfy.nodes[node_id].GET_NODE_INFO_V1()


def input_options(info) -> dict[str, dict]:
    return {name: (spec[1] if len(spec) > 1 else {}) for section in ("required", "optional")
            for name, spec in info["input"].get(section, {}).items()}


def test_the_host_schema_features_are_detected_by_version(comfy):
    host_schema = comfy.pack("nodes.host_schema")
    newer = host_version() >= (0, 33, 0)
    assert host_schema.HAS_SEARCH_ALIASES is newer and host_schema.HAS_ADVANCED_INPUTS is newer


def test_every_node_loads_and_is_found_by_its_aliases_where_the_host_has_them(comfy):
    for node_id in PACK_NODES:
        info = node_info(comfy, node_id)  # loaded on either host
        aliases = info.get("search_aliases")
        if comfy.pack("nodes.host_schema").HAS_SEARCH_ALIASES:
            assert "in-domain" in aliases and any(a in aliases for a in ("domain guidance", "DoG")), (node_id, aliases)
        else:
            assert not aliases


def test_the_sampler_is_found_as_domain_guidance_text_free_and_dog(comfy):
    if not comfy.pack("nodes.host_schema").HAS_SEARCH_ALIASES:
        pytest.skip("this host's node schema has no search_aliases (ComfyUI 0.8.0); the test above checks the node loads")
    aliases = node_info(comfy, "InDomainKSampler")["search_aliases"]
    assert {"domain guidance", "in-domain", "text-free", "DoG"} <= set(aliases)


def test_rarely_changed_training_inputs_are_folded_as_advanced_where_the_host_folds_them(comfy):
    options = input_options(node_info(comfy, "InDomainTrainUNet"))
    folded = {name for name, o in options.items() if o.get("advanced")}
    if comfy.pack("nodes.host_schema").HAS_ADVANCED_INPUTS:
        assert folded == ADVANCED_TRAINING_INPUTS
        assert {"model", "vae", "mode", "steps", "learning_rate", "save_name", "image_folder",
                "validation_prompts"}.isdisjoint(folded)
    else:
        assert folded == set()
    assert ADVANCED_TRAINING_INPUTS <= set(options)  # every one of them is still an input
