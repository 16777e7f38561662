"""Greedy decode speed of a GGUF file in llama.cpp (through llama-cpp-python), for the benches that compare it.

Runs in a side virtualenv that has llama-cpp-python (and numpy), not in the project's: it imports nothing from
elasticlm. Reads a JSON job from stdin, writes a JSON result to stdout:

    {"model": "m.gguf", "prompt": [ids...], "new_tokens": 64, "repeats": 3, "threads": 2}
    -> {"tok_s": ..., "seconds": [...], "tokens": [ids...], "llama_cpp_python": "0.3.36", "system_info": "..."}

The time is prefill + decode (one ``eval`` of the prompt, then one ``eval`` per new token, the next token the
argmax of the last logits: greedy, no EOS stop), median of ``repeats`` after one warm-up run — what
bench/real_parent_decode.py times for elasticlm and transformers.
"""

from __future__ import annotations

import json
import statistics
import sys
import time

import llama_cpp
import numpy as np


def greedy(llm: llama_cpp.Llama, prompt: list[int], new_tokens: int) -> list[int]:
    llm.reset()
    llm.eval(prompt)
    out = []
    vocab = llm.n_vocab()
    for _ in range(new_tokens):
        logits = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(vocab,))  # the last evaluated token's row
        token = int(logits.argmax())
        out.append(token)
        llm.eval([token])
    return out


def main() -> None:
    job = json.load(sys.stdin)
    llm = llama_cpp.Llama(model_path=job["model"], n_ctx=len(job["prompt"]) + job["new_tokens"] + 8,
                          n_batch=512, n_threads=job["threads"], n_threads_batch=job["threads"], verbose=False)
    tokens = greedy(llm, job["prompt"], job["new_tokens"])  # warm-up
    seconds = []
    for _ in range(job["repeats"]):
        t0 = time.perf_counter()
        tokens = greedy(llm, job["prompt"], job["new_tokens"])
        seconds.append(time.perf_counter() - t0)
    print(json.dumps({"tok_s": job["new_tokens"] / statistics.median(seconds), "seconds": seconds, "tokens": tokens,
                      "llama_cpp_python": llama_cpp.__version__,
                      "system_info": llama_cpp.llama_print_system_info().decode(errors="replace")}))


if __name__ == "__main__":
    main()
