"""Greedy generations, teacher-forced log-probs and tokenization of a GGUF file in llama.cpp (llama-cpp-python).

Runs in whichever virtualenv has llama-cpp-python (and numpy); imports nothing from elasticlm, so
bench/engines.py can call it with another interpreter (``--llama-python``). Reads a JSON job from stdin, writes
a JSON result to stdout:

    {"model": "m.gguf", "prompts": [[ids...]], "texts": ["..."], "new_tokens": 32, "threads": 2}
    -> {"generated": [[ids]], "logprobs": [[per prompt token after the first]], "tokenized": [[ids]],
        "llama_cpp_python": "0.3.36"}

float32 KV cache (llama.cpp's default f16 cache alone moves logits by ~1e-3 relative); greedy = argmax of the
last logits, no EOS stop.
"""

from __future__ import annotations

import json
import sys

import llama_cpp
import numpy as np


def run(job: dict) -> dict:
    prompts, new = job["prompts"], job["new_tokens"]
    n_ctx = max(len(p) for p in prompts) + new + 8
    llm = llama_cpp.Llama(job["model"], n_ctx=n_ctx, n_batch=n_ctx, logits_all=True, n_threads=job["threads"],
                          n_threads_batch=job["threads"], verbose=False, type_k=0, type_v=0)
    tokenized = [llm.tokenize(t.encode(), add_bos=False, special=True) for t in job["texts"]]
    generated, logprobs = [], []
    for ids in prompts:
        llm.reset()
        llm.eval(ids)
        scores = np.array(llm.scores[: len(ids)], dtype=np.float64)
        top = scores.max(1, keepdims=True)
        lse = np.log(np.exp(scores - top).sum(1)) + top[:, 0]
        logprobs.append([float(scores[i, ids[i + 1]] - lse[i]) for i in range(len(ids) - 1)])
        out = []
        for _ in range(new):
            out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
            llm.eval([out[-1]])
        generated.append(out)
    llm.close()
    return {"generated": generated, "logprobs": logprobs, "tokenized": tokenized,
            "llama_cpp_python": llama_cpp.__version__}


if __name__ == "__main__":
    json.dump(run(json.load(sys.stdin)), sys.stdout)
