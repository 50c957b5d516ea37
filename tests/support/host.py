"""The ComfyUI host for the tests: found as a real install finds it, started in-process on CPU.

- find_host(): COMFYUI_PATH, else the ComfyUI two folders above the pack
  (ComfyUI/custom_nodes/<pack>).
- start(base_dir): imports ComfyUI with its model/input/output folders under base_dir,
  loads the host's built-in nodes and this pack through the host's own custom-node loader.
- run(prompt): validates and executes an API-format prompt with the host's PromptExecutor (a new
  one per run, caching nothing across runs); run(prompt, executor=host.executor()) runs it through
  one executor kept across runs, with the host's real output cache, as a running ComfyUI queues.
- tiny SD1-architecture models with random weights (nothing downloaded).
"""
from __future__ import annotations

import asyncio
import copy
import logging
import os
import sys
import types
import uuid

PACK_DIR = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/support/ -> the pack
PACK_NAME = "comfyui-indomain"
log = logging.getLogger("tests.host")


def find_host() -> str | None:
    """The ComfyUI folder: COMFYUI_PATH, else two folders above the pack."""
    candidates = [os.environ.get("COMFYUI_PATH"), os.path.dirname(os.path.dirname(PACK_DIR))]
    for path in candidates:
        if path and os.path.isfile(os.path.join(path, "comfy", "samplers.py")):
            return os.path.abspath(path)
    return None


def pack_module(submodule: str):
    """A module of the pack as the running host loaded it, e.g. "nodes.dynamic_vram" (the host names
    the package by its path)."""
    suffix = f"{PACK_NAME}.{submodule}"
    for name, module in sys.modules.items():
        if name.endswith(suffix):
            return module
    raise KeyError(suffix)


def allocator_as_main(comfy_path: str | None = None) -> None:
    """(comfy_path: the host's folder; None: find_host(), nothing without one.) main.py's `import cuda_malloc`: on a CUDA build of torch the host sets PYTORCH_CUDA_ALLOC_CONF's
    backend to cudaMallocAsync (its default for NVIDIA users). main.py does it before torch is
    imported, and so must a caller: torch 2.11 reads the backend when it loads and stops at CUDA's
    first use if the variable changed since ("Allocator backend parsed at runtime != allocator backend
    parsed at load time"). Called once torch is imported, this keeps the allocator torch loaded with
    and says so (Host.allocator says which one runs). HOST_ALLOCATOR=native keeps torch's own
    caching allocator, as the host's --disable-cuda-malloc does."""
    comfy_path = comfy_path or find_host()
    if comfy_path is None:
        return
    # The host's folder stays off sys.path until Host.start: pytest imports this pack's __init__.py
    # (a package) before the first test, and it must not find the host there before the host starts.
    added = comfy_path not in sys.path
    if added:
        sys.path.insert(0, comfy_path)
    try:
        from comfy.cli_args import args

        if os.environ.get("HOST_ALLOCATOR") == "native":
            args.disable_cuda_malloc = True
        before = os.environ.get("PYTORCH_CUDA_ALLOC_CONF")
        torch_loaded = "torch" in sys.modules
        try:
            import cuda_malloc  # noqa: F401  (the host's module beside its main.py; it acts once, on import)
        except ImportError:
            return
    finally:
        if added:
            sys.path.remove(comfy_path)
    if torch_loaded and os.environ.get("PYTORCH_CUDA_ALLOC_CONF") != before:
        if before is None:
            del os.environ["PYTORCH_CUDA_ALLOC_CONF"]
        else:
            os.environ["PYTORCH_CUDA_ALLOC_CONF"] = before
        log.warning("torch was imported before the host's allocator choice: it keeps the allocator it loaded with")


class _Server:
    """The part of ComfyUI's PromptServer that PromptExecutor talks to, recording messages."""

    def __init__(self):
        self.client_id = None
        self.last_node_id = None
        self.last_prompt_id = None
        self.messages = []

    def send_sync(self, event, data, sid=None):
        self.messages.append((event, data))

    def send_progress_text(self, text, node_id, sid=None):
        self.messages.append(("progress_text", {"node": node_id, "text": text}))

    def progress_texts(self, node_id=None) -> list[str]:
        return [d["text"] for e, d in self.messages if e == "progress_text" and node_id in (None, d["node"])]


def card_settings(total_bytes: int, card_gib: float) -> tuple[float, float]:
    """A GPU of `total_bytes` held to a card of `card_gib` GiB, as the card tables measure it: (the
    host's --reserve-vram in GiB: the rest of the GPU, which its model management then leaves alone;
    the fraction of the GPU this process's CUDA allocations are capped at). ValueError unless the
    card is smaller than the GPU."""
    card = card_gib * 2**30
    if not 0 < card < total_bytes:
        raise ValueError(f"a card of {card_gib} GiB: it must be above 0 and below this GPU's {total_bytes / 2**30:.1f} GiB")
    return (total_bytes - card) / 2**30, card / total_bytes


def add_card_option(parser) -> None:
    """--card-gib of the benchmarks (bench/sampling.py, bench/training.py): the card tables' runs."""
    parser.add_argument("--card-gib", type=float, default=None,
                        help="hold the GPU to a card of this many GiB (the host's --reserve-vram for the rest and this "
                             "process capped there): the card tables' runs")


def hold_to_card(card_gib: float, args) -> dict:
    """Before the host's model management is imported: its --reserve-vram set to the rest of the GPU
    and this process capped at the card (torch.cuda.set_per_process_memory_fraction), so that the host
    loads, offloads and runs out of memory as on a card of card_gib GiB. Returns what was set."""
    import torch

    if not torch.cuda.is_available():
        raise ValueError("--card-gib holds a CUDA GPU to a smaller card: this machine has none")
    total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    args.reserve_vram, fraction = card_settings(total, card_gib)
    torch.cuda.set_per_process_memory_fraction(fraction)
    return {"card_gib": card_gib, "gpu_gib": round(total / 2**30, 2), "reserve_vram_gib": round(args.reserve_vram, 3),
            "memory_fraction": round(fraction, 5)}


class Host:
    def __init__(self, comfy_path: str, base_dir: str, cpu: bool = True, builtin_nodes: bool = True,
                 dynamic_vram: bool = False, card_gib: float | None = None):
        """cpu=False lets the host pick its accelerator (benchmarks); builtin_nodes=False skips the
        host's comfy_extras nodes (and their optional dependencies): only nodes.py and this pack.
        dynamic_vram=True turns on the host's dynamic VRAM as its main.py does on NVIDIA (ComfyUI
        0.33+; only in a process that has not imported the host yet); self.dynamic_vram then says
        whether it is on. card_gib: the GPU held to a card of that size (card_settings); self.card
        then says how."""
        self.card_gib, self.card = card_gib, None
        self.path = comfy_path
        self.base_dir = base_dir
        self.cpu = cpu
        self.builtin_nodes = builtin_nodes
        self.want_dynamic_vram = dynamic_vram
        self.dynamic_vram = False
        self.allocator = None  # after start(): "native", "cudaMallocAsync" or "cpu"
        self.server = _Server()
        self.captured = {}

    def start(self):
        if self.path not in sys.path:
            sys.path.insert(0, self.path)
        from comfy.cli_args import args

        args.cpu = self.cpu
        args.base_directory = self.base_dir
        args.disable_all_custom_nodes = False
        if not self.cpu:
            allocator_as_main(self.path)
        if self.card_gib:
            self.card = hold_to_card(self.card_gib, args)
        if self.want_dynamic_vram:
            self._aimdo_init(args)
        import folder_paths

        folder_paths.set_output_directory(os.path.join(self.base_dir, "output"))
        folder_paths.set_input_directory(os.path.join(self.base_dir, "input"))
        folder_paths.set_temp_directory(os.path.join(self.base_dir, "temp"))
        for sub in ("input", "output", "temp"):
            os.makedirs(os.path.join(self.base_dir, sub), exist_ok=True)
        import nodes

        if self.want_dynamic_vram:
            self.dynamic_vram = self._dynamic_vram_on(args)
        if self.builtin_nodes:
            asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
        # Load the pack the way the host loads custom_nodes/<pack>.
        custom = os.path.join(self.base_dir, "custom_nodes")
        os.makedirs(custom, exist_ok=True)
        link = os.path.join(custom, PACK_NAME)
        if not os.path.exists(link):
            os.symlink(PACK_DIR, link)
        if not asyncio.run(nodes.load_custom_node(link)):
            raise RuntimeError("ComfyUI failed to load the pack; see the log above")
        from tests.support import tiny_nodes

        tiny_nodes.register(self)
        # Nodes reach the UI through server.PromptServer.instance, as in a running ComfyUI (whose
        # main.py imports the server module first); here that instance is the recording stand-in.
        # Newer hosts import the real server module on their own (with no instance running): the
        # stand-in then becomes its instance.
        if "server" not in sys.modules:
            stub = types.ModuleType("server")
            stub.PromptServer = type("PromptServer", (), {"instance": self.server})
            sys.modules["server"] = stub
        elif getattr(getattr(sys.modules["server"], "PromptServer", None), "instance", None) is None:
            sys.modules["server"].PromptServer.instance = self.server
        import torch

        self.allocator = "cpu" if self.cpu or not torch.cuda.is_available() else torch.cuda.memory.get_allocator_backend()
        return self

    @staticmethod
    def _aimdo_init(args):
        """main.py, before any comfy module that loads comfy_aimdo (they copy its library handle)."""
        if any(name == "comfy.model_management" for name in sys.modules):
            raise RuntimeError("dynamic VRAM must be turned on before the host is imported (a fresh process)")
        try:
            from comfy.cli_args import enables_dynamic_vram
            import comfy_aimdo.control  # noqa: F401
        except ImportError:  # a host before dynamic VRAM (0.8.0)
            return
        if args.cpu or not enables_dynamic_vram():
            return
        import comfy_aimdo.control

        headroom = None if args.reserve_vram is None else int(args.reserve_vram * 1024 ** 3)
        try:
            comfy_aimdo.control.init(simple_vram_headroom=headroom,
                                     nvml_pressure=not getattr(args, "disable_nvml_pressure", False))
        except TypeError:  # older comfy-aimdo protocols
            try:
                comfy_aimdo.control.init(simple_vram_headroom=headroom)
            except TypeError:
                comfy_aimdo.control.init()

    @staticmethod
    def _dynamic_vram_on(args) -> bool:
        """main.py, after `import nodes`: the devices registered with aimdo, the dynamic patcher as
        the core ModelPatcher (the host's loaders build theirs with it)."""
        import comfy.model_management as mm
        import comfy.model_patcher

        try:
            from comfy.cli_args import enables_dynamic_vram
            import comfy.memory_management
            import comfy_aimdo.control
        except ImportError:  # a host before dynamic VRAM (0.8.0)
            return False
        if args.cpu or not enables_dynamic_vram() or not mm.is_nvidia() or mm.torch_version_numeric < (2, 8):
            return False

        try:
            ok = comfy_aimdo.control.init_devices((d.index, int(args.vram_headroom * 1024 ** 3))
                                                  for d in mm.get_all_torch_devices())
        except TypeError:  # comfy-aimdo 0.4.9
            ok = comfy_aimdo.control.init_devices(d.index for d in mm.get_all_torch_devices())
        if ok:
            Host._aimdo_log_level(args)
            comfy.model_patcher.CoreModelPatcher = comfy.model_patcher.ModelPatcherDynamic
            comfy.memory_management.aimdo_enabled = True
        return bool(ok)

    @staticmethod
    def _aimdo_log_level(args):
        """main.py gives comfy-aimdo its console level (INFO unless --verbose). Left at its own default
        (every level, its hot paths' verbose lines included), aimdo calls its Python log callback for
        each of them, also from its own threads: a tier run hung in that callback (docs/GPU_TIER.md,
        2026-11-30 night)."""
        import comfy_aimdo.control as aimdo

        try:
            from comfy.cli_args import get_console_log_level
            level = get_console_log_level(args.verbose)
        except (ImportError, AttributeError, TypeError):
            level = "INFO"
        setter = {"DEBUG": "set_log_debug", "DETAIL": "set_log_detail", "CRITICAL": "set_log_critical",
                  "ERROR": "set_log_error", "WARNING": "set_log_warning"}.get(level, "set_log_info")
        getattr(aimdo, setter, aimdo.set_log_info)()

    def after_node(self):
        """What the host's executor does after each node (0.33: cast buffers, prefetch queues and
        dynamic VRAM watermarks reset), for code that calls node functions directly."""
        import comfy.model_management as mm

        if hasattr(mm, "reset_cast_buffers"):
            mm.reset_cast_buffers()
        try:
            import comfy.model_prefetch
            import comfy_aimdo.model_vbar
        except ImportError:
            return
        comfy.model_prefetch.cleanup_prefetch_queues()
        if self.dynamic_vram:
            comfy_aimdo.model_vbar.vbars_reset_watermark_limits()

    def pack(self, submodule: str):
        """A module of the loaded pack, e.g. pack("nodes.domain_files") (the host names it by its path)."""
        return pack_module(submodule)

    @property
    def nodes(self):
        import nodes

        return nodes.NODE_CLASS_MAPPINGS

    def model_dir(self, folder: str) -> str:
        import folder_paths

        path = folder_paths.get_folder_paths(folder)[0]
        os.makedirs(path, exist_ok=True)
        return path

    def executor(self, cache_type: str = "CLASSIC", lru: int = 10):
        """A PromptExecutor with the host's real output cache (cache_type: a name of the host's
        execution.CacheType, CLASSIC being 0.8.0's default), to pass to run(..., executor=) for
        several prompts in a row: a node runs again only when its inputs or its fingerprint changed."""
        import execution

        return execution.PromptExecutor(self.server, cache_type=getattr(execution.CacheType, cache_type),
                                        cache_args={"lru": lru, "ram": 0.0, "ram_inactive": 0.0})

    def run(self, prompt: dict, outputs: list[str] | None = None, executor=None) -> dict:
        """Validate and execute an API-format prompt; return {"ui": ..., "captured": ...}.

        executor: None (a new PromptExecutor that caches nothing across runs), or one from
        executor(), reused across runs with its cache. Raises HostError with the host's own
        validation or execution error.
        """
        import execution

        prompt_id = str(uuid.uuid4())
        valid = asyncio.run(execution.validate_prompt(prompt_id, prompt, outputs))
        if not valid[0]:
            raise HostError(f"prompt did not validate: {valid[1]} {valid[3]}")
        self.captured.clear()
        self.server.messages.clear()
        if executor is None:
            executor = execution.PromptExecutor(self.server, cache_args={"lru": 0, "ram": 0.0, "ram_inactive": 0.0})
        else:  # the host writes each node's fingerprint into the prompt; a server gets a fresh one per queue
            prompt = copy.deepcopy(prompt)
        executor.success = True  # a run whose nodes all come from the cache executes none to set it
        executor.execute(prompt, prompt_id, {}, valid[2])
        if not executor.success:
            errors = [(e, d) for e, d in executor.status_messages if e in ("execution_error", "execution_interrupted")]
            if errors and errors[0][0] == "execution_interrupted":
                raise HostError(f"interrupted at node {errors[0][1].get('node_id')}", errors[0][1], interrupted=True)
            raise HostError(errors[0][1] if errors else "execution failed")
        return {"ui": executor.history_result["outputs"], "captured": dict(self.captured)}


class HostError(RuntimeError):
    def __init__(self, message, detail=None, interrupted=False):
        self.interrupted = interrupted
        if isinstance(message, dict):  # the host's error record: show its type, message and last frames
            detail = message
            message = (f"{message.get('node_type')} ({message.get('node_id')}): {message.get('exception_type')}: "
                       f"{message.get('exception_message', '').strip()}\n" + "".join(message.get("traceback", [])[-3:]))
        super().__init__(message)
        self.detail = detail

    @property
    def exception_message(self) -> str:
        d = self.detail if isinstance(self.detail, dict) else {}
        return d.get("exception_message", str(self))
