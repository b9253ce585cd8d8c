"""The UNet stage: the UNet and text encoder trained jointly in four phases (base, refine, shape,
ground), each resumable from its own checkpoint."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from explainer.shapes.architecture import make_noise_schedulers, make_text_encoder, make_unet
from explainer.shapes.grounding import grounding_loss, tap_cross_attention
from explainer.shapes.tokenizer import MODEL_MAX_LENGTH
from explainer.shapes.training import CHECKPOINT_SECONDS, ema_update, log, save_checkpoint, warmup_cosine

CHECKPOINTS = {"base": "unet_ckpt.pt", "refine": "refine_ckpt.pt", "shape": "shape_ckpt.pt", "ground": "ground_ckpt.pt"}  # one per UNet phase
PREVIOUS_PHASE = {"refine": "base", "shape": "refine", "ground": "shape"}


def train_unet(args, work: Path, phase: str = "base"):
    """Joint UNet + text encoder training in four phases, each from the last one's EMA weights
    with a fresh optimizer: "base"; "refine" (a lower learning rate; --refine-high-t-fraction
    samples more high-noise steps, which the epsilon model needed for place); "shape", whose loss weighs
    the latent cells on the shapes' outlines up (--shape-outline-weight), where a circle and a square
    differ, and whose text encoder learns faster (--shape-text-lr-scale); "ground" keeps the shape
    phase's loss and adds --ground-weight times ``grounding_loss``: each shape noun's cross-attention
    should fall on its shape. Why each phase: assets/shapes-ldm/README.md.
    """
    refine, grounding = phase == "refine", phase == "ground"
    shaping = phase in ("shape", "ground")
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(work / "tokenizer")
    latents = torch.from_numpy(np.load(work / "latents.npy"))
    scale = 1.0 / latents.float().std().item()
    captions = json.loads((work / "captions.json").read_text())
    ids = tokenizer(captions, padding="max_length", max_length=MODEL_MAX_LENGTH,
                    truncation=True, return_tensors="pt")["input_ids"]
    empty_ids = tokenizer([""], padding="max_length", max_length=MODEL_MAX_LENGTH,
                          return_tensors="pt")["input_ids"]
    outlines = torch.from_numpy(np.load(work / "outlines.npy").astype(np.float32)) if shaping else None
    if grounding:
        nouns = np.load(work / "nouns.npz")
        noun_positions, noun_cover = torch.from_numpy(nouns["positions"]), torch.from_numpy(nouns["cover"].astype(np.float32))
    torch.manual_seed(args.seed)
    unet, text_encoder = make_unet(), make_text_encoder(tokenizer)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    ema = [p.detach().clone() for p in params]
    total = {"base": args.unet_steps, "refine": args.refine_steps, "shape": args.shape_steps, "ground": args.ground_steps}[phase]
    lr, warmup = {"base": (args.lr, args.warmup), "refine": (args.refine_lr, 50), "shape": (args.shape_lr, 50),
                  "ground": (args.ground_lr, 50)}[phase]
    groups = [{"params": params}]
    if shaping:  # the text encoder learns faster, without weight decay
        groups = [{"params": list(unet.parameters())},
                  {"params": list(text_encoder.parameters()), "lr": lr * args.shape_text_lr_scale, "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(warmup, total))
    ddpm, _ = make_noise_schedulers(args.prediction_type, args.zero_terminal_snr)
    alphas_cumprod = ddpm.alphas_cumprod.float()
    snr = alphas_cumprod / (1 - alphas_cumprod)
    gen = torch.Generator().manual_seed(args.seed + {"base": 2, "refine": 4, "shape": 6, "ground": 8}[phase])
    step, losses, ground_losses = 0, [], []
    ckpt = work / CHECKPOINTS[phase]
    previous = CHECKPOINTS.get(PREVIOUS_PHASE.get(phase))
    if previous and not (args.resume and ckpt.exists()):
        before = torch.load(work / previous, weights_only=False)
        unet.load_state_dict(before["unet"]), text_encoder.load_state_dict(before["text"])
        with torch.no_grad():
            for p, e, saved in zip(params, ema, before["ema"]):
                p.copy_(saved), e.copy_(saved)
        losses = list(before["losses"])
        log(f"{phase} phase starts from the EMA weights of {previous}")
    if args.resume and ckpt.exists():
        state = torch.load(ckpt, weights_only=False)
        unet.load_state_dict(state["unet"]), text_encoder.load_state_dict(state["text"])
        for e, saved in zip(ema, state["ema"]):
            e.copy_(saved)
        opt.load_state_dict(state["opt"]), sched.load_state_dict(state["sched"])
        gen.set_state(state["gen"])
        step, losses, ground_losses = state["step"], state["losses"], state.get("ground_losses", [])
        log(f"UNet resumed at step {step}")
    log(f"UNet {sum(p.numel() for p in unet.parameters()) / 1e6:.2f}M params, "
        f"text {sum(p.numel() for p in text_encoder.parameters()) / 1e6:.2f}M, "
        f"{len(captions)} scenes, latent scale {scale:.4f}")
    unet.train(), text_encoder.train()
    found = tap_cross_attention(unet) if grounding else []
    last_save, started = time.time(), time.time()
    while step < total:
        index = torch.randint(0, len(captions), (args.batch,), generator=gen)
        x0 = latents[index].float() * scale
        tokens = ids[index].clone()
        drop = torch.rand(args.batch, generator=gen) < args.caption_dropout
        tokens[drop] = empty_ids[0]
        if grounding:
            positions = noun_positions[index].clone()
            positions[drop] = -1  # an empty caption names no shape
        t = torch.randint(0, 1000, (args.batch,), generator=gen)
        if refine:
            high = torch.rand(args.batch, generator=gen) < args.refine_high_t_fraction
            t_high = torch.randint(args.high_t_min, 1000, (args.batch,), generator=gen)
            t = torch.where(high, t_high, t)
        elif args.high_t_from_step is not None and step >= args.high_t_from_step:  # layout (place, shape) is decided at high noise
            high = torch.rand(args.batch, generator=gen) < args.high_t_fraction
            t_high = torch.randint(args.high_t_min, 1000, (args.batch,), generator=gen)
            t = torch.where(high, t_high, t)
        noise = torch.randn(x0.shape, generator=gen)
        xt = ddpm.add_noise(x0, noise, t)
        found.clear()
        context = text_encoder(tokens)[0]
        pred = unet(xt, t, context).sample
        if args.prediction_type == "v_prediction":
            target = ddpm.get_velocity(x0, noise, t)
            # v-loss is (snr + 1) times the x0-loss: high noise, where the layout is decided,
            # keeps weight 1 on x0; low noise is capped as in min-SNR.
            weight = torch.clamp(snr[t] + 1, max=args.min_snr + 1) / (snr[t] + 1)
        else:
            target = noise
            weight = torch.clamp(snr[t], max=args.min_snr) / snr[t].clamp(min=1e-8)  # min-SNR weighting
        if shaping:  # weigh the outline cells up; normalised so each sample keeps its weight
            spatial = 1 + args.shape_outline_weight * outlines[index][:, None]
            per_sample = ((pred - target).pow(2) * spatial).mean(dim=(1, 2, 3)) / spatial.mean(dim=(1, 2, 3))
        else:
            per_sample = (pred - target).pow(2).mean(dim=(1, 2, 3))
        if refine and args.prediction_type == "epsilon":  # the epsilon model's layout needed 1/SNR weights
            weight = torch.clamp(1.0 / snr[t], min=1.0, max=args.refine_max_weight)
        loss = (per_sample * weight).mean()
        if grounding:
            ground = grounding_loss(found, positions, noun_cover[index])
            loss = loss + args.ground_weight * ground
            ground_losses.append(ground.item())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step(), sched.step()
        step += 1
        decay = {"refine": args.refine_ema, "shape": args.shape_ema, "ground": args.ground_ema}.get(
            phase, min(args.ema, (1 + step) / (10 + step)))
        ema_update(ema, params, decay)
        losses.append(per_sample.mean().item())
        if step % 25 == 0:
            rate = (time.time() - started) / 25
            started = time.time()
            grounded = f" grounding {np.mean(ground_losses[-25:]):.4f}" if grounding else ""
            log(f"{phase} step {step}/{total} loss {np.mean(losses[-25:]):.4f}{grounded} "
                f"lr {sched.get_last_lr()[0]:.2e} {rate:.2f}s/step")
        if time.time() - last_save > CHECKPOINT_SECONDS or step == total:
            save_checkpoint(ckpt, dict(unet=unet.state_dict(), text=text_encoder.state_dict(),
                                       ema=ema, opt=opt.state_dict(), sched=sched.state_dict(),
                                       gen=gen.get_state(), step=step, losses=losses,
                                       ground_losses=ground_losses, torch_rng=torch.get_rng_state()))
            last_save = time.time()
            log(f"checkpoint at step {step}")
