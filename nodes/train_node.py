"""Train Domain UNet node: declarations; the run is nodes/training/run.py's run_training."""
from __future__ import annotations

from comfy_api.latest import io

from ..training import TrainConfig
from ..training.config import OPTIMIZERS, PRECISIONS
from .host_schema import CATEGORY, advanced, schema
from .training.plot import loss_curve_image, validation_text
from .training.run import image_folder_fingerprint, run_training
from .training.samples import DEFAULT_SCALES, DEFAULT_STEPS, no_samples_image, validation_settings


def trainer_inputs() -> list:
    """The inputs of Train Domain UNet, in the order the node shows them (the widgets of a saved
    workflow follow this order: a new input is appended)."""
    return _recipe_inputs() + _output_inputs() + _data_inputs() + _speed_inputs() + _validation_inputs()


def _recipe_inputs() -> list:
    """The base model and the training recipe: mode, steps, batch, learning rate, resolution, precision, EMA, LoRA."""
    return [
        io.Model.Input("model", tooltip="The base MODEL (from Load Checkpoint). Its noise schedule and prediction type are used, "
                       "as the host samples it (a ModelSamplingDiscrete patch, e.g. v_prediction + zsnr, included)."),
        io.Vae.Input("vae", tooltip="The base checkpoint's VAE; images are encoded once and cached on disk."),
        io.Combo.Input("mode", options=["lora", "full"], default="lora",
                       tooltip="lora: small adapters on the base (a fraction of full mode's memory, small files, its "
                               "steps as CUDA graphs on a GPU). full: the paper's text-free copy of the whole UNet (the "
                               "most memory: the weights, their gradients and AdamW's states). Figures: docs/BENCHMARKS.md."),
        io.Int.Input("steps", default=1000, min=1, max=1_000_000, tooltip="Total optimizer steps (a resumed run continues up to this)."),
        io.Int.Input("batch_size", default=4, min=1, max=256,
                     tooltip="Images per optimizer step (all from one aspect-ratio bucket). With gradient_accumulation "
                             "this is the whole step's batch, computed in parts."),
        io.Float.Input("learning_rate", default=1e-4, min=1e-7, max=1.0, step=1e-6, round=1e-7,
                       tooltip="Peak learning rate (AdamW). About 1e-4 for lora, 1e-5 to 2e-5 for full."),
        io.Combo.Input("lr_schedule", options=["constant", "cosine"], default="constant",
                       tooltip="After warm-up: keep the learning rate, or decay it to 0 along a cosine.", **advanced()),
        io.Int.Input("warmup_steps", default=0, min=0, max=100_000, tooltip="Steps of linear warm-up to the learning rate.", **advanced()),
        io.Int.Input("seed", default=0, min=0, max=2**63 - 1, control_after_generate=False,
                     tooltip="Seed of all training randomness (images, flips, timesteps, noise): the same seed gives the same weights.", **advanced()),
        io.Int.Input("resolution", default=512, min=64, max=4096, step=64,
                     tooltip="Training area: buckets of about resolution x resolution pixels (512 for SD1, 768 for SD2, 1024 for SDXL). "
                             "Images of any size are resized and centre-cropped to the nearest aspect-ratio bucket."),
        io.Boolean.Input("flip", default=True, tooltip="Horizontal-flip augmentation (off for text, logos or asymmetric subjects).", **advanced()),
        io.Combo.Input("training_dtype", options=list(PRECISIONS), default="bf16",
                       tooltip="Autocast precision. bf16 on recent GPUs (its runs repeat bit for bit); fp16 uses loss scaling; fp32 is full precision and slow (on a GPU two fp32 runs differ slightly).", **advanced()),
        io.Boolean.Input("gradient_checkpointing", default=True,
                         tooltip="Recompute activations in backward: much less memory, each step slower (the forward "
                                 "runs twice). Figures: docs/BENCHMARKS.md.", **advanced()),
        io.Float.Input("ema_decay", default=0.0, min=0.0, max=0.99999, step=0.0001, round=0.00001,
                       tooltip="Exponential moving average of the weights (e.g. 0.999); the file and the output use it. 0 = off. "
                               "With warm-up: step t uses min(ema_decay, (1 + t) / (10 + t)), so the starting weights fade early.", **advanced()),
        io.Int.Input("lora_rank", default=16, min=1, max=1024, tooltip="LoRA rank (mode lora only).", **advanced()),
        io.Float.Input("lora_alpha", default=16.0, min=0.01, max=4096.0, step=0.5, tooltip="LoRA alpha; the update is scaled by alpha / rank (mode lora only).", **advanced()),
    ]


def _output_inputs() -> list:
    """Where the run writes (save_name), how often, and whether it resumes."""
    return [
        io.String.Input("save_name", default="my_domain",
                        tooltip="File name in models/loras (lora) or models/diffusion_models (full); subfolders allowed, no '..'. "
                                "Running again with the same name resumes."),
        io.Int.Input("checkpoint_every", default=250, min=0, max=1_000_000,
                     tooltip="Save the model file and the resumable state every N steps (0: only at the end).", **advanced()),
        io.Int.Input("preview_every", default=0, min=0, max=1_000_000,
                     tooltip="Every N steps, sample the domain model on the empty prompt (20 Euler steps, fixed seed), show it "
                             "on the node and save it to output/indomain_previews/<save_name>/. 0 = off.", **advanced()),
        io.Boolean.Input("resume", default=True,
                         tooltip="On: continue from save_name's last checkpoint if there is one. Off: start over and replace it."),
    ]


def _data_inputs() -> list:
    """The empty prompt (or the clip to encode it) and the domain images."""
    return [
        io.Conditioning.Input("null_conditioning", optional=True,
                              tooltip="CLIP Text Encode of an empty string (the condition of every training sample). Or connect clip."),
        io.Clip.Input("clip", optional=True, tooltip="Encodes the empty prompt when null_conditioning is not connected, "
                                                    "and the validation_prompts."),
        io.Image.Input("images", optional=True, tooltip="Domain images as an IMAGE batch (e.g. Load Image). Can be combined with image_folder."),
        io.String.Input("image_folder", default="", optional=True,
                        tooltip="A folder of domain images (png, jpg, webp, bmp) inside ComfyUI's input folder, e.g. "
                                "my_domain_images for input/my_domain_images (an absolute path must lie inside it too). "
                                "Unreadable files are skipped with a warning. Adding, removing or changing an image "
                                "makes the next queue train again."),
    ]


def _speed_inputs() -> list:
    """Speed and memory: torch.compile, the optimizer, CUDA graphs, gradient accumulation."""
    return [
        io.Boolean.Input("torch_compile", default=False, optional=True,
                         tooltip="Compile the trained UNet with torch.compile (needs a C++ compiler / Triton): the first step takes "
                                 "minutes, the later ones run faster with less memory, most in full mode at large batches "
                                 "without gradient checkpointing (figures: docs/BENCHMARKS.md). Pays for long runs.", **advanced()),
        io.Combo.Input("optimizer", options=list(OPTIMIZERS), default="adamw", optional=True,
                       tooltip="adamw: AdamW with 32-bit moments (8 bytes of state per trained parameter). adamw8bit: "
                               "bitsandbytes' 8-bit AdamW, the paper's recipe: 2 bytes per parameter (SD1.5 full mode: "
                               "about 5 GB less); needs the bitsandbytes package (pip install bitsandbytes). A run "
                               "resumes only with the optimizer it started with.", **advanced()),
        io.Boolean.Input("cuda_graphs", default=False, optional=True,
                         tooltip="Full mode too. LoRA mode always replays each step's forward and backward as a CUDA "
                                 "graph where the run allows it: the same training with far fewer kernel launches, "
                                 "for almost no memory. On: full mode does as well, faster, for the graph's memory "
                                 "pool kept between steps. Needs one GPU, bf16 or fp32, torch_compile off and "
                                 "gradient_accumulation 1; ComfyUI's --disable-cuda-graphs or the environment variable "
                                 "INDOMAIN_TRAIN_GRAPHS=0 turns them off; the log says why a run trains without them.",
                         **advanced()),
        io.Int.Input("gradient_accumulation", default=1, min=1, max=256, optional=True,
                     tooltip="Compute each step's batch_size images in this many parts (micro-batches of batch_size / "
                             "gradient_accumulation images, their gradients added up): a batch larger than fits in "
                             "memory, the same training as one batch, slower. batch_size must be a multiple of it. "
                             "(kohya's train_batch_size x gradient_accumulation_steps is batch_size here.) May change "
                             "on resume. 1 = off.", **advanced()),
    ]


def _validation_inputs() -> list:
    """Watching the run: the held-out validation loss, TensorBoard, the validation samples."""
    return [
        io.Float.Input("validation_share", default=0.0, min=0.0, max=0.5, step=0.01, round=0.01, optional=True,
                       tooltip="Hold this share of the images out of training (at least one image; the same images "
                               "whatever the seed or settings) and measure their loss at the start, at every checkpoint "
                               "and at the end, with fixed noise and timesteps so the numbers compare across checkpoints "
                               "and runs. Shown on loss_curve (orange) and the validation output. 0 = off; cannot "
                               "change on resume.", **advanced()),
        io.Boolean.Input("tensorboard", default=False, optional=True,
                         tooltip="Write TensorBoard logs (loss, learning rate, images/s, validation loss) to "
                                 "output/indomain_logs/<save_name>/; view them with tensorboard --logdir "
                                 "output/indomain_logs. Needs the tensorboard package (pip install tensorboard).",
                         **advanced()),
        # (appended: a saved workflow's widget values keep their inputs)
        io.String.Input("validation_prompts", default="", multiline=True, optional=True,
                        tooltip="Prompts to sample at every checkpoint and at the end, one per line, with the domain "
                                "being trained: each prompt (a row) at each of validation_domain_scales (a column), "
                                "as Load Domain UNet + KSampler (Domain Guidance) sample the checkpoint's file, the "
                                "empty prompt as negative. One grid per checkpoint in "
                                "output/indomain_previews/<save_name>/validation_step_N.png and on validation_samples. "
                                "Needs clip (to encode them). Empty = off."),
        io.String.Input("validation_domain_scales", default=DEFAULT_SCALES, optional=True,
                        tooltip="The domain_scale of each column of the validation grid, separated by commas. 0 is the "
                                "base alone (KSampler exactly; sampled once per run); the others show the domain's pull "
                                "at the weights you would sample with.", **advanced()),
        io.Int.Input("validation_seed", default=0, min=0, max=0xffffffffffffffff, control_after_generate=False,
                     optional=True, tooltip="The seed of every validation sample: the same noise at every checkpoint, "
                                            "so the grids differ only by the weights.", **advanced()),
        io.Int.Input("validation_steps", default=DEFAULT_STEPS, min=1, max=200, optional=True,
                     tooltip="Sampling steps of each validation sample (euler; scheduler normal, or simple for "
                             "rectified-flow models such as SD3, Flux and Qwen-Image).", **advanced()),
        io.Float.Input("validation_cfg", default=0.0, min=0.0, max=100.0, step=0.1, round=0.01, optional=True,
                       tooltip="Text guidance of the validation samples. 0 = the model family's usual: 7 for "
                               "SD1.x/SD2.x/SDXL, 4.5 for SD3, 1 for Flux.1, Flux.2 and Z-Image Turbo "
                               "(guidance-distilled), 4 for Chroma and Qwen-Image, 3.5 for HunyuanImage.",
                       **advanced()),
    ]


class DomainTrainer(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return schema(
            node_id="InDomainTrainUNet",
            search_aliases=["train domain", "in-domain", "text-free", "captionless", "fine-tune", "domain lora", "DoG"],
            display_name="Train Domain UNet",
            category=CATEGORY,
            description="Learns a visual domain from captionless images: a text-free copy of the base UNet (full) or "
                        "LoRA adapters on it, trained with every image on the empty prompt. Writes models/loras/<save_name>.safetensors "
                        "(lora) or models/diffusion_models/<save_name>.safetensors (full) and resumes from its checkpoint when run again.",
            is_output_node=True,
            inputs=trainer_inputs(),
            outputs=[
                io.Model.Output(display_name="domain_model", tooltip="The trained domain UNet, for KSampler (Domain Guidance)."),
                io.Image.Output(display_name="loss_curve", tooltip="The training loss per step of this run, and the "
                                "validation loss (orange) where validation_share is on."),
                io.String.Output(display_name="validation", tooltip="The validation loss at each step it was measured "
                                 "(\"step N: loss\", one per line, earlier runs of a resumed training included); "
                                 "empty when validation_share is 0."),
                io.Image.Output(display_name="validation_samples", tooltip="The last grid of validation samples (rows: "
                                "validation_prompts; columns: validation_domain_scales), as saved beside the previews; "
                                "a note when validation_prompts is empty."),
            ],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def fingerprint_inputs(cls, image_folder="", **kwargs):
        """The host re-runs a node whose inputs are unchanged only when this value changed: the
        images in image_folder (names, sizes, modification times)."""
        return image_folder_fingerprint(image_folder)

    @classmethod
    def execute(cls, model, vae, mode, steps, batch_size, learning_rate, lr_schedule, warmup_steps, seed, resolution,
                flip, training_dtype, gradient_checkpointing, ema_decay, lora_rank, lora_alpha, save_name,
                checkpoint_every, preview_every, resume, null_conditioning=None, clip=None, images=None, image_folder="",
                torch_compile=False, optimizer="adamw", cuda_graphs=False, gradient_accumulation=1, validation_share=0.0,
                tensorboard=False, validation_prompts="", validation_domain_scales=DEFAULT_SCALES, validation_seed=0,
                validation_steps=DEFAULT_STEPS, validation_cfg=0.0) -> io.NodeOutput:
        config = TrainConfig(
            steps=steps, mode=mode, lora_rank=lora_rank, lora_alpha=lora_alpha, lr=learning_rate, lr_schedule=lr_schedule,
            warmup_steps=warmup_steps, batch_size=batch_size, resolution=resolution, flip=flip, seed=seed,
            precision=training_dtype, ema_decay=ema_decay, checkpoint_every=checkpoint_every, preview_every=preview_every,
            gradient_checkpointing=("all",) if gradient_checkpointing else (), compile=torch_compile, optimizer=optimizer,
            gradient_accumulation=gradient_accumulation, validation_share=validation_share,
        )
        validation = validation_settings(validation_prompts, validation_domain_scales, validation_seed, validation_steps,
                                         validation_cfg)
        done = run_training(model=model, vae=vae, null_conditioning=null_conditioning, clip=clip, images=images,
                            image_folder=image_folder, config=config, save_name=save_name, resume=resume,
                            node_id=cls.hidden.unique_id, cuda_graphs=cuda_graphs, tensorboard=tensorboard,
                            validation=validation)
        return io.NodeOutput(done.domain, loss_curve_image(done.losses, done.start, done.validation),
                             validation_text(done.validation),
                             done.samples if done.samples is not None else no_samples_image())
