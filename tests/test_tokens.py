import pytest

from explainer.families.clip import pieces_to_text, tokenize


def test_words_join_their_bpe_pieces(tiny_model):
    tokens = tokenize(tiny_model.pipe.tokenizer, "a cat and a dog")
    assert tokens.word_texts == ["a", "cat", "and", "a", "dog"]
    by_text = {word.text: word for word in tokens.words}
    assert by_text["cat"].positions == (2,)  # one merged token
    assert by_text["and"].positions == (3, 4, 5)  # three BPE pieces
    assert tokens.end_position == 8 and tokens.stored_positions == 9
    assert tokens.ids[0] == tiny_model.pipe.tokenizer.bos_token_id


def test_accents_and_emoji_read_as_typed(tiny_model):
    tokens = tokenize(tiny_model.pipe.tokenizer, "café 😀")
    assert tokens.word_texts == ["café", "😀"]
    assert pieces_to_text(["ca", "f", "Ã", "©</w>"]) == "café"


def test_long_prompt_is_truncated_with_a_message(tiny_model):
    tokens = tokenize(tiny_model.pipe.tokenizer, "word " * 40)
    assert tokens.truncated.startswith("d word")
    assert "limit of 75 tokens" in tokens.truncation_message
    assert tokens.end_position == 76
    assert tokenize(tiny_model.pipe.tokenizer, "a cat").truncation_message == ""


def test_find_names_the_prompt_words(tiny_model):
    tokens = tokenize(tiny_model.pipe.tokenizer, "a red circle")
    assert tokens.find("Circle") == 2
    with pytest.raises(ValueError, match=r"'dog' is not in the prompt.*'red', 'circle'"):
        tokens.find("dog")
