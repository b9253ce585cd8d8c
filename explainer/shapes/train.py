"""Train the shapes latent diffusion model on CPU and save it in diffusers format.

Stages (all run by default, each resumable): VAE on 32x32 crops, latent
cache for a fixed scene set, decoder fine-tune, UNet + text encoder jointly in four
phases (base, refine, shape, ground), pipeline export.

    python -m explainer.shapes.train --resume
    python -m explainer.shapes.train --seed-from assets/shapes-ldm  # only the ground phase, from a saved model
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from explainer.capture import classic_attention
from explainer.families import FAMILIES
from explainer.shapes.tokenizer import MODEL_MAX_LENGTH, write_tokenizer
from explainer.shapes.world import SHAPES, generate_scene

SD1 = FAMILIES["sd1"]  # the embedded model is built as Stable Diffusion 1.x is
CHECKPOINT_SECONDS = 180
CHECKPOINTS = {"base": "unet_ckpt.pt", "refine": "refine_ckpt.pt", "shape": "shape_ckpt.pt", "ground": "ground_ckpt.pt"}  # one per UNet phase
PREVIOUS_PHASE = {"refine": "base", "shape": "refine", "ground": "shape"}
BETA_START, BETA_END = 0.00085, 0.012


def log(message: str) -> None:
    print(time.strftime("%H:%M:%S"), message, flush=True)


def make_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(32, 64, 64), layers_per_block=1,
        latent_channels=4, norm_num_groups=32, sample_size=64,
    )


def make_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(64, 96, 128), layers_per_block=1,
        cross_attention_dim=64, attention_head_dim=4, norm_num_groups=32,
    )


def make_text_encoder(tokenizer):
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=256,
        num_hidden_layers=3, num_attention_heads=4,
        max_position_embeddings=MODEL_MAX_LENGTH,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModel(config)


def make_noise_schedulers(prediction_type: str = "v_prediction", zero_terminal_snr: bool = True):
    """Training (DDPM) and sampling (DPM-Solver++) schedulers with the same noise schedule.

    Zero terminal SNR (Lin et al., 2024): with SD's schedule x_999 still holds 6.8 % of the
    image, and on 16x16 latents of flat saturated shapes that faint signal is enough to locate a
    shape, so a model trained on it places shapes where the pure starting noise happens to look
    like one and ignores the place words. At zero terminal SNR the text is all it has at t = 999.
    Needs v-prediction (epsilon is undefined there) and "trailing" spacing to start at t = 999.
    """
    from diffusers import DDPMScheduler, DPMSolverMultistepScheduler

    common = dict(num_train_timesteps=1000, beta_start=BETA_START, beta_end=BETA_END,
                  beta_schedule="scaled_linear", prediction_type=prediction_type)
    if zero_terminal_snr:
        common |= dict(rescale_betas_zero_snr=True, timestep_spacing="trailing")
    ddpm = DDPMScheduler(**common, clip_sample=False)
    dpm = DPMSolverMultistepScheduler(**common, algorithm_type="dpmsolver++", solver_order=2,
                                      **({} if zero_terminal_snr else {"steps_offset": 1}))
    return ddpm, dpm


def warmup_cosine(warmup: int, total: int, floor: float = 0.05):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    return factor


def save_checkpoint(path: Path, state: dict) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


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


def scene_seed(args, index: int) -> int:
    return args.seed * 1_000_003 + index


def latent_cells(mask: np.ndarray) -> np.ndarray:
    """The share of each 4x4 pixel cell (one latent cell) that a 64x64 mask covers."""
    height, width = mask.shape
    return mask.reshape(height // 4, 4, width // 4, 4).mean(axis=(1, 3))


def shape_outline(scene) -> np.ndarray:
    """Share of each 4x4 pixel cell (one latent cell) on a shape's outline, +-2 pixels: where a
    circle and a square of the same place and size differ."""
    from scipy import ndimage

    outline = np.zeros(scene.image.shape[:2], bool)
    for item in scene.shapes:
        outline |= ndimage.binary_dilation(item.mask, iterations=2) & ~ndimage.binary_erosion(item.mask, iterations=2)
    return latent_cells(outline)


def cache_outlines(args, work: Path) -> None:
    """The outline share per latent cell of every cached scene (for the shape phase's loss)."""
    path = work / "outlines.npy"
    if path.exists():
        return
    outlines = np.stack([shape_outline(generate_scene(scene_seed(args, i))) for i in range(args.scenes)])
    np.save(work / "outlines.tmp.npy", outlines.astype(np.float16))
    os.replace(work / "outlines.tmp.npy", path)
    log(f"outlines cached: {outlines.shape}, mean {outlines.mean():.4f}")


def cache_nouns(args, work: Path) -> None:
    """Each cached caption's shape nouns: their token positions (in caption order, -1 for none)
    and, per noun, the share of each latent cell its shape covers (for the ground phase)."""
    from transformers import CLIPTokenizer

    path = work / "nouns.npz"
    if path.exists():
        return
    tokenizer = CLIPTokenizer.from_pretrained(work / "tokenizer")
    noun_ids = {tokenizer.convert_tokens_to_ids(word + "</w>") for word in SHAPES}
    positions = np.full((args.scenes, 2), -1, np.int16)
    cover = np.zeros((args.scenes, 2, 16, 16), np.float16)
    for i in range(args.scenes):
        scene = generate_scene(scene_seed(args, i))
        ids = tokenizer(scene.caption, max_length=MODEL_MAX_LENGTH, truncation=True)["input_ids"]
        found = [k for k, token in enumerate(ids) if token in noun_ids]
        assert len(found) == len(scene.shapes), scene.caption  # the captions name each shape once, in order
        for slot, (position, item) in enumerate(zip(found, scene.shapes)):
            positions[i, slot] = position
            cover[i, slot] = latent_cells(item.mask)
    np.savez(work / "nouns.tmp.npz", positions=positions, cover=cover)
    os.replace(work / "nouns.tmp.npz", path)
    log(f"shape nouns cached: {int((positions >= 0).sum())} nouns in {args.scenes} captions")


class ProbabilityTap:
    """A cross-attention processor (diffusers' classic maths) that keeps each layer's
    probabilities, with their graph, for the grounding loss."""

    def __init__(self, found: list):
        self.found = found

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **_):
        return classic_attention(attn, hidden_states, encoder_hidden_states, attention_mask, temb,
                                  on_probs=lambda probs: self.found.append((probs, attn.heads)))


def tap_cross_attention(unet) -> list:
    """Install ``ProbabilityTap`` on every cross-attention layer; returns the list it fills."""
    found: list = []
    cross = set(SD1.cross_attention_sites(unet))
    unet.set_attn_processor({name: ProbabilityTap(found) if name in cross else processor
                             for name, processor in unet.attn_processors.items()})
    return found


def grounding_loss(found: list, positions: torch.Tensor, cover: torch.Tensor) -> torch.Tensor:
    """TokenCompose's token loss (Wang et al., CVPR 2024), per layer and per shape noun:
    (1 - the share of the noun's attention, mean over heads, that falls on its shape)^2, with
    the shape's cover of each cell of the layer's grid (area means of the 16x16 cover).

    positions: (batch, slots) noun token positions, -1 for none; cover: (batch, slots, 16, 16).
    """
    batch, slots = positions.shape
    valid = positions >= 0
    losses = []
    for probs, heads in found:
        _, tokens, text_length = probs.shape
        mean = probs.view(batch, heads, tokens, text_length).mean(1)  # (batch, N, L)
        grid = SD1.layer_grid(tokens, tuple(cover.shape[-2:]))
        cells = F.adaptive_avg_pool2d(cover, grid).flatten(2)  # (batch, slots, N)
        noun = torch.gather(mean, 2, positions.clamp(min=0).long()[:, None, :].expand(batch, tokens, slots)).transpose(1, 2)
        inside = (noun * cells).sum(-1) / noun.sum(-1).clamp(min=1e-8)
        losses.append((1 - inside).pow(2)[valid])
    return torch.cat(losses).mean()


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


def _ema_update(ema: list[torch.Tensor], params: list[torch.Tensor], decay: float):
    torch._foreach_mul_(ema, decay)
    torch._foreach_add_(ema, [p.detach() for p in params], alpha=1 - decay)


def train_unet(args, work: Path, phase: str = "base"):
    """Joint UNet + text encoder training in four phases, each from the last one's EMA weights
    with a fresh optimizer: "base"; "refine" (a lower learning rate; --refine-high-t-fraction
    samples more high-noise steps, which the epsilon model needed for place); "shape", whose loss weighs
    the latent cells on the shapes' outlines up (--shape-outline-weight) and whose text encoder
    learns faster (--shape-text-lr-scale). After refine, circles came out as rounded squares:
    the two differ only at the outline, a few percent of the loss, and the text embeddings of
    "circle" and "square" stayed 0.96 cosine-similar. "ground" keeps the shape phase's loss and
    adds --ground-weight times ``grounding_loss``: each shape noun's cross-attention should fall
    on its shape. Without it the noun's map peaks on the shape but its floor spreads over the image.
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
        _ema_update(ema, params, decay)
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


def save_loss_curve(losses: list[float], path: Path, ground_losses: list[float] | None = None) -> None:
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
    ax.set_xlabel("UNet step, every phase the checkpoint remembers (batch 64)")
    ax.set_ylabel("loss (v-prediction, weighted)")
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
    parser.add_argument("--work", default="runs/shapes", help="scratch dir for caches/checkpoints")
    parser.add_argument("--out", default="assets/shapes-ldm")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--export-only", action="store_true")
    parser.add_argument("--vae-steps", type=int, default=1000)
    parser.add_argument("--vae-batch", type=int, default=32)
    parser.add_argument("--vae-lr", type=float, default=1e-3)
    parser.add_argument("--kl-weight", type=float, default=1e-6)
    parser.add_argument("--decoder-steps", type=int, default=600)
    parser.add_argument("--decoder-lr", type=float, default=3e-4)
    parser.add_argument("--decoder-only", action="store_true")
    parser.add_argument("--scenes", type=int, default=20_000)
    parser.add_argument("--unet-steps", type=int, default=3000)
    parser.add_argument("--prediction-type", default="v_prediction",
                        choices=("v_prediction", "epsilon"),
                        help="v: the network predicts x0 directly at high noise, where an "
                             "epsilon network's x0 error is amplified by 1/sqrt(SNR) (~15x)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=6e-4)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--ema", type=float, default=0.999)
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
    parser.add_argument("--shape-steps", type=int, default=1500)
    parser.add_argument("--shape-lr", type=float, default=2e-4)
    parser.add_argument("--shape-text-lr-scale", type=float, default=3.0)
    parser.add_argument("--shape-outline-weight", type=float, default=8.0)
    parser.add_argument("--shape-ema", type=float, default=0.995)
    parser.add_argument("--ground-steps", type=int, default=800)
    parser.add_argument("--ground-lr", type=float, default=1e-4)
    parser.add_argument("--ground-weight", type=float, default=0.1)
    parser.add_argument("--ground-ema", type=float, default=0.995)
    parser.add_argument("--caption-dropout", type=float, default=0.1)
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
