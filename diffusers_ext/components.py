"""The one list of diffusers-ext's public components, read by the lazy imports, the CLI, the README table and the
Hub cards. Adding a component means adding one ``Component`` here."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Component:
    """A public component.

    Attributes:
        name: the class or function users import, ``from diffusers_ext import <name>``.
        kind: ``scheduler``, ``pipeline``, ``model``, ``trainer``, ``guidance``, ``speed`` (``diffusers_ext.hooks``:
            hooks on a stock pipeline's denoiser that make it faster, or let it sample at other sizes) or ``oracle``.
        module: the module defining it.
        summary: one line on what it does.
        paper: the paper's title, ``None`` for the project's own tools.
        arxiv: the paper's arXiv id.
        status: ``stable`` or ``experimental``.
    """

    name: str
    kind: str
    module: str
    summary: str
    paper: str | None = None
    arxiv: str | None = None
    status: str = "stable"

    @property
    def paper_link(self) -> str:
        if self.paper is None:
            return "—"
        return f"[{self.paper}](https://arxiv.org/abs/{self.arxiv})" if self.arxiv else self.paper


COMPONENTS: tuple[Component, ...] = (
    Component(
        "ERSDESolverScheduler",
        "scheduler",
        "diffusers_ext.schedulers",
        "ER-SDE-Solver 1/2/3 for VP models (SD 1.x/2.x/SDXL), seven noise-scale functions from ODE to reverse SDE",
        "Elucidating the Solution Space of Extended Reverse-Time SDE for Diffusion Models",
        "2309.06169",
    ),
    Component(
        "TimeShiftScheduler",
        "scheduler",
        "diffusers_ext.schedulers",
        "Time-Shift Sampler around DDIM or DPM-Solver++: the model sees the timestep matching the sample's variance",
        "Alleviating Exposure Bias in Diffusion Models through Sampling with Shifted Time Steps",
        "2305.15583",
    ),
    Component(
        "RFSolverScheduler",
        "scheduler",
        "diffusers_ext.schedulers",
        "Second-order RF-Solver for SD3 / Flux (2 calls per step) with invert-then-regenerate inversion",
        "Taming Rectified Flow for Inversion and Editing",
        "2411.04746",
    ),
    Component(
        "MaskedDiffusionScheduler",
        "scheduler",
        "diffusers_ext.schedulers",
        "Masked (absorbing) diffusion for token sequences: MDLM ancestral, first-hitting (arXiv 2409.02908) and "
        "adaptive-order parallel decoding, semi-autoregressive blocks, float64 Gumbel sampling, RADD caching signal",
        "Simple and Effective Masked Diffusion Language Models",
        "2406.07524",
        "experimental",
    ),
    Component(
        "optimize_timesteps",
        "scheduler",
        "diffusers_ext.schedulers",
        "Learned sampling schedules for VP schedulers: Align Your Steps (KL bound) or LD3 (teacher matching, "
        "arXiv 2405.15506), saved in the scheduler config",
        "Align Your Steps: Optimizing Sampling Schedules in Diffusion Models",
        "2404.14507",
        "experimental",
    ),
    Component(
        "MaskedDiffusionLMPipeline",
        "pipeline",
        "diffusers_ext.pipelines",
        "Text generation and infilling with any masked LM as a masked-diffusion denoiser, with RADD caching",
        "Your Absorbing Discrete Diffusion Secretly Models the Conditional Distributions of Clean Data",
        "2406.03736",
        "experimental",
    ),
    Component(
        "MaskedDiffusionLMObjective",
        "trainer",
        "diffusers_ext.training",
        "MDLM's continuous-time negative ELBO (RADD's time-independent form) as a loss for the shared Trainer",
        "Simple and Effective Masked Diffusion Language Models",
        "2406.07524",
        "experimental",
    ),
    Component(
        "Trainer",
        "trainer",
        "diffusers_ext.training",
        "The shared training core: accelerate (mixed precision, accumulation, multi-process, exact resume) and PEFT "
        "LoRA; a method is a loss",
    ),
    Component(
        "RDDMScheduler",
        "scheduler",
        "diffusers_ext.schedulers",
        "Residual denoising diffusion: residual and noise diffused separately, residual / noise / both predicted, "
        "deterministic or stochastic sampling, restoration or generation (zero input)",
        "Residual Denoising Diffusion Models",
        "2308.13712",
    ),
    Component(
        "ResShiftScheduler",
        "scheduler",
        "diffusers_ext.schedulers",
        "Residual shifting between the degraded and the clean image in a 4- to 15-step Markov chain (kappa, eta "
        "schedule), any sub-grid of the trained chain",
        "ResShift: Efficient Diffusion Model for Image Super-resolution by Residual Shifting",
        "2307.12348",
    ),
    Component(
        "MeanRevertingScheduler",
        "scheduler",
        "diffusers_ext.schedulers",
        "The mean-reverting SDE of IR-SDE (arXiv 2301.11699) sampled by the MR Sampler's ODE / SDE solvers (noise, "
        "data or velocity prediction) in 10-20 NFE, or by Euler-Maruyama",
        "MRS: A Fast Sampler for Mean Reverting Diffusion based on ODE and SDE Solvers",
        "2502.07856",
    ),
    Component(
        "BridgeScheduler",
        "scheduler",
        "diffusers_ext.schedulers",
        "Denoising diffusion bridges (DDBM, arXiv 2309.16948; VP and VE) sampled by DBIM from stochastic to "
        "deterministic and its higher-order variant, or by DDBM's own sampler",
        "Diffusion Bridge Implicit Models",
        "2405.15885",
    ),
    Component(
        "FrameAwareFlowMatchScheduler",
        "scheduler",
        "diffusers_ext.schedulers",
        "Per-frame (vectorized-timestep) flow-matching step for video: every frame from its own noise level to its "
        "own next one in one update (Euler, or DPM-Solver++(2M) with per-frame history); frames that stay are "
        "bit-identical",
        "Redefining Temporal Modeling in Video Diffusion: The Vectorized Timestep Approach",
        "2410.03160",
        "experimental",
    ),
    Component(
        "FrameAwareVPScheduler",
        "scheduler",
        "diffusers_ext.schedulers",
        "The same per-frame step for VP (DDPM-family) video models: DDIM with eta, or DPM-Solver++(2M)",
        "Redefining Temporal Modeling in Video Diffusion: The Vectorized Timestep Approach",
        "2410.03160",
        "experimental",
    ),
    Component(
        "RDDMPipeline",
        "pipeline",
        "diffusers_ext.pipelines",
        "Image restoration (or generation from a zero input) with an RDDM model, pixel or latent space",
        "Residual Denoising Diffusion Models",
        "2308.13712",
    ),
    Component(
        "ResShiftPipeline",
        "pipeline",
        "diffusers_ext.pipelines",
        "4x super-resolution (or restoration) by residual shifting, pixel or latent space; a tiny model ships with "
        "the package (`diffusers-ext restore`)",
        "ResShift: Efficient Diffusion Model for Image Super-resolution by Residual Shifting",
        "2307.12348",
    ),
    Component(
        "MeanRevertingPipeline",
        "pipeline",
        "diffusers_ext.pipelines",
        "Image restoration with a mean-reverting SDE model, sampled fast by MRS",
        "Image Restoration with Mean-Reverting Stochastic Differential Equations",
        "2301.11699",
    ),
    Component(
        "BridgePipeline",
        "pipeline",
        "diffusers_ext.pipelines",
        "Image-to-image restoration with a denoising diffusion bridge, sampled by DBIM in about 10 steps",
        "Denoising Diffusion Bridge Models",
        "2309.16948",
    ),
    Component(
        "FrameAwareVideoPipeline",
        "pipeline",
        "diffusers_ext.pipelines",
        "FVDM sampling on Wan / SkyReels-V2 / LTX-Video backbones by per-frame timestep plans (FrameTimestepPlan): "
        "generation, image-to-video, interpolation, Diffusion Forcing pyramids and rolling-window long video",
        "Redefining Temporal Modeling in Video Diffusion: The Vectorized Timestep Approach",
        "2410.03160",
        "experimental",
    ),
    Component(
        "DiffusionMBIRPipeline",
        "pipeline",
        "diffusers_ext.pipelines",
        "3D inverse problems (sparse-view / limited-angle CT, through-plane super-resolution, masks) with a 2D slice "
        "prior: every slice denoised in batches, then ADMM-TV across slices (CG inner solves) after each step",
        "Solving 3D Inverse Problems using Pre-trained 2D Diffusion Models",
        "2211.10655",
        "experimental",
    ),
    Component(
        "CausalVideoPipeline",
        "pipeline",
        "diffusers_ext.pipelines",
        "Autoregressive video chunk by chunk on a stock Wan made frame-causal, the clean context's keys/values "
        "computed once per chunk at timestep 0 and shared by every denoising step (bounded cache, image or clip start)",
        "Ca2-VDM: Efficient Autoregressive Video Diffusion Model with Causal Generation and Cache Sharing",
        "2411.16375",
        "experimental",
    ),
    Component(
        "JointImageVideoPipeline",
        "pipeline",
        "diffusers_ext.pipelines",
        "JVID: an image model (each frame on its own) and a video model sharing one latent space take turns denoising "
        "one video, by a per-step schedule (alternating, random, or your own)",
        "JVID: Joint Video-Image Diffusion for Visual-Quality and Temporal-Consistency in Video Generation",
        "2409.14149",
        "experimental",
    ),
    Component(
        "DenoisingObjective",
        "trainer",
        "diffusers_ext.training",
        "The plain DDPM loss (uniform timesteps, the scheduler's prediction type) for an unconditional image model, "
        "e.g. DiffusionMBIR's 2D slice prior",
        "Denoising Diffusion Probabilistic Models",
        "2006.11239",
    ),
    Component(
        "PairedRestorationObjective",
        "trainer",
        "diffusers_ext.training",
        "One restoration loss for all four processes, driven by the method's scheduler, on the shared Trainer; data "
        "from image-pair folders or on-the-fly degradations (noise, blur, 4x downscale, JPEG, rain)",
    ),
    Component(
        "LCMLoRADistillation",
        "trainer",
        "diffusers_ext.training",
        "Latent consistency distillation of a guided DDIM teacher into a LoRA that LCMScheduler samples in few steps "
        "(arXiv 2311.05556); the 4-step effect does not show on toy random-weight teachers (see the tests)",
        "Latent Consistency Models: Synthesizing High-Resolution Images with Few-Step Inference",
        "2310.04378",
        "experimental",
    ),
    Component(
        "SmoothLoRAObjective",
        "trainer",
        "diffusers_ext.training",
        "Smooth Diffusion's step-wise variation regularisation for LoRA fine-tuning, with the ISTD smoothness metric",
        "Smooth Diffusion: Crafting Smooth Latent Spaces in Diffusion Models",
        "2312.04410",
        "experimental",
    ),
    Component(
        "DDPOObjective",
        "trainer",
        "diffusers_ext.training",
        "DDPO reward fine-tuning: PPO-clipped policy gradient over DDIM steps (eta > 0) with per-step "
        "log-probabilities and per-prompt reward normalisation; JPEG (in)compressibility or any reward callable",
        "Training Diffusion Models with Reinforcement Learning",
        "2305.13301",
        "experimental",
    ),
    Component(
        "RLCMObjective",
        "trainer",
        "diffusers_ext.training",
        "RLCM: the same policy gradient over a latent consistency model's multistep sampler (LCMScheduler)",
        "RL for Consistency Models: Faster Reward Guided Text-to-Image Generation",
        "2404.03673",
        "experimental",
    ),
    Component(
        "DomainStudioObjective",
        "trainer",
        "diffusers_ext.training",
        "DomainStudio few-shot fine-tuning: relative-distance preservation against the frozen source model and "
        "Haar high-frequency losses, on top of DreamBooth prior preservation",
        "DomainStudio: Fine-Tuning Diffusion Models for Domain-Driven Image Generation using Limited Data",
        "2306.14153",
        "experimental",
    ),
    Component(
        "SPMObjective",
        "trainer",
        "diffusers_ext.training",
        "SPM concept erasing: rank-1 membranes with latent anchoring, facilitated transport at inference "
        "(load_spm / SPMTransport), combinable and transferable to same-architecture UNets",
        "One-dimensional Adapter to Rule Them All: Concepts, Diffusion Models and Erasing Applications",
        "2312.16145",
        "experimental",
    ),
    Component(
        "FVDMObjective",
        "trainer",
        "diffusers_ext.training",
        "FVDM training with per-frame timesteps drawn by PTSS (the authors' 0.2 of batches vectorized), the "
        "scheduler's own noise path and target, on Wan / SkyReels-V2 / LTX-Video, LoRA or full "
        "(`diffusers-ext train fvdm`)",
        "Redefining Temporal Modeling in Video Diffusion: The Vectorized Timestep Approach",
        "2410.03160",
        "experimental",
    ),
    Component(
        "CREPAObjective",
        "trainer",
        "diffusers_ext.training",
        "CREPA: a video model's diffusion loss plus cosine alignment (through a trained projection head) of one "
        "block's hidden states with frozen image features of each frame and its neighbours (weights exp(-|k-f|/tau)), "
        "for LoRA on Wan / CogVideoX-style transformers (`diffusers-ext train crepa`)",
        "Cross-Frame Representation Alignment for Fine-Tuning Video Diffusion Models",
        "2506.09229",
        "experimental",
    ),
    Component(
        "FKSteering",
        "guidance",
        "diffusers_ext.guidance",
        "Feynman-Kac particle steering of any pipeline toward a reward-tilted law (potentials max / difference / sum, "
        "ESS-triggered resampling)",
        "A General Framework for Inference-time Scaling and Steering of Diffusion Models",
        "2501.06848",
    ),
    Component(
        "NoiseSearch",
        "guidance",
        "diffusers_ext.guidance",
        "Search over starting noises (random, zero-order) or sampling paths with a verifier and an NFE budget",
        "Inference-Time Scaling for Diffusion Models beyond Scaling Denoising Steps",
        "2501.09732",
    ),
    Component(
        "RolloverBudgetForcing",
        "guidance",
        "diffusers_ext.guidance",
        "Reward search for flow models (SD3 / Flux): stochastic steps via the SNR-matched VP-SDE, unused NFE budget "
        "rolled over to later steps",
        "Inference-Time Scaling for Flow Models via Stochastic Generation and Rollover Budget Forcing",
        "2503.19385",
    ),
    Component(
        "FlowChef",
        "guidance",
        "diffusers_ext.guidance",
        "Gradient-free (gradient-skipping) steering of rectified flows by a loss on x0: classifier guidance, "
        "inpainting, super-resolution, deblurring, editing",
        "FlowChef: Steering of Rectified Flow Models for Controlled Generations",
        "2412.00100",
    ),
    Component(
        "LossGuidance",
        "guidance",
        "diffusers_ext.guidance",
        "DPS / steered-diffusion guidance by the gradient of a loss on x0 through the denoiser (arXiv 2310.00224)",
        "Diffusion Posterior Sampling for General Noisy Inverse Problems",
        "2209.14687",
    ),
    Component(
        "MinorityGuidance",
        "guidance",
        "diffusers_ext.guidance",
        "Training-free guidance toward low-density (minority) samples by the self-reconstruction minority score",
        "Self-Guided Generation of Minority Samples Using Diffusion Models",
        "2407.11555",
        "experimental",
    ),
    Component(
        "FasterDiffusion",
        "speed",
        "diffusers_ext.hooks",
        "UNet encoder propagation: the encoder runs at key steps only, its features (and ControlNet residuals) "
        "reused by decoder-only steps, with prior noise injection and optional parallel decoding "
        "(SD 1.x / 2.x / SDXL UNets)",
        "Faster Diffusion: Rethinking the Role of the Encoder for Diffusion Model Inference",
        "2312.09608",
        "experimental",
    ),
    Component(
        "FeatureInheritance",
        "speed",
        "diffusers_ext.hooks",
        "Named blocks of a UNet or transformer compute every n-th step and otherwise return their last output",
        "A-SDM: Accelerating Stable Diffusion through Model Assembly and Feature Inheritance Strategies",
        "2406.00210",
        "experimental",
    ),
    Component(
        "RegionAdaptiveSampling",
        "speed",
        "diffusers_ext.hooks",
        "RAS for SD3 and Flux transformers: each step recomputes only the tokens the model focuses on, with "
        "cached keys and values for the rest",
        "Region-Adaptive Sampling for Diffusion Transformers",
        "2502.10389",
        "experimental",
    ),
    Component(
        "TStitch",
        "speed",
        "diffusers_ext.hooks",
        "Trajectory stitching: a small denoiser sharing the latent space takes the first fraction of the steps",
        "T-Stitch: Accelerating Sampling in Pre-Trained Diffusion Models with Trajectory Stitching",
        "2402.14167",
        "experimental",
    ),
    Component(
        "StreamPipeline",
        "speed",
        "diffusers_ext.hooks",
        "StreamDiffusion for a stock SD img2img pipeline: stream batch, residual classifier-free guidance, "
        "stochastic similarity filter",
        "StreamDiffusion: A Pipeline-level Solution for Real-time Interactive Generation",
        "2312.12491",
        "experimental",
    ),
    Component(
        "AttentionEntropyScaling",
        "speed",
        "diffusers_ext.hooks",
        "Attention logits scaled by sqrt(log N / log N_train) so that other resolutions keep the training "
        "attention entropy (UNet and DiT self-attention processors)",
        "Training-free Diffusion Model Adaptation for Variable-Sized Text-to-Image Synthesis",
        "2306.08645",
        "experimental",
    ),
    Component(
        "GaussianMixtureDenoiser",
        "oracle",
        "diffusers_ext.testing",
        "Exact epsilon / x0 / v / flow prediction of a Gaussian-mixture law under any VP or flow-matching schedule",
    ),
    Component(
        "ExactRestorationDenoiser",
        "oracle",
        "diffusers_ext.testing",
        "Exact restoration model of a paired Gaussian-mixture law (y = A x0 + n) for any restoration scheduler",
    ),
    Component(
        "GaussianMixtureSamplingPipeline",
        "oracle",
        "diffusers_ext.testing",
        "The stock sampling loop on an oracle with any scheduler, returning unclamped samples",
    ),
    Component(
        "SliceMixtureVolumeLaw",
        "oracle",
        "diffusers_ext.testing",
        "Volumes of i.i.d. Gaussian-mixture slices: the exact slice denoiser (a pipeline's unet) and the exact "
        "per-slice posterior of a slice-wise linear measurement",
    ),
    Component(
        "VideoGaussianMixtureDenoiser",
        "oracle",
        "diffusers_ext.testing",
        "Exact per-frame-timestep denoiser of a Gaussian mixture of AR(1) clips (exact conditional laws and frame "
        "statistics in VideoGaussianMixture)",
    ),
    Component(
        "MultiViewDiffusionPipeline",
        "pipeline",
        "diffusers_ext.pipelines",
        "MVDream multi-view sampling: N consistent views per prompt around an object (cameras given or an orbit), "
        "CFG, any VP scheduler, views + cameras out (view_grid for a sheet)",
        "MVDream: Multi-view Diffusion for 3D Generation",
        "2308.16512",
        "experimental",
    ),
    Component(
        "MultiViewAttnProcessor",
        "model",
        "diffusers_ext.pipelines.three_d",
        "Self-attention across the views of each object on a stock UNet2DConditionModel's attn1 layers "
        "(make_multiview / remove_multiview), wrapping and restoring the layer's own processor",
        "MVDream: Multi-view Diffusion for 3D Generation",
        "2308.16512",
        "experimental",
    ),
    Component(
        "CameraEmbedding",
        "model",
        "diffusers_ext.pipelines.three_d",
        "MVDream's camera MLP of the normalized camera-to-world matrix, added to a stock UNet's timestep embedding "
        "by diffusers hooks (unet(..., cameras=...)); save_pretrained / from_pretrained",
        "MVDream: Multi-view Diffusion for 3D Generation",
        "2308.16512",
        "experimental",
    ),
    Component(
        "MultiViewObjective",
        "trainer",
        "diffusers_ext.training",
        "MVDream fine-tuning: LoRA on the UNet + the camera MLP on views rendered on the fly, one timestep per "
        "object, 2D batches mixed in (the paper's 0.3) (`diffusers-ext train multiview`)",
        "MVDream: Multi-view Diffusion for 3D Generation",
        "2308.16512",
        "experimental",
    ),
    Component(
        "MultiViewMixtureDenoiser",
        "oracle",
        "diffusers_ext.testing",
        "Exact joint (or per-view) denoiser of a law of view sets over K shapes seen from N cameras: checks that a "
        "multi-view sampler keeps each object's views together",
    ),
    Component(
        "ScoreDistillation",
        "trainer",
        "diffusers_ext.pipelines.three_d",
        "Text to a textured mesh: SDS or SDI (DDIM-inversion noise, annealed t) optimises a VoxelGrid against any VP "
        "text-to-image pipeline (SD 1.x/2.x/SDXL) or a multi-view prior, view-dependent prompts, checkpoints, mesh + "
        "turntable (`diffusers-ext 3d distill`)",
        "Score Distillation via Reparametrized DDIM",
        "2405.15891",
        "experimental",
    ),
    Component(
        "VoxelGrid",
        "model",
        "diffusers_ext.pipelines.three_d",
        "A density + colour voxel grid rendered by a differentiable emission-absorption volume renderer in pure torch "
        "(render, orbit_cameras, random_cameras); marching-cubes export to .glb / .ply / .obj and turntable GIFs",
        "DreamFusion: Text-to-3D using 2D Diffusion",
        "2209.14988",
        "experimental",
    ),
    Component(
        "ViewConditionedGaussianPrior",
        "oracle",
        "diffusers_ext.testing",
        "A prior whose law at camera c is a Gaussian (or mixture) around the renders of known shapes: closed-form "
        "eps for checking score distillation against the shape it must recover",
    ),
)

# Helpers exported at the top level that are not components.
HELPERS: dict[str, str] = {
    "save_for_hub": "diffusers_ext.hub",
    "push_to_hub": "diffusers_ext.hub",
    "render_model_card": "diffusers_ext.hub",
    "load_shipped_pipeline": "diffusers_ext.shipped",
    "shipped_model_path": "diffusers_ext.shipped",
    "enable_causal_attention": "diffusers_ext.pipelines.video",
    "disable_causal_attention": "diffusers_ext.pipelines.video",
    "make_multiview": "diffusers_ext.pipelines.three_d",
    "remove_multiview": "diffusers_ext.pipelines.three_d",
    "view_grid": "diffusers_ext.pipelines.three_d",
    "render": "diffusers_ext.pipelines.three_d",
    "orbit_cameras": "diffusers_ext.pipelines.three_d",
    "random_cameras": "diffusers_ext.pipelines.three_d",
    "voxelize": "diffusers_ext.pipelines.three_d",
    "random_shape": "diffusers_ext.pipelines.three_d",
    "export_mesh": "diffusers_ext.pipelines.three_d",
    "export_turntable": "diffusers_ext.pipelines.three_d",
    "ParallelBeamProjection": "diffusers_ext.pipelines.three_d",
    "ThroughPlaneDownsampling": "diffusers_ext.pipelines.three_d",
    "VolumeMask": "diffusers_ext.pipelines.three_d",
    "sparse_view_angles": "diffusers_ext.pipelines.three_d",
    "limited_angle_angles": "diffusers_ext.pipelines.three_d",
    "filtered_back_projection": "diffusers_ext.pipelines.three_d",
    "interpolate_through_plane": "diffusers_ext.pipelines.three_d",
}


def list_components(kind: str | None = None) -> list[Component]:
    """All public components, or those of one ``kind``."""
    return [c for c in COMPONENTS if kind is None or c.kind == kind]


def find_component(name: str) -> Component | None:
    return next((c for c in COMPONENTS if c.name == name), None)


# Kinds that check the other components rather than serve users' pipelines.
VERIFICATION_KINDS = ("oracle",)


def _markdown_table(components: list[Component]) -> list[str]:
    rows = ["| component | kind | what it does | paper | status |", "| --- | --- | --- | --- | --- |"]
    return rows + [f"| `{c.name}` | {c.kind} | {c.summary} | {c.paper_link} | {c.status} |" for c in components]


def components_markdown_table() -> str:
    """The README's component tables: the components users build with, then the verification tools."""
    kind_order = ("scheduler", "pipeline", "trainer", "guidance", "speed", "model")
    users = sorted((c for c in COMPONENTS if c.kind not in VERIFICATION_KINDS), key=lambda c: kind_order.index(c.kind))
    tools = [c for c in COMPONENTS if c.kind in VERIFICATION_KINDS]
    return "\n".join([*_markdown_table(users), "", "Verification tools (`diffusers_ext.testing`): exact oracles that "
                      "the components are checked against.", "", *_markdown_table(tools)])
