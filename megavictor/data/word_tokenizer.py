"""A small word-level HF tokenizer built from a corpus: for data sets without an LLM tokenizer (`prep`) and for
random-weight models that need one (`bench serve`, tests)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}


def build_word_tokenizer(texts: Iterable[str], out: Path, max_vocab: int) -> PreTrainedTokenizerFast:
    """Word-level vocab (special tokens first, then words sorted, so it is deterministic), saved to `out`.

    Words and punctuation runs are split like `\\w+|[^\\w\\s]+`; `<s>` is prepended like LLaMA's tokenizer does.
    """
    pre = pre_tokenizers.Whitespace()
    specials = list(SPECIAL_TOKENS.values())
    words = sorted({w for text in texts for piece in text.split(SPECIAL_TOKENS["eos_token"])
                    for w, _ in pre.pre_tokenize_str(piece)} - set(specials))
    vocab = {token: i for i, token in enumerate(specials + words)}
    if len(vocab) > max_vocab:
        raise ValueError(f"the corpus needs {len(vocab)} tokens, more than the vocab limit {max_vocab}")
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=SPECIAL_TOKENS["unk_token"]))
    tok.pre_tokenizer = pre
    tok.decoder = decoders.WordPiece()  # joins words with spaces and drops the space before punctuation
    tok.add_special_tokens(specials)
    bos = SPECIAL_TOKENS["bos_token"]
    tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, vocab[bos])])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIAL_TOKENS)
    fast.save_pretrained(str(out))
    return fast
