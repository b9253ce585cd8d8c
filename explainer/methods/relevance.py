"""Token relevance: which prompt word the denoiser draws at step k (docs/methods.md, Token relevance; Chefer et al., ICCV 2021).

One forward and one backward pass per step. The attention probabilities of every self-, cross- and
joint-attention layer of the denoiser, and of every text-encoder layer, are computed explicitly
with gradients; as each one's gradient G arrives in the backward pass, a tensor hook keeps only
``Abar = mean over heads of rectify(G * A)`` of the conditional prompt (|G * A| by default, the
paper's ``clamp(G * A, min=0)`` with ``rectify="relu"``) and lets autograd free the rest. The
bi-modal rules then run in forward order on the finest latent grid (a UNet), or the single-stream
rule on the joint tokens of an MM-DiT (docs/methods.md, Stable Diffusion 3).

The explicit attention comes from forward hooks that act only on calls from the explaining
thread, not from swapped processors (why, and what the method holds in memory: docs/design.md,
"Token relevance: hooks, not processors").

Example:
    >>> explanation = TokenRelevance(word="circle").explain(model, run, step=15)
    >>> explanation.token_scores  # {'0:a': 0.0, '1:red': 0.4, '2:circle': 1.0, ...}
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..config import LIMITS
from ..families.base import call_argument
from ..maps import normalise
from ..models import OutOfDeviceMemory, memory_budget
from ..replay import raw_prediction, step_inputs
from ..run import RunData
from .base import RECTIFIERS, GradientMethod


class RelevanceState:
    """One explain call's Abar matrices, in forward order; nothing is shared between calls.

    ``latent_size``: the explained step's latent grid (H_lat, W_lat), which a family whose attention
    calls do not carry their image token count needs (FLUX.1's single-stream blocks; see
    ``Family.hooked_attention``); None where the family needs none. ``budget``: the bytes of attention
    probabilities the forward pass may keep for the backward pass before it stops with
    ``OutOfDeviceMemory`` (None: no limit).
    """

    def __init__(self, conditional_index: int, batch_size: int, rectify: str, latent_size: tuple[int, int] | None = None,
                 budget: int | None = None):
        self.budget, self.kept_bytes = budget, 0
        self.conditional_index = conditional_index
        self.batch_size = batch_size
        self.rectify = RECTIFIERS[rectify]
        self.latent_size = latent_size
        # {"kind": "self" | "cross" | "joint", "tokens": N_l image tokens, "abar": (rows, keys)}
        self.denoiser_layers: list[dict] = []
        self.text_layers: list[dict] = []  # {"abar": (L, L)}
        self.text_leaf: torch.Tensor | None = None

    def _keep(self, entry: dict, probs: torch.Tensor, shape: tuple[int, ...], index: int) -> None:
        """Register a hook on ``probs`` that turns its gradient G into Abar; ``shape`` is (batch, heads, rows, keys)."""
        self.kept_bytes += probs.numel() * probs.element_size()  # autograd keeps them until the backward pass
        if self.budget is not None and self.kept_bytes > self.budget:
            raise OutOfDeviceMemory(
                f"Token relevance keeps every attention map of the step for one backward pass, and at this size they "
                f"take more than {self.budget / 2**30:.1f} GiB, {LIMITS.relevance_memory_share:.0%} of the GPU memory "
                f"free. {TokenRelevance.memory_advice}")
        values = probs.detach().view(shape)[index]  # (heads, rows, keys)

        def on_gradient(gradient):
            gradient = gradient.view(shape)[index]
            entry["abar"] = self.rectify(gradient.float() * values.float()).mean(0)  # (rows, keys)

        probs.register_hook(on_gradient)

    def add_denoiser(self, probs: torch.Tensor, heads: int, kind: str, image_tokens: int | None = None) -> None:
        """Keep a denoiser attention's probabilities (batch * heads, rows, keys): ``kind`` "self" (N, N),
        "cross" (N, L) or "joint" (N + L, N + L, the ``image_tokens`` N first)."""
        _, rows, keys = probs.shape
        entry = {"kind": kind, "tokens": rows if image_tokens is None else image_tokens, "abar": None}
        self.denoiser_layers.append(entry)
        self._keep(entry, probs, (self.batch_size, heads, rows, keys), self.conditional_index)

    def add_text(self, probs: torch.Tensor) -> None:
        entry = {"abar": None}
        self.text_layers.append(entry)
        self._keep(entry, probs, tuple(probs.shape), 0)  # (1, heads, L, L): the conditional prompt alone

    def attend(self, family, attn, args: tuple, kwargs: dict):
        """One call of the denoiser's attention module ``attn`` (its ``args`` and ``kwargs``) redone with the
        family's explicit softmax (``Family.hooked_attention``), keeping its probabilities for the backward
        pass; returns what the module returns."""

        def keep(probs, kind, image_tokens):
            self.add_denoiser(probs, attn.heads, kind, image_tokens if kind == "joint" else None)

        return family.hooked_attention(attn, args, kwargs, self.latent_size, keep)


def _text_attention(model, module, args: tuple, kwargs: dict, state: RelevanceState, first: bool):
    """The family's text attention redone explicitly (``Family.hooked_text_attention``); its probabilities
    go to ``state``; returns what the module returns."""
    hidden_states = call_argument(args, kwargs, 0, "hidden_states")
    if first:  # a leaf, so the graph reaches every attention map even when the weights are frozen
        hidden_states = hidden_states.detach().requires_grad_(True)
        state.text_leaf = hidden_states
    output, probs = model.family.hooked_text_attention(module, args, kwargs, hidden_states)
    state.add_text(probs)
    return output


@contextmanager
def relevance_hooks(model, state: RelevanceState):
    """Forward hooks that redo every denoiser and text-encoder attention explicitly, for this thread only.

    Inside the block, an attention module called from the thread that entered it returns the
    output of ``state.attend`` (denoiser) or the family's explicit text attention, computed
    again from the same inputs after the installed processor ran, so gradients reach the
    probabilities. Calls from other threads (other users' runs on the same pipeline) are left
    alone, and no processor is swapped. The hooks are removed on exit, whatever happened.
    """
    thread = threading.get_ident()

    def denoiser_hook(module, args, kwargs, output):
        if threading.get_ident() != thread:
            return None
        return state.attend(model.family, module, args, kwargs)

    def text_hook(first: bool):
        def hook(module, args, kwargs, output):
            if threading.get_ident() != thread:
                return None
            return _text_attention(model, module, args, kwargs, state, first)

        return hook

    family = model.family
    handles = [m.register_forward_hook(denoiser_hook, with_kwargs=True) for m in family.attention_modules(model.denoiser)]
    handles += [
        m.register_forward_hook(text_hook(i == 0), with_kwargs=True) for i, m in enumerate(family.text_attention_modules(model.pipe))
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def resize_self(abar: torch.Tensor, grid: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
    """(N_l, N_l) -> (N, N) as ``P Abar P^T * N_l / N`` with P the bilinear upsampling matrix (our choice):
    queries take their coarse pixel's row, and each row keeps its sum."""
    (h, w), (height, width) = grid, size
    if (h, w) == (height, width):
        return abar
    keys = F.interpolate(abar.reshape(h * w, 1, h, w), size=size, mode="bilinear", align_corners=False)  # (N_l, 1, H, W)
    keys = keys.reshape(h * w, height * width).T  # (N, N_l): rows are fine keys
    both = F.interpolate(keys.reshape(-1, 1, h, w), size=size, mode="bilinear", align_corners=False)  # (N, 1, H, W)
    return both.reshape(height * width, height * width).T * (h * w) / (height * width)  # (N queries, N keys)


def resize_cross(abar: torch.Tensor, grid: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
    """(N_l, L) -> (N, L) by bilinear upsampling of the image-token axis."""
    (h, w), (height, width) = grid, size
    if (h, w) == (height, width):
        return abar
    maps = abar.T.reshape(-1, 1, h, w)  # (L, 1, h, w)
    return F.interpolate(maps, size=size, mode="bilinear", align_corners=False).reshape(-1, height * width).T


def without_identity_normalised(relevance: torch.Tensor) -> torch.Tensor:
    """norm(R) (docs/methods.md, Token relevance): remove the identity, divide each row by its sum (zero rows stay 0), add it back."""
    eye = torch.eye(relevance.shape[0], dtype=relevance.dtype, device=relevance.device)
    rest = relevance - eye
    sums = rest.sum(dim=-1, keepdim=True)
    return torch.where(sums != 0, rest / torch.where(sums != 0, sums, 1), 0) + eye


def relevance_matrices(state: RelevanceState, size: tuple[int, int], family) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply the bi-modal rules in forward order; returns R_iq (N, L) and R_qq (L, L)."""
    length = state.text_layers[0]["abar"].shape[0]
    device = state.text_layers[0]["abar"].device
    r_qq = torch.eye(length, device=device)
    for layer in state.text_layers:
        if layer["abar"] is not None:  # None: no gradient reached the layer (its output was not used)
            r_qq = r_qq + layer["abar"] @ r_qq
    r_qq_norm = without_identity_normalised(r_qq)
    if any(layer["kind"] == "joint" for layer in state.denoiser_layers):
        return joint_relevance(state.denoiser_layers, r_qq_norm, size, family), r_qq
    tokens = size[0] * size[1]
    r_ii = torch.eye(tokens, device=device)
    r_iq = torch.zeros(tokens, length, device=device)
    for layer in state.denoiser_layers:
        grid = family.layer_grid(layer["tokens"], size)
        if layer["kind"] == "self":
            abar = resize_self(layer["abar"], grid, size)
            r_iq = r_iq + abar @ r_iq
            r_ii = r_ii + abar @ r_ii
            r_iq = F.normalize(r_iq, p=2, dim=1)  # rows of zeros stay zero
        else:
            abar = resize_cross(layer["abar"], grid, size)
            r_iq = r_iq + without_identity_normalised(r_ii).T @ abar @ r_qq_norm
    return r_iq, r_qq


def joint_relevance(layers: list[dict], r_qq_norm: torch.Tensor, size: tuple[int, int], family) -> torch.Tensor:
    """R_iq (N, L) of an MM-DiT by the single-stream rule (*our choice*): R = I over the joint tokens
    [image; text], ``R += Ā R`` for each joint attention and ``R_I += Ā R_I`` (image rows) for an
    image-only one, in forward order. The image rows' text columns then go through the text
    encoder, ``R_I,T norm(R_qq)`` (the first text positions are the encoder's; later ones, T5's,
    are dropped), and the image axis is upsampled from the patch grid to the latent grid."""
    joint = [layer for layer in layers if layer["kind"] == "joint"]
    image_tokens, total = joint[0]["tokens"], joint[0]["abar"].shape[0]
    if any(layer["tokens"] != image_tokens for layer in layers) or any(layer["abar"].shape[0] != total for layer in joint):
        raise ValueError("The joint-attention layers do not share one token grid.")
    relevance = torch.eye(total, device=joint[0]["abar"].device)
    for layer in layers:
        if layer["kind"] == "joint":
            relevance = relevance + layer["abar"] @ relevance
        elif layer["kind"] == "self":
            image_rows = relevance[:image_tokens]
            relevance = torch.cat([image_rows + layer["abar"] @ image_rows, relevance[image_tokens:]])
        else:
            raise ValueError(f"A {layer['kind']}-attention layer has no rule beside joint attention.")
    length = r_qq_norm.shape[0]
    r_iq = relevance[:image_tokens, image_tokens : image_tokens + length] @ r_qq_norm
    return resize_cross(r_iq, family.layer_grid(image_tokens, size), size)


@dataclass(kw_only=True)
class TokenRelevance(GradientMethod):
    """Gradient-weighted attention relevance of every prompt word at one step (docs/methods.md, Token relevance).

    Args:
        word: the word whose relevance map becomes ``saliency`` (default: all words summed).
        rectify: "abs" (default; our choice) or "relu" (the paper's clamp), applied to each G * A
            before the heads are averaged; see ``base.RECTIFIERS`` (why "abs": docs/evaluation.md,
            "What the gradient methods explain").
    Returns (from ``explain``):
        ``Explanation`` with ``token_scores`` {"i:word": score in [0, 1]} (column sums of R_iq,
        pieces of a word summed, min-max across words), ``token_maps`` {"i:word": (H_lat, W_lat)},
        ``saliency`` (H_lat, W_lat) and ``denoiser_calls`` = 1.
    """

    word: str | None = None
    rectify: str = "abs"
    name = "relevance"
    label = "token relevance"
    memory_advice = "Its memory grows with the square of the picture's area: explain a run of a smaller picture."
    saliency_tab = False  # the Concepts tab's

    def _check_options(self) -> None:
        super()._check_options()
        if self.word is not None and (not isinstance(self.word, str) or not self.word.strip()):
            raise ValueError(f"word must be a word of the prompt or None, got {self.word!r}.")

    def _explain(self, model, run, step):
        words = run.tokens.words
        chosen = run.tokens.find(self.word) if self.word is not None else None  # ValueError naming the words
        if not words:
            raise ValueError("The prompt has no words to score.")
        r_iq = self.relevance(model, run, step)
        size = tuple(run.records[step - 1].latents.shape[-2:])
        columns = [r_iq[:, list(w.positions)].sum(1) for w in words]  # each (N,)
        labels = [f"{i}:{w.text}" for i, w in enumerate(words)]
        scores = normalise(np.array([float(c.sum()) for c in columns], dtype=np.float32))
        maps = {label: normalise(c.reshape(size).cpu().numpy()) for label, c in zip(labels, columns)}
        selected = columns[chosen] if chosen is not None else torch.stack(columns).sum(0)
        return self._result(
            run,
            step,
            selected.reshape(size).cpu().numpy(),
            token_scores=dict(zip(labels, map(float, scores))),
            token_maps=maps,
            denoiser_calls=1,
        )

    def relevance(self, model, run: RunData, step: int) -> torch.Tensor:
        """R_iq (N image tokens, L text positions) of ``step``, float32 on the model's device."""
        inputs = step_inputs(model, run, step)
        state = RelevanceState(inputs.conditional_index, batch_size=inputs.conditioning.halves, rectify=self.rectify,
                               latent_size=tuple(inputs.latents.shape[-2:]),
                               budget=memory_budget(model.device, LIMITS.relevance_memory_share))
        ids = torch.tensor([run.tokens.ids], device=model.device)
        with relevance_hooks(model, state), torch.enable_grad():
            conditioning = model.family.encode_ids(model.pipe, ids, inputs.conditioning)  # through the hooked text attention
            latents = inputs.latents.detach().requires_grad_(True)
            output = raw_prediction(model, inputs, latents, conditioning)
            torch.autograd.grad(output.sum(), [latents, state.text_leaf])  # the hooks keep each layer's Abar
        with torch.no_grad():
            r_iq, _ = relevance_matrices(state, tuple(inputs.latents.shape[-2:]), model.family)
        return r_iq


ATTENTION_SCORES = ("peak", "mass")  # the quick concept scores; "mass" is the paper's


def attention_scores(run: RunData, record, score: str = "peak") -> dict[str, float]:
    """The quick concept score of every word at one step, from the recorded cross-attention (it
    streams during a run; docs/methods.md, Concept scores). ``score``:

    - ``"peak"`` (default): the largest share of one spot's attention that goes to the word, relative
      to the strongest word's at that step (1: the strongest). A word spread evenly over the picture,
      as the start of a prompt or a causal encoder's summary-like last word, has a low peak.
    - ``"mass"``: the paper's, the word's attention summed over the picture, min-max normalised
      across the words.
    """
    if score not in ATTENTION_SCORES:
        raise ValueError(f"score must be one of {ATTENTION_SCORES}, got {score!r}.")
    words = run.tokens.words
    if not words:
        return {}
    maps = [record.attention[list(w.positions)].astype(np.float32).sum(0) for w in words]
    if score == "peak":
        peaks = np.array([m.max() for m in maps])
        normalised = peaks / peaks.max() if peaks.max() > 0 else np.zeros_like(peaks)
    else:
        masses = np.array([m.sum() for m in maps])
        span = masses.max() - masses.min()
        normalised = (masses - masses.min()) / span if span > 0 else np.zeros_like(masses)
    return {f"{i}:{w.text}": float(v) for i, (w, v) in enumerate(zip(words, normalised))}


def cheap_token_scores(run: RunData, step: int, score: str = "peak") -> dict[str, float]:
    """``attention_scores`` of step ``step`` (1-based)."""
    return attention_scores(run, run.records[step - 1], score)


def relevance_series(model, run: RunData, steps: list[int] | None = None, method: TokenRelevance | None = None) -> dict:
    """Chart data for the concept view: {"steps": [k...], "scores": {"i:word": [score per step]}}."""
    method = method or TokenRelevance()
    steps = list(steps) if steps is not None else list(range(1, len(run.records) + 1))
    per_step = [method.explain(model, run, k).token_scores for k in steps]
    labels = list(per_step[0]) if per_step else []
    return {"steps": steps, "scores": {label: [scores[label] for scores in per_step] for label in labels}}
