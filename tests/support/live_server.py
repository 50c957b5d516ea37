"""A real ComfyUI server with this pack installed the way a user (or ComfyUI-Manager) installs it.

LiveServer(comfy_path, base_dir):
- install(): `git clone` of this repository's HEAD into <base>/custom_nodes/comfyui-indomain
  (a clean clone: uncommitted changes are not in it), then `pip install -r requirements.txt`
  with the host's own pip;
- start(): `main.py --cpu --base-directory <base>` on a free localhost port, in its own process
  group, log in <base>/server.log; returns when the server answers;
- tiny model files (random weights, nothing downloaded) under the names the workflows use,
  written by a subprocess (`python live_server.py write-files ...`) while the server starts;
- stop(): ends the server's process group.

The front-end user settings are written before the start so the first page load shows the
graph directly (no tour, template browser or minimap over it).
"""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/support/ -> the pack
PACK_NAME = "comfyui-indomain"

# The combo widgets holding a file name, for the node types of workflows/: (widgets_values index,
# folder) each. The browser test checks every combo value against the front end's options, so a
# name missed here fails there.
MODEL_WIDGETS = {
    "CheckpointLoaderSimple": [(0, "models/checkpoints")],
    "UNETLoader": [(0, "models/diffusion_models")],
    "DualCLIPLoader": [(0, "models/text_encoders"), (1, "models/text_encoders")],
    "CLIPLoader": [(0, "models/text_encoders")],
    "VAELoader": [(0, "models/vae")],
    "InDomainUNetLoader": [(0, "models/domain_unets")],
    "ControlNetLoader": [(0, "models/controlnet")],
    "LoadImage": [(0, "input")],
}

# Front-end settings of a user who has been here before: no first-run tour or template browser,
# no minimap drawn over the graph.
FRONTEND_SETTINGS = {
    "Comfy.TutorialCompleted": True,
    "Comfy.Minimap.Visible": False,
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def workflow_paths() -> list[str]:
    """The UI-format workflows a user drags in (from the tested repository's working tree)."""
    folder = os.path.join(REPO, "example_workflows")
    return sorted(os.path.join(folder, name) for name in os.listdir(folder) if name.endswith(".json"))


def files_for_workflows(paths: list[str]) -> list[tuple[str, str]]:
    """(folder relative to the base, file name) of every model or image a workflow names."""
    wanted = set()
    for path in paths:
        with open(path) as f:
            workflow = json.load(f)
        for node in workflow["nodes"]:
            for index, folder in MODEL_WIDGETS.get(node["type"], []):
                wanted.add((folder, node["widgets_values"][index]))
    return sorted(wanted)


class LiveServer:
    def __init__(self, comfy_path: str, base_dir: str, repo: str = REPO):
        self.comfy_path = comfy_path
        self.base = base_dir
        self.repo = repo
        self.python = os.path.join(comfy_path, ".venv", "bin", "python")
        if not os.path.exists(self.python):
            self.python = sys.executable
        self.pack_dir = os.path.join(base_dir, "custom_nodes", PACK_NAME)
        self.log_path = os.path.join(base_dir, "server.log")
        self.port = None
        self.process = None
        self.timings: dict[str, float] = {}
        self.install_output = ""

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # --- install -------------------------------------------------------------------------------
    def install(self) -> "LiveServer":
        t0 = time.perf_counter()
        os.makedirs(os.path.dirname(self.pack_dir), exist_ok=True)
        head = _git(self.repo, "rev-parse", "HEAD").strip()
        _run(["git", "clone", "--quiet", "--no-checkout", self.repo, self.pack_dir])
        _git(self.pack_dir, "checkout", "--quiet", head)
        self.commit = head
        self.timings["clone"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        result = _run([self.python, "-m", "pip", "install", "--disable-pip-version-check", "-q",
                       "-r", os.path.join(self.pack_dir, "requirements.txt")])
        self.install_output = result.stdout + result.stderr
        self.timings["pip"] = time.perf_counter() - t0
        return self

    # --- files ---------------------------------------------------------------------------------
    def write_user_settings(self, settings: dict | None = None):
        user = os.path.join(self.base, "user", "default")
        for sub in ("workflows", "subgraphs"):
            os.makedirs(os.path.join(user, sub), exist_ok=True)
        with open(os.path.join(user, "comfy.settings.json"), "w") as f:
            json.dump(settings or FRONTEND_SETTINGS, f, indent=1)
        # files the front end asks for at start; absent they are 404s in the browser console
        with open(os.path.join(user, "user.css"), "w") as f:
            f.write("")
        with open(os.path.join(user, "comfy.templates.json"), "w") as f:
            f.write("[]")

    def start_writing_files(self, files: list[tuple[str, str]]) -> subprocess.Popen:
        """Tiny model files and images under the given names, written by a subprocess of the host's Python."""
        return subprocess.Popen([self.python, "-m", "tests.support.live_server", "write-files", self.comfy_path, self.base,
                                 json.dumps(files)], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    # --- server --------------------------------------------------------------------------------
    def command(self) -> list[str]:
        return [self.python, "main.py", "--cpu", "--base-directory", self.base, "--disable-auto-launch",
                "--listen", "127.0.0.1", "--port", str(self.port), "--disable-api-nodes",
                "--database-url", "sqlite:///:memory:"]

    def start(self, timeout: float = 120.0) -> "LiveServer":
        t0 = time.perf_counter()
        self.port = free_port()
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with open(self.log_path, "w") as log:
            self.process = subprocess.Popen(self.command(), cwd=self.comfy_path, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, env=env, start_new_session=True)
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with code {self.process.returncode}:\n{self.log()[-4000:]}")
            try:
                self.get("/system_stats", timeout=2)
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"ComfyUI did not answer in {timeout} s:\n{self.log()[-4000:]}")
                time.sleep(0.25)
        self.timings["start"] = time.perf_counter() - t0
        return self

    def stop(self):
        if self.process is None or self.process.poll() is not None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)
        except ProcessLookupError:
            pass

    def log(self) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    # --- HTTP ----------------------------------------------------------------------------------
    def get(self, path: str, timeout: float = 30.0):
        with urllib.request.urlopen(self.url + path, timeout=timeout) as response:
            return json.loads(response.read())

    def fetch(self, path: str, timeout: float = 30.0) -> tuple[int, str, bytes]:
        """(status, content type, body) of a GET, errors included (e.g. 404)."""
        try:
            with urllib.request.urlopen(self.url + path, timeout=timeout) as response:
                return response.status, response.headers.get("Content-Type", ""), response.read()
        except urllib.error.HTTPError as e:
            return e.code, e.headers.get("Content-Type", ""), e.read()

    def wait_for_history(self, exclude=(), timeout: float = 120.0) -> dict:
        """The /history entry of the first finished prompt whose id is not in `exclude`."""
        deadline = time.monotonic() + timeout
        while True:
            history = self.get("/history")
            done = [h for prompt_id, h in history.items() if prompt_id not in exclude
                    and h.get("status", {}).get("status_str") in ("success", "error")]
            if done:
                return done[0]
            if time.monotonic() > deadline:
                raise TimeoutError(f"no finished prompt in {timeout} s; server log:\n{self.log()[-3000:]}")
            time.sleep(0.25)


def pack_node_ids(pack_dir: str) -> set[str]:
    """The node ids the pack's sources declare (`node_id="..."`), read without importing them."""
    ids = set()
    nodes_dir = os.path.join(pack_dir, "nodes")
    for name in os.listdir(nodes_dir):
        if name.endswith(".py"):
            with open(os.path.join(nodes_dir, name)) as f:
                ids.update(re.findall(r'node_id="([^"]+)"', f.read()))
    return ids


def _run(args, cwd=None) -> subprocess.CompletedProcess:
    result = subprocess.run(args, cwd=cwd, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def _git(repo: str, *args) -> str:
    return _run(["git", "-C", repo, *args]).stdout


def write_files(comfy_path: str, base: str, files: list[tuple[str, str]]):
    """Tiny files (random weights) for each (folder, name): what the page lists. Only the SD1.5 workflow
    is queued there; the files of another family's workflows (an SDXL checkpoint, Flux's diffusion model,
    text encoders and VAE, its domain) are only listed, so they hold SD1 parts of the same kind (the VAE:
    a TAESD of 16 channels) and a second file of a folder is a hard link to the first (the checkpoint is
    300 MB)."""
    sys.path.insert(0, comfy_path)
    from comfy.cli_args import args

    args.cpu = True
    from tests.support import tiny_nodes as tiny
    from PIL import Image

    first = {}  # folder -> the first model file written there
    for folder, name in files:
        path = os.path.join(base, folder, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if folder in first:
            os.link(first[folder], path)
            continue
        if folder != "input":
            first[folder] = path
        if folder == "input":
            Image.new("RGB", (64, 64), (200, 120, 40)).save(path)
        elif folder == "models/checkpoints":
            tiny.write_safetensors(path, tiny.checkpoint_state_dict())
        elif folder == "models/domain_unets":
            tiny.write_safetensors(path, tiny.domain_state_dict())
        elif folder == "models/controlnet":
            tiny.write_safetensors(path, tiny.controlnet_state_dict())
        elif folder == "models/diffusion_models":
            tiny.write_safetensors(path, tiny.unet_state_dict(0))
        elif folder == "models/text_encoders":
            tiny.write_safetensors(path, tiny.tiny_clip().cond_stage_model.state_dict())
        elif folder == "models/vae":
            tiny.write_safetensors(path, tiny.TestTinyTAESD().load(16)[0].first_stage_model.state_dict())
        else:
            raise ValueError(f"no tiny file for {folder}/{name}")


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "write-files":
        write_files(sys.argv[2], sys.argv[3], [tuple(x) for x in json.loads(sys.argv[4])])
    else:
        sys.exit(f"usage: {sys.argv[0]} write-files COMFY_PATH BASE_DIR FILES_JSON")
