"""Sampling nodes: KSampler (Domain Guidance), Domain Guider, Domain Term."""
from __future__ import annotations

import comfy.samplers
from comfy_api.latest import io

from .host_schema import CATEGORY, schema
from .sampling.domains import DOMAIN_TERMS, DomainTerm
from .sampling.run import collect_terms, make_guider, sample_like_ksampler

DomainTerms = io.Custom(DOMAIN_TERMS)

NULL_TIP = ("The base model's empty-prompt conditioning (CLIP Text Encode of an empty string). "
            "Domain terms are measured against it; it is not the negative prompt.")
DOMAIN_MODEL_TIP = ("A text-free domain UNet (Load Domain UNet, or Train Domain UNet's output). "
                    "Leave unconnected to use only the terms given in more_domains.")
SCALE_TIP = ("Domain weight w_d: how strongly samples are pulled towards the domain. "
             "0 = plain KSampler; about 1-3 is typical; combine with cfg for text control.")
START_TIP = "Fraction of the sampling run at which the domain term starts (0 = first step)."
END_TIP = "Fraction of the sampling run at which the domain term stops (1 = last step)."
CONTROL_TIP = ("Off (default): a ControlNet on the positive stays in the text term only, as the paper does. "
               "On: the domain model also receives the positive's ControlNet, so the domain term follows the control too.")
MORE_TIP = "Further domain terms from Domain Term nodes, each with its own model, weight and interval."
EVERY_TIP = ("Speed dial, opt-in: compute the domain term every k-th model evaluation and reuse its last "
             "value (domain - empty prompt) in between, where the step costs what KSampler's does. "
             "1 (default) is the exact formula; the quality cost of each k: docs/BENCHMARKS.md.")


def domain_inputs() -> list:
    """The inputs shared by the sampler and the guider that describe the domain terms."""
    return [
        io.Model.Input("domain_model", optional=True, tooltip=DOMAIN_MODEL_TIP),
        io.Float.Input("domain_scale", default=1.0, min=-10.0, max=50.0, step=0.05, round=0.01, tooltip=SCALE_TIP),
        io.Float.Input("domain_start", default=0.0, min=0.0, max=1.0, step=0.01, tooltip=START_TIP),
        io.Float.Input("domain_end", default=1.0, min=0.0, max=1.0, step=0.01, tooltip=END_TIP),
        io.Boolean.Input("control_in_domain", default=False, tooltip=CONTROL_TIP),
        DomainTerms.Input("more_domains", optional=True, tooltip=MORE_TIP),
        io.Int.Input("domain_every", default=1, min=1, max=50, optional=True, tooltip=EVERY_TIP),
    ]


class DomainTermNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return schema(
            node_id="InDomainTerm",
            search_aliases=["domain term", "multi domain", "in-domain", "domain guidance", "DoG"],
            display_name="Domain Term",
            category=CATEGORY,
            description="One more domain term w * (domain(x, '') - base(x, '')) for the domain sampler or guider. "
                        "Chain several to guide towards several domains, each with its weight and step interval.",
            inputs=[
                io.Model.Input("domain_model", tooltip="A text-free domain UNet."),
                io.Float.Input("weight", default=1.0, min=-10.0, max=50.0, step=0.05, round=0.01, tooltip=SCALE_TIP),
                io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.01, tooltip=START_TIP),
                io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.01, tooltip=END_TIP),
                DomainTerms.Input("previous", optional=True, tooltip="Terms from an earlier Domain Term node."),
            ],
            outputs=[DomainTerms.Output(display_name="domains",
                                           tooltip="This term and the ones chained before it, for the more_domains input of the sampler or guider.")],
        )

    @classmethod
    def execute(cls, domain_model, weight, start_percent, end_percent, previous=None) -> io.NodeOutput:
        term = DomainTerm(domain_model, weight, start_percent, end_percent, name=f"term{len(previous or [])}")
        return io.NodeOutput([*(previous or []), term])


class DomainKSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return schema(
            node_id="InDomainKSampler",
            search_aliases=["domain guidance", "in-domain", "text-free", "DoG", "domain sampler", "decoupled guidance"],
            display_name="KSampler (Domain Guidance)",
            category=CATEGORY,
            description="KSampler with decoupled domain guidance: the base model keeps the prompt, negative and "
                        "ControlNet; a text-free domain UNet adds domain_scale * (domain - base) on the empty prompt. "
                        "domain_scale 0 is exactly KSampler. On NVIDIA GPUs its model calls replay as CUDA graphs, kept "
                        "for the next identical run within a tenth of the card's memory (INDOMAIN_GRAPH_CACHE_GIB sets "
                        "the GiB, 0 keeps none) and let go whenever ComfyUI needs the memory.",
            inputs=[
                io.Model.Input("model", tooltip="The base model: it predicts the prompt, negative and empty-prompt terms."),
                io.Int.Input("seed", default=0, min=0, max=0xffffffffffffffff, control_after_generate=True,
                             tooltip="The random seed used for creating the noise."),
                io.Int.Input("steps", default=20, min=1, max=10000, tooltip="The number of denoising steps."),
                io.Float.Input("cfg", default=8.0, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="Text guidance weight, exactly as in KSampler."),
                io.Combo.Input("sampler_name", options=comfy.samplers.KSampler.SAMPLERS, tooltip="The sampling algorithm."),
                io.Combo.Input("scheduler", options=comfy.samplers.KSampler.SCHEDULERS, tooltip="The noise schedule."),
                io.Conditioning.Input("positive", tooltip="The prompt (ControlNet, areas and masks work as in KSampler)."),
                io.Conditioning.Input("negative", tooltip="The negative prompt, with exactly its KSampler role."),
                io.Conditioning.Input("null_conditioning", tooltip=NULL_TIP),
                io.Latent.Input("latent_image", tooltip="The latent to denoise (empty latent, img2img or inpainting latent)."),
                io.Float.Input("denoise", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Amount of denoising; below 1 for img2img, as in KSampler."),
                *domain_inputs(),
            ],
            outputs=[io.Latent.Output(tooltip="The denoised latent, for VAE Decode.")],
        )

    @classmethod
    def execute(cls, model, seed, steps, cfg, sampler_name, scheduler, positive, negative, null_conditioning,
                latent_image, denoise, domain_scale, domain_start, domain_end, control_in_domain,
                domain_model=None, more_domains=None, domain_every=1) -> io.NodeOutput:
        terms = collect_terms(domain_model, domain_scale, domain_start, domain_end, more_domains)
        guider = make_guider(model, positive, negative, null_conditioning, cfg, terms, control_in_domain, domain_every)
        return io.NodeOutput(sample_like_ksampler(guider, seed, steps, sampler_name, scheduler, latent_image, denoise))


class DomainGuiderNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return schema(
            node_id="InDomainGuider",
            search_aliases=["domain guidance", "in-domain", "text-free", "DoG", "guider", "decoupled guidance"],
            display_name="Domain Guider",
            category=CATEGORY,
            description="A GUIDER for SamplerCustomAdvanced with the same terms as KSampler (Domain Guidance).",
            inputs=[
                io.Model.Input("model", tooltip="The base model."),
                io.Conditioning.Input("positive", tooltip="The prompt."),
                io.Conditioning.Input("negative", tooltip="The negative prompt, with exactly its KSampler role."),
                io.Conditioning.Input("null_conditioning", tooltip=NULL_TIP),
                io.Float.Input("cfg", default=8.0, min=0.0, max=100.0, step=0.1, round=0.01, tooltip="Text guidance weight."),
                *domain_inputs(),
            ],
            outputs=[io.Guider.Output(tooltip="For SamplerCustomAdvanced (or any node that takes a GUIDER).")],
        )

    @classmethod
    def execute(cls, model, positive, negative, null_conditioning, cfg, domain_scale, domain_start, domain_end,
                control_in_domain, domain_model=None, more_domains=None, domain_every=1) -> io.NodeOutput:
        terms = collect_terms(domain_model, domain_scale, domain_start, domain_end, more_domains)
        return io.NodeOutput(make_guider(model, positive, negative, null_conditioning, cfg, terms, control_in_domain,
                                         domain_every))
