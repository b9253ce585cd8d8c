"""Train the shapes latent diffusion model on CPU and save it in diffusers format.

Stages (all run by default, each resumable): VAE on 32x32 crops, latent
cache for a fixed scene set, decoder fine-tune (``train_vae``), UNet + text encoder jointly in four
phases (base, refine, shape, ground; ``train_unet``, ``grounding``), pipeline export (here).

    python -m explainer.shapes.train --resume
    python -m explainer.shapes.train --seed-from assets/shapes-ldm  # only the ground phase, from a saved model
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from explainer.shapes.architecture import make_noise_schedulers, make_text_encoder, make_unet
from explainer.shapes.grounding import cache_nouns, cache_outlines
from explainer.shapes.tokenizer import write_tokenizer
from explainer.shapes.train_unet import CHECKPOINTS, train_unet
from explainer.shapes.train_vae import cache_latents, finetune_decoder, train_vae
from explainer.shapes.training import log, save_checkpoint, shared_arguments


def seed_work_folder(pipeline: Path, work: Path) -> None:
    """Stand a saved pipeline in for the stages before the ground phase: its VAE (the decoder
    fine-tune froze the encoder, so the cached latents come out as they did), its tokenizer, and
    its UNet and text encoder (the shape phase's EMA weights) as the shape phase's checkpoint,
    without its loss history."""
    import shutil

    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    for part in ("vae", "vae_decoder"):
        if not (work / part).exists():
            AutoencoderKL.from_pretrained(pipeline / "vae").save_pretrained(work / part)
    if not (work / "tokenizer").exists():
        shutil.copytree(pipeline / "tokenizer", work / "tokenizer")
    if not (work / CHECKPOINTS["shape"]).exists():
        unet = UNet2DConditionModel.from_pretrained(pipeline / "unet")
        text_encoder = CLIPTextModel.from_pretrained(pipeline / "text_encoder")
        params = list(unet.parameters()) + list(text_encoder.parameters())
        save_checkpoint(work / CHECKPOINTS["shape"], dict(unet=unet.state_dict(), text=text_encoder.state_dict(),
                                                          ema=[p.detach().clone() for p in params], losses=[]))
    log(f"work folder seeded from {pipeline}")


def export_pipeline(args, work: Path):
    """Assemble the pipeline from the latest checkpoint's EMA weights and save it."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(work / "tokenizer")
    candidates = [(CHECKPOINTS["ground"], args.ground_steps), (CHECKPOINTS["shape"], args.shape_steps),
                  (CHECKPOINTS["refine"], args.refine_steps), (CHECKPOINTS["base"], 1)]
    latest = next(name for name, steps in candidates if steps and (work / name).exists())
    state = torch.load(work / latest, weights_only=False)
    unet, text_encoder = make_unet(), make_text_encoder(tokenizer)
    unet.load_state_dict(state["unet"]), text_encoder.load_state_dict(state["text"])
    params = list(unet.parameters()) + list(text_encoder.parameters())
    with torch.no_grad():
        for p, e in zip(params, state["ema"]):
            p.copy_(e)
    vae_dir = work / "vae_decoder" if (work / "vae_decoder").exists() else work / "vae"
    vae = AutoencoderKL.from_pretrained(vae_dir)
    latents = np.load(work / "latents.npy").astype(np.float32)
    vae.register_to_config(scaling_factor=float(1.0 / latents.std()))
    _, dpm = make_noise_schedulers(args.prediction_type, args.zero_terminal_snr)
    pipe = StableDiffusionPipeline(
        vae=vae.eval(), text_encoder=text_encoder.eval(), tokenizer=tokenizer,
        unet=unet.eval(), scheduler=dpm, safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )
    out = Path(args.out)
    pipe.save_pretrained(out, safe_serialization=True)
    save_loss_curve(state["losses"], out / "loss_curve.png", state.get("ground_losses"))
    info = dict(steps_in_last_phase=state["step"], final_loss=float(np.mean(state["losses"][-200:])),
                scaling_factor=vae.config.scaling_factor)
    (work / "export.json").write_text(json.dumps(info, indent=2))
    log(f"pipeline saved to {out}: {info}")


def save_loss_curve(losses: list[float], path: Path, ground_losses: list[float] | None = None,
                    ylabel: str = "loss (v-prediction, weighted)") -> None:
    """The denoising loss of every UNet step the checkpoint remembers; the ground phase's
    grounding loss, where there is one, on its own axis (its steps are the last ones)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    values = np.asarray(losses)
    window = max(1, min(50, len(values)))
    smooth = np.convolve(values, np.ones(window) / window, mode="valid")
    fig, ax = plt.subplots(figsize=(5, 3), dpi=80)
    ax.plot(values, alpha=0.25, lw=0.5, label="per step")
    ax.plot(np.arange(window - 1, len(values)), smooth, label=f"mean of {window}")
    ax.set_xlabel("training step (batch 64), every phase kept", fontsize=9)
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, min(1.0, float(values.max())))
    handles = ax.get_legend_handles_labels()
    if ground_losses:
        ground = np.asarray(ground_losses)
        twin = ax.twinx()
        steps = np.arange(len(values) - len(ground), len(values))
        twin.plot(steps, ground, color="tab:red", alpha=0.6, lw=0.8, label="grounding loss (ground phase)")
        twin.set_ylabel("grounding loss")
        twin.set_ylim(0, 1)
        handles = [a + b for a, b in zip(handles, twin.get_legend_handles_labels())]
    ax.legend(*handles, fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    shared_arguments(parser, work="runs/shapes", out="assets/shapes-ldm")
    parser.add_argument("--vae-steps", type=int, default=1000)
    parser.add_argument("--vae-batch", type=int, default=32)
    parser.add_argument("--vae-lr", type=float, default=1e-3)
    parser.add_argument("--kl-weight", type=float, default=1e-6)
    parser.add_argument("--decoder-steps", type=int, default=600)
    parser.add_argument("--decoder-lr", type=float, default=3e-4)
    parser.add_argument("--decoder-only", action="store_true")
    parser.add_argument("--unet-steps", type=int, default=3000)
    parser.add_argument("--prediction-type", default="v_prediction",
                        choices=("v_prediction", "epsilon"),
                        help="v: the network predicts x0 directly at high noise, where an "
                             "epsilon network's x0 error is amplified by 1/sqrt(SNR) (~15x)")
    parser.add_argument("--min-snr", type=float, default=5.0)
    parser.add_argument("--zero-terminal-snr", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--high-t-from-step", type=int, default=None,
                        help="from this step, oversample t >= --high-t-min (off by default)")
    parser.add_argument("--high-t-fraction", type=float, default=0.5)
    parser.add_argument("--high-t-min", type=int, default=500)
    parser.add_argument("--refine-steps", type=int, default=1500)
    parser.add_argument("--refine-lr", type=float, default=2e-4)
    parser.add_argument("--refine-ema", type=float, default=0.999)
    parser.add_argument("--refine-high-t-fraction", type=float, default=0.0)
    parser.add_argument("--refine-max-weight", type=float, default=10.0)
    parser.add_argument("--shape-text-lr-scale", type=float, default=3.0)
    parser.add_argument("--ground-steps", type=int, default=800)
    parser.add_argument("--ground-lr", type=float, default=1e-4)
    parser.add_argument("--ground-weight", type=float, default=0.1)
    parser.add_argument("--ground-ema", type=float, default=0.995)
    parser.add_argument("--seed-from", help="a saved pipeline (e.g. assets/shapes-ldm) whose VAE, tokenizer and "
                        "weights stand in for the stages before the ground phase, which alone runs")
    args = parser.parse_args(argv)
    if args.zero_terminal_snr and args.prediction_type == "epsilon":
        parser.error("--zero-terminal-snr needs --prediction-type v_prediction (epsilon is undefined at SNR 0)")

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if args.decoder_only:
        finetune_decoder(args, work)
        return
    if args.seed_from and not args.export_only:
        seed_work_folder(Path(args.seed_from), work)
        cache_latents(args, work)
        cache_outlines(args, work)
        cache_nouns(args, work)
        train_unet(args, work, phase="ground")
    elif not args.export_only:
        write_tokenizer(work / "tokenizer")
        train_vae(args, work)
        cache_latents(args, work)
        finetune_decoder(args, work)
        train_unet(args, work)
        if args.refine_steps:
            train_unet(args, work, phase="refine")
        if args.refine_steps and args.shape_steps:
            cache_outlines(args, work)
            train_unet(args, work, phase="shape")
        if args.refine_steps and args.shape_steps and args.ground_steps:
            cache_nouns(args, work)
            train_unet(args, work, phase="ground")
    export_pipeline(args, work)


if __name__ == "__main__":
    main()
