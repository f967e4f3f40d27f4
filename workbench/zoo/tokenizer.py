"""Word-level tokenizers: one token per whitespace-separated word.

Used by the zoo's tiny models so every word of the task suite is exactly one token.
Saved as a standard ``tokenizer.json`` that ``AutoTokenizer`` loads offline.
"""

from __future__ import annotations

from typing import Sequence

SPECIALS = ("<pad>", "<unk>", "<bos>")


def build_word_tokenizer(words: Sequence[str]):
    """A case-sensitive word-level ``PreTrainedTokenizerFast`` over ``words``.

    Ids 0, 1, 2 are ``<pad>``, ``<unk>``, ``<bos>``; every encoding starts with ``<bos>``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {s: i for i, s in enumerate(SPECIALS)}
    for w in words:
        if w not in vocab:
            vocab[w] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", vocab["<bos>"])]
    )
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with single spaces
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", pad_token="<pad>", unk_token="<unk>", model_max_length=1 << 20
    )
