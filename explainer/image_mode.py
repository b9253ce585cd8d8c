"""Explain an image the model did not make: encode it with the family's VAE, then follow one of two
trajectories and record every step as a generation's run is recorded, so every view and method reads it.

- ``"noise"``: at every step of the schedule the image noised to that step's level (one noise drawn
  from the seed), and the model's one-step prediction from it: what the model recovers of this image,
  and where each word is attended, at each noise level (the paper's step-wise view; the protocol of
  zero-shot segmentation from attention). Steps are independent of one another.
- ``"invert"``: the image inverted to noise by the deterministic sampler run backwards (DDIM inversion
  for epsilon- and v-prediction models, the flow's Euler step backwards for flow matching), then the
  model's own denoising run from there, which returns close to the image (``reconstruction_error``).

    >>> run = ImageRun(model, RunSettings(prompt="a red circle"), image, mode="invert").run_all()
    >>> run.data.source["reconstruction_error"]  # mean |regenerated - image| over pixels in [0, 1]
"""

from __future__ import annotations

import dataclasses
import hashlib

import numpy as np
import torch
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image, ImageOps

from . import config
from .models import LoadedModel
from .replay import combine_guidance, model_input
from .run import InstrumentedRun, RunSettings

MODES = ("noise", "invert")
# Modes PIL converts to RGB without losing what the picture shows; others (16-bit, float) are refused.
CONVERTIBLE_MODES = ("RGB", "RGBA", "LA", "L", "P", "PA", "CMYK", "YCbCr", "1", "RGBX", "La", "RGBa")


def read_image(image, width: int, height: int, limits: config.Limits = config.LIMITS) -> tuple[Image.Image, list[str]]:
    """``image`` (a PIL image, an (H, W[, 3|4]) uint8 array or a file path) as an RGB picture of
    ``width`` x ``height``, and messages for what was changed (transparency flattened on white, a
    different size centre-cropped to the aspect and resized). ValueError naming the rule for what
    cannot be explained: not an image, a side under ``limits.min_image_side``, more than
    ``limits.max_image_pixels`` pixels, a mode without a faithful RGB conversion."""
    picture = _as_picture(image, limits)
    messages = []
    if min(picture.size) < limits.min_image_side:
        raise ValueError(f"The image is {picture.width}×{picture.height} pixels; each side must be at least "
                         f"{limits.min_image_side}.")
    if picture.mode not in CONVERTIBLE_MODES:
        raise ValueError(f"The image has pixel mode {picture.mode!r} (16-bit or floating point); save it as an 8-bit "
                         "RGB or greyscale picture (PNG or JPEG).")
    if picture.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (picture.mode == "P" and "transparency" in picture.info):
        rgba = picture.convert("RGBA")
        flattened = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        flattened.alpha_composite(rgba)
        picture = flattened
        messages.append("The image's transparency was flattened onto white.")
    picture = picture.convert("RGB")
    if picture.size != (width, height):
        messages.append(f"The image was resized from {picture.width}×{picture.height} to the run's {width}×{height} "
                        "(centre-cropped to its aspect first).")
        picture = ImageOps.fit(picture, (width, height), Image.Resampling.LANCZOS)
    return picture, messages


def _as_picture(image, limits: config.Limits) -> Image.Image:
    if image is None:
        raise ValueError("No image: upload one (PNG or JPEG) or pick a scene.")
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (1, 3, 4)):
            raise ValueError(f"An image array must be uint8 (H, W), (H, W, 3) or (H, W, 4), got {image.dtype} {image.shape}.")
        _check_pixels(image.shape[1], image.shape[0], limits)
        return Image.fromarray(image[..., 0] if image.ndim == 3 and image.shape[2] == 1 else image)
    if isinstance(image, Image.Image):
        _check_pixels(*image.size, limits)
        return image
    try:
        with Image.open(image) as opened:  # a path or file object; the size is read before any pixel
            _check_pixels(*opened.size, limits)
            opened.load()
            return opened.copy()
    except (OSError, ValueError, TypeError, Image.DecompressionBombError) as error:
        if isinstance(error, ValueError) and "pixels" in str(error):
            raise
        raise ValueError(f"This is not an image that can be read (PNG, JPEG, WebP, GIF or BMP): {error}") from None


def _check_pixels(width: int, height: int, limits: config.Limits) -> None:
    if width * height > limits.max_image_pixels:
        raise ValueError(f"The image is {width}×{height} = {width * height:,} pixels; the limit is "
                         f"{limits.max_image_pixels:,}: make it smaller first.")


def encode_image(model: LoadedModel, picture: Image.Image) -> torch.Tensor:
    """An RGB picture's clean latent (1, C, h, w) in the denoiser's scale and the model's dtype."""
    pixels = torch.from_numpy(np.asarray(picture, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)[None]
    return model.family.encode_pictures(model.pipe, pixels).to(model.device, model.dtype)


def invert(model: LoadedModel, clean: torch.Tensor, scheduler, conditioning, guidance: float,
           refinements: int = config.LIMITS.inversion_refinements) -> torch.Tensor:
    """x_T from a clean latent by the run's deterministic step run backwards, level by level up
    ``scheduler.timesteps``. Each level's latent x_b is first guessed as diffusers' ``DDIMInverseScheduler``
    does (the model's prediction at the noisier timestep, from the latent x_a it has: DDIM inversion, or
    Euler backwards for flow matching), then refined ``refinements`` times towards the x_b whose forward
    step lands on x_a: x_b <- x_b + (x_a - step(x_b)) / gain, ``gain`` the step's coefficient on x_b with
    the prediction held (a Newton step; for an epsilon model it is the DDIM inversion with the noise
    predicted at x_b, as ReNoise and AIDI refine it; why: docs/design.md, "Inverting an image")."""
    family, halves = model.family, conditioning.halves

    def prediction(latents, level):
        timestep = torch.tensor(level, device=latents.device)
        output = family.predict(model.pipe, model_input(scheduler, latents, timestep, halves), timestep, conditioning)
        return combine_guidance(output, guidance, halves)

    levels = [None, *reversed(scheduler.timesteps.tolist())]  # None: the clean latent
    latents = clean.float()
    for current, target in zip(levels[:-1], levels[1:]):
        output = prediction(latents.to(clean.dtype), target)
        guess = family.noised(scheduler, family.clean_estimate(scheduler, latents, output, current),
                              family.noise_estimate(scheduler, latents, output, current), target)
        # the step's own gain on x_b with the prediction held (sqrt(alpha_bar_a / alpha_bar_b) for epsilon, 1 for
        # flow): dividing by it makes each refinement a Newton step, which converges where x_b's gain is large
        gain = family.replay_step(scheduler, torch.ones_like(latents), torch.zeros_like(latents), target, current).float()
        for _ in range(refinements):
            landed = family.replay_step(scheduler, guess.to(clean.dtype), prediction(guess.to(clean.dtype), target), target, current)
            guess = guess + (latents - landed.float()) / gain
        latents = guess
    return latents.to(clean.dtype)


class ImageRun(InstrumentedRun):
    """An instrumented run over an image's trajectory (module docstring) instead of a generation. Its
    data carries the picture (``source_image``) and ``source``: the mode, the picture's SHA-256, and for
    ``"invert"`` the reconstruction error (mean absolute difference of the regenerated picture from
    the image, pixels in [0, 1]) once the run is done. Families stepped by DDPM schedulers use DDIM
    (the sampler that inverts); the seed draws the noise of ``"noise"`` and is unused by ``"invert"``;
    ``refinements``: ``invert``'s."""

    def __init__(self, model: LoadedModel, settings: RunSettings, image, mode: str = config.DEFAULTS.image_mode,
                 refinements: int = config.LIMITS.inversion_refinements):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}.")
        super().__init__(model, dataclasses.replace(settings, scheduler="ddim"))
        picture, messages = read_image(image, self.settings.width, self.settings.height)
        self.mode, self.refinements = mode, refinements
        self.data.messages.extend(messages)
        self.data.source_image = picture
        self.data.source = {"mode": mode, "sha256": hashlib.sha256(picture.tobytes()).hexdigest()}
        self._clean = self._noise = None

    def initial_latents(self, conditioning) -> torch.Tensor:
        model = self.model
        self._clean = encode_image(model, self.data.source_image)
        if self.mode == "invert":
            inverter = model.family.scheduler(model.pipe, self.settings)  # fresh: schedulers keep per-run state
            return invert(model, self._clean, inverter, conditioning, self.settings.guidance, self.refinements)
        generator = torch.Generator("cpu").manual_seed(self.settings.seed)
        self._noise = randn_tensor(self._clean.shape, generator=generator, device=model.device, dtype=model.dtype)
        return self.latents_at(self.scheduler.timesteps[0], None)

    def latents_at(self, timestep, latents):
        if self.mode == "invert":
            return latents
        return self.model.family.noised(self.scheduler, self._clean, self._noise, timestep.item()).to(self.model.dtype)

    def steps(self):
        yield from super().steps()
        if self.mode == "invert":
            source = np.asarray(self.data.source_image, dtype=np.float32) / 255.0
            # the reproduction record holds this same dict: it carries the error too
            self.data.source["reconstruction_error"] = float(np.abs(self.data.final_array - source).mean())


__all__ = ["MODES", "ImageRun", "encode_image", "invert", "read_image"]


def reconstruction_table(model_id: str, scenes: int = 10, refinements=(0, 1, 3), guidances=(1.0,)) -> list[dict]:
    """Mean reconstruction error of inverted rendered scenes (shapes world, seeds 0..scenes-1) per number of
    refinements and guidance, beside the VAE's own round-trip error on the same pictures."""
    from .models import load_model
    from .shapes.world import generate_scene

    model = load_model(model_id)
    spec = model.spec
    rendered = [generate_scene(seed, split="any") for seed in range(scenes)]
    pictures = [read_image(scene.image, spec.width, spec.height)[0] for scene in rendered]
    captions = [scene.caption for scene in rendered]
    with torch.inference_mode():
        floor = [float(np.abs(model.decode(encode_image(model, p).float(), output_type="np")[0]
                              - np.asarray(p, np.float32) / 255).mean()) for p in pictures]
    rows = []
    for guidance in guidances:
        for count in refinements:
            errors = [ImageRun(model, RunSettings(prompt=caption, steps=spec.steps, guidance=guidance, width=spec.width,
                                                  height=spec.height), picture, "invert", count).run_all().data.source["reconstruction_error"]
                      for picture, caption in zip(pictures, captions)]
            rows.append({"guidance": guidance, "refinements": count, "error": float(np.mean(errors)),
                         "worst": float(np.max(errors)), "vae_round_trip": float(np.mean(floor))})
    return rows


if __name__ == "__main__":  # python -m explainer.image_mode [model id] [scenes]: the inversion table of docs/design.md
    import sys

    chosen = sys.argv[1] if len(sys.argv) > 1 else config.EMBEDDED_MODEL_ID
    for row in reconstruction_table(chosen, int(sys.argv[2]) if len(sys.argv) > 2 else 10, guidances=(1.0, 5.0)):
        print(f"guidance {row['guidance']:g} · refinements {row['refinements']} · error {row['error']:.4f} "
              f"(worst {row['worst']:.4f}) · VAE round trip {row['vae_round_trip']:.4f}")
