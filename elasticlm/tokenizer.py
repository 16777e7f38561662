"""Tokenizers: the one shipped in a model directory, or a byte-level one for fresh models.

Uses the `tokenizers` library; files are written so that transformers' AutoTokenizer reads
them too (``tokenizer.json`` + ``tokenizer_config.json``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from .errors import CheckpointError

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>")  # ids 0, 1, 2: NemotronH's pad / bos / eos defaults


def byte_level_tokenizer() -> Tokenizer:
    """A tokenizer with one token per byte (plus pad/bos/eos at ids 0-2): 259 ids, no training.

    Any UTF-8 text round-trips; a trained BPE (a later issue) replaces it for real data.
    """
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    return tok


def save_tokenizer(tok: Tokenizer, directory: str | os.PathLike) -> None:
    directory = Path(directory)
    tok.save(str(directory / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "pad_token": SPECIAL_TOKENS[0],
              "bos_token": SPECIAL_TOKENS[1], "eos_token": SPECIAL_TOKENS[2]}
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def load_tokenizer(directory: str | os.PathLike) -> Tokenizer:
    file = Path(directory) / "tokenizer.json"
    if not file.is_file():
        raise CheckpointError(f"{directory} has no tokenizer.json; pass token ids with --prompt-ids instead")
    try:
        return Tokenizer.from_file(str(file))
    except Exception as exc:  # the Rust side raises a bare Exception on malformed files
        raise CheckpointError(f"{file} could not be read ({str(exc).splitlines()[0]})") from None
