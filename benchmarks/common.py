"""Helpers shared by the benchmarks: models to measure on, side-by-side timing, and output."""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel  # noqa: E402

from explainer import config  # noqa: E402
from explainer.models import LoadedModel, load_model, preferred_device  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def sd15_shaped_pipeline() -> StableDiffusionPipeline:
    """A pipeline with Stable Diffusion v1.5's architecture and random weights (speed and memory behave the same)."""
    import tempfile

    from explainer.families.sd1_tiny import sd1_pipeline, write_tokenizer_files

    device, dtype = preferred_device()
    unet = UNet2DConditionModel(
        sample_size=64,
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
        cross_attention_dim=768,
        attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    )
    vae = AutoencoderKL(
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        layers_per_block=2,
        sample_size=512,
    )
    with tempfile.TemporaryDirectory() as folder:
        tokenizer = write_tokenizer_files(Path(folder))
    text_encoder = CLIPTextModel(
        CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=77, vocab_size=49408)
    )
    return sd1_pipeline(unet, vae, text_encoder, tokenizer).to(device=device, dtype=dtype)


def mmdit_shaped_pipeline():
    """An SD 3 pipeline with the embedded MM-DiT's architecture (explainer.shapes.architecture) and
    random weights, on the embedded VAE and tokenizer: an MM-DiT's speed on the CPU."""
    from diffusers import AutoencoderKL, StableDiffusion3Pipeline
    from transformers import CLIPTokenizer

    from explainer.shapes.architecture import make_flow_scheduler, make_mmdit, make_projected_text_encoder

    source = config.ASSETS_DIR / "shapes-ldm"
    tokenizer = CLIPTokenizer.from_pretrained(source / "tokenizer")
    vae = AutoencoderKL.from_pretrained(source / "vae")
    vae.register_to_config(shift_factor=0.0)
    torch.manual_seed(0)
    return StableDiffusion3Pipeline(
        transformer=make_mmdit().eval(), scheduler=make_flow_scheduler(), vae=vae.eval(),
        text_encoder=make_projected_text_encoder(tokenizer).eval(), tokenizer=tokenizer,
        text_encoder_2=make_projected_text_encoder(tokenizer).eval(), tokenizer_2=tokenizer, text_encoder_3=None, tokenizer_3=None,
    )


def flux_shaped_pipeline():
    """FLUX.1's shape where it sets what a run stores, narrow elsewhere, random weights: 16 latent
    channels packed 2x2, an 8x VAE with FLUX.1's scale and shift, 19 double-stream and 38
    single-stream blocks (their layer groups), T5 tokens as the maps' rows; 2 heads of 16 and tiny
    text encoders, so that a 1024x1024 step runs on a CPU."""
    from diffusers import FluxTransformer2DModel

    from explainer.families.flux_tiny import CLIP_WIDTH, T5_WIDTH, t5_tokenizer, tiny_flux_pipeline

    pipe = tiny_flux_pipeline()
    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=T5_WIDTH, pooled_projection_dim=CLIP_WIDTH, guidance_embeds=False, axes_dims_rope=(4, 6, 6),
    )
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 8, 8, 8),
        layers_per_block=1, latent_channels=16, norm_num_groups=8, sample_size=1024, scaling_factor=0.3611, shift_factor=0.1159,
        use_quant_conv=False, use_post_quant_conv=False,
    )
    return type(pipe)(**(pipe.components | {"transformer": transformer.eval(), "vae": vae.eval(), "tokenizer_2": t5_tokenizer(512)}))


def benchmark_model(kind: str) -> tuple[LoadedModel, dict]:
    """``embedded`` (the CPU default), ``sd15`` (SD v1.5-shaped, random weights; for a GPU),
    ``mmdit`` (the embedded MM-DiT's shape, random weights: an SD 3 family model on the CPU) or
    ``flux`` (FLUX.1-schnell's shape where it sets what a run stores, 1024x1024; ``flux_shaped_pipeline``)."""
    if kind == "flux":
        spec = config.MODELS["black-forest-labs/FLUX.1-schnell"]
        spec = dataclasses.replace(spec, id="flux-shaped", hub=False, needs_gpu=False, latent_rgb=None)
        return LoadedModel.from_pipeline(flux_shaped_pipeline(), "flux-shaped", spec), dict(width=1024, height=1024, steps=28, guidance=0.0)
    if kind == "mmdit":
        spec = dataclasses.replace(config.MODELS[config.TINY_SD3_MODEL_ID], id="mmdit-shaped", max_sequence_length=1)
        return LoadedModel.from_pipeline(mmdit_shaped_pipeline(), "mmdit-shaped", spec), dict(width=64, height=64, steps=20, guidance=5.0)
    if kind == "sd15":
        model = LoadedModel.from_pipeline(sd15_shaped_pipeline(), "sd15-shaped", config.MODELS["stable-diffusion-v1-5/stable-diffusion-v1-5"])
        return model, dict(width=512, height=512, steps=30, guidance=7.5)
    model = load_model(config.default_model_id())
    spec = model.spec
    return model, dict(width=spec.width, height=spec.height, steps=spec.steps, guidance=spec.guidance)


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(function, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        synchronize()
        start = time.perf_counter()
        function()
        synchronize()
        times.append(time.perf_counter() - start)
    return times


def side_by_side(functions: dict, repeats: int) -> dict[str, float]:
    """Median seconds of each function, the functions alternating so load drifts hit them alike."""
    for function in functions.values():  # warm-up
        function()
    samples = {name: [] for name in functions}
    for _ in range(repeats):
        for name, function in functions.items():
            samples[name] += timed(function, 1)
    return {name: statistics.median(values) for name, values in samples.items()}


def parser(description: str) -> argparse.ArgumentParser:
    result = argparse.ArgumentParser(description=description)
    result.add_argument("--model", choices=["embedded", "sd15", "mmdit", "flux"], default="sd15" if torch.cuda.is_available() else "embedded")
    result.add_argument("--repeats", type=int, default=5)
    return result


def header(title: str, model: LoadedModel) -> str:
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"
    return f"# {title}\nmodel: {model.id} | device: {device} | dtype: {model.dtype} | torch {torch.__version__} | python {platform.python_version()}\n"


def save(name: str, text: str) -> None:
    print(text)
    RESULTS.mkdir(exist_ok=True)
    suffix = "gpu" if torch.cuda.is_available() else "cpu"
    (RESULTS / f"{name}-{suffix}.txt").write_text(text)
