"""pytest set-up: the real ComfyUI host, started once per session, on the CPU or (the GPU tier,
`--gpu`) on the GPU.

The host is found as a real install finds it (COMFYUI_PATH, else the ComfyUI two folders
above the pack). Without one the session stops with a clear message: the host tests are the
heart of this suite and are never silently skipped.

Two tiers, one suite:
- CPU (default, CI): the host on the CPU, which computes in float32 and casts weights itself.
  Tests marked `gpu` are skipped, saying why.
- GPU (`--gpu`, `bash scripts/test.sh --gpu`): the host picks the GPU and its own defaults, as
  users run it (fp16/bf16 weights, no manual cast, CUDA graphs on the fast path; on ComfyUI
  0.33+ dynamic VRAM, turned on as its main.py does). Every test runs
  there but those marked `cpu_tier` (install, browser and the pure-torch reproduction, which
  do not touch the GPU); `--gpu` without CUDA stops the session.
"""
from __future__ import annotations

import os
import sys

import pytest

TESTS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TESTS)
sys.path.append(REPO)  # `guidance`, `training`, `lora_hooks`, ... and `tests.support` as top-level packages; after the host's `nodes`

from tests.support import host as host_module  # noqa: E402


def pytest_addoption(parser):
    parser.addoption("--gpu", action="store_true",
                     help="the GPU tier: start the host on the GPU with its own defaults (needs CUDA)")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs the host on a CUDA GPU (the GPU tier, --gpu); skipped otherwise")
    config.addinivalue_line("markers", "cpu_tier: runs in the CPU tier only (no GPU code: install, browser, "
                                       "pure-torch reproduction)")
    if config.getoption("--gpu"):
        host_module.allocator_as_main()  # the host's CUDA allocator, before torch is imported
        import torch

        if not torch.cuda.is_available():
            raise pytest.UsageError("--gpu: this machine has no CUDA device (torch.cuda.is_available() is False)")
    if host_module.find_host() is None:
        raise pytest.UsageError(
            "No ComfyUI host found. Set COMFYUI_PATH to a ComfyUI folder (one with comfy/samplers.py), "
            "or place this pack in ComfyUI/custom_nodes/. The README's set-up command builds one."
        )


def pytest_report_header(config):
    if config.getoption("--gpu"):
        import torch

        return f"GPU tier: {torch.cuda.get_device_name()}, CUDA allocator as the host's main.py picks it: " \
               f"PYTORCH_CUDA_ALLOC_CONF={os.environ.get('PYTORCH_CUDA_ALLOC_CONF')!r}"


def pytest_collection_modifyitems(config, items):
    gpu = config.getoption("--gpu")
    for item in items:
        if gpu and "cpu_tier" in item.keywords:
            item.add_marker(pytest.mark.skip(reason="CPU tier only (no GPU code); run without --gpu"))
        elif not gpu and "gpu" in item.keywords:
            item.add_marker(pytest.mark.skip(reason="GPU tier: run `bash scripts/test.sh --gpu` on a CUDA machine"))


@pytest.fixture(scope="session")
def on_gpu(pytestconfig) -> bool:
    """True in the GPU tier: the host runs on the GPU with its own dtype defaults."""
    return pytestconfig.getoption("--gpu")


@pytest.fixture(scope="session")
def graphs(on_gpu) -> bool:
    """True where the fast path's recorded calls are CUDA graphs: on the GPU, under either allocator
    (the tier runs under the host's, cudaMallocAsync on CUDA 13 torch; HOST_ALLOCATOR=native under
    torch's own, as ComfyUI's --disable-cuda-malloc)."""
    return on_gpu


@pytest.fixture(scope="session")
def comfy(tmp_path_factory, on_gpu):
    """The started host: ComfyUI with its built-in nodes and this pack, folders in a temp dir."""
    base = tmp_path_factory.mktemp("comfyui")
    return host_module.Host(host_module.find_host(), str(base), cpu=not on_gpu, dynamic_vram=on_gpu).start()


@pytest.fixture(scope="session")
def comfy_server(tmp_path_factory):
    """A ComfyUI server started once per session as a user starts it (main.py, a free localhost
    port), with this pack installed from a clean clone and tiny model files under the names the
    workflows use. Stopped (its whole process group) at the end of the session."""
    from tests.support import live_server

    server = live_server.LiveServer(host_module.find_host(), str(tmp_path_factory.mktemp("comfyui-live")))
    writer = None
    try:
        server.install()
        server.write_user_settings()
        writer = server.start_writing_files(live_server.files_for_workflows(live_server.workflow_paths()))
        server.start()
        output, _ = writer.communicate(timeout=600)
        if writer.returncode != 0:
            raise RuntimeError(f"writing the tiny model files failed:\n{output[-4000:]}")
        yield server
    finally:
        if writer is not None and writer.poll() is None:
            writer.kill()
            writer.wait()
        server.stop()


@pytest.fixture(scope="module")
def folders(comfy, request):
    """The tiny image domain in ComfyUI's input/domain, and models/domain_unets (returned) with, where
    the test module sets DOMAIN_FILES = "name", a full-copy domain (name_domain.safetensors) and a
    LoRA (name_lora.safetensors) of the tiny model."""
    import folder_paths

    from tests.support import tiny_nodes as tiny

    tiny.domain_images(os.path.join(folder_paths.get_input_directory(), "domain"))
    d = comfy.model_dir("domain_unets")
    name = getattr(request.module, "DOMAIN_FILES", None)
    if name:
        tiny.write_safetensors(os.path.join(d, f"{name}_domain.safetensors"), tiny.domain_state_dict())
        tiny.write_safetensors(os.path.join(d, f"{name}_lora.safetensors"), tiny.lora_state_dict(seed=5))
    return d
