"""Cross- and joint-attention capture through diffusers attention processors (docs/methods.md,
Cross-attention maps; Stable Diffusion 3; FLUX.1).

``with capture_attention(model) as sites:`` swaps in processors that can record on the attention
sites the model's family names, and restores the originals on exit, also after an exception. The
processors themselves hold no run state: a run passes its own ``AttentionRecorder`` to the
denoiser call (``family.predict(..., recorder=r)``), so two runs in two threads on one pipeline
never see each other's maps. Without a recorder the processors run the original code.
Self-attention keeps its fused kernel; only the sites compute their probabilities explicitly: a
UNet's cross-attention (its key length is the text length: small), an MM-DiT's joint attention
over [image; text] tokens, or FLUX.1's attention over [text; image] tokens (double- and
single-stream blocks). One processor class per attention kind.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_flux import FluxAttention

from .recorder import AttentionRecorder  # noqa: F401 (the recorder the processors feed, importable from here too)


def classic_attention(attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, on_probs=None):
    """diffusers' classic ``AttnProcessor`` maths (explicit softmax(QK^T)) for self- or cross-attention.

    ``on_probs(probs)`` sees the probabilities, shape (batch * heads, N, N or L), before they
    weight the values: the one place where capture and relevance read attention.
    """
    cross = encoder_hidden_states is not None
    residual = hidden_states
    if attn.spatial_norm is not None:
        hidden_states = attn.spatial_norm(hidden_states, temb)
    input_ndim = hidden_states.ndim
    if input_ndim == 4:
        batch_size, channel, height, width = hidden_states.shape
        hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
    context = encoder_hidden_states if cross else hidden_states
    attention_mask = attn.prepare_attention_mask(attention_mask, context.shape[1], context.shape[0])
    if attn.group_norm is not None:
        hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
    query = attn.to_q(hidden_states)
    if cross and attn.norm_cross:
        context = attn.norm_encoder_hidden_states(context)
    elif not cross:
        context = hidden_states
    key, value = attn.to_k(context), attn.to_v(context)
    # (batch, tokens, heads * dim) -> (batch * heads, tokens, dim)
    query, key, value = (attn.head_to_batch_dim(x) for x in (query, key, value))
    probs = attn.get_attention_scores(query, key, attention_mask)  # (batch * heads, N, N or L)
    if on_probs is not None:
        on_probs(probs)
    hidden_states = attn.batch_to_head_dim(torch.bmm(probs, value))
    hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))  # linear projection, dropout
    if input_ndim == 4:
        hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
    if attn.residual_connection:
        hidden_states = hidden_states + residual
    return hidden_states / attn.rescale_output_factor


class CrossAttentionRecordingProcessor:
    """Runs the original processor, or, given a recorder, computes and records the probabilities."""

    def __init__(self, layer: str, original):
        self.layer = layer
        self.original = original

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, recorder=None, **kwargs):
        if recorder is None or encoder_hidden_states is None:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)
        return classic_attention(
            attn, hidden_states, encoder_hidden_states, attention_mask, temb,
            on_probs=lambda probs: recorder.add(self.layer, probs, attn.heads),
        )


def joint_attention(attn, hidden_states, encoder_hidden_states=None, on_probs=None):
    """diffusers' ``JointAttnProcessor2_0`` maths with an explicit softmax(QK^T / sqrt(d)): SD 3's
    attention over [image tokens; text tokens] (or over the image tokens alone, as SD 3.5's second
    attention of a block). Returns what that processor returns: (image output, text output) when
    there is text, else the image output.

    ``on_probs(probs)`` sees the probabilities in float32, shape (batch * heads, N + L, N + L) with
    the N image tokens first (N x N without text), before they weight the values.
    """
    batch, image_tokens, _ = hidden_states.shape
    heads = attn.heads

    def split(x):  # (batch, tokens, heads * dim) -> (batch, heads, tokens, dim)
        return x.view(batch, x.shape[1], heads, -1).transpose(1, 2)

    query, key, value = (split(projection(hidden_states)) for projection in (attn.to_q, attn.to_k, attn.to_v))
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    if encoder_hidden_states is not None:
        text_query, text_key, text_value = (
            split(projection(encoder_hidden_states)) for projection in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj)
        )
        if attn.norm_added_q is not None:
            text_query = attn.norm_added_q(text_query)
        if attn.norm_added_k is not None:
            text_key = attn.norm_added_k(text_key)
        query, key, value = (torch.cat(pair, dim=2) for pair in ((query, text_query), (key, text_key), (value, text_value)))
    scale = query.shape[-1] ** -0.5  # scaled_dot_product_attention's default
    scores = torch.matmul(query * scale, key.transpose(-1, -2)).flatten(0, 1)  # (batch * heads, N + L, N + L)
    probs = scores.softmax(dim=-1, dtype=torch.float32)
    if on_probs is not None:
        on_probs(probs)  # the tensor that weighs the values, so gradients reach it
    weights = probs.view(batch, heads, *probs.shape[1:]).to(value.dtype)
    hidden_states = torch.matmul(weights, value).transpose(1, 2).reshape(batch, -1, heads * value.shape[-1])
    if encoder_hidden_states is None:
        return attn.to_out[1](attn.to_out[0](hidden_states))
    hidden_states, text_states = hidden_states[:, :image_tokens], hidden_states[:, image_tokens:]
    if not attn.context_pre_only:
        text_states = attn.to_add_out(text_states)
    return attn.to_out[1](attn.to_out[0](hidden_states)), text_states


class JointAttentionRecordingProcessor:
    """For joint attention (an MM-DiT block, ``attn.add_q_proj`` present): runs the original processor,
    or, given a recorder, computes the attention explicitly and records the image-to-text block."""

    def __init__(self, layer: str, original):
        self.layer = layer
        self.original = original

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, recorder=None, **kwargs):
        if recorder is None or encoder_hidden_states is None:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, **kwargs)
        image_tokens = hidden_states.shape[1]
        return joint_attention(
            attn, hidden_states, encoder_hidden_states,
            on_probs=lambda probs: recorder.add_joint(self.layer, probs, attn.heads, image_tokens),
        )


def flux_attention(attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None,
                   text_tokens: int | None = None, on_probs=None):
    """diffusers' ``FluxAttnProcessor`` maths with an explicit softmax(QK^T / sqrt(d)): FLUX.1's attention
    over [text tokens; image tokens], text first. A double-stream block passes the image tokens as
    ``hidden_states`` (B, N, C) and the text as ``encoder_hidden_states`` (B, L, C) and gets (image
    output, text output); a single-stream block passes both concatenated, [text; image], as
    ``hidden_states`` (B, L + N, C) with ``text_tokens`` = L, and gets the attention output (B, L + N,
    C) in that order. Rotary embeddings apply as the processor applies them, in FLUX's token order.

    ``on_probs(probs)`` sees the probabilities in float32, shape (batch * heads, N + L, N + L) with the
    N image tokens FIRST, as SD 3's joint attention gives them (the tokens are reordered before the
    softmax, and the output back after it: attention does not depend on the order of its tokens). They
    are the tensor that weighs the values, so gradients reach it.
    """
    if attention_mask is not None:
        raise ValueError("FLUX.1's attention is called without a mask; this explicit attention takes none.")
    double_stream = encoder_hidden_states is not None
    if getattr(attn, "fused_projections", False):
        query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
    else:
        query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
    # (batch, tokens, heads * dim) -> (batch, tokens, heads, dim), as the processor splits them
    query, key, value = (x.unflatten(-1, (-1, attn.head_dim)) for x in (query, key, value))
    query, key = attn.norm_q(query), attn.norm_k(key)
    if double_stream:
        if getattr(attn, "fused_projections", False):
            text_query, text_key, text_value = attn.to_added_qkv(encoder_hidden_states).chunk(3, dim=-1)
        else:
            text_query, text_key, text_value = (
                projection(encoder_hidden_states) for projection in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj)
            )
        text_query, text_key, text_value = (x.unflatten(-1, (-1, attn.head_dim)) for x in (text_query, text_key, text_value))
        text_query, text_key = attn.norm_added_q(text_query), attn.norm_added_k(text_key)
        query, key, value = (torch.cat(pair, dim=1) for pair in ((text_query, query), (text_key, key), (text_value, value)))
        text_tokens = encoder_hidden_states.shape[1]
    elif text_tokens is None:
        raise ValueError("A single-stream FLUX attention call needs its text length (text_tokens).")
    if image_rotary_emb is not None:  # per position, in FLUX's order [text; image]
        query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
        key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
    # [text; image] -> [image; text], then (batch, heads, tokens, dim)
    query, key, value = (torch.roll(x, shifts=-text_tokens, dims=1).transpose(1, 2) for x in (query, key, value))
    batch, heads, total, _ = query.shape
    scale = query.shape[-1] ** -0.5  # scaled_dot_product_attention's default
    scores = torch.matmul(query * scale, key.transpose(-1, -2)).flatten(0, 1)  # (batch * heads, N + L, N + L)
    probs = scores.softmax(dim=-1, dtype=torch.float32)
    if on_probs is not None:
        on_probs(probs)
    weights = probs.view(batch, heads, total, total).to(value.dtype)
    output = torch.matmul(weights, value).transpose(1, 2).flatten(2, 3)  # (batch, N + L, heads * dim)
    output = torch.roll(output, shifts=text_tokens, dims=1).to(query.dtype)  # back to [text; image]
    if not double_stream:
        return output
    text_output, image_output = output[:, :text_tokens], output[:, text_tokens:]
    return attn.to_out[1](attn.to_out[0](image_output.contiguous())), attn.to_add_out(text_output.contiguous())


class FluxAttentionRecordingProcessor:
    """For FLUX.1's attention (``FluxAttention``, double- and single-stream blocks): runs the original
    processor, or, given a recorder, computes the attention explicitly and records the image-to-text
    block. A single-stream call needs the text length, ``text_tokens``, passed beside the recorder
    (``Flux.predict`` passes both)."""

    def __init__(self, layer: str, original):
        self.layer = layer
        self.original = original

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None,
                 recorder=None, text_tokens=None):
        if recorder is None:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        if encoder_hidden_states is not None:
            image_tokens = hidden_states.shape[1]
        elif text_tokens is None:
            raise ValueError("A single-stream FLUX attention records only with the text length (text_tokens) "
                             "beside the recorder.")
        else:
            image_tokens = hidden_states.shape[1] - text_tokens
        return flux_attention(
            attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb, text_tokens,
            on_probs=lambda probs: recorder.add_joint(self.layer, probs, attn.heads, image_tokens),
        )


def recording_processor(layer: str, module, original):
    """The recording processor for one site: FLUX.1's attention (``FluxAttention``), joint attention where
    the module projects the text itself (``add_q_proj``), else cross-attention."""
    if isinstance(module, FluxAttention):
        return FluxAttentionRecordingProcessor(layer, original)
    if getattr(module, "add_q_proj", None) is not None:
        return JointAttentionRecordingProcessor(layer, original)
    return CrossAttentionRecordingProcessor(layer, original)


class RecorderPassthrough:
    """Wraps a processor that records nothing (self-attention) so it accepts and ignores ``recorder``:
    fused kernel kept."""

    def __init__(self, original):
        self.original = original

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, recorder=None, **kwargs):
        return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)


@dataclass
class _Installation:
    originals: dict
    users: int


# Which denoisers have our processors installed, and by how many open `capture_attention` blocks.
# Only installation bookkeeping lives here; captured maps live in each run's recorder.
_INSTALLED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_INSTALL_LOCK = threading.Lock()


@contextmanager
def capture_attention(model) -> Iterator[list[str]]:
    """Install recording processors on a model's denoiser for the duration of the block; yields the
    cross-attention sites (processor keys) its family names.

    Nested or concurrent blocks on one denoiser share one installation; the last to leave restores
    the original processors, whatever happened inside.

    Example:
        >>> with capture_attention(model) as sites:
        ...     model.family.predict(pipe, x, t, conditioning, recorder=recorder)
    """
    denoiser = model.denoiser
    layers = model.family.cross_attention_sites(denoiser)
    if not layers:
        raise ValueError("This denoiser has no cross- or joint-attention layers to capture.")
    with _INSTALL_LOCK:
        installation = _INSTALLED.get(denoiser)
        if installation is None:
            originals = denoiser.attn_processors
            denoiser.set_attn_processor(
                {
                    key: (
                        recording_processor(key, denoiser.get_submodule(key.removesuffix(".processor")), proc)
                        if key in layers else RecorderPassthrough(proc)
                    )
                    for key, proc in originals.items()
                }
            )
            installation = _INSTALLED[denoiser] = _Installation(originals=originals, users=0)
        installation.users += 1
    try:
        yield layers
    finally:
        with _INSTALL_LOCK:
            installation.users -= 1
            if installation.users == 0:
                denoiser.set_attn_processor(installation.originals)
                del _INSTALLED[denoiser]
