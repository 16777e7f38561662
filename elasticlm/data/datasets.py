"""Documents → tokens → fixed-length packed sequences, streamed deterministically and resumably.

A *source* yields documents (strings) in a fixed order: the synthetic blend, plain-text files or
folders, JSONL (a text field, or prompt + response fields), or a Hugging Face dataset. A stable
hash of each document sends it to the training or the validation split. :class:`PackedStream`
tokenizes documents, joins them with EOS and cuts ``[batch, seq_len + 1]`` windows (inputs and
shifted targets); its position is two integers and a short carry-over list, saved with every
checkpoint, so that a resumed run reads exactly the tokens it would have read.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError
from . import synthetic

log = logging.getLogger("elasticlm.data")

TEXT_SUFFIXES = (".txt", ".md", ".rst", ".text")
Doc = str | tuple[str, str]  # a document, or (prompt, completion) when the loss may skip the prompt


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
    val_fraction: float = 0.01  # documents whose hash falls in this fraction are validation
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
        if self.task_weights is not None:
            if not isinstance(self.task_weights, dict):
                raise ConfigError(f"data.task_weights must be a table of family = weight, got {self.task_weights!r}")
            try:
                synthetic.check_weights(self.task_weights)
            except ValueError as exc:
                raise ConfigError(f"data.task_weights: {exc}") from None


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


def text_documents(path: Path) -> Iterator[str]:
    """Each file is split into documents at blank lines."""
    for doc, _ in _text_from(_files(path, TEXT_SUFFIXES), 0, 0):
        yield doc


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


def _text_from(files: list[Path], file_index: int, skip: int) -> Iterator[tuple[str, tuple[int, int]]]:
    """Documents of text files from file ``file_index`` on (its first ``skip`` documents skipped), each with
    the position after it: (file index, documents of that file read)."""
    for k in range(file_index, len(files)):
        file = files[k]
        try:
            raw = file.read_bytes()
        except OSError as exc:
            raise ConfigError(f"cannot read {file}: {exc.strerror or exc}") from None
        text = decode_text(raw, file)
        docs = [d.strip() for d in text.split("\n\n") if d.strip()]
        for j in range(skip if k == file_index else 0, len(docs)):
            yield docs[j], (k, j + 1)


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


def in_validation(doc: str, fraction: float) -> bool:
    h = int.from_bytes(hashlib.sha1(doc.encode("utf-8", "replace")).digest()[:8], "big")
    return h / 2**64 < fraction


def documents(cfg: DataConfig, split: str) -> Callable[[int], Iterator[Doc]]:
    """A function ``start → documents of `split` from document index `start` on`` (restartable)."""
    cfg.validate()
    if cfg.source == "synthetic":
        def render(ex: synthetic.Example) -> Doc:
            return (ex.query, ex.text[len(ex.query):]) if cfg.mask_prompt else ex.text

        if split == "train":
            return lambda start: (render(ex) for ex in synthetic.blend(cfg.seed, start, cfg.task_weights))
        # validation: held-out prompts at the training difficulties, cycling through the families
        def val(start: int) -> Iterator[str]:
            i = start
            while True:
                fam = synthetic.FAMILIES[i % len(synthetic.FAMILIES)]
                d = 1 + (i // len(synthetic.FAMILIES)) % synthetic.DIFFICULTY[fam][0]
                yield render(synthetic.eval_set(fam, d, 1, seed=10_000 + i)[0])
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
        self.cfg, self.split, self.want_val = cfg, split, split != "train"
        self.cursor: dict[str, Any] | None = None  # position after the last document yielded

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
        return _text_from(_files(Path(self.cfg.path or ""), TEXT_SUFFIXES), c.get("file", 0), c.get("offset", 0))

    def _split(self, cursor: dict[str, Any] | None, start: int) -> Iterator[Doc]:
        i = cursor["index"] if cursor else 0
        for doc, pos in self._raw(cursor):
            if in_validation(doc_text(doc), self.cfg.val_fraction) == self.want_val:
                if i >= start:
                    if self.cfg.source == "hf":  # pos: the dataset, standing just after this record
                        self.cursor = {"index": i + 1, "hf": pos.state_dict()}
                    else:
                        self.cursor = {"index": i + 1, "file": pos[0], "offset": pos[1],
                                       **({"line": pos[2]} if len(pos) > 2 else {})}
                    yield doc
                i += 1
        if i == 0:
            raise ConfigError(f"the {self.split} split of {self.cfg.source} data {self.cfg.path or self.cfg.hf_name} "
                              "is empty"
                              + (" (too few documents for data.val_fraction?)" if self.want_val else ""))

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

    Documents are tokenized, followed by EOS, concatenated, and cut into windows; a window's
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
                    raise ConfigError(f"the data has only {self.state.doc_index} documents, fewer tokens than one "
                                      f"batch of {self.batch_size} × {self.seq_len + 1}; lower the sequence length "
                                      "or batch size, or add data (it would repeat inside a batch)") from None
                log.warning("data: epoch %d begins (all %d documents were read; they repeat from here)",
                            self.state.epoch + 2, self.state.doc_index)
                self.state.doc_index, self.state.epoch, self.state.cursor = 0, self.state.epoch + 1, None
        raise ConfigError("the dataset yielded no documents")

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
