"""Train the second embedded model, an MM-DiT of the shapes world (Stable Diffusion 3's design),
on CPU with rectified flow, and save it as a diffusers ``StableDiffusion3Pipeline``.

It reuses the shapes world, its closed-vocabulary tokenizer and the first model's VAE (the latent
cache of the same seeded scenes). Its attention is never trained towards the shapes: how well
joint attention localises is a finding. Phases, each resumable from its own checkpoint:

1. ``base``: transformer and both text encoders jointly, the plain flow-matching loss.
2. ``shape``: from base's EMA weights, latent cells on the shapes' outlines weighted up.

    nohup python -m explainer.shapes.train_mmdit --resume > runs/train_mmdit.log 2>&1 &
    python -m explainer.shapes.train_mmdit --export-only
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from explainer.shapes.architecture import make_flow_scheduler, make_mmdit, make_projected_text_encoder
from explainer.shapes.grounding import cache_outlines
from explainer.shapes.train_vae import cache_latents
from explainer.shapes.training import CHECKPOINT_SECONDS, ema_update, log, save_checkpoint, shared_arguments, warmup_cosine

CHECKPOINTS = {"base": "mmdit_base.pt", "shape": "mmdit_shape.pt"}
T5_TOKENS = 1  # no T5: the pipeline appends this many zero tokens (the model card's max_sequence_length)


def seed_work_folder(source: Path, work: Path) -> None:
    """The first model's VAE and tokenizer stand in for the stages the two models share."""
    from diffusers import AutoencoderKL

    if not (work / "vae").exists():
        AutoencoderKL.from_pretrained(source / "vae").save_pretrained(work / "vae")
    if not (work / "tokenizer").exists():
        shutil.copytree(source / "tokenizer", work / "tokenizer")


def build_pipeline(work: Path, transformer, text_encoder, text_encoder_2, shift: float):
    """The pipeline the training encodes captions with and the export saves: so the training's
    conditioning is the pipeline's own (penultimate CLIP states side by side, pooled outputs)."""
    from diffusers import AutoencoderKL, StableDiffusion3Pipeline
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(work / "tokenizer")
    vae = AutoencoderKL.from_pretrained(work / "vae")
    vae.register_to_config(shift_factor=0.0)  # the pipeline adds it; latents are scaled only
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=make_flow_scheduler(shift), vae=vae,
        text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer,
        text_encoder_3=None, tokenizer_3=None,
    )


def make_models(args, work: Path):
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(work / "tokenizer")
    torch.manual_seed(args.seed)
    return (make_mmdit(args.patch_size, args.layers, args.heads, args.head_dim),
            make_projected_text_encoder(tokenizer), make_projected_text_encoder(tokenizer))


def sample_sigmas(batch: int, generator: torch.Generator, uniform_fraction: float) -> torch.Tensor:
    """Logit-normal noise levels (SD3's training distribution), a share drawn uniformly so the
    ends (pure noise, where the layout is decided, and nearly clean) are not starved."""
    logit_normal = torch.sigmoid(torch.randn(batch, generator=generator))
    uniform = torch.rand(batch, generator=generator)
    return torch.where(torch.rand(batch, generator=generator) < uniform_fraction, uniform, logit_normal)


def train(args, work: Path, phase: str) -> None:
    transformer, text_encoder, text_encoder_2 = make_models(args, work)
    pipe = build_pipeline(work, transformer, text_encoder, text_encoder_2, args.shift)
    latents = torch.from_numpy(np.load(work / "latents.npy"))
    scale = pipe.vae.config.scaling_factor
    captions = json.loads((work / "captions.json").read_text())
    outlines = torch.from_numpy(np.load(work / "outlines.npy").astype(np.float32)) if phase == "shape" else None
    params = [p for module in (transformer, text_encoder, text_encoder_2) for p in module.parameters()]
    ema = [p.detach().clone() for p in params]
    total, lr, warmup = {"base": (args.steps, args.lr, args.warmup), "shape": (args.shape_steps, args.shape_lr, 50)}[phase]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(warmup, total))
    gen = torch.Generator().manual_seed(args.seed + {"base": 12, "shape": 16}[phase])
    step, losses = 0, []
    ckpt = work / CHECKPOINTS[phase]
    if phase == "shape" and not (args.resume and ckpt.exists()):
        before = torch.load(work / CHECKPOINTS["base"], weights_only=False)
        with torch.no_grad():
            for p, e, saved in zip(params, ema, before["ema"]):
                p.copy_(saved), e.copy_(saved)
        losses = list(before["losses"])
        log("shape phase starts from the EMA weights of the base phase")
    if args.resume and ckpt.exists():
        state = torch.load(ckpt, weights_only=False)
        with torch.no_grad():
            for p, saved in zip(params, state["params"]):
                p.copy_(saved)
            for e, saved in zip(ema, state["ema"]):
                e.copy_(saved)
        opt.load_state_dict(state["opt"]), sched.load_state_dict(state["sched"])
        gen.set_state(state["gen"])
        step, losses = state["step"], state["losses"]
        log(f"{phase} resumed at step {step}")
    log(f"MM-DiT {sum(p.numel() for p in transformer.parameters()) / 1e6:.2f}M params, text encoders "
        f"{sum(p.numel() for m in (text_encoder, text_encoder_2) for p in m.parameters()) / 1e6:.2f}M, "
        f"{len(captions)} scenes, latent scale {scale:.4f}, {phase} phase {total} steps")
    for module in (transformer, text_encoder, text_encoder_2):
        module.train()
    last_save, started = time.time(), time.time()
    while step < total:
        index = torch.randint(0, len(captions), (args.batch,), generator=gen)
        x0 = latents[index].float() * scale
        drop = (torch.rand(args.batch, generator=gen) < args.caption_dropout).tolist()
        batch_captions = ["" if dropped else captions[i] for i, dropped in zip(index.tolist(), drop)]
        context, _, pooled, _ = pipe.encode_prompt(batch_captions, None, None, device=torch.device("cpu"),
                                                  do_classifier_free_guidance=False, max_sequence_length=T5_TOKENS)
        sigma = sample_sigmas(args.batch, gen, args.uniform_sigma_fraction)
        noise = torch.randn(x0.shape, generator=gen)
        xt = (1 - sigma[:, None, None, None]) * x0 + sigma[:, None, None, None] * noise
        velocity = transformer(xt, context, pooled, sigma * 1000, return_dict=False)[0]
        error = (velocity - (noise - x0)).pow(2)
        if outlines is not None:  # outline cells weigh more; normalised so each sample keeps its weight
            spatial = 1 + args.shape_outline_weight * outlines[index][:, None]
            per_sample = (error * spatial).mean(dim=(1, 2, 3)) / spatial.mean(dim=(1, 2, 3))
        else:
            per_sample = error.mean(dim=(1, 2, 3))
        loss = per_sample.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step(), sched.step()
        step += 1
        decay = args.shape_ema if phase == "shape" else min(args.ema, (1 + step) / (10 + step))
        ema_update(ema, params, decay)
        losses.append(loss.item())
        if step % 25 == 0:
            rate, started = (time.time() - started) / 25, time.time()
            log(f"{phase} step {step}/{total} loss {np.mean(losses[-25:]):.4f} lr {sched.get_last_lr()[0]:.2e} {rate:.2f}s/step")
        if time.time() - last_save > CHECKPOINT_SECONDS or step == total:
            save_checkpoint(ckpt, dict(params=[p.detach() for p in params], ema=ema, opt=opt.state_dict(),
                                       sched=sched.state_dict(), gen=gen.get_state(), step=step, losses=losses))
            last_save = time.time()
            log(f"checkpoint at step {step}")


def export_pipeline(args, work: Path) -> None:
    """The latest phase's EMA weights as a StableDiffusion3Pipeline in ``args.out``."""
    from explainer.shapes.train import save_loss_curve

    latest = next(work / name for name in (CHECKPOINTS["shape"], CHECKPOINTS["base"]) if (work / name).exists())
    state = torch.load(latest, weights_only=False)
    transformer, text_encoder, text_encoder_2 = make_models(args, work)
    params = [p for module in (transformer, text_encoder, text_encoder_2) for p in module.parameters()]
    with torch.no_grad():
        for p, e in zip(params, state["ema"]):
            p.copy_(e)
    pipe = build_pipeline(work, transformer.eval(), text_encoder.eval(), text_encoder_2.eval(), args.shift)
    out = Path(args.out)
    pipe.save_pretrained(out, safe_serialization=True)
    save_loss_curve(state["losses"], out / "loss_curve.png", ylabel="loss (flow velocity MSE)")
    info = dict(checkpoint=latest.name, steps_in_last_phase=state["step"], final_loss=float(np.mean(state["losses"][-200:])))
    (work / "export.json").write_text(json.dumps(info, indent=2))
    log(f"pipeline saved to {out}: {info}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    shared_arguments(parser, work="runs/mmdit", out="assets/shapes-mmdit")
    parser.add_argument("--vae-from", default="assets/shapes-ldm", help="the pipeline whose VAE and tokenizer are reused")
    parser.add_argument("--patch-size", type=int, default=1)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=32)
    parser.add_argument("--shift", type=float, default=1.0, help="the sampling scheduler's sigma shift")
    parser.add_argument("--steps", type=int, default=6000)
    parser.add_argument("--uniform-sigma-fraction", type=float, default=0.3)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if not args.export_only:
        seed_work_folder(Path(args.vae_from), work)
        cache_latents(args, work)
        train(args, work, "base")
        if args.shape_steps:
            cache_outlines(args, work)
            train(args, work, "shape")
    export_pipeline(args, work)


if __name__ == "__main__":
    main()
