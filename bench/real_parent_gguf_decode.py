"""Greedy decode speed of GGUF files: elasticlm and transformers (on the file's weights, dequantized to fp32)
against llama.cpp (running the file as it is), in one run.

    python bench/real_parent_gguf_decode.py --llama-python /work/llama-venv/bin/python \
        f32=smollm2-f32.gguf f16=smollm2-f16.gguf q8_0=smollm2-q8_0.gguf

llama.cpp runs in a child process of ``--llama-python`` (a side virtualenv with llama-cpp-python, see
bench/llamacpp_decode.py; the project's own environment does not need it); elasticlm loads the same file
(``elasticlm.load(file.gguf)``: transformers' GGUF loader dequantizes it) and transformers the Hugging Face
directory that import writes. Every engine gets the same prompt ids, batch 1, greedy, no EOS stop, the same
thread count; the time is prefill + decode, median of ``--repeats`` after a warm-up. "same tokens" compares each
engine's greedy tokens with elasticlm's on the same file: llama.cpp computes in the file's precision (f16 / q8_0
matmuls), so a late difference there is arithmetic, not a wrong model.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from real_parent_decode import timed


def first_difference(a: list[int], b: list[int]) -> str:
    k = next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), None)
    return "all" if k is None else f"first {k}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="+", help="LABEL=FILE.gguf")
    ap.add_argument("--llama-python", required=True, help="python of a virtualenv with llama-cpp-python")
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM

    import elasticlm
    from elasticlm.model.gguf_import import gguf_to_hf

    threads = torch.get_num_threads()
    print(f"torch {torch.__version__}, {threads} threads; prompt {args.prompt_tokens}, new {args.new_tokens}, "
          "batch 1, greedy")
    print("| file | elasticlm tok/s | transformers tok/s | llama.cpp tok/s | elasticlm ÷ llama.cpp | "
          "same tokens as elasticlm (transformers / llama.cpp) |")
    print("|---|---|---|---|---|---|")
    rows = []
    for label, file in (f.split("=", 1) for f in args.files):
        file = Path(file).resolve()
        ours = elasticlm.load(file).eval()
        ids = torch.randint(3, ours.config.vocab_size, (1, args.prompt_tokens),
                            generator=torch.Generator().manual_seed(0))
        with torch.inference_mode():
            t_ours, a = timed(lambda m=ours, ids=ids: elasticlm.generate(m, ids, max_new_tokens=args.new_tokens),
                              args.repeats)
        del ours
        with tempfile.TemporaryDirectory() as tmp:
            hf = AutoModelForCausalLM.from_pretrained(gguf_to_hf(file, Path(tmp) / "hf"), dtype=torch.float32).eval()
            with torch.inference_mode():
                t_hf, b = timed(lambda m=hf, ids=ids: m.generate(ids, max_new_tokens=args.new_tokens,
                                                        min_new_tokens=args.new_tokens, do_sample=False,
                                                        eos_token_id=None, pad_token_id=0), args.repeats)
            del hf
        job = {"model": str(file), "prompt": ids[0].tolist(), "new_tokens": args.new_tokens,
               "repeats": args.repeats, "threads": threads}
        out = subprocess.run([args.llama_python, str(Path(__file__).with_name("llamacpp_decode.py"))],
                             input=json.dumps(job), capture_output=True, text=True)
        if out.returncode != 0:
            sys.exit(f"error: llama.cpp failed on {file}: {out.stderr.strip()[-2000:]}")
        cpp = json.loads(out.stdout.strip().splitlines()[-1])
        n = args.new_tokens
        ours_new, hf_new = a[0, args.prompt_tokens:].tolist(), b[0, args.prompt_tokens:].tolist()
        row = {"file": label, "path": str(file), "elasticlm_tok_s": n / t_ours, "transformers_tok_s": n / t_hf,
               "llama_cpp_tok_s": cpp["tok_s"], "same_transformers": first_difference(ours_new, hf_new),
               "same_llama_cpp": first_difference(ours_new, cpp["tokens"]),
               "llama_cpp_python": cpp["llama_cpp_python"], "system_info": cpp["system_info"]}
        rows.append(row)
        print(f"| {label} | {row['elasticlm_tok_s']:.1f} | {row['transformers_tok_s']:.1f} | "
              f"{row['llama_cpp_tok_s']:.1f} | {row['elasticlm_tok_s'] / row['llama_cpp_tok_s']:.2f} | "
              f"{row['same_transformers']} / {row['same_llama_cpp']} |", flush=True)
    if rows:
        print(f"llama-cpp-python {rows[0]['llama_cpp_python']}; {rows[0]['system_info']}")
    if args.json:
        args.json.write_text(json.dumps({"threads": threads, "torch": torch.__version__, "prompt_tokens":
                                         args.prompt_tokens, "new_tokens": args.new_tokens, "rows": rows},
                                        indent=2) + "\n")


if __name__ == "__main__":
    main()
