"""pytest set-up: the real ComfyUI host, started once per session on CPU.

The host is found as a real install finds it (COMFYUI_PATH, else the ComfyUI two folders
above the pack). Without one the session stops with a clear message: the host tests are the
heart of this suite and are never silently skipped.
"""
from __future__ import annotations

import os
import sys

import pytest

TESTS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TESTS)
sys.path.insert(0, TESTS)
sys.path.append(REPO)  # `guidance` and `training` as top-level packages; after the host's `nodes`

import host as host_module  # noqa: E402


def pytest_configure(config):
    if host_module.find_host() is None:
        raise pytest.UsageError(
            "No ComfyUI host found. Set COMFYUI_PATH to a ComfyUI folder (one with comfy/samplers.py), "
            "or place this pack in ComfyUI/custom_nodes/. The README's set-up command builds one."
        )


@pytest.fixture(scope="session")
def comfy(tmp_path_factory):
    """The started host: ComfyUI with its built-in nodes and this pack, folders in a temp dir."""
    base = tmp_path_factory.mktemp("comfyui")
    return host_module.Host(host_module.find_host(), str(base)).start()


@pytest.fixture(scope="session")
def comfy_server(tmp_path_factory):
    """A ComfyUI server started once per session as a user starts it (main.py, a free localhost
    port), with this pack installed from a clean clone and tiny model files under the names the
    workflows use. Stopped (its whole process group) at the end of the session."""
    import live_server

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
