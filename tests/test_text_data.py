"""Real-corpus data semantics: what a document is (file, separator piece, JSONL record), explicit validation
files, whole-file scoring for eval / prune / importance, and one-line errors naming tokens."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

import elasticlm
from elasticlm import ConfigError
from elasticlm.cli import main
from elasticlm.data.datasets import (
    BLOCK_CHARS,
    Continued,
    DataConfig,
    PackedStream,
    calibration_windows,
    documents,
    whole_documents,
)
from elasticlm.tokenizer import byte_level_tokenizer, load_tokenizer

TOK = byte_level_tokenizer()
EOS = 2


def encode(text: str) -> list[int]:
    return TOK.encode(text).ids


def prose(n: int, tag: str = "") -> str:
    """``n`` paragraphs of varied lines (so that blocks are cut at line ends)."""
    return "\n\n".join(f"{tag}paragraph {i}: " + " ".join(f"word{(i * 7 + j) % 31}" for j in range(i % 9 + 3))
                       + f"\nand a second line {i}" for i in range(n))


def all_tokens(cfg: DataConfig, split: str) -> list[int]:
    """Every token a packed stream of ``split`` reads in one epoch (EOS between documents)."""
    out: list[int] = []
    stream = PackedStream(documents(cfg, split), encode, EOS, seq_len=1, batch_size=1)
    docs = list(documents(cfg, split)(0))
    stream._append(docs, [encode(d) for d in docs], out, [])
    return out


# -- what a document is ------------------------------------------------------------------------------


def test_a_text_file_is_one_document_unless_a_separator_is_given(tmp_path):
    text = prose(60)
    (tmp_path / "a.txt").write_text(text + "\n")
    (tmp_path / "b.txt").write_text("second file\n\nstill the second file")
    whole = DataConfig(source="text", path=str(tmp_path))
    assert list(whole_documents(whole)) == [text, "second file\n\nstill the second file"]
    # read in blocks (bounded memory), but packed as one document: no EOS inside a file
    assert len(text) > 2 * BLOCK_CHARS and all_tokens(whole, "all") == encode(text) + [EOS] + encode(
        "second file\n\nstill the second file") + [EOS]
    paragraphs = DataConfig(source="text", path=str(tmp_path), separator="\n\n")
    assert list(whole_documents(paragraphs)) == text.split("\n\n") + ["second file", "still the second file"]
    assert all_tokens(paragraphs, "all").count(EOS) == 62
    lines = DataConfig(source="text", path=str(tmp_path / "b.txt"), separator="file")
    assert list(whole_documents(lines)) == ["second", "still the second"]


def test_jsonl_records_are_documents(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text("".join(json.dumps({"text": f"record {i}\n\nwith a blank line"}) + "\n" for i in range(5)))
    cfg = DataConfig(source="jsonl", path=str(f), separator="\n\n")  # the separator is for text files only
    assert list(whole_documents(cfg)) == [f"record {i}\n\nwith a blank line" for i in range(5)]


def test_one_long_file_still_gives_a_validation_split_in_blocks(tmp_path):
    text = prose(400)
    (tmp_path / "book.txt").write_text(text)
    cfg = DataConfig(source="text", path=str(tmp_path / "book.txt"), val_fraction=0.2)
    train, val = list(documents(cfg, "train")(0)), list(documents(cfg, "val")(0))
    assert train and val and all(len(b) <= BLOCK_CHARS for b in train + val)
    assert not set(train) & set(val)
    # every block of the file is in exactly one split; together, in file order, they are the text
    assert "".join(sorted(train + val, key=text.index)) == text
    # consecutive blocks of a split are one document (no EOS); a block whose successor went to the other split
    # ends a document
    for split in (train, val):
        for a, b in zip(split, split[1:], strict=False):
            assert isinstance(a, Continued) == (text.index(a) + len(a) == text.index(b))
        assert not isinstance(split[-1], Continued)


def test_an_explicit_validation_file_replaces_the_hashed_split(tmp_path):
    (tmp_path / "train.txt").write_text(prose(30, "train "))
    (tmp_path / "held.txt").write_text(prose(5, "held "))
    cfg = DataConfig(source="text", path=str(tmp_path / "train.txt"), val_path=str(tmp_path / "held.txt"))
    assert "".join(documents(cfg, "train")(0)) == prose(30, "train ")  # all of it, no hashed split
    assert "".join(documents(cfg, "val")(0)) == prose(5, "held ")
    with pytest.raises(ConfigError, match="val_path .*does not exist"):
        list(documents(DataConfig(source="text", path=str(tmp_path), val_path=str(tmp_path / "no.txt")), "val")(0))


def test_val_data_flag_feeds_the_validation_batches(tmp_path, capsys):
    """`pretrain --val-data FILE` reads its validation batches from FILE: a FILE too small for one batch is
    refused naming it and the tokens needed and found, before any training."""
    (tmp_path / "train.txt").write_text(prose(40))
    (tmp_path / "tiny-val.txt").write_text("too short")
    cfg = tmp_path / "run.json"
    cfg.write_text(json.dumps({"model": {"preset": "tiny"}, "data": {"source": "text",
                                                                       "path": str(tmp_path / "train.txt")},
                               "train": {"out": str(tmp_path / "out"), "steps": 1, "batch_size": 2,
                                         "seq_len": 32, "tensorboard": False, "dtype": "float32"},
                               "eval": {"tasks": False}}))  # float32: `auto` would time a bf16 step first
    assert main(["pretrain", "--config", str(cfg), "--val-data", str(tmp_path / "tiny-val.txt"),
                 "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "tiny-val.txt holds 10 tokens" in err and "2 × 33 = 66" in err and "sequence length" in err


# -- eval / prune / importance use the whole file ----------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny") / "model"
    assert main(["init", str(d), "--preset", "tiny", "--seed", "3"]) == 0
    return d


@torch.no_grad()
def naive_loss(model, ids: list[int], seq_len: int) -> tuple[float, int]:
    """Mean next-token loss over every token of one document, written out plainly: the stream is EOS +
    the document; each window of ``seq_len`` inputs is run as the model would see it under document
    masking — the leading EOS alone (it ends the previous, empty document), the document's tokens alone."""
    stream = [EOS, *ids]
    total, count = 0.0, 0
    for s in range(0, len(stream) - 1, seq_len):
        window = stream[s:s + seq_len + 1]
        inputs, targets = window[:-1], window[1:]
        segments = [(0, 1), (1, len(inputs))] if s == 0 else [(0, len(inputs))]
        for a, b in segments:
            if a == b:
                continue
            logits = model(torch.tensor([inputs[a:b]]))[0].float()
            total += float(F.cross_entropy(logits, torch.tensor(targets[a:b]), reduction="sum"))
            count += b - a
    return total / count, count


def test_eval_scores_every_token_of_the_file(tiny, tmp_path, capsys):
    text = prose(6)  # ≈ 400 tokens: 7 windows of 64, the last one partial
    (tmp_path / "held_out.txt").write_text(text + "\n")
    assert main(["eval", "--checkpoint", str(tiny), "--tasks", "ppl", "--data", str(tmp_path / "held_out.txt"),
                 "--seq-len", "64", "--batch-size", "4", "--out", str(tmp_path / "report")]) == 0
    out = capsys.readouterr().out
    report = json.loads((tmp_path / "report" / "eval.json").read_text())
    ids = load_tokenizer(tiny).encode(text).ids
    assert len(ids) % 64 and report["val_tokens"] == report["points"][0]["val_tokens"] == len(ids)
    assert f"every token of {tmp_path / 'held_out.txt'}: {len(ids):,} tokens" in out
    want, count = naive_loss(elasticlm.load(tiny), ids, 64)
    assert count == len(ids)
    assert report["points"][0]["val_loss"] == pytest.approx(want, rel=1e-5)
    assert 0 < want < 2 * math.log(320)  # a random model: about log(vocab)


def test_eval_on_a_file_that_is_too_small_or_empty(tiny, tmp_path, capsys):
    (tmp_path / "one.txt").write_text("hi")
    assert main(["eval", "--checkpoint", str(tiny), "--tasks", "ppl", "--data", str(tmp_path / "one.txt"),
                 "--out", str(tmp_path / "r1")]) == 0  # two tokens: one window, both scored
    assert json.loads((tmp_path / "r1" / "eval.json").read_text())["val_tokens"] == 2
    (tmp_path / "blank.txt").write_text("\n \n")
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(tiny), "--tasks", "ppl", "--data", str(tmp_path / "blank.txt"),
                 "--out", str(tmp_path / "r2")]) == 2
    assert "blank.txt" in capsys.readouterr().err


def test_importance_and_prune_refuse_a_file_smaller_than_asked_naming_tokens(tiny, tmp_path, capsys):
    (tmp_path / "calib.txt").write_text("x" * 299)  # 300 tokens with the EOS that starts the document
    assert main(["importance", "--model", str(tiny), "--data", str(tmp_path / "calib.txt"), "--samples", "8",
                 "--seq-len", "64", "--out", str(tmp_path / "imp"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "holds 300 tokens (4 windows of 64), fewer than --samples 8 × --seq-len 64 = 512" in err
    assert "pass --samples 4" in err and not (tmp_path / "imp").exists()
    cfg = DataConfig(source="text", path=str(tmp_path / "calib.txt"))
    with pytest.raises(ConfigError, match="fewer than --val-samples 5 × --seq-len 64 = 320; pass --val-samples 4"):
        calibration_windows(cfg, encode, EOS, 5, 64, 2, True, ("--val-samples", "--seq-len"))


def test_calibration_windows_cover_the_whole_file_evenly(tmp_path):
    text = "".join(chr(97 + i % 26) for i in range(999))
    (tmp_path / "c.txt").write_text(text)
    batches = calibration_windows(DataConfig(source="text", path=str(tmp_path / "c.txt")), encode, EOS, 4, 100, 3)
    rows = torch.cat([ids for ids, _ in batches])
    stream = torch.tensor([EOS, *encode(text)])
    assert rows.shape == (4, 100) and [b[0].shape[0] for b in batches] == [3, 1]
    # 10 windows in the file, 4 asked for: windows 0, 2, 5 and 7 — spread over all of it, not its beginning
    assert [torch.equal(rows[i], stream[s * 100:(s + 1) * 100]) for i, s in enumerate((0, 2, 5, 7))] == [True] * 4
