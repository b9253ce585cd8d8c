"""A CLIP tokenizer for the closed shapes vocabulary: one token per word."""

from __future__ import annotations

import json
from pathlib import Path

from explainer.shapes.world import TOLERATED_PUNCTUATION, VOCABULARY
from explainer.families.clip import bytes_to_unicode

MODEL_MAX_LENGTH = 24  # longest caption is 16 tokens (15 words + '.'), plus start/end
START_TOKEN = "<|startoftext|>"
END_TOKEN = "<|endoftext|>"
END_OF_WORD = "</w>"


def _apply_bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """Run BPE on one word exactly like CLIP: lowest-rank pair merges first."""
    symbols = list(word[:-1]) + [word[-1] + END_OF_WORD]
    while len(symbols) > 1:
        pairs = [(symbols[i], symbols[i + 1]) for i in range(len(symbols) - 1)]
        best = min(pairs, key=lambda p: ranks.get(p, float("inf")))
        if best not in ranks:
            break
        merged, i = [], 0
        while i < len(symbols):
            if i < len(symbols) - 1 and (symbols[i], symbols[i + 1]) == best:
                merged.append(symbols[i] + symbols[i + 1])
                i += 2
            else:
                merged.append(symbols[i])
                i += 1
        symbols = merged
    return symbols


def build_vocab_and_merges(words=VOCABULARY) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Vocabulary and ordered merges such that every word becomes one token.

    Each word is first reduced with the merges built so far; merges joining
    what is left are appended after all earlier ones, so they can never fire
    before an earlier word's own merges and every word stays one token.
    """
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for word in words:
        symbols = _apply_bpe(word, ranks)
        while len(symbols) > 1:
            pair = (symbols[0], symbols[1])
            if pair not in ranks:
                ranks[pair] = len(merges)
                merges.append(pair)
            symbols = [symbols[0] + symbols[1]] + symbols[2:]
    for word in words:
        assert _apply_bpe(word, ranks) == [word + END_OF_WORD], word
    base = list(bytes_to_unicode().values())
    tokens = base + [c + END_OF_WORD for c in base]
    tokens += ["".join(pair) for pair in merges]
    tokens += [START_TOKEN, END_TOKEN]
    vocab = {token: index for index, token in enumerate(dict.fromkeys(tokens))}
    return vocab, merges


def write_tokenizer(directory: str | Path):
    """Write CLIP tokenizer files to `directory` and return the tokenizer."""
    from transformers import CLIPTokenizer

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    vocab, merges = build_vocab_and_merges()
    vocab_file = directory / "vocab.json"
    merges_file = directory / "merges.txt"
    vocab_file.write_text(json.dumps(vocab, ensure_ascii=False))
    merges_file.write_text(
        "#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n"
    )
    tokenizer = CLIPTokenizer(
        str(vocab_file),
        str(merges_file),
        bos_token=START_TOKEN,
        eos_token=END_TOKEN,
        unk_token=END_TOKEN,
        pad_token=END_TOKEN,
        model_max_length=MODEL_MAX_LENGTH,
    )
    tokenizer.save_pretrained(directory)
    special = {"bos_token": START_TOKEN, "eos_token": END_TOKEN,
               "unk_token": END_TOKEN, "pad_token": END_TOKEN}
    (directory / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    return tokenizer


def word_token_counts(tokenizer, words=VOCABULARY + TOLERATED_PUNCTUATION) -> dict[str, int]:
    """How many tokens each word becomes (without start/end tokens)."""
    return {w: len(tokenizer(w, add_special_tokens=False)["input_ids"]) for w in words}
