"""The VAE stage: the VAE trained on 32x32 crops of fresh scenes, the latent cache of a fixed scene
set, and the decoder fine-tuned on full scenes with the encoder frozen."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from explainer.shapes.architecture import make_vae
from explainer.shapes.training import CHECKPOINT_SECONDS, log, save_checkpoint, scene_seed, warmup_cosine
from explainer.shapes.world import generate_scene


def scene_batch(rng: np.random.Generator, size: int, crop: int) -> torch.Tensor:
    """Random crops of fresh training scenes, float in [-1, 1], NCHW."""
    images = []
    for _ in range(size):
        image = generate_scene(rng).image
        y, x = rng.integers(0, 64 - crop + 1, size=2)
        images.append(image[y:y + crop, x:x + crop])
    array = np.stack(images).astype(np.float32) / 127.5 - 1
    return torch.from_numpy(array).permute(0, 3, 1, 2).contiguous()


def train_vae(args, work: Path):
    out_dir = work / "vae"
    if (out_dir / "config.json").exists():
        log("VAE already trained")
        return
    vae = make_vae()
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(50, args.vae_steps))
    rng = np.random.default_rng(args.seed + 1)
    step, losses = 0, []
    ckpt = work / "vae_ckpt.pt"
    if args.resume and ckpt.exists():
        state = torch.load(ckpt, weights_only=False)
        vae.load_state_dict(state["model"]), opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        rng.bit_generator.state = state["np_rng"]
        torch.set_rng_state(state["torch_rng"])
        step, losses = state["step"], state["losses"]
        log(f"VAE resumed at step {step}")
    last_save, started = time.time(), time.time()
    vae.train()
    while step < args.vae_steps:
        x = scene_batch(rng, args.vae_batch, 32)
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        mse = torch.nn.functional.mse_loss(recon, x)
        loss = mse + args.kl_weight * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step(), sched.step()
        step += 1
        losses.append(mse.item())
        if step % 50 == 0:
            rate = (time.time() - started) / 50
            started = time.time()
            log(f"vae step {step}/{args.vae_steps} mse {np.mean(losses[-50:]):.4f} {rate:.2f}s/step")
        if time.time() - last_save > CHECKPOINT_SECONDS or step == args.vae_steps:
            save_checkpoint(ckpt, dict(model=vae.state_dict(), opt=opt.state_dict(),
                                       sched=sched.state_dict(), step=step, losses=losses,
                                       np_rng=rng.bit_generator.state,
                                       torch_rng=torch.get_rng_state()))
            last_save = time.time()
    vae.save_pretrained(out_dir)
    (work / "vae_losses.json").write_text(json.dumps(losses))
    log("VAE saved")


@torch.no_grad()
def cache_latents(args, work: Path):
    """Encode a fixed training scene set (posterior means) to runs/."""
    from diffusers import AutoencoderKL

    latents_file, captions_file = work / "latents.npy", work / "captions.json"
    if latents_file.exists() and captions_file.exists():
        log("latents already cached")
        return
    vae = AutoencoderKL.from_pretrained(work / "vae").eval()
    latents, captions, chunk = [], [], 256
    for start in range(0, args.scenes, chunk):
        scenes = [generate_scene(scene_seed(args, i)) for i in range(start, min(args.scenes, start + chunk))]
        x = np.stack([s.image for s in scenes]).astype(np.float32) / 127.5 - 1
        x = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()
        latents.append(vae.encode(x).latent_dist.mean.numpy().astype(np.float16))
        captions += [s.caption for s in scenes]
        if (start // chunk) % 20 == 0:
            log(f"encoded {start + len(scenes)}/{args.scenes} scenes")
    array = np.concatenate(latents)
    np.save(work / "latents.tmp.npy", array)
    os.replace(work / "latents.tmp.npy", latents_file)
    captions_file.write_text(json.dumps(captions))
    log(f"latents cached: {array.shape}, std {array.astype(np.float32).std():.4f}")


def finetune_decoder(args, work: Path):
    """Fine-tune the VAE decoder on full 64x64 scenes, encoder frozen.

    The latents (and so the UNet) are unaffected; shape pixels weigh more so
    small shapes keep their corners. Saved to work/vae_decoder.
    """
    from diffusers import AutoencoderKL

    out_dir = work / "vae_decoder"
    if (out_dir / "config.json").exists() or args.decoder_steps == 0:
        log("decoder fine-tune done or skipped")
        return
    vae = AutoencoderKL.from_pretrained(work / "vae")
    vae.encoder.requires_grad_(False), vae.quant_conv.requires_grad_(False)
    params = list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters())
    opt = torch.optim.AdamW(params, lr=args.decoder_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(20, args.decoder_steps))
    rng = np.random.default_rng(args.seed + 3)
    started = time.time()
    for step in range(1, args.decoder_steps + 1):
        scenes = [generate_scene(rng) for _ in range(args.vae_batch // 2)]
        x = np.stack([sc.image for sc in scenes]).astype(np.float32) / 127.5 - 1
        x = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()
        shapes = np.stack([np.logical_or.reduce([i.mask for i in sc.shapes]) for sc in scenes])
        weight = 1 + 4 * torch.nn.functional.max_pool2d(
            torch.from_numpy(shapes[:, None].astype(np.float32)), 5, 1, 2)
        with torch.no_grad():
            z = vae.encode(x).latent_dist.mean
        recon = vae.decode(z).sample
        loss = ((recon - x).pow(2) * weight).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step(), sched.step()
        if step % 50 == 0:
            log(f"decoder step {step}/{args.decoder_steps} weighted mse {loss.item():.4f} "
                f"{(time.time() - started) / step:.2f}s/step")
    vae.save_pretrained(out_dir)
    log("fine-tuned decoder saved")
