"""run_training: one Train Domain UNet run, from host objects to the written files and the domain
MODEL, shared by the node and the headless trainer (tools/train_domain.py).

What training needs to know of the host's MODEL is read once (inputs.read_host_model) and handed
on; host objects become the loop's callables (inputs.py), the loop runs (training.train) with the
host's progress bar, interrupt and previews (progress.py), and each checkpoint's weights are
written as the model file (files.py); with validation prompts, each checkpoint's weights are
sampled as the domain of the base (samples.py), the host's training changes undone meanwhile
(HostChanges); with `tensorboard`, the progress also goes to TensorBoard event files (logs.py).
Out-of-memory and a full disk are reported with what was kept.
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import logging
import os
from typing import NamedTuple

import torch
import torch.utils.checkpoint

import comfy.model_management
import comfy.utils
import folder_paths

from ...lora_hooks import DEFAULT_TARGETS
from ...training import TrainConfig, data, train
from ...training.checkpoint import deliverable, fingerprint
from ...training.config import cuda_graph_reason, memory_savers
from ...training.distributed import ranks
from ...training.sharded import remove_sharded
from ..domain_files import apply_lora, model_from_base_config
from ..dynamic_vram import release
from ..host_memory import host_flag_reason
from .differentiable import for_training, host_in_training, mixed_dtypes, weights_cast_to_input, weights_for_autograd
from .files import ModelFile, cache_folder, kept_message, output_paths
from .inputs import HostModel, check_vae, cond_function, empty_prompt, encode_function, one_frame, read_host_model
from .logs import TensorBoardLog, log_folder, require_tensorboard
from .progress import each_of, preview_function, progress_reporter, text_sender
from .samples import ValidationSamples, ValidationSettings, samples_folder

log = logging.getLogger(__name__)


def resolve_image_folder(image_folder: str, *, anywhere: bool = False) -> str:
    """training.data.resolve_image_folder in ComfyUI's input directory."""
    return data.resolve_image_folder(image_folder, folder_paths.get_input_directory(), anywhere=anywhere)


def image_folder_fingerprint(image_folder: str) -> str:
    """training.data.image_folder_fingerprint in ComfyUI's input directory (the node's fingerprint_inputs)."""
    return data.image_folder_fingerprint(image_folder, folder_paths.get_input_directory())


def with_cuda_graphs(config: TrainConfig, asked: bool = False) -> TrainConfig:
    """config with cuda_graph on where it pays and the run can have them (training/graphed.py): in
    LoRA mode always (its eager step waits on the launches of the adapters' small ops; the graphs
    cost it almost no memory), in full mode when `asked` (its graphs keep their memory pool between
    steps). Otherwise config as it is, and the reason logged (a warning when asked): the CPU,
    torchrun, fp16, torch_compile, fsdp, gradient accumulation, ComfyUI's --disable-cuda-graphs,
    INDOMAIN_TRAIN_GRAPHS=0."""
    if config.cuda_graph or (not asked and config.mode != "lora"):
        return config
    reason = ("training_dtype fp16 (its loss scaling)" if config.precision == "fp16" else
              "torch_compile is on" if config.compile else
              "fsdp is on (its blocks' weights are gathered and freed around each call)" if config.fsdp else
              f"gradient_accumulation is {config.gradient_accumulation} (the graphs record whole steps)"
              if config.gradient_accumulation > 1 else
              cuda_graph_reason(comfy.model_management.get_torch_device()) or host_flag_reason()
              or ("INDOMAIN_TRAIN_GRAPHS=0 is set" if os.environ.get("INDOMAIN_TRAIN_GRAPHS", "").strip() == "0" else None))
    if reason:
        (log.warning if asked else log.info)("cuda_graphs: training without CUDA graphs: %s", reason)
        return config
    return dataclasses.replace(config, cuda_graph=True)


class TrainingRun(NamedTuple):
    """What run_training returns."""
    domain: object  # the domain MODEL (None on the ranks but 0 of a run with fsdp: rank 0 alone holds its weights)
    losses: list[float]  # one per step run in this call
    start: int  # the step this call started after
    model_path: str  # the model file written
    validation: list[tuple[int, float | None]]  # (step, validation loss), resumed runs' too; [] without validation
    samples: torch.Tensor | None = None  # the last grid of validation samples, an IMAGE; None without validation prompts


def run_training(*, model, vae, null_conditioning=None, clip=None, images=None, image_folder="", config: TrainConfig,
                 save_name: str, resume: bool = True, node_id=None, on_progress=None, headless: bool = False,
                 cuda_graphs: bool = False, tensorboard: bool = False,
                 validation: ValidationSettings | None = None) -> TrainingRun:
    """Train, write the domain UNet file, and return a TrainingRun.

    image_folder: a folder inside ComfyUI's input directory (relative to it, or an absolute path
    inside it). headless=True (the headless trainer): any folder, and errors name its options.
    cuda_graphs: full mode's steps as CUDA graphs too (LoRA mode's are wherever the run allows
    them; with_cuda_graphs). tensorboard: TensorBoard event files in
    output/indomain_logs/<save_name>/ (logs.py; ImportError naming the package when it is missing).
    validation: the prompts (encoded with `clip`) and settings of the validation samples taken at
    each checkpoint (samples.py); None or no prompts: none."""
    config = with_cuda_graphs(config, asked=cuda_graphs)
    if tensorboard:
        require_tensorboard()  # before anything is read or written
    config.validate()
    sources = image_sources(images, image_folder, anywhere=headless)
    model_path, state_path = output_paths(save_name, config.mode)
    host = read_host_model(model)  # all that training asks of the model, asked once; refuses one it cannot train
    check_vae(vae, host)
    if null_conditioning is None and clip is not None:  # (as CLIP Text Encode of "" gives it)
        null_conditioning = clip.encode_from_tokens_scheduled(clip.tokenize(""))
    cross_attn, extras = empty_prompt(null_conditioning, clip)
    config = family_config(config, host)
    stem = os.path.splitext(os.path.basename(model_path))[0]
    samples = validation_samples(validation, model, host, vae, clip, null_conditioning, config, model_path, stem)
    main = ranks().main  # under torchrun (the headless trainer) rank 0 alone writes files
    if not resume and os.path.exists(state_path) and main:
        log.info("resume is off: starting over, replacing %s", state_path)
        os.remove(state_path)
        remove_sharded(state_path)  # a sharded state's parts (fsdp)

    # Under dynamic VRAM, the host's non-dynamic copy of the base; the outputs below refer to `model`.
    trainer = for_training(model)
    with contextlib.ExitStack() as copy, torch.inference_mode(False), weights_for_autograd(trainer) as unet:
        if trainer is not model:
            copy.callback(release, trainer)
        board = TensorBoardLog(log_folder(save_name), config) if tensorboard and main else None
        if board is not None:
            copy.callback(board.close)
        base_fp = fingerprint(unet)
        write = ModelFile(model_path, host, config, base_fp)
        bar = comfy.utils.ProgressBar(config.steps, node_id=node_id)
        progress = each_of(write.count_images, progress_reporter(bar, node_id, config.steps), board, on_progress)
        preview = preview_function(trainer, host, vae, cross_attn, extras, config, stem, bar)
        changes = training_changes(unet, host, config)

        def take_samples(step: int, weights: dict, resumed: bool) -> None:  # the loop's on_samples (rank 0)
            with changes.suspended(), validation_failures_explained(state_path, step):
                samples(step, weights, resumed)

        if samples is not None and main:
            samples.start(trainer=trainer, base_fingerprint=base_fp, bar=bar, say=text_sender(node_id), board=board)

        with failures_explained(state_path, host, config, cli=headless), changes:
            result = train(
                unet, sources if len(sources) > 1 else sources[0], config=config, state_path=state_path,
                **host_arguments(vae, host, trainer, cross_attn, extras),
                on_progress=progress, on_checkpoint=write, on_preview=preview,
                release_base=(lambda: release(trainer)) if config.mode == "full" else None,
                # (with fsdp every rank gathers the weights rank 0 samples with: every rank passes it, rank 0 calls it)
                on_samples=take_samples if samples is not None and (main or config.fsdp) else None,
            )
        final = result.ema_weights if result.ema_weights is not None else result.weights
        if main:
            write(result.step, final)

    domain = trained_model(model, host, final, config, model_path) if final or not config.fsdp else None  # fsdp: rank 0's
    return TrainingRun(domain, result.losses, result.start_step, model_path,
                       result.validation, samples.latest if samples is not None else None)


def validation_samples(settings: ValidationSettings | None, model, host: HostModel, vae, clip, null, config: TrainConfig,
                       model_path: str, stem: str) -> ValidationSamples | None:
    """The run's validation samples (samples.py; in the folder of `stem`, the model file's name), or
    None without prompts. Their prompts are encoded here: a refused one stops the run before anything is written."""
    if settings is None or not settings.on:
        return None
    return ValidationSamples(
        model=model, host=host, vae=vae, clip=clip, null=null, settings=settings, mode=config.mode,
        resolution=config.resolution, total_steps=config.steps, folder=samples_folder(stem),
        make_domain=lambda weights: trained_model(model, host, weights, config, model_path),
    )


def host_arguments(vae, host: HostModel, trainer, cross_attn, extras) -> dict:
    """train()'s arguments that the host gives: the VAE's encode and its id, the empty prompt's
    conditioning, the schedule, the latent cache's folder, the interrupt and the device."""
    return dict(
        encode=encode_function(vae, host, trainer),
        vae_id=f"{fingerprint(vae.first_stage_model)}|{host.latent_format}",
        cond_for=cond_function(host, cross_attn, extras), alphas_cumprod=host.alphas_cumprod,
        prediction_type=host.prediction_type, flow=host.flow, cache_dir=cache_folder(),
        check_interrupt=comfy.model_management.throw_exception_if_processing_interrupted,
        device=comfy.model_management.get_torch_device(),
    )


def image_sources(images, image_folder: str, *, anywhere: bool = False) -> list:
    """What the run trains on: the IMAGE batch, the folder, or both (ValueError for neither)."""
    sources = []
    if images is not None:
        sources.append(images)
    if image_folder and image_folder.strip():
        sources.append(resolve_image_folder(image_folder, anywhere=anywhere))
    if not sources:
        raise ValueError("images / image_folder: connect an IMAGE batch or give a folder of domain images")
    return sources


def family_config(config: TrainConfig, host: HostModel) -> TrainConfig:
    """config with the model family's own checkpointed blocks and LoRA targets where it asks for the defaults."""
    if config.gradient_checkpointing == ("all",):
        config = TrainConfig(**{**config.__dict__, "gradient_checkpointing": host.checkpointed_blocks})
    if config.lora_targets == DEFAULT_TARGETS:  # the UNet's layer names: the family's own, for a DiT
        config = TrainConfig(**{**config.__dict__, "lora_targets": host.family.lora_targets})
    return config


def training_changes(unet, host: HostModel, config: TrainConfig) -> HostChanges:
    """What the run changes in the host (HostChanges): the weights cast to fp32 inputs (LoRA in fp32),
    a video model's one-frame input, the host's ops made differentiable (host_in_training)."""
    # LoRA in fp32 runs the host's UNet without autocast: its fp16/bf16 weights (a GPU's) are cast
    # to the fp32 activations layer by layer.
    casting = config.mode == "lora" and config.precision == "fp32" and mixed_dtypes(unet, torch.float32)
    return HostChanges(lambda: weights_cast_to_input(unet, casting), lambda: one_frame(unet, host),
                       lambda: host_in_training(host.family, checkpointing=bool(config.gradient_checkpointing)))


class HostChanges:
    """What training changes in the host for the length of a run (each a context manager made by a
    function), entered together, and left for a block within it (suspended(): the host as it was,
    e.g. to sample as KSampler does) and entered again after, also after an error."""

    def __init__(self, *makers):
        self.makers, self.stack = makers, None

    def __enter__(self):
        stack = contextlib.ExitStack()
        with stack:
            for make in self.makers:
                stack.enter_context(make())
            self.stack = stack.pop_all()
        return self

    def __exit__(self, *exc):
        stack, self.stack = self.stack, None
        return stack.__exit__(*exc) if stack is not None else False

    @contextlib.contextmanager
    def suspended(self):
        self.__exit__(None, None, None)
        try:
            yield
        finally:
            self.__enter__()


@contextlib.contextmanager
def validation_failures_explained(state_path: str, step: int):
    """Out of memory while taking the validation samples, as an error that says what to change and
    that the checkpoint is kept (a resumed run takes that step's samples first)."""
    try:
        yield
    except torch.OutOfMemoryError as e:
        raise RuntimeError(kept_message(state_path, f"out of memory while taking the validation samples of step {step} "
                                             f"({e}). Give fewer validation_prompts or validation_domain_scales, a "
                                             "lower resolution, or leave validation_prompts empty")) from e


@contextlib.contextmanager
def failures_explained(state_path: str, host: HostModel, config: TrainConfig, cli: bool):
    """Out of memory, a recomputation that differs and a full disk during training, raised as errors
    that say what to change (for memory: training.config.memory_savers, in order) and that the
    resumable state is kept (kept_message)."""
    try:
        yield
    except torch.OutOfMemoryError as e:
        savers = memory_savers(config, cli) or ["a GPU with more memory"]
        raise RuntimeError(kept_message(state_path, f"out of memory while training ({str(e).splitlines()[0]}). To fit, "
                                             f"change in this order until it does: {'; '.join(savers)}")) from e
    except torch.utils.checkpoint.CheckpointError as e:  # seen with SD3.5 on an H200 (docs/BENCHMARKS.md)
        raise RuntimeError(kept_message(state_path, f"gradient_checkpointing: recomputing {host.family.name} blocks "
                                             "in backward did not give what the forward computed on this device "
                                             f"({str(e).splitlines()[0]}). Turn gradient_checkpointing off (more memory: "
                                             "lower batch_size or resolution if needed)")) from e
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise RuntimeError(kept_message(state_path, f"the disk is full while writing {e.filename or 'a checkpoint'}; "
                                                 "free space and run again to resume")) from e
        raise


def trained_model(model, host: HostModel, final: dict, config: TrainConfig, model_path: str):
    """The trained weights as the domain MODEL the node outputs (a full copy of the base's
    architecture, or the LoRA applied to the base `model`), named after its file."""
    name = os.path.basename(model_path)
    if config.mode == "full":
        domain = model_from_base_config(model, deliverable(final, config, host.storage), name)
        if host.sampling_patch is not None:  # e.g. ModelSamplingDiscrete's v / zsnr: what it was trained on
            domain.add_object_patch("model_sampling", host.sampling_patch)
    else:
        domain = apply_lora(model, final, name)
    return domain


