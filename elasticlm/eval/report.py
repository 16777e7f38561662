"""Per-budget evaluation: validation loss (perplexity) and exact-match accuracy per task family and
difficulty, as a markdown table, a JSON file and a Pareto plot (parameters vs accuracy and loss).

One :class:`Point` is one model evaluated once: a budget of an elastic checkpoint (run as its nested
Subnet of the shared weights — equal to the extracted model, which the deployment tests check) or
a baseline model directory (e.g. a zero-shot pruned model of the same size).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import atomic_directory
from ..config import Subnet
from ..data import synthetic
from ..errors import ConfigError
from ..model.hybrid import HybridLM
from ..model.slicing import SliceMemo
from .tasks import task_accuracy

TASK_GROUPS = {"reasoning": ("add", "vars", "sort"), "recall": ("recall",)}
LEVELS = ("default", "hard")


def parse_tasks(text: str) -> tuple[bool, tuple[str, ...]]:
    """``--tasks`` → (whether to measure perplexity, the task families to score, in canonical order).

    Groups (``reasoning`` = add, vars, sort; ``recall``) and single families may be mixed:

    >>> parse_tasks("ppl,reasoning,recall")
    (True, ('add', 'vars', 'recall', 'sort'))
    >>> parse_tasks("recall, sort")
    (False, ('recall', 'sort'))
    """
    ppl, families = False, set()
    for name in (t.strip().lower() for t in text.split(",")):
        if not name:
            continue
        if name in ("ppl", "perplexity", "loss"):
            ppl = True
        elif name in TASK_GROUPS:
            families.update(TASK_GROUPS[name])
        elif name in synthetic.FAMILIES:
            families.add(name)
        else:
            raise ConfigError(f"unknown task {name!r}; choose from ppl, {', '.join(TASK_GROUPS)} or a single task "
                              f"({', '.join(synthetic.FAMILIES)})")
    if not ppl and not families:
        raise ConfigError("--tasks is empty; give e.g. ppl,reasoning,recall")
    return ppl, tuple(f for f in synthetic.FAMILIES if f in families)


def parse_levels(text: str) -> tuple[str, ...]:
    """``--difficulty default,hard`` → the levels to score (see ``synthetic.DIFFICULTY``)."""
    levels = tuple(t.strip().lower() for t in text.split(",") if t.strip())
    bad = [t for t in levels if t not in LEVELS]
    if bad or not levels:
        raise ConfigError(f"unknown difficulty {bad or text!r}; choose from {', '.join(LEVELS)}")
    return levels


@dataclass
class Point:
    """One evaluated model: ``series`` names the line of points it belongs to in the plot."""

    series: str
    budget: str
    parameters: int
    val_loss: float | None = None
    accuracy: dict[str, dict[str, float]] = field(default_factory=dict)  # level → family → fraction
    source: str = ""
    lm_eval: dict[str, float] = field(default_factory=dict)  # "task/metric" → value (eval --lm-eval)
    val_tokens: int | None = None  # how many tokens val_loss is the mean over

    @property
    def perplexity(self) -> float | None:
        return None if self.val_loss is None else math.exp(self.val_loss)

    def mean_accuracy(self, level: str = "default") -> float | None:
        row = self.accuracy.get(level)
        return sum(row.values()) / len(row) if row else None


@torch.no_grad()
def evaluate_model(model: HybridLM, tokenizer: Any, subnet: Subnet | None, *, families: Iterable[str],
                   levels: Iterable[str], n: int, val_batches: list[Any] | None,
                   think: Subnet | None = None, memo: SliceMemo | None = None) -> tuple[float | None, dict]:
    """Validation loss on ``val_batches`` (None: not measured) and accuracy per level and family."""
    from ..elastic.prune import subnet_loss

    was = model.training
    model.eval()
    try:
        loss = None if val_batches is None else subnet_loss(model, subnet, val_batches)
        accuracy = {level: {f: task_accuracy(model, tokenizer, f, synthetic.DIFFICULTY[f][LEVELS.index(level)],
                                             n, subnet, think=think, memo=memo) for f in families}
                    for level in levels}
    finally:
        model.train(was)
    return loss, accuracy


def markdown_table(points: list[Point]) -> str:
    """One row per point: parameters, loss, perplexity, accuracy per family and difficulty, means."""
    levels = [lv for lv in LEVELS if any(lv in p.accuracy for p in points)]
    families = [f for f in synthetic.FAMILIES if any(f in p.accuracy.get(lv, {}) for p in points for lv in levels)]
    has_loss = any(p.val_loss is not None for p in points)
    head = ["model", "budget", "parameters"] + (["val loss", "ppl"] if has_loss else [])
    for lv in levels:
        col = LEVELS.index(lv)
        head += [f"{f} ({lv[0]}{synthetic.DIFFICULTY[f][col]})" for f in families] + [f"mean {lv}"]
    extra = sorted({k for p in points for k in p.lm_eval})
    head += [f"lm-eval {k}" for k in extra]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for p in points:
        cells = [p.series, p.budget, f"{p.parameters:,}"]
        if has_loss:
            cells += ["–", "–"] if p.val_loss is None else [f"{p.val_loss:.3f}", f"{p.perplexity:.3f}"]
        for lv in levels:
            row = p.accuracy.get(lv, {})
            cells += [f"{100 * row[f]:.0f} %" if f in row else "–" for f in families]
            mean = p.mean_accuracy(lv)
            cells.append("–" if mean is None else f"**{100 * mean:.1f} %**")
        cells += [f"{p.lm_eval[k]:.4g}" if k in p.lm_eval else "–" for k in extra]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def pareto_plot(points: list[Point], path: Path, title: str = "") -> bool:
    """Parameters vs mean accuracy (default difficulty) and vs validation loss, one marker per point,
    a line through each series. False (and nothing written) when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FuncFormatter
    except ImportError:
        return False
    panels = [("mean accuracy (default difficulty, %)", lambda p: None if p.mean_accuracy() is None
               else 100 * p.mean_accuracy()),
              ("validation loss (nats/token)", lambda p: p.val_loss)]
    panels = [(label, get) for label, get in panels if any(get(p) is not None for p in points)]
    if not panels:
        return False
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), squeeze=False)
    markers = "osD^vP*X"
    series = list(dict.fromkeys(p.series for p in points))
    for ax, (label, get) in zip(axes[0], panels, strict=True):
        for i, name in enumerate(series):
            pts = sorted((p for p in points if p.series == name and get(p) is not None), key=lambda p: p.parameters)
            if not pts:
                continue
            xs, ys = [p.parameters for p in pts], [get(p) for p in pts]
            ax.plot(xs, ys, marker=markers[i % len(markers)], label=name, linestyle="-" if len(pts) > 1 else "")
            for p, x, y in zip(pts, xs, ys, strict=True):
                ax.annotate(p.budget, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.xaxis.set_major_formatter(FuncFormatter(_short_count))
        ax.set_xlabel("parameters")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    tmp.replace(path)
    return True


def _short_count(x: float, _pos: object = None) -> str:
    """Axis labels for parameter counts: 780000 → '780K', 1.56e6 → '1.56M'."""
    for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(x) >= div:
            return f"{x / div:.3g}{unit}"
    return f"{x:.0f}"


def save_report(points: list[Point], out: str | Path, meta: dict[str, Any], title: str = "", force: bool = False,
                inputs: list[str | Path] | None = None) -> dict[str, Path]:
    """Write ``eval.json``, ``eval.md`` and (with matplotlib) ``pareto.png`` as the directory ``out`` (atomic;
    an existing report is replaced only with ``force``)."""
    out = Path(out)
    table = markdown_table(points)
    payload = {**meta, "points": [asdict(p) | {"perplexity": p.perplexity, "mean_accuracy": p.mean_accuracy(),
                                               "mean_accuracy_hard": p.mean_accuracy("hard")} for p in points]}
    with atomic_directory(out, force, "report", inputs or []) as tmp:
        (tmp / "eval.json").write_text(json.dumps(payload, indent=2) + "\n")
        (tmp / "eval.md").write_text((f"# {title}\n\n" if title else "") + table + "\n")
        plotted = pareto_plot(points, tmp / "pareto.png", title)
    paths = {"json": out / "eval.json", "table": out / "eval.md"}
    if plotted:
        paths["plot"] = out / "pareto.png"
    return paths


def load_points(path: str | Path) -> list[Point]:
    """The points of an ``eval.json`` written by :func:`save_report`."""
    try:
        data = json.loads(Path(path).read_text())
        keep = {"series", "budget", "parameters", "val_loss", "accuracy", "source", "lm_eval", "val_tokens"}
        return [Point(**{k: v for k, v in p.items() if k in keep}) for p in data["points"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{path}: not an eval.json written by `elasticlm eval` ({exc})") from None



@dataclass
class Entry:
    """A model to evaluate: ``model`` run as ``subnet`` (None: the whole model)."""

    series: str
    budget: str
    model: HybridLM
    tokenizer: Any
    subnet: Subnet | None = None
    source: str = ""
    think: Subnet | None = None  # think small, answer big: the Subnet that writes the trace
    memo: SliceMemo | None = None  # the deployment's kept weight slices, when the model comes from one


def evaluate_entries(entries: list[Entry], *, families: tuple[str, ...], levels: tuple[str, ...], n: int,
                     val_data: Any | None, val_samples: int | None = 48, seq_len: int = 256, batch_size: int = 8,
                     log=print) -> list[Point]:
    """Evaluate every entry; ``val_data`` (a DataConfig, None: no loss) gives the held-out sequences,
    encoded once per distinct tokenizer so that every model is scored on the same text. Files (text, JSONL)
    are scored whole — every token once, in windows of ``seq_len`` (``val_samples``: only that many windows,
    spread over the file); other data gives ``val_samples`` (default 48) sequences of its validation split."""
    from ..data.datasets import is_local, scoring_batches
    from ..elastic.importance import calibration_batches

    batches: dict[str, list[Any]] = {}
    counts: dict[str, int] = {}
    points = []
    for i, e in enumerate(entries, 1):
        val = None
        if val_data is not None:
            key = e.tokenizer.to_str()
            if key not in batches:
                eos = e.model.config.eos_token_id
                if eos is None:
                    raise ConfigError(f"{e.source or e.series}: the model has no eos_token_id, needed to pack "
                                      "validation documents")
                encode = lambda s, t=e.tokenizer: t.encode(s).ids  # noqa: E731
                if is_local(val_data):
                    scored = scoring_batches(val_data, encode, eos, seq_len, batch_size, val_samples)
                    batches[key] = scored.batches
                    log(f"scoring {val_data.path}: {scored.tokens:,} tokens of {scored.documents} document(s) in "
                        f"{scored.windows} window(s) of up to {seq_len}")
                else:
                    batches[key] = list(calibration_batches(val_data, encode, eos, val_samples or 48, seq_len,
                                                            batch_size, "val", True))
                counts[key] = sum(int(m[:, 1:].sum()) for _, _, m in batches[key])
            val = batches[key]
        loss, acc = evaluate_model(e.model, e.tokenizer, e.subnet, families=families, levels=levels, n=n,
                                   val_batches=val if e.think is None else None, think=e.think, memo=e.memo)
        point = Point(e.series, e.budget, e.model.num_parameters(e.subnet), loss, acc, e.source,
                      val_tokens=counts.get(e.tokenizer.to_str()) if val is not None else None)
        points.append(point)
        mean = point.mean_accuracy(levels[0]) if families else None
        log(f"[{i}/{len(entries)}] {e.series} {e.budget}: {point.parameters:,} parameters"
            + ("" if loss is None else f", val loss {loss:.4f}")
            + ("" if mean is None else f", mean accuracy ({levels[0]}) {100 * mean:.1f} %"))
    return points
