"""Tokenizers: the one shipped in a model directory, or a byte-level one for fresh models.

Uses the `tokenizers` library; files are written so that transformers' AutoTokenizer reads
them too (``tokenizer.json`` + ``tokenizer_config.json``).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from .errors import CheckpointError, ConfigError

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


def batch_encoder(tok: Tokenizer) -> Callable[[list[str]], list[list[int]]]:
    """Texts → token ids, a batch at a time (the Rust tokenizer encodes a batch on several threads)."""
    return lambda texts: [e.ids for e in tok.encode_batch(texts)] if texts else []


def save_tokenizer(tok: Tokenizer, directory: str | os.PathLike) -> None:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG, indent=2) + "\n")


# No ``bos_token``: training never puts ``<s>`` in front of a document, and tools that find one
# use it as the context of the first token (lm-eval's rolling log-likelihood does) -- a token the
# model never saw there. Without it they fall back to ``</s>``, the document separator it did see.
TOKENIZER_CONFIG = {"tokenizer_class": "PreTrainedTokenizerFast", "pad_token": SPECIAL_TOKENS[0],
                    "eos_token": SPECIAL_TOKENS[2]}
_OLD_TOKENIZER_CONFIG = {**TOKENIZER_CONFIG, "bos_token": SPECIAL_TOKENS[1]}  # what elasticlm wrote before


def copy_tokenizer_config(src: Path, dst: Path) -> None:
    """Copy a tokenizer_config.json, dropping the untrained ``bos_token`` that earlier versions of
    elasticlm wrote (a user's own tokenizer config is copied unchanged)."""
    try:
        data = json.loads(src.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        data = None
    if data == _OLD_TOKENIZER_CONFIG:
        dst.write_text(json.dumps(TOKENIZER_CONFIG, indent=2) + "\n")
    else:
        shutil.copy2(src, dst)


def load_tokenizer(directory: str | os.PathLike) -> Tokenizer:
    """The ``tokenizer.json`` of a model directory (or the tokenizer a .gguf file carries)."""
    from .model.gguf_import import hf_directory

    file = hf_directory(directory) / "tokenizer.json"
    if not file.is_file():
        raise CheckpointError(f"{directory} has no tokenizer.json; pass token ids with --prompt-ids instead")
    try:
        return Tokenizer.from_file(str(file))
    except Exception as exc:  # the Rust side raises a bare Exception on malformed files
        raise CheckpointError(f"{file} could not be read ({str(exc).splitlines()[0]})") from None


def train_bpe(documents: Iterable[str], vocab_size: int, min_frequency: int = 2) -> Tokenizer:
    """Train a byte-level BPE (pad/bos/eos at ids 0-2, then the 256 bytes, then merges)."""
    from tokenizers import trainers

    if vocab_size < len(SPECIAL_TOKENS) + 256:
        raise ConfigError(f"vocab_size must be at least {len(SPECIAL_TOKENS) + 256} for a byte-level BPE")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    seen = [0]

    def counted() -> Iterator[str]:
        for doc in documents:
            seen[0] += 1
            yield doc

    tok.train_from_iterator(counted(), trainer=trainer)
    if seen[0] == 0:
        raise ConfigError("cannot train a tokenizer on an empty dataset")
    return tok
