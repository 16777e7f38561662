"""lm-eval on nested budgets: a budget of an elastic checkpoint evaluated on the shared weights, without
extracting it.

    python -m elasticlm.lm_eval --model elasticlm --model_args checkpoint=runs/demo/elastic/final,budget=0.5 \\
        --tasks TASKS [any other lm_eval option]

Importing this module registers the model name ``elasticlm`` with lm-eval (0.4.x has no plugin discovery, so
``python -m elasticlm.lm_eval`` is lm-eval's own command line with the model registered first). Model args:
``checkpoint`` (a native or NemotronH directory, elastic or not), ``budget`` (a trained budget; default: the
full model), ``device``, ``batch_size``, ``max_length`` (the longest window scored at once).

Log-likelihoods of a batch are computed on right-padded rows (causal layers, so padding after a row cannot
change it); rolling log-likelihoods use lm-eval's disjoint windows with EOS — the token training puts between
documents — as the prefix, not an untrained BOS, and as in training an EOS ends a document: the tokens after it
start from a fresh state (document ids, the convention of `elasticlm eval`'s loss); generation decodes greedily
in ragged batches (:class:`~elasticlm.generate.DecodeBatch`) and cuts at the first stop string.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
import torch.nn.functional as F

try:
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
except ImportError as exc:  # pragma: no cover - the message is the point
    raise ImportError("elasticlm.lm_eval needs lm-eval: pip install lm-eval") from exc

from .config import Subnet
from .elastic.deployment import Deployment
from .errors import ConfigError
from .generate import DecodeBatch, Request
from .model.documents import document_ids_from_eos
from .model.hybrid import HybridLM
from .runtime import resolve_device
from .tokenizer import load_tokenizer


@register_model("elasticlm")
class ElasticLMHarness(LM):
    """lm-eval's ``LM`` over one budget of an elasticlm checkpoint."""

    def __init__(self, checkpoint: str, budget: str | None = None, device: str = "cpu", batch_size: int | str = 8,
                 max_length: int | str = 2048, **_: Any) -> None:
        if str(device).startswith("cuda") and not torch.cuda.is_available():  # lm_eval's default is cuda:0
            device = "cpu"
        deployment = Deployment.load(checkpoint, device=resolve_device(str(device)), serving=True)
        subnet = None
        if budget is not None and str(budget) not in ("", "1.0", "full"):
            subnet = deployment.subnet(str(budget))
        self._setup(deployment, load_tokenizer(checkpoint), subnet, batch_size, max_length, checkpoint)

    @classmethod
    def for_model(cls, model: HybridLM, tokenizer: Any, subnet: Subnet | None = None, batch_size: int | str = 8,
                  max_length: int | str = 2048) -> ElasticLMHarness:
        """The harness over a model already in memory (``elasticlm eval --lm-eval`` uses one per budget)."""
        self = cls.__new__(cls)
        self._setup(Deployment(model), tokenizer, subnet, batch_size, max_length, "the model")
        return self

    def _setup(self, deployment: Deployment, tokenizer: Any, subnet: Subnet | None, batch_size: int | str,
               max_length: int | str, source: str) -> None:
        LM.__init__(self)
        self.deployment, self.model, self.tokenizer, self.subnet = deployment, deployment.model, tokenizer, subnet
        self.batch_size = int(str(batch_size).split(":")[0]) if str(batch_size) != "auto" else 8
        self.max_length = int(max_length)
        self.eos = self.model.config.eos_token_id
        if self.eos is None:
            raise ConfigError(f"{source}: the model has no eos_token_id (the prefix of empty contexts)")

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text).ids

    @torch.inference_mode()
    def _score(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(log-probability of ``cont`` after ``ctx``, whether greedy decoding would write it) per pair."""
        out = []
        for start in range(0, len(pairs), self.batch_size):
            chunk = pairs[start:start + self.batch_size]
            rows = [(ctx + cont)[-(self.max_length + 1):] for ctx, cont in chunk]
            longest = max(len(r) for r in rows) - 1
            ids = torch.zeros(len(rows), longest, dtype=torch.long)
            for i, r in enumerate(rows):
                ids[i, : len(r) - 1] = torch.tensor(r[:-1])
            ids = ids.to(self.model.device)
            # An EOS ends a document, and training starts the next one from a fresh state: with document
            # ids the EOS prefix of an empty context predicts the first token and nothing after sees it.
            docs = document_ids_from_eos(ids, self.eos) if bool((ids == self.eos).any()) else None
            logp = F.log_softmax(self.model(ids, self.subnet, document_ids=docs, memo=self.deployment.memo).float(), -1)
            for i, ((_, cont), r) in enumerate(zip(chunk, rows, strict=True)):
                n = len(cont)
                pos = torch.arange(len(r) - 1 - n, len(r) - 1)
                target = torch.tensor(r[-n:], device=logp.device)
                row = logp[i, pos]
                out.append((float(row.gather(-1, target[:, None]).sum()), bool((row.argmax(-1) == target).all())))
        return out

    def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = []
        for req in requests:
            context, continuation = req.args
            # trailing spaces belong to the continuation (how tokenizers attach them), as lm-eval's HF model does
            spaces = len(context) - len(context.rstrip())
            if spaces:
                context, continuation = context[:-spaces], context[-spaces:] + continuation
            whole, ctx = self._encode(context + continuation), self._encode(context)
            cont = whole[len(ctx):]
            pairs.append(([self.eos] if not ctx else ctx, cont))
        return self._score(pairs)

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        out = []
        for req in requests:
            (text,) = req.args
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                self._encode(text), prefix_token=self.eos, max_seq_len=self.max_length, context_len=1)]
            out.append(sum(s for s, _ in self._score(windows)))
        return out

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        out: list[str] = [""] * len(requests)
        for start in range(0, len(requests), self.batch_size):
            chunk = list(enumerate(requests))[start:start + self.batch_size]
            rows, stops = [], []
            for _, req in chunk:
                context, kwargs = req.args
                until = kwargs.get("until") or []
                until = [until] if isinstance(until, str) else list(until)
                n = int(kwargs.get("max_gen_toks", 256))
                ids = self._encode(context)[-(self.max_length - n):] or [self.eos]
                rows.append(Request(ids, n, eos_token_id=self.eos))
                stops.append(until)
            batch = DecodeBatch(self.model, self.subnet, self.deployment.memo)
            batch.add(rows)
            while len(batch):
                batch.step()
            for (i, _), req, until in zip(chunk, rows, stops, strict=True):
                tokens = [t for t in req.tokens if t != self.eos]
                text = self.tokenizer.decode(tokens)
                cut = min((text.find(s) for s in until if s and s in text), default=len(text))
                out[i] = text[:cut]
        return out


def task_manager(tasks: list[str], include_path: str | None = None) -> Any:
    """lm-eval's TaskManager (with the local tasks of ``include_path``); ConfigError naming unknown tasks."""
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=include_path) if include_path else TaskManager()
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        where = (f" (with --lm-eval-include {include_path})" if include_path
                 else " (add --lm-eval-include DIR for local tasks)")
        raise ConfigError(f"lm-eval does not know task(s) {', '.join(unknown)}{where}")
    return manager


def run_tasks(model: HybridLM, tokenizer: Any, subnet: Subnet | None, tasks: list[str], *,
              include_path: str | None = None, limit: int | None = None, batch_size: int = 8,
              manager: Any = None) -> dict[str, float]:
    """lm-eval's ``simple_evaluate`` of ``tasks`` on one budget: ``{"task/metric": value}`` (standard errors and
    non-numeric entries left out). ``manager``: a :func:`task_manager` to reuse (indexing lm-eval's task
    registry takes seconds)."""
    from lm_eval import simple_evaluate

    manager = manager if manager is not None else task_manager(tasks, include_path)
    lm = ElasticLMHarness.for_model(model, tokenizer, subnet, batch_size=batch_size)
    result = simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=limit, log_samples=False,
                             bootstrap_iters=0)
    metrics = {}
    for task, values in (result or {}).get("results", {}).items():
        for key, value in values.items():
            if "_stderr" not in key and isinstance(value, (int, float)) and not isinstance(value, bool):
                metrics[f"{task}/{key.split(',')[0]}"] = float(value)
    return metrics


def main() -> None:
    """lm-eval's command line, with ``--model elasticlm`` available."""
    from lm_eval.__main__ import cli_evaluate

    sys.exit(cli_evaluate())


if __name__ == "__main__":
    main()
