"""Tokenizer time per rank for the packed training stream: every rank tokenizing the whole global batch (what
the trainer did before) vs each rank tokenizing a round-robin share of the documents and all-gathering the
token lists (elasticlm.train.distributed.shared_encoder). Both give the same batches (checked here).

    python bench/bench_tokenize.py [--world 2] [--batches 20] [--batch 16] [--seq-len 2048]

A BPE tokenizer (vocab 8192) is trained on the synthetic blend first; each variant runs in fresh gloo
processes and reports per rank the seconds spent producing the batches and the texts it tokenized.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch
from step_probe import free_port


def _worker(rank: int, world: int, port: int, tok_dir: str, mode: str, args: dict, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch.distributed as dist

    from elasticlm.data.datasets import DataConfig, PackedStream, documents
    from elasticlm.tokenizer import batch_encoder, load_tokenizer
    from elasticlm.train.distributed import Distributed, shared_encoder

    torch.set_num_threads(1)
    os.environ["RAYON_NUM_THREADS"] = "1"  # one core per rank for the tokenizer too
    dist.init_process_group("gloo", rank=rank, world_size=world)
    tok = load_tokenizer(tok_dir)
    count = [0]

    def counted(texts: list[str]) -> list[list[int]]:
        count[0] += len(texts)
        return batch_encoder(tok)(texts)

    cfg = DataConfig(source="synthetic", seed=1)
    if mode == "whole":  # every rank: the whole global batch, one document at a time
        def one(text: str) -> list[int]:
            count[0] += 1
            return tok.encode(text).ids

        stream = PackedStream(documents(cfg, "train"), one, 0, args["seq_len"], args["batch"])
    else:
        stream = PackedStream(documents(cfg, "train"), lambda t: tok.encode(t).ids, 0, args["seq_len"],
                              args["batch"], encode_many=shared_encoder(counted, Distributed(rank, world, "gloo")),
                              chunk_multiple=world)
    dist.barrier()
    t0 = time.perf_counter()
    sums = [int(stream.next_batch().sum()) for _ in range(args["batches"])]
    seconds = time.perf_counter() - t0
    Path(out, f"{mode}-{rank}.json").write_text(json.dumps({"seconds": seconds, "texts": count[0], "sums": sums}))
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--batches", type=int, default=20)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=2048)
    a = p.parse_args()
    from elasticlm.data.datasets import DataConfig, doc_text, documents
    from elasticlm.tokenizer import save_tokenizer, train_bpe

    with tempfile.TemporaryDirectory() as tmp:
        docs = documents(DataConfig(source="synthetic", seed=0), "train")(0)
        tok = train_bpe((doc_text(next(docs)) for _ in range(20_000)), 8192)
        save_tokenizer(tok, tmp)
        args = {"batches": a.batches, "batch": a.batch, "seq_len": a.seq_len}
        results = {}
        for mode in ("whole", "shared"):
            torch.multiprocessing.spawn(_worker, args=(a.world, free_port(), tmp, mode, args, tmp), nprocs=a.world)
            results[mode] = [json.loads(Path(tmp, f"{mode}-{r}.json").read_text()) for r in range(a.world)]
        same = all(r["sums"] == results["whole"][0]["sums"] for rs in results.values() for r in rs)
        print(f"world {a.world}, {a.batches} global batches of {a.batch} x {a.seq_len} tokens; "
              f"identical batches on every rank and in both modes: {same}")
        print("| mode | seconds per rank (max) | texts tokenized per rank |\n|---|---|---|")
        for mode, rs in results.items():
            print(f"| {mode} | {max(r['seconds'] for r in rs):.2f} | {', '.join(str(r['texts']) for r in rs)} |")
        print(f"ratio shared / whole (slowest rank): "
              f"{max(r['seconds'] for r in results['shared']) / max(r['seconds'] for r in results['whole']):.2f}")


if __name__ == "__main__":
    main()
