"""tools/train_domain.py: the same training from the command line, through the host's own loaders."""
import importlib.util
import os
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

from tests.support import tiny_nodes as tiny
from tests.support.host import find_host
from tests.support.tiny_nodes import domain_images

TOOL = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools", "train_domain.py")


@pytest.fixture(scope="module")
def base_dir(comfy, tmp_path_factory):
    """A ComfyUI base directory with tiny base files in the host's own model folders."""
    base = tmp_path_factory.mktemp("headless")
    from comfy.taesd.taesd import TAESD

    tiny.write_safetensors(str(base / "models" / "diffusion_models" / "tiny_unet.safetensors"), tiny.unet_state_dict(0))
    with tiny.plain_weights():
        taesd = tiny.randomize_(TAESD(latent_channels=4), seed=5, scale=1.0)
    tiny.write_safetensors(str(base / "models" / "vae" / "tiny_taesd.safetensors"), taesd.state_dict())
    import comfy.sd1_clip

    # The host's text-encoder loader builds the real CLIP-L shape, so this one is full size (random, fp16).
    with tiny.plain_weights():
        clip_l = tiny.randomize_(comfy.sd1_clip.SDClipModel(dtype=torch.float16), seed=10, scale=1.0)
    tiny.write_safetensors(str(base / "models" / "text_encoders" / "tiny_clip_l.safetensors"), clip_l.transformer.state_dict())
    domain_images(str(base / "images"))
    return base


def run_tool(base, *extra, gpu=False, launcher=(sys.executable,), env=None):
    """The tool on the CPU, or (gpu) on the GPU as the host picks it; `launcher` e.g. torchrun; `env`
    added to the environment."""
    cmd = [*launcher, TOOL, "--comfyui", find_host(), "--base-directory", str(base), *([] if gpu else ["--cpu"]),
           "--unet", "tiny_unet.safetensors", "--vae", "tiny_taesd.safetensors", "--clip", "tiny_clip_l.safetensors",
           "--images", str(base / "images"), "--resolution", "64", "--batch-size", "2", "--training-dtype", "fp32",
           "--no-gradient-checkpointing", "--log-every", "1", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def test_trains_writes_the_file_and_resumes(base_dir, on_gpu):
    run = lambda *extra: run_tool(*extra, gpu=on_gpu)  # noqa: E731
    first = run(base_dir, "--save-name", "cli_domain", "--steps", "2", "--checkpoint-every", "1")
    assert first.returncode == 0, first.stderr[-3000:]
    assert "step 2/2" in first.stderr
    path = base_dir / "models" / "loras" / "cli_domain.safetensors"
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata()["indomain.steps"] == "2" and f.metadata()["indomain.mode"] == "lora"
    more = run(base_dir, "--save-name", "cli_domain", "--steps", "3", "--cuda-graphs")  # a speed option may change
    assert more.returncode == 0, more.stderr[-3000:]
    assert "step 3/3" in more.stderr and "step 1/3" not in more.stderr  # resumed, not restarted
    # On a GPU the graphs are taken (under torch's own allocator, which the trainer keeps: only main.py picks another)
    if on_gpu:
        assert "without CUDA graphs" not in more.stderr, more.stderr[-3000:]
    else:
        assert "cuda_graphs: training without CUDA graphs: CUDA graphs need a CUDA device and one process " \
               "(the device is cpu)" in more.stderr
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata()["indomain.steps"] == "3"


@pytest.fixture(scope="module")
def two_ranks(base_dir):
    """The tool under torchrun (2 CPU processes, gloo), 2 steps, a checkpoint each, validation prompts
    from a file: one run, whose outcome the next two tests read."""
    prompts = base_dir / "prompts.txt"
    prompts.write_text("a photo of a cat\n\na red house\n", encoding="utf-8")
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    return run_tool(base_dir, "--save-name", "two_ranks", "--steps", "2", "--checkpoint-every", "1",
                    "--validation-prompts", str(prompts), "--validation-steps", "2", "--validation-domain-scales", "0 1.5",
                    launcher=launcher)


def test_validation_prompts_from_a_file_give_a_grid_per_checkpoint_also_under_torchrun(base_dir, two_ranks):
    """--validation-prompts: rank 0 samples the grid of each checkpoint while the other rank waits;
    the run goes on and ends as without them."""
    assert two_ranks.returncode == 0, two_ranks.stderr[-3000:]
    folder = base_dir / "output" / "indomain_previews" / "two_ranks"
    assert sorted(os.listdir(folder)) == ["validation_step_000001.png", "validation_step_000002.png"]
    from PIL import Image
    with Image.open(folder / "validation_step_000002.png") as image:
        assert '"prompts": ["a photo of a cat", "a red house"]' in image.text["indomain.validation"]
    missing = run_tool(base_dir, "--save-name", "cli_samples_missing", "--steps", "1",
                       "--validation-prompts", str(base_dir / "no_such_file.txt"))
    assert missing.returncode != 0 and "--validation-prompts" in missing.stderr


def test_torchrun_trains_on_two_processes_and_rank_0_writes_the_files(base_dir, two_ranks):
    """The same command under torchrun: each process takes half of the global batch; rank 0 alone logs
    progress and writes the state and model files."""
    out = two_ranks
    assert out.returncode == 0, out.stderr[-3000:]
    assert "2 processes of 1 images each" in out.stderr and "step 2/2" in out.stderr
    assert "INFO [rank 1/2]" not in out.stderr and "ERROR" not in out.stderr  # rank 1 reports only its own failures
    path = base_dir / "models" / "loras" / "two_ranks.safetensors"
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata()["indomain.steps"] == "2"
    assert (path.parent / "two_ranks.indomain-state").exists() and not any(".tmp" in n for n in os.listdir(path.parent))


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs (e.g. the lent nvidia-h200-x2)")
@pytest.mark.parametrize("mode", ["lora", "full"])
def test_torchrun_trains_on_two_gpus_with_nccl_and_resumes_on_one(base_dir, mode):
    """The command users run on a two-GPU machine: NCCL, one GPU per rank, the host's own loaders;
    the run it saved resumes on one GPU."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    name = f"two_gpus_{mode}"
    out = run_tool(base_dir, "--save-name", name, "--steps", "2", "--mode", mode, "--training-dtype", "bf16",
                   gpu=True, launcher=launcher)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "2 processes of 1 images each" in out.stderr and "step 2/2" in out.stderr and "ERROR" not in out.stderr
    more = run_tool(base_dir, "--save-name", name, "--steps", "3", "--mode", mode, "--training-dtype", "bf16", gpu=True)
    assert more.returncode == 0, more.stderr[-3000:]
    assert "step 3/3" in more.stderr and "step 1/3" not in more.stderr
    folder = "loras" if mode == "lora" else "diffusion_models"
    with safe_open(str(base_dir / "models" / folder / f"{name}.safetensors"), framework="pt") as f:
        assert f.metadata()["indomain.steps"] == "3"


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None, reason="tensorboard is not installed (scripts/setup.sh installs it)")
def test_accumulation_validation_and_tensorboard_from_the_command_line(base_dir):
    """--gradient-accumulation, --validation-share and --tensorboard: the log says how the step is
    split and what is held out, logs the validation loss, and the event files in
    output/indomain_logs/<save-name> hold the steps' losses and the validation losses."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = run_tool(base_dir, "--save-name", "cli_logged", "--steps", "2", "--checkpoint-every", "1",
                   "--gradient-accumulation", "2", "--validation-share", "0.34", "--tensorboard")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "2 micro-batches of 1 images per step, 2 images held out for validation" in out.stderr
    shown = [line.split("validation loss ")[1] for line in out.stderr.splitlines() if "validation loss " in line]
    assert [s.split()[-1] for s in shown] == ["0", "1", "2"]
    logs = base_dir / "output" / "indomain_logs" / "cli_logged"
    acc = EventAccumulator(str(logs))
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2]
    assert [round(e.value, 4) for e in acc.Scalars("validation/loss")] == [float(s.split()[0]) for s in shown]


def test_tensorboard_without_the_package_stops_before_the_models_load_naming_it(base_dir, tmp_path):
    """A tensorboard package that cannot be imported (simulated: one that raises, first on the path)."""
    fake = tmp_path / "site" / "tensorboard"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('simulated: no tensorboard')\n")
    out = run_tool(base_dir, "--save-name", "cli_no_board", "--steps", "1", "--tensorboard",
                   env={"PYTHONPATH": os.pathsep.join(p for p in (str(tmp_path / "site"), os.environ.get("PYTHONPATH")) if p)})
    assert out.returncode == 1, out.stderr[-3000:]
    assert "pip install tensorboard" in out.stderr and "simulated: no tensorboard" in out.stderr
    assert "Latents" not in out.stderr and not (base_dir / "models" / "loras" / "cli_no_board.safetensors").exists()


def test_refuses_pickled_model_files_by_name(base_dir):
    (base_dir / "models" / "vae" / "evil.pt").write_bytes(b"\x80\x04")
    bad = run_tool(base_dir, "--save-name", "x", "--steps", "1", "--vae", "evil.pt")
    assert bad.returncode != 0 and "evil.pt" in bad.stderr and "only .safetensors" in bad.stderr
    assert not any((base_dir / "models" / kind / "x.safetensors").exists() for kind in ("loras", "diffusion_models"))


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["lora", "full"])
def test_trains_on_the_gpu_in_the_hosts_low_vram_mode_with_previews(base_dir, mode):
    """--lowvram: the host loads the UNet in parts and unloads it for the VAE; training (and its
    previews) goes on with the weights it trains."""
    out = run_tool(base_dir, "--save-name", f"lowvram_{mode}", "--steps", "4", "--mode", mode, "--lowvram",
                   "--preview-every", "2", "--training-dtype", "bf16", "--restart", gpu=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "step 4/4" in out.stderr
    previews = base_dir / "output" / "indomain_previews" / f"lowvram_{mode}"
    assert sorted(os.listdir(previews)) == ["step_000002.png", "step_000004.png"]


def cli_module(name: str):
    spec = importlib.util.spec_from_file_location(f"{name}_cli", os.path.join(os.path.dirname(__file__), "..", "tools", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# CLI option -> the node input it stands for, where the names differ (flags that turn a default off).
NODE_NAMES = {"no_flip": "flip", "no_gradient_checkpointing": "gradient_checkpointing", "compile": "torch_compile",
              "restart": "resume"}


def test_every_option_explains_itself_with_the_nodes_default_and_range(comfy):
    """--help as the node's tooltips: every option of both tools has a help line; each number states
    its range, which is the node input's (min to max, the same default), and a value outside it is
    refused naming the option and the range."""
    train, extract, options = cli_module("train_domain"), cli_module("extract_domain_lora"), cli_module("cli_options")
    inputs = {i.id: i for i in comfy.nodes["InDomainTrainUNet"].GET_SCHEMA().inputs}
    inputs_extract = {i.id: i for i in comfy.nodes["InDomainExtractLoRA"].GET_SCHEMA().inputs}
    for cli, node in ((train, inputs), (extract, inputs_extract)):
        numbers = 0
        for action in cli.parser()._actions:
            assert action.help and len(action.help) > 10, action.option_strings
            if not hasattr(action.type, "lo"):
                continue
            numbers += 1
            lo, hi = action.type.lo, action.type.hi
            assert f"({options.span(lo, hi)})" in action.help, action.help
            assert options.Help("tool")._get_help_string(action).endswith("(default: %(default)s)"), action.dest
            name = NODE_NAMES.get(action.dest, action.dest)
            if name in node:  # --log-every has no node input
                assert (node[name].min, node[name].max, node[name].default) == (lo, hi, action.default), name
        assert numbers >= (15 if cli is train else 1)
    for flag in NODE_NAMES:  # the flags' node inputs exist and default the other way round
        assert inputs[NODE_NAMES[flag]].default in (True, False)

    for argv, words in ((["--steps", "0"], "argument --steps: 0 is outside 1 to 1000000"),
                        (["--learning-rate", "2"], "argument --learning-rate: 2 is outside 1e-07 to 1"),
                        (["--validation-share", "0.6"], "argument --validation-share: 0.6 is outside 0 to 0.5"),
                        (["--batch-size", "four"], "argument --batch-size: 'four' is not an integer")):
        out = subprocess.run([sys.executable, TOOL, "--images", "x", "--save-name", "y", *argv], capture_output=True, text=True)
        assert out.returncode == 2 and words in out.stderr, out.stderr


def test_the_command_line_offers_what_the_training_loop_takes(comfy):
    """The CLI parses its options before the pack is importable, so its choices are written out
    there: each must be a value TrainConfig takes, and every optimizer training.config has is offered."""
    spec = importlib.util.spec_from_file_location("train_domain_cli", os.path.join(os.path.dirname(__file__), "..", "tools", "train_domain.py"))
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    config = comfy.pack("training.config")
    choices = {a.dest: a.choices for a in cli.parser()._actions if a.choices}
    assert set(choices) == {"mode", "lr_schedule", "training_dtype", "optimizer"}
    assert set(choices["optimizer"]) == set(config.OPTIMIZERS)
    for name in ("mode", "lr_schedule", "optimizer"):
        for value in choices[name]:
            config.TrainConfig(**{name: value}).validate()  # raises on a value the loop does not take


def test_the_out_of_memory_advice_names_real_inputs_and_options(comfy):
    """training.config.memory_savers, which the node's and the CLI's out-of-memory errors list, names
    inputs Train Domain UNet has and options the headless trainer takes, with values they accept."""
    config, cli = comfy.pack("training.config"), cli_module("train_domain")
    worst = dict(mode="full", batch_size=8, precision="fp32", resolution=1024, cuda_graph=True)
    inputs = {i.id: i for i in comfy.nodes["InDomainTrainUNet"].GET_SCHEMA().inputs}
    node_advice = config.memory_savers(config.TrainConfig(**worst))
    for advice in node_advice:
        words = advice.split(" (")[0].split()
        name = words[2] if words[:2] in (["turn", "on"], ["turn", "off"]) else words[-1] if words[0] == "a" else words[0]
        assert name in inputs, advice
        if len(words) == 2 and words[0] == name:  # "<input> <value>": a value the input takes
            value = words[1]
            options = getattr(inputs[name], "options", None)
            assert value in options if options else inputs[name].min <= int(value) <= inputs[name].max, advice
    options = {s for a in cli.parser()._actions for s in a.option_strings}
    for advice in config.memory_savers(config.TrainConfig(**worst), cli=True) + \
            config.memory_savers(config.TrainConfig(mode="full", fsdp=True), cli=True):
        named = [w for w in advice.split(" (")[0].split() if w.startswith("--")]
        assert named and all(o in options for o in named), advice
    assert len(node_advice) == 7
