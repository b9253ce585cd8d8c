"""DF-CAM: Grad-CAM on the denoiser itself, every layer in one backward pass (docs/methods.md, DF-CAM).

Each layer's map weighs its activation by its gradient at each pixel (LayerCAM, the default;
HiResCAM) or per channel (Grad-CAM, the paper's; see ``WEIGHTINGS``), and the layers add up in the
target's own units (default) or min-max normalised each (the paper's; see ``LAYER_SCALES``).

The target is what the step's prediction is explained for: by default how much the prompt changes
it, ½‖ε_c − ε_u‖²; the paper's sum of the denoiser's output is ``target="sum"`` (see ``TARGETS``).
Every layer the model's family names (``Family.explained_layers``; SD 1.x: each resnet, attention
block, down- and upsampler of every down/mid/up block; SD 3: each transformer block, its image
tokens laid on the patch grid) keeps its activation in one forward pass; one ``torch.autograd.grad``
call gives every gradient.

Example:
    >>> explanation = DFCam().explain(model, run, step=15)
    >>> sorted(explanation.per_layer)[:2]  # module paths, as the family names them
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..maps import normalise
from ..replay import StepInputs, combine_guidance, raw_prediction, step_inputs
from .base import RECTIFIERS, GradientMethod, check_choice
from .options import option


def cam_layers(model) -> list[str]:
    """Paths of the modules DF-CAM explains, as the model's family names them, in forward order."""
    return model.family.explained_layers(model.denoiser)


def feature_map(activation: torch.Tensor, family, size: tuple[int, int]) -> torch.Tensor:
    """An explained layer's activation or gradient as a feature map (B, C, h, w): image tokens
    (B, N, C) are laid on the family's layer grid for a latent grid of ``size``."""
    if activation.ndim == 4:
        return activation
    batch, tokens, channels = activation.shape
    height, width = family.layer_grid(tokens, size)
    return activation.transpose(1, 2).reshape(batch, channels, height, width)


def _sum(output: torch.Tensor) -> torch.Tensor:
    return output.sum()


def _guidance_energy(output: torch.Tensor) -> torch.Tensor:
    # a v-predicting denoiser gives v_c - v_u = (eps_c - eps_u) / sqrt(alpha_bar): the same maps after min-max
    unconditional, conditional = output  # (C, h, w) each
    return 0.5 * (conditional - unconditional).pow(2).sum()


# What DF-CAM explains, from the raw denoiser output of one step. "sum" is the paper's: the sum
# of the output over both guidance halves, a target with no preferred sign (the model may draw a region
# by pushing it up or down), so Grad-CAM's ReLU keeps whatever pushes it up, whatever is drawn there.
# "guidance" is 1/2 ||eps_c - eps_u||^2, how much the prompt changes the prediction (the term classifier-
# free guidance scales): like a classifier's class score, it grows with the evidence for the prompt,
# and negating the output leaves it unchanged (why it is the default: docs/evaluation.md, "What the
# gradient methods explain").
TARGETS = {"guidance": _guidance_energy, "sum": _sum}


def run_halves(tensor: torch.Tensor, inputs: StepInputs) -> torch.Tensor:
    """(halves, ...) -> (...) as the run combined its prediction: ``u + w (c - u)`` when guided, else the
    conditional half alone (the last row; an unguided run's only one unless the target added the other)."""
    return combine_guidance(tensor.float(), inputs.guidance, halves=2)[0] if inputs.guided else tensor[-1].float()


# How a layer's gradient weighs its activation, from the layer's gradient G (C, h, w). "layercam" (Jiang
# et al., 2021), the default: the positive part of the gradient at each pixel, so a pixel counts where
# raising its activation raises the target. "hirescam" (Draelos & Carin, 2020): the gradient at each
# pixel, gradient x activation. "grad-cam" (the paper's): one weight per channel, the gradient's
# mean over space, which a small or off-centre shape barely moves (scripts/meaning_checks.py).
WEIGHTINGS = {
    "layercam": lambda gradient: gradient.clamp(min=0),
    "hirescam": lambda gradient: gradient,
    "grad-cam": lambda gradient: gradient.mean(dim=(1, 2), keepdim=True),
}

# How the per-layer maps add up. "target" (default): each layer's map stays in the target's units
# (gradient x activation), a coarse layer's pixel shared among the latent pixels it covers, so a layer
# counts by how much of the target it carries. "min-max" (the paper's): each layer's map
# min-max normalised first, so a layer whose map is noise weighs as much as the one that draws the shape.
LAYER_SCALES = ("target", "min-max")


def layer_map(activation: torch.Tensor, gradient: torch.Tensor, size: tuple[int, int], rectify: str, weighting: str) -> torch.Tensor:
    """One layer's map in the target's units: combined A and G (C, h, w) -> rectify(sum_c W_c A_c), W
    from ``WEIGHTINGS``, ``rectify`` from ``RECTIFIERS`` (|.| or the paper's ReLU). Upsampled bilinearly
    to ``size`` (H_lat, W_lat) and divided by the upsampling's area factor, so a coarse layer's pixel is
    shared among the latent pixels it covers; float32 tensor (H_lat, W_lat)."""
    cam = RECTIFIERS[rectify]((WEIGHTINGS[weighting](gradient) * activation).sum(0))  # (h, w)
    area_factor = size[0] * size[1] / cam.numel()
    return F.interpolate(cam[None, None], size=size, mode="bilinear", align_corners=False)[0, 0].detach() / area_factor


@dataclass(kw_only=True)
class DFCam(GradientMethod):
    """DF-CAM saliency of one step (docs/methods.md, DF-CAM), with every layer's own map.

    Args:
        layers: module paths to use (default: all of ``cam_layers(model)``); the summed map uses these.
        target: "guidance" (default), how much the prompt changes the prediction, 1/2 ||eps_c - eps_u||^2,
            or "sum", the paper's sum of the denoiser output (see ``TARGETS``). An unguided run (guidance
            <= 1, or any run of a guidance-distilled family such as FLUX.1) gets its unconditional half
            computed for "guidance"; A and G are then the conditional half's, the run's own prediction.
        weighting: "layercam" (default: each pixel weighed by its gradient's positive part), "hirescam"
            (by its gradient) or "grad-cam" (the paper's: each channel by its mean gradient); see
            ``WEIGHTINGS``.
        layer_scale: "target" (default: the layers add up in the target's units, each by how much of it
            it carries) or "min-max" (the paper's: each layer's map min-max normalised before the sum);
            see ``LAYER_SCALES`` (why the defaults: docs/evaluation.md, "How DF-CAM weighs and adds
            its layers"); the paper's rules are target="sum", weighting="grad-cam", layer_scale="min-max".
        rectify: "relu" (default, the paper's) or "abs", applied to each layer's weighted sum; "abs"
            keeps what lowers the target too (see ``base.RECTIFIERS``).
    Returns (from ``explain``):
        ``Explanation`` with ``saliency`` (H_lat, W_lat) = min-max of the sum of the per-layer maps,
        ``per_layer`` {path: (H_lat, W_lat)} each min-max normalised, ``layer_shares`` {path: each
        layer's share of the sum, summing to 1}, ``denoiser_calls`` = 1.
    """

    layers: tuple[str, ...] | None = None
    # what the Saliency tab shows: one plain sentence per option (the maths: docs/methods.md, DF-CAM)
    target: str = option("guidance", "What the map explains", "How much the prompt changes the prediction (guidance, "
                         "recommended), or the prediction as a whole (sum, the paper's).", choices=tuple(TARGETS))
    weighting: str = option("layercam", "How layers are read", "Each spot by its own gradient (layercam, recommended; "
                            "hirescam keeps its sign), or each channel by its average gradient (grad-cam, the paper's), "
                            "which a small shape barely moves.", choices=tuple(WEIGHTINGS))
    layer_scale: str = option("target", "How layers add up", "Each layer by how much of the explained change it carries "
                              "(target, recommended), or every layer stretched to the same range first (min-max, the "
                              "paper's).", choices=LAYER_SCALES)
    rectify: str = option("relu", "What each layer's map keeps", "Where the layer pushes the explained quantity up (relu, "
                          "the paper's), or where it pushes it either way (abs).", choices=tuple(RECTIFIERS))
    name = "df-cam"
    label = "DF-CAM"

    def _check_options(self) -> None:
        super()._check_options()
        check_choice("target", self.target, tuple(TARGETS))
        check_choice("weighting", self.weighting, tuple(WEIGHTINGS))
        check_choice("layer_scale", self.layer_scale, LAYER_SCALES)
        if self.layers is not None and (isinstance(self.layers, str) or not all(isinstance(x, str) for x in self.layers)):
            raise ValueError(f"layers must be a list of module paths (see cam_layers(model)), got {self.layers!r}.")

    def _explain(self, model, run, step):
        denoiser = model.denoiser
        known = cam_layers(model)
        names = list(self.layers) if self.layers is not None else known
        unknown = [name for name in names if name not in set(known)]
        if unknown or not names:
            raise ValueError(f"layers must be paths from cam_layers(model); unknown or empty: {unknown or names}.")
        inputs = step_inputs(model, run, step)
        conditioning = inputs.conditioning
        if self.target == "guidance" and not inputs.guided:  # the target needs the unconditional half too
            conditioning = model.encode(run.settings.prompt, run.settings.negative_prompt, guided=True, guidance=inputs.guidance)
        size = tuple(inputs.latents.shape[-2:])
        activations: dict[str, torch.Tensor] = {}
        thread = threading.get_ident()  # other threads' runs on the same denoiser pass by untouched

        def keep(name):
            def hook(module, args, output):
                if threading.get_ident() == thread:
                    activations[name] = model.family.explained_output(output)

            return hook

        handles = [denoiser.get_submodule(name).register_forward_hook(keep(name)) for name in names]
        try:
            with torch.enable_grad():
                latents = inputs.latents.detach().requires_grad_(True)  # a leaf, so gradients exist even for frozen weights
                target = TARGETS[self.target](raw_prediction(model, inputs, latents, conditioning))
                gradients = torch.autograd.grad(target, [activations[name] for name in names])
        finally:
            for handle in handles:
                handle.remove()

        def as_map(tensor):
            return run_halves(feature_map(tensor, model.family, size), inputs)

        raw = {
            name: layer_map(as_map(activations[name].detach()), as_map(gradient), size, self.rectify, self.weighting).cpu().numpy()
            for name, gradient in zip(names, gradients)
        }
        per_layer = {name: normalise(layer) for name, layer in raw.items()}
        summed = raw if self.layer_scale == "target" else per_layer
        total = np.sum(list(summed.values()), axis=0)
        mass = max(float(total.sum()), np.finfo(np.float32).tiny)
        shares = {name: float(layer.sum()) / mass for name, layer in summed.items()}
        return self._result(run, step, total, per_layer=per_layer, layer_shares=shares, denoiser_calls=1)
