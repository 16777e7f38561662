"""Documents → tokens → fixed-length packed sequences, streamed deterministically and resumably.

A *source* yields documents (strings) in a fixed order: the synthetic blend, plain-text files or
folders (each file one document, or cut at ``data.separator``), JSONL (one record per document: a text
field, or prompt + response fields), or a Hugging Face dataset (one row per document).
:class:`PackedStream` tokenizes documents, joins them with EOS and cuts ``[batch, seq_len + 1]`` windows
(inputs and shifted targets); its position is two integers and a short carry-over list, saved with every
checkpoint, so that a resumed run reads exactly the tokens it would have read.

Splits. With ``data.val_path`` the validation data is that file (or folder) and training reads every
document of ``data.path``. Without it, a stable hash sends each *unit* to the training or the validation
split (``data.val_fraction``): a JSONL record or a dataset row, or a block of at most :data:`BLOCK_CHARS`
characters of a text document (cut at a line end), so that one long file still gives both splits.
Consecutive blocks of a document in the same split are joined with no EOS between them: document masking
applies at real document boundaries only.

Whole-file scoring. ``eval`` / ``prune`` / ``importance --data FILE`` use every document of FILE, no split
(:func:`scoring_batches`, :func:`calibration_windows`): the user holds the file out.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError
from .synthetic import DIFFICULTY, FAMILIES, Example, blend, check_weights, eval_set

log = logging.getLogger("elasticlm.data")

TEXT_SUFFIXES = (".txt", ".md", ".rst", ".text")
Doc = str | tuple[str, str]  # a document, or (prompt, completion) when the loss may skip the prompt
# A text document longer than this is read (and split into train / validation) in blocks of at most this many
# characters, cut after a line break where there is one: bounded memory per document in the packer's carry,
# and a validation split even for one long file.
BLOCK_CHARS = 2048


class Continued(str):
    """A block of a text document that the next block of the same document follows directly: the packer
    puts no EOS after it (one document, one document id)."""

    __slots__ = ()


@dataclass
class DataConfig:
    """Where training text comes from (the ``[data]`` table of a run config)."""

    source: str = "synthetic"  # synthetic | text | jsonl | hf
    path: str | None = None  # file or folder (text, jsonl)
    text_field: str | None = "text"  # jsonl / hf: the document field...
    prompt_field: str | None = None  # ...or a prompt + response pair joined by a newline
    response_field: str | None = None
    hf_name: str | None = None  # hf: dataset name or local path for datasets.load_dataset
    hf_config: str | None = None
    hf_split: str = "train"
    hf_data_files: str | None = None  # hf: local files for a packaged loader (hf_name = "json", "text", …)
    separator: str | None = None  # text: cut each file into documents here (e.g. "\n\n"); None: one per file
    val_path: str | None = None  # a validation file or folder (text / JSONL); then training reads all of `path`
    val_fraction: float = 0.01  # without val_path: units (records, rows, text blocks) hashed into validation
    mask_prompt: bool = False  # no loss on prompts (synthetic, prompt/response data): train on answers only
    task_weights: dict[str, float] | None = None  # synthetic: sampling weight per family (missing: 1)
    seed: int = 0

    def validate(self) -> None:
        if self.source not in ("synthetic", "text", "jsonl", "hf"):
            raise ConfigError(f"data.source must be synthetic, text, jsonl or hf, got {self.source!r}")
        if self.source in ("text", "jsonl") and not self.path:
            raise ConfigError(f"data.source={self.source!r} needs data.path (a file or a folder)")
        if self.source == "hf" and not self.hf_name:
            raise ConfigError("data.source='hf' needs data.hf_name")
        if (self.prompt_field is None) != (self.response_field is None):
            raise ConfigError("data.prompt_field and data.response_field go together")
        if not 0 < self.val_fraction < 1:
            raise ConfigError(f"data.val_fraction must be in (0, 1), got {self.val_fraction}")
        if self.separator is not None and (not isinstance(self.separator, str) or not self.separator):
            raise ConfigError(f"data.separator must be a non-empty string (e.g. \"\\n\\n\"), or unset for one "
                              f"document per file; got {self.separator!r}")
        if self.val_path is not None and self.source == "synthetic":
            raise ConfigError("data.val_path is for text, jsonl or hf data; the synthetic blend has its own "
                              "held-out prompts")
        if self.task_weights is not None:
            if not isinstance(self.task_weights, dict):
                raise ConfigError(f"data.task_weights must be a table of family = weight, got {self.task_weights!r}")
            try:
                check_weights(self.task_weights)
            except ValueError as exc:
                raise ConfigError(f"data.task_weights: {exc}") from None


# [data] fields newer than some checkpoints: at their defaults, a resume's record of the data still matches
DATA_ADDED_LATER = ("separator", "val_path")


def compat_data(data: dict[str, Any]) -> dict[str, Any]:
    """The [data] table as a resume compares it: fields added later left out while at their default (None)."""
    return {k: v for k, v in data.items() if not (k in DATA_ADDED_LATER and v is None)}


def data_config_from_spec(spec: str, **fields: Any) -> DataConfig:
    """A DataConfig from a short command-line spec.

    ``synthetic`` → the embedded blend; ``hf:NAME`` or ``hf:NAME:CONFIG`` → Hugging Face datasets;
    a ``.jsonl``/``.json`` file → JSONL (field ``text``); any other file or folder → plain text.

    >>> data_config_from_spec("hf:wikitext:wikitext-2-raw-v1").hf_config
    'wikitext-2-raw-v1'
    """
    if spec == "synthetic":
        cfg = DataConfig(source="synthetic", **fields)
    elif spec.startswith("hf:"):
        name, _, config = spec[3:].partition(":")
        cfg = DataConfig(source="hf", hf_name=name, hf_config=config or None, **fields)
    else:
        path = Path(spec)
        if not path.exists():
            raise ConfigError(f"data {spec!r} is neither 'synthetic', 'hf:NAME' nor an existing file or folder")
        jsonl = path.suffix in (".jsonl", ".json")
        cfg = DataConfig(source="jsonl" if jsonl else "text", path=str(path), **fields)
    cfg.validate()
    return cfg


def _files(path: Path, suffixes: tuple[str, ...]) -> list[Path]:
    if not path.exists():
        raise ConfigError(f"data path {path} does not exist")
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in suffixes)
    if not files:
        raise ConfigError(f"no {'/'.join(suffixes)} files under {path}")
    return files


def text_documents(path: Path, separator: str | None = None) -> Iterator[str]:
    """The documents of a text file or folder: each file whole, or cut at ``separator``; stripped of white
    space at both ends, empty ones left out."""
    for file in _files(path, TEXT_SUFFIXES):
        yield from _pieces(_read_text(file), separator)


def _read_text(file: Path) -> str:
    try:
        raw = file.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {file}: {exc.strerror or exc}") from None
    return decode_text(raw, file)


def _pieces(text: str, separator: str | None) -> list[str]:
    parts = [text] if separator is None else text.split(separator)
    return [p.strip() for p in parts if p.strip()]


def _blocks(doc: str, size: int = BLOCK_CHARS) -> list[str]:
    """``doc`` in consecutive blocks of at most ``size`` characters, each cut after its last line break (else
    before its last space, else anywhere), so that the next block starts a line or a word: tokenizing the
    blocks one by one then gives the tokens of the whole text in all but rare cases."""
    out, start = [], 0
    while len(doc) - start > size:
        window = doc[start:start + size]
        cut = window.rfind("\n") + 1
        if cut == 0:
            cut = window.rfind(" ")
        if cut <= 0:  # one long word: cut anywhere
            cut = size
        out.append(doc[start:start + cut])
        start += cut
    out.append(doc[start:])
    return out


def decode_text(raw: bytes, file: Path | str) -> str:
    """UTF-8 text of a data file, or a ConfigError naming the file and the byte offset where it is not text."""
    nul = raw.find(b"\0")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{file} is not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start}); convert "
                          "it to UTF-8 or leave it out of the data") from None
    if nul >= 0:
        raise ConfigError(f"{file} looks binary (a NUL byte at offset {nul}), not text; leave it out of the data")
    return text


def _text_from(files: list[Path], file_index: int, skip: int, separator: str | None,
               keep: Callable[[str], bool] | None) -> Iterator[tuple[str, tuple[int, int]]]:
    """The blocks of the documents of text files that ``keep`` selects (None: all), from file ``file_index``
    on (its first ``skip`` blocks skipped), each with the position after it: (file index, blocks of that
    file read). A block is a :class:`Continued` when the next block of its document is selected too."""
    for k in range(file_index, len(files)):
        blocks: list[tuple[str, bool]] = []  # (text, last block of its document)
        for doc in _pieces(_read_text(files[k]), separator):
            parts = _blocks(doc)
            blocks += [(b, i == len(parts) - 1) for i, b in enumerate(parts)]
        chosen = [keep is None or keep(b) for b, _ in blocks]
        for j in range(skip if k == file_index else 0, len(blocks)):
            if chosen[j]:
                text, last = blocks[j]
                yield (text if last or not chosen[j + 1] else Continued(text)), (k, j + 1)


def _record_text(record: dict[str, Any], cfg: DataConfig, where: str) -> Doc:
    if cfg.prompt_field is not None:
        for f in (cfg.prompt_field, cfg.response_field):
            if f not in record:
                raise ConfigError(f"{where}: no field {f!r} (fields: {sorted(record)})")
        prompt, response = f"{record[cfg.prompt_field]}\n", str(record[cfg.response_field])
        return (prompt, response) if cfg.mask_prompt else prompt + response
    if cfg.text_field not in record:
        raise ConfigError(f"{where}: no field {cfg.text_field!r} (fields: {sorted(record)}); "
                          "set data.text_field, or data.prompt_field and data.response_field")
    value = record[cfg.text_field]
    if not isinstance(value, str):
        raise ConfigError(f"{where}: field {cfg.text_field!r} is {type(value).__name__}, not text")
    return value


def doc_text(doc: Doc) -> str:
    return doc if isinstance(doc, str) else doc[0] + doc[1]


def jsonl_documents(cfg: DataConfig) -> Iterator[Doc]:
    for doc, _ in _jsonl_from(cfg, _files(Path(cfg.path or ""), (".jsonl", ".json")), 0, 0, 1):
        yield doc


def _jsonl_from(cfg: DataConfig, files: list[Path], file_index: int, offset: int, line: int
                ) -> Iterator[tuple[Doc, tuple[int, int, int]]]:
    """Records of JSON-lines files from file ``file_index`` at byte ``offset`` (line number ``line``) on, each
    with the position after it: (file index, byte offset, next line number) — a resume seeks there."""
    for k in range(file_index, len(files)):
        file = files[k]
        pos, n = (offset, line) if k == file_index else (0, 1)
        try:
            fh = open(file, "rb")
        except OSError as exc:
            raise ConfigError(f"cannot read {file}: {exc.strerror or exc}") from None
        with fh:
            fh.seek(pos)
            for raw in fh:
                here, pos, n = n, pos + len(raw), n + 1
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise ConfigError(f"{file}:{here}: not UTF-8 (byte {pos - len(raw) + exc.start} of the file); "
                                      "is this a JSON-lines text file?") from None
                if not text.strip():
                    continue
                try:
                    record = json.loads(text)
                except json.JSONDecodeError as exc:
                    raise ConfigError(f"{file}:{here}: not valid JSON ({exc.msg})") from None
                if not isinstance(record, dict):
                    raise ConfigError(f"{file}:{here}: expected a JSON object per line")
                doc = _record_text(record, cfg, f"{file}:{here}")
                if doc_text(doc).strip():
                    yield doc, (k, pos, n)


def _hf_dataset(cfg: DataConfig) -> Any:
    try:
        import datasets
    except ModuleNotFoundError:
        raise ConfigError("data.source='hf' needs the `datasets` package (pip install datasets)") from None
    try:
        return datasets.load_dataset(cfg.hf_name, cfg.hf_config, split=cfg.hf_split, streaming=True,
                                     data_files=cfg.hf_data_files)
    except Exception as exc:  # datasets raises many types for a missing or offline dataset
        raise ConfigError(f"cannot load dataset {cfg.hf_name!r}: {str(exc).splitlines()[0]}") from None


def hf_documents(cfg: DataConfig) -> Iterator[Doc]:
    """Every non-empty document of a streamed Hugging Face dataset, in order."""
    yield from (doc for doc, _ in _hf_from(cfg, _hf_dataset(cfg)))


def _hf_from(cfg: DataConfig, ds: Any) -> Iterator[tuple[Doc, Any]]:
    for n, record in enumerate(ds):
        doc = _record_text(record, cfg, f"{cfg.hf_name}[{n}]")
        if doc_text(doc).strip():
            yield doc, ds


def val_config(cfg: DataConfig) -> DataConfig:
    """The DataConfig of ``cfg.val_path``: JSONL for a .jsonl / .json file (the same fields), text otherwise
    (the same separator)."""
    path = Path(cfg.val_path or "")
    if not path.exists():
        raise ConfigError(f"data.val_path {path} does not exist")
    jsonl = path.suffix in (".jsonl", ".json") or (path.is_dir() and not any(
        p.suffix in TEXT_SUFFIXES for p in path.rglob("*")))
    return dataclasses.replace(cfg, source="jsonl" if jsonl else "text", path=str(path), val_path=None)


def in_validation(doc: str, fraction: float) -> bool:
    h = int.from_bytes(hashlib.sha1(doc.encode("utf-8", "replace")).digest()[:8], "big")
    return h / 2**64 < fraction


def documents(cfg: DataConfig, split: str) -> Callable[[int], Iterator[Doc]]:
    """A function ``start → documents of `split` from document index `start` on`` (restartable). ``split``:
    "train", "val", or (not for synthetic data) "all": every document, no split."""
    cfg.validate()
    if cfg.source == "synthetic":
        def render(ex: Example) -> Doc:
            return (ex.query, ex.text[len(ex.query):]) if cfg.mask_prompt else ex.text

        if split == "train":
            return lambda start: (render(ex) for ex in blend(cfg.seed, start, cfg.task_weights))
        # validation: held-out prompts at the training difficulties, cycling through the families
        def val(start: int) -> Iterator[str]:
            i = start
            while True:
                fam = FAMILIES[i % len(FAMILIES)]
                d = 1 + (i // len(FAMILIES)) % DIFFICULTY[fam][0]
                yield render(eval_set(fam, d, 1, seed=10_000 + i)[0])
                i += 1
        return val
    return SeekableDocuments(cfg, split)


class SeekableDocuments:
    """The documents of one split of local text / JSON-lines files or a streamed Hugging Face dataset:
    ``docs(start)`` iterates from the ``start``-th document of the split (reading from the beginning),
    ``docs.resume(start, cursor)`` seeks straight to the position :attr:`cursor` recorded after that
    document, so a resumed run does not re-read the data before it: the file and byte offset for local
    files; the ``datasets`` library's own ``IterableDataset.state_dict()`` for a Hugging Face dataset (which
    skips whole shards and, inside the current shard, the records before the position)."""

    def __init__(self, cfg: DataConfig, split: str) -> None:
        if split not in ("train", "val", "all"):
            raise ValueError(f"split must be train, val or all, got {split!r}")
        self.split, self.want_val = split, split == "val"
        # An explicit validation file replaces the hashed split: training reads all of data.path.
        self.whole = split == "all" or cfg.val_path is not None
        if split == "val" and cfg.val_path is not None:
            cfg = val_config(cfg)
        self.cfg = cfg
        self.cursor: dict[str, Any] | None = None  # position after the last document yielded

    @property
    def name(self) -> str:
        """The data, for messages: e.g. "the validation split of text data corpus.txt"."""
        where = f"{self.cfg.source} data {self.cfg.path or self.cfg.hf_name}"
        return where if self.whole else f"the {'validation' if self.want_val else 'training'} split of {where}"

    def _keep(self, text: str) -> bool:
        return self.whole or in_validation(text, self.cfg.val_fraction) == self.want_val

    def _raw(self, cursor: dict[str, Any] | None) -> Iterator[tuple[Doc, Any]]:
        c = cursor or {}
        if self.cfg.source == "hf":
            ds = _hf_dataset(self.cfg)
            if c.get("hf") is not None:
                try:
                    ds.load_state_dict(c["hf"])
                except Exception as exc:
                    raise ConfigError(f"cannot resume dataset {self.cfg.hf_name!r} at the saved position "
                                      f"({str(exc).splitlines()[0]})") from None
            return _hf_from(self.cfg, ds)
        if self.cfg.source == "jsonl":
            files = _files(Path(self.cfg.path or ""), (".jsonl", ".json"))
            return _jsonl_from(self.cfg, files, c.get("file", 0), c.get("offset", 0), c.get("line", 1))
        return _text_from(_files(Path(self.cfg.path or ""), TEXT_SUFFIXES), c.get("file", 0), c.get("offset", 0),
                          self.cfg.separator, None if self.whole else self._keep)

    def _split(self, cursor: dict[str, Any] | None, start: int) -> Iterator[Doc]:
        i = cursor["index"] if cursor else 0
        for doc, pos in self._raw(cursor):
            if self.cfg.source == "text" or self._keep(doc_text(doc)):  # text blocks are selected as they are cut
                if i >= start:
                    if self.cfg.source == "hf":  # pos: the dataset, standing just after this record
                        self.cursor = {"index": i + 1, "hf": pos.state_dict()}
                    else:
                        self.cursor = {"index": i + 1, "file": pos[0], "offset": pos[1],
                                       **({"line": pos[2]} if len(pos) > 2 else {})}
                    yield doc
                i += 1
        if i == 0:
            raise ConfigError(f"{self.name} is empty"
                              + ("" if self.whole else
                                 f" (data.val_fraction {self.cfg.val_fraction} of its documents"
                                 + (f" and {BLOCK_CHARS}-character blocks" if self.cfg.source == "text" else "")
                                 + "); pass a validation file (--val-data / data.val_path) or raise "
                                   "data.val_fraction"))

    def __call__(self, start: int) -> Iterator[Doc]:
        return self._split(None, start)

    def resume(self, start: int, cursor: dict[str, Any] | None) -> Iterator[Doc]:
        """From document ``start`` on, seeking to ``cursor`` when it is the position of that document."""
        if cursor is not None and cursor.get("index") == start:
            return self._split(dict(cursor), start)
        return self._split(None, start)


@dataclass
class StreamState:
    """Resumable position: next document index, epoch, tokens (and their loss mask) carried over."""

    doc_index: int = 0
    epoch: int = 0
    carry: list[int] = field(default_factory=list)
    carry_mask: list[int] = field(default_factory=list)
    cursor: dict[str, Any] | None = None  # where the source stands after document doc_index - 1 (seekable sources)


class PackedStream:
    """Batches of packed token windows ``[batch, seq_len + 1]`` from a document stream.

    Documents are tokenized, followed by EOS (except a :class:`Continued` block, which the rest of its
    document follows), concatenated, and cut into windows; a window's
    tail that does not fill a batch row is carried into the next one. Finite sources restart
    (epoch + 1) when exhausted. A ``(prompt, completion)`` document gets loss-mask 0 on its
    prompt tokens (:meth:`next_masked_batch`).

    ``encode_many`` (texts → token lists, in order) tokenizes documents in chunks instead of one by one: a
    whole tokenizer batch at a time, or each rank of a distributed run a share of every chunk
    (``elasticlm.train.distributed.shared_encoder``). Chunks read a little ahead, and the tokens of the
    documents read ahead are carried like a window's tail, so the windows are the same token for token as
    one-by-one tokenization gives, and so is every resumed run.
    """

    def __init__(self, docs: Callable[[int], Iterator[Doc]], encode: Callable[[str], list[int]], eos_id: int,
                 seq_len: int, batch_size: int, state: StreamState | None = None,
                 encode_many: Callable[[list[str]], list[list[int]]] | None = None, chunk_multiple: int = 1) -> None:
        if seq_len < 1 or batch_size < 1:
            raise ConfigError("seq_len and batch_size must be >= 1")
        self.docs, self.encode, self.eos_id = docs, encode, eos_id
        self.seq_len, self.batch_size = seq_len, batch_size
        self.state = state or StreamState()
        self._iter: Iterator[str] | None = None
        self.encode_many, self.chunk_multiple = encode_many, max(1, chunk_multiple)
        self._seen_docs, self._seen_tokens = 0, 0  # for the chunk size: tokens per document so far
        self._docs_this_batch = 0

    def _next_doc(self) -> Doc:
        for _ in range(2):
            if self._iter is None:
                resume = getattr(self.docs, "resume", None)
                self._iter = resume(self.state.doc_index, self.state.cursor) if resume is not None else \
                    self.docs(self.state.doc_index)
            try:
                doc = next(self._iter)
                self.state.doc_index += 1
                self._docs_this_batch += 1
                self.state.cursor = getattr(self.docs, "cursor", None)
                return doc
            except StopIteration:
                self._iter = None
                if self.state.doc_index == 0:
                    break
                if self._docs_this_batch >= self.state.doc_index:  # this one batch already holds every document
                    self._check_one_batch(self.state.doc_index)
                log.warning("data: epoch %d begins (all %d documents were read; they repeat from here)",
                            self.state.epoch + 2, self.state.doc_index)
                self.state.doc_index, self.state.epoch, self.state.cursor = 0, self.state.epoch + 1, None
        raise ConfigError("the dataset yielded no documents")

    def _check_one_batch(self, n_docs: int) -> None:
        """All ``n_docs`` documents were read for one batch: refuse when their tokens do not fill it (the batch
        would repeat them), naming the tokens needed and found. (Reading ahead in chunks can read them all
        although fewer would fill the batch: then the next epoch only tops up the carry.)"""
        need = self.batch_size * (self.seq_len + 1)
        found = 0
        for doc in itertools.islice(self.docs(0), n_docs):
            texts = [doc] if isinstance(doc, str) else list(doc)
            found += sum(len(self.encode(t)) for t in texts) + (not isinstance(doc, Continued))
        if found < need:
            docs = f"{n_docs} document{'s' if n_docs != 1 else ''}"
            raise ConfigError(f"{getattr(self.docs, 'name', 'the data')} holds {found:,} tokens ({docs}, with EOS), "
                              f"fewer than one batch of {self.batch_size} × {self.seq_len + 1} = {need:,}; lower the "
                              "sequence length or batch size, or give more text (it would repeat inside a batch)")

    def _chunk_size(self, missing: int) -> int:
        """Documents to read for ``missing`` more tokens: the running tokens-per-document estimate with 10 %
        to spare, at least one per share, rounded up to a multiple of the shares (every rank computes the
        same number from the same tokens)."""
        m = self.chunk_multiple
        if self._seen_docs == 0:
            n = m
        else:
            per_doc = max(1.0, self._seen_tokens / self._seen_docs)
            n = min(4096, max(m, int(1.1 * missing / per_doc) + 1))
        return -(-n // m) * m

    def _append(self, docs: list[Doc], ids: list[list[int]], buf: list[int], mask: list[int]) -> None:
        it = iter(ids)
        for doc in docs:
            if isinstance(doc, str):
                tokens = next(it)
                buf.extend(tokens)
                mask.extend([1] * len(tokens))
            else:
                prompt, completion = next(it), next(it)
                buf.extend(prompt + completion)
                mask.extend([0] * len(prompt) + [1] * len(completion))
            if not isinstance(doc, Continued):
                buf.append(self.eos_id)
                mask.append(1)

    def next_masked_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens ``[batch, seq_len + 1]`` and a 0/1 loss mask of the same shape."""
        need = self.batch_size * (self.seq_len + 1)
        buf, mask = list(self.state.carry), list(self.state.carry_mask)
        self._docs_this_batch = 0
        while len(buf) < need:
            if self.encode_many is None:
                docs = [self._next_doc()]
                texts = [t for d in docs for t in ([d] if isinstance(d, str) else d)]
                ids = [self.encode(t) for t in texts]
            else:
                docs = [self._next_doc() for _ in range(self._chunk_size(need - len(buf)))]
                texts = [t for d in docs for t in ([d] if isinstance(d, str) else d)]
                ids = self.encode_many(texts)
            before = len(buf)
            self._append(docs, ids, buf, mask)
            self._seen_docs, self._seen_tokens = self._seen_docs + len(docs), self._seen_tokens + len(buf) - before
        self.state.carry, self.state.carry_mask = buf[need:], mask[need:]
        shape = (self.batch_size, self.seq_len + 1)
        return (torch.tensor(buf[:need], dtype=torch.long).view(shape),
                torch.tensor(mask[:need], dtype=torch.bool).view(shape))

    def next_batch(self) -> torch.Tensor:
        return self.next_masked_batch()[0]

    def state_dict(self) -> dict[str, Any]:
        return {"doc_index": self.state.doc_index, "epoch": self.state.epoch, "carry": list(self.state.carry),
                "carry_mask": list(self.state.carry_mask), "cursor": self.state.cursor}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        cursor = d.get("cursor")
        self.state = StreamState(int(d["doc_index"]), int(d["epoch"]), [int(t) for t in d["carry"]],
                                 [int(t) for t in d.get("carry_mask", [1] * len(d["carry"]))],
                                 dict(cursor) if isinstance(cursor, dict) else None)
        self._iter = None


# -- whole-file scoring and calibration (eval / prune / importance --data FILE) ----------------------


def whole_documents(cfg: DataConfig) -> Iterator[Doc]:
    """Every document of a text / JSONL / Hugging Face source, in order, no split; text documents whole
    (not in blocks), so that they tokenize exactly as the whole text does."""
    cfg.validate()
    if cfg.source == "synthetic":
        raise ConfigError("the synthetic blend is endless; whole-file scoring needs text, jsonl or hf data")
    if cfg.source == "text":
        return text_documents(Path(cfg.path or ""), cfg.separator)
    return jsonl_documents(cfg) if cfg.source == "jsonl" else hf_documents(cfg)


def document_tokens(cfg: DataConfig, encode: Callable[[str], list[int]], eos_token_id: int
                    ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Every document of ``cfg`` (no split) as one token stream, each document preceded by EOS — where a
    document starts in packed training rows, after the EOS that ends the one before — with the 0/1 mask of
    the tokens a loss counts (every token of every document; not the EOS, nor a masked prompt), and the
    number of documents."""
    ids: list[torch.Tensor] = []
    mask: list[torch.Tensor] = []
    n = 0
    for doc in whole_documents(cfg):
        prompt, text = ("", doc) if isinstance(doc, str) else doc
        head, body = (encode(prompt) if prompt else []), encode(text)
        ids.append(torch.tensor([eos_token_id, *head, *body], dtype=torch.long))
        mask.append(torch.tensor([0] * (1 + len(head)) + [1] * len(body), dtype=torch.bool))
        n += 1
    if not ids or not any(bool(m.any()) for m in mask):
        raise ConfigError(f"{cfg.path or cfg.hf_name} holds no text to score")
    return torch.cat(ids), torch.cat(mask), n


def _spread(count: int, want: int | None) -> list[int]:
    """``want`` indices out of ``count``, evenly spread over all of them (all when ``want`` is None or more)."""
    if want is None or want >= count:
        return list(range(count))
    return [i * count // want for i in range(want)]


def _rows(ids: torch.Tensor, mask: torch.Tensor, eos_token_id: int, loss_mask: bool) -> tuple[torch.Tensor, ...]:
    from ..model.documents import document_ids_from_eos

    doc = document_ids_from_eos(ids, eos_token_id)
    return (ids, doc, mask) if loss_mask else (ids, doc)


@dataclass
class Scoring:
    """Batches ``(ids, document ids, loss mask)`` that score every token of a file once (see
    :func:`scoring_batches`), and what they cover."""

    batches: list[tuple[torch.Tensor, ...]]
    tokens: int  # targets the loss counts: every token of every document
    windows: int
    documents: int


def scoring_batches(cfg: DataConfig, encode: Callable[[str], list[int]], eos_token_id: int, seq_len: int,
                    batch_size: int, max_windows: int | None = None) -> Scoring:
    """Non-overlapping windows of ``seq_len`` inputs that together predict every token of the data once:
    window ``k`` holds stream tokens ``[k·seq_len, (k+1)·seq_len]`` (``seq_len + 1``: inputs and shifted
    targets share all but one), the last one shorter — it is scored too. Full windows go ``batch_size`` to a
    batch, the short one alone. ``max_windows``: that many windows, evenly spread over the data."""
    if seq_len < 1 or batch_size < 1:
        raise ConfigError("seq_len and batch_size must be >= 1")
    ids, mask, n_docs = document_tokens(cfg, encode, eos_token_id)
    starts = list(range(0, len(ids) - 1, seq_len))
    starts = [starts[i] for i in _spread(len(starts), max_windows)]
    full = [s for s in starts if s + seq_len + 1 <= len(ids)]
    batches = []
    for b in range(0, len(full), batch_size):
        rows = full[b:b + batch_size]
        batches.append(_rows(torch.stack([ids[s:s + seq_len + 1] for s in rows]),
                             torch.stack([mask[s:s + seq_len + 1] for s in rows]), eos_token_id, True))
    if len(full) < len(starts):
        s = starts[-1]
        batches.append(_rows(ids[None, s:], mask[None, s:], eos_token_id, True))
    tokens = sum(int(m[:, 1:].sum()) for _, _, m in batches)
    return Scoring(batches, tokens, len(starts), n_docs)


def calibration_windows(cfg: DataConfig, encode: Callable[[str], list[int]], eos_token_id: int, samples: int,
                        seq_len: int, batch_size: int, loss_mask: bool = False,
                        flags: tuple[str, str] = ("--samples", "--seq-len")) -> list[tuple[torch.Tensor, ...]]:
    """``samples`` windows of ``seq_len`` tokens of the data (no split), evenly spread over all of it, in
    batches ``(ids, document ids[, loss mask])`` — :func:`elasticlm.elastic.importance.calibration_batches`'s
    rows, from a file the user gives whole. Refused, naming the tokens needed and found, when the data holds
    fewer than ``samples`` full windows (``flags``: the options that set samples and seq_len, for the message)."""
    if samples < 1 or seq_len < 2:
        raise ConfigError("calibration needs samples >= 1 and seq_len >= 2")
    ids, mask, _ = document_tokens(cfg, encode, eos_token_id)
    have = len(ids) // seq_len
    if have < samples:
        fix = f"pass {flags[0]} {have}" if have else f"pass a {flags[1]} below {len(ids)}"
        raise ConfigError(f"{cfg.path or cfg.hf_name} holds {len(ids):,} tokens ({have} windows of {seq_len}), "
                          f"fewer than {flags[0]} {samples} × {flags[1]} {seq_len} = {samples * seq_len:,}; "
                          f"{fix}, a smaller {flags[1]}, or give a larger file")
    picked = [i * seq_len for i in _spread(have, samples)]
    return [_rows(torch.stack([ids[s:s + seq_len] for s in picked[b:b + batch_size]]),
                  torch.stack([mask[s:s + seq_len] for s in picked[b:b + batch_size]]), eos_token_id, loss_mask)
            for b in range(0, len(picked), batch_size)]


def is_local(cfg: DataConfig) -> bool:
    """Data a user gives as files (text, JSONL): ``eval`` / ``prune`` / ``importance`` use all of it."""
    return cfg.source in ("text", "jsonl")
