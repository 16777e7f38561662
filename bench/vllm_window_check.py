"""Which attention does an engine run for a model with sliding-window layers? Greedy tokens of vLLM on a Hugging Face
export against elasticlm's model with the window as exported, with every attention layer windowed, and with no
window at all (docs/engines.md, "Sliding-window attention layers").

    /work/vllm-venv/bin/python bench/vllm_window_check.py --checkpoint runs/sliding-elastic/final --hf DIR
"""

from __future__ import annotations

import argparse
import dataclasses

import torch

import elasticlm
from elasticlm.model.hybrid import HybridLM


def variants(base: HybridLM) -> dict[str, HybridLM]:
    window = base.config.section(elasticlm.kinds.KINDS["W"]).window
    every = "".join("W" if elasticlm.kinds.kind_of(c).attends else c for c in base.config.pattern)
    out = {}
    for name, pattern, w in (("as exported", base.config.pattern, window), ("every attention layer windowed", every,
                                                                            window), ("no window", base.config.pattern,
                                                                                      10**9)):
        m = HybridLM(dataclasses.replace(base.config, pattern=pattern,
                                         sections={"sliding_attention": {"window": w}})).eval()
        m.load_state_dict(base.state_dict())
        out[name] = m
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="an elasticlm model with W layers")
    ap.add_argument("--hf", required=True, help="its `elasticlm extract --format hf` directory")
    ap.add_argument("--new-tokens", type=int, default=40)
    args = ap.parse_args()
    from vllm import LLM, SamplingParams

    models = variants(elasticlm.load(args.checkpoint))
    llm = LLM(model=args.hf, dtype="float32", max_model_len=256, enforce_eager=True, seed=0,
              gpu_memory_utilization=0.1)
    g = torch.Generator().manual_seed(0)
    for length in (5, 12, 20, 31, 40):
        prompt = torch.randint(3, 260, (1, length), generator=g)
        out = llm.generate([{"prompt_token_ids": prompt[0].tolist()}],
                           SamplingParams(temperature=0, max_tokens=args.new_tokens, ignore_eos=True), use_tqdm=False)
        theirs = list(out[0].outputs[0].token_ids)
        for name, m in models.items():
            mine = elasticlm.generate(m, prompt, max_new_tokens=args.new_tokens)[0, length:].tolist()
            first = next((i for i, (a, b) in enumerate(zip(mine, theirs, strict=True)) if a != b), None)
            print(f"prompt {length:3d}, elasticlm {name}: first differing generated token {first}")


if __name__ == "__main__":
    main()
