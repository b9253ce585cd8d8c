"""CLIP's text side, shared by the families that use a CLIP text encoder: its byte-level BPE
joined back into words, and its (causal) self-attention redone explicitly for token relevance."""

from __future__ import annotations

import torch

from ..tokens import PromptTokens, Word

_WORD_END = "</w>"
TOKENS = 77  # CLIP's sequence length: every prompt is padded to it


def bytes_to_unicode() -> dict[int, str]:
    """CLIP's reversible table from bytes to printable characters (its BPE works on these)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars)))


_UNICODE_TO_BYTE = {char: byte for byte, char in bytes_to_unicode().items()}


def pieces_to_text(pieces: list[str]) -> str:
    """Readable text of BPE pieces: word ends become spaces, byte characters become UTF-8 again."""
    data = bytearray()
    for piece in pieces:
        word_ends = piece.endswith(_WORD_END)
        body = piece[: -len(_WORD_END)] if word_ends else piece
        data += bytes(_UNICODE_TO_BYTE.get(char, ord("?")) for char in body)
        if word_ends:
            data += b" "
    return data.decode("utf-8", errors="replace").strip()


def tokenize(tokenizer, prompt: str) -> PromptTokens:
    """Tokenise ``prompt`` as the pipeline does, and group the BPE pieces into words."""
    max_length = tokenizer.model_max_length
    ids = tokenizer(prompt, padding="max_length", max_length=max_length, truncation=True).input_ids
    full = tokenizer(prompt, truncation=False, verbose=False).input_ids
    pieces = tokenizer.convert_ids_to_tokens(ids)
    end_position = ids.index(tokenizer.eos_token_id, 1)
    words = _join_pieces(pieces[1:end_position], offset=1)
    truncated = ""
    if len(full) > max_length:
        cut_pieces = tokenizer.convert_ids_to_tokens(full[max_length - 1 : -1])
        truncated = pieces_to_text(cut_pieces)
    return PromptTokens(
        words=tuple(words),
        ids=tuple(ids),
        start_position=0,
        end_position=end_position,
        max_length=max_length,
        truncated=truncated,
    )


def _join_pieces(pieces: list[str], offset: int) -> list[Word]:
    """Join BPE pieces into words: a word ends at a piece ending in ``</w>``."""
    words, current, positions = [], [], []
    for position, piece in enumerate(pieces, start=offset):
        current.append(piece)
        positions.append(position)
        if piece.endswith(_WORD_END):
            words.append(Word(pieces_to_text(current), tuple(positions), tuple(current)))
            current, positions = [], []
    if current:  # a word cut by truncation has no </w> piece
        words.append(Word(pieces_to_text(current), tuple(positions), tuple(current)))
    return words


def whole_words(tokenizer) -> set[str]:
    """The words the tokenizer knows as one token (a piece ending a word)."""
    return {token.removesuffix(_WORD_END) for token in tokenizer.get_vocab() if token.endswith(_WORD_END)}


def text_attention_modules(text_encoder) -> list[torch.nn.Module]:
    """The text encoder's self-attention modules in forward order (found by their projections)."""
    return [m for _, m in text_encoder.named_modules() if all(hasattr(m, a) for a in ("q_proj", "k_proj", "v_proj", "out_proj"))]


def text_attention(module, hidden_states, attention_mask) -> tuple[torch.Tensor, torch.Tensor]:
    """CLIP attention with an explicit (causal) softmax: (its output, its probabilities (B, heads, L, L))."""
    batch, length, _ = hidden_states.shape
    heads, dim = module.num_heads, module.head_dim

    def split(x):  # (batch, L, heads * dim) -> (batch, heads, L, dim)
        return x.view(batch, length, heads, dim).transpose(1, 2)

    query, key, value = (split(projection(hidden_states)) for projection in (module.q_proj, module.k_proj, module.v_proj))
    scores = torch.matmul(query, key.transpose(-1, -2)) * module.scale  # (batch, heads, L, L)
    if attention_mask is not None:
        scores = scores + attention_mask
    else:  # CLIP's text attention is causal
        future = torch.ones(length, length, dtype=torch.bool, device=scores.device).triu(1)
        scores = scores.masked_fill(future, float("-inf"))
    probs = scores.softmax(dim=-1, dtype=torch.float32).to(query.dtype)
    output = torch.matmul(probs, value).transpose(1, 2).reshape(batch, length, heads * dim)
    return module.out_proj(output), probs
