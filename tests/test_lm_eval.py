"""lm-eval's model API on a nested budget, against naive computations with the extracted sub-model."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("lm_eval")

import elasticlm  # noqa: E402
from elasticlm.tokenizer import load_tokenizer  # noqa: E402


def req(kind, *args):
    from lm_eval.api.instance import Instance

    return Instance(kind, {}, args, 0)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from test_deploy import elastic_checkpoint

    path = elastic_checkpoint(tmp_path_factory.mktemp("lme"), name="final")
    deployed = elasticlm.Deployment.load(path)
    model = deployed.model
    return path, elasticlm.extract(model, deployed.budgets["0.7"]).eval(), load_tokenizer(path)


def harness(path, max_length):
    from elasticlm.lm_eval import ElasticLMHarness

    return ElasticLMHarness(checkpoint=str(path), budget="0.7", batch_size="3", max_length=str(max_length))


def naive_logprob(model, ids: list[int], start: int, eos: int = 2) -> tuple[float, bool]:
    """Σ log p(ids[t] | its document so far) for t >= start, one position at a time, and whether each is the
    argmax. As in training, an EOS ends a document: ids[t] is predicted from the document that ids[t-1]
    belongs to, which starts after the last EOS before position t-1."""
    total, greedy = 0.0, True
    with torch.no_grad():
        for t in range(start, len(ids)):
            begin = max((i + 1 for i in range(t - 1) if ids[i] == eos), default=0)
            logits = model(torch.tensor([ids[begin:t]]))[0, -1]
            total += torch.log_softmax(logits, -1)[ids[t]].item()
            greedy &= int(logits.argmax()) == ids[t]
    return total, greedy


def test_loglikelihood_equals_the_extracted_budget(setup):
    path, small, tok = setup
    pairs = [("Q: 1+2", " A: 3"), ("hello", " world"), ("", "x y z"), ("a long context with words ", "end")]
    for max_length in (64, 16):  # 16: the longest pair is cut to its last 17 tokens, as lm-eval's HF model does
        got = harness(path, max_length).loglikelihood([req("loglikelihood", c, x) for c, x in pairs])
        for (context, cont), (lp, greedy) in zip(pairs, got, strict=True):
            if context.endswith(" "):  # the space moves to the continuation
                context, cont = context[:-1], " " + cont
            ctx = tok.encode(context).ids or [small.config.eos_token_id]
            cont_ids = tok.encode(context + cont).ids[len(tok.encode(context).ids):]
            ids = (ctx + cont_ids)[-(max_length + 1):]
            want, want_greedy = naive_logprob(small, ids, len(ids) - len(cont_ids))
            assert lp == pytest.approx(want, rel=1e-4, abs=1e-4) and greedy == want_greedy


def test_rolling_loglikelihood_scores_every_token_once_after_an_eos_prefix(setup):
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    path, small, tok = setup
    text = "a text longer than one window of twenty-four tokens, scored in disjoint windows"
    (got,) = harness(path, 24).loglikelihood_rolling([req("loglikelihood_rolling", text)])
    ids = tok.encode(text).ids
    eos = small.config.eos_token_id
    windows = [make_disjoint_window(w) for w in get_rolling_token_windows(ids, eos, 24, 1)]
    assert len(windows) > 1 and [t for _, cont in windows for t in cont] == ids and windows[0][0] == [eos]
    want = sum(naive_logprob(small, ctx + cont, len(ctx))[0] for ctx, cont in windows)
    assert got == pytest.approx(want, rel=1e-4)


def test_generate_until_equals_elasticlm_generate_cut_at_the_stop(setup):
    path, small, tok = setup
    prompts = ["Q: 1+2", "x", "a somewhat longer prompt"]
    reqs = [req("generate_until", p, {"until": ["\n\n", "7"], "max_gen_toks": 12}) for p in prompts]
    got = harness(path, 64).generate_until(reqs)
    eos = small.config.eos_token_id
    for p, text in zip(prompts, got, strict=True):
        ids = tok.encode(p).ids
        out = elasticlm.generate(small, torch.tensor([ids]), max_new_tokens=12, eos_token_id=eos)[0, len(ids):].tolist()
        want = tok.decode([t for t in out if t != eos])
        cut = min((want.find(s) for s in ("\n\n", "7") if s in want), default=len(want))
        assert text == want[:cut]


def test_loglikelihoods_equal_elasticlm_evals_loss_on_the_same_text(setup):
    """The adapter on the nested budget vs the loss `elasticlm eval` computes (prune.subnet_loss on a packed row
    with document ids from EOS), on the same tokens: Σ log p = -(mean loss × scored tokens)."""
    from elasticlm.elastic.prune import subnet_loss
    from elasticlm.model.documents import document_ids_from_eos

    path, small, tok = setup
    deployed = elasticlm.Deployment.load(path)
    nested = deployed.model
    subnet, eos = deployed.budgets["0.7"], nested.config.eos_token_id
    h = harness(path, 256)
    texts = ["Q: 12+7\nT: 2+7=9 carry 0\nA: 19", "a second document, a little longer than the first one"]
    rolling = h.loglikelihood_rolling([req("loglikelihood_rolling", t) for t in texts])
    pairs = [("Q: 12+7\nT:", " 2+7=9"), ("a second", " document")]
    ll = h.loglikelihood([req("loglikelihood", c, x) for c, x in pairs])
    for text, got in zip(texts, rolling, strict=True):
        ids = torch.tensor([[eos] + tok.encode(text).ids])
        mask = torch.ones_like(ids)
        loss = subnet_loss(nested, subnet, [(ids, document_ids_from_eos(ids, eos), mask)])
        assert got == pytest.approx(-loss * (ids.shape[1] - 1), rel=1e-5)
    for (context, cont), (got, _) in zip(pairs, ll, strict=True):
        ctx, whole = tok.encode(context).ids, tok.encode(context + cont).ids
        ids = torch.tensor([whole])
        mask = torch.zeros_like(ids)
        mask[0, len(ctx):] = 1
        loss = subnet_loss(nested, subnet, [(ids, document_ids_from_eos(ids, eos), mask)])
        assert got == pytest.approx(-loss * (len(whole) - len(ctx)), rel=1e-5)


def test_eval_lm_eval_adds_task_metrics_for_every_budget(setup, tmp_path, capsys):
    """`elasticlm eval --lm-eval TASK` runs a local lm-eval task on every nested budget; the perplexity it
    reports equals exp(-mean log p(target | question)) computed naively with each extracted budget."""
    import json
    import math

    from elasticlm.cli import main

    path, _, tok = setup
    docs = [{"question": f"Q: {a}+{b}\nT:", "answer": str(a + b)} for a, b in [(1, 2), (12, 7), (30, 45)]]
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (tmp_path / "tasks" / "t.yaml").write_text(
        "task: elasticlm_test_ll\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {tmp_path / 'tasks' / 'docs.jsonl'}\ntest_split: test\noutput_type: loglikelihood\n"
        'doc_to_text: "{{question}}"\ndoc_to_target: " {{answer}}"\n'
        "metric_list:\n  - metric: perplexity\n    aggregation: perplexity\n    higher_is_better: false\n")
    out = tmp_path / "report"
    assert main(["eval", "--checkpoint", str(path), "--tasks", "add", "--n", "1", "--difficulty", "default",
                 "--lm-eval", "elasticlm_test_ll", "--lm-eval-include", str(tmp_path / "tasks"),
                 "--out", str(out)]) == 0
    assert "lm-eval elasticlm_test_ll/perplexity" in capsys.readouterr().out
    points = json.loads((out / "eval.json").read_text())["points"]
    deployed = elasticlm.Deployment.load(path)
    nested = deployed.model
    assert {p["budget"] for p in points} == set(deployed.budgets)
    for p in points:
        small = elasticlm.extract(nested, deployed.budgets[p["budget"]]).eval()
        lls = []
        for d in docs:
            ctx, whole = tok.encode(d["question"]).ids, tok.encode(d["question"] + " " + d["answer"]).ids
            lls.append(naive_logprob(small, whole, len(ctx))[0])
        assert p["lm_eval"]["elasticlm_test_ll/perplexity"] == pytest.approx(math.exp(-sum(lls) / len(lls)), rel=1e-4)
    # unknown tasks: one line, before anything runs or is written
    assert main(["eval", "--checkpoint", str(path), "--tasks", "add", "--lm-eval", "no_such_task",
                 "--out", str(tmp_path / "r2")]) == 2
    assert "does not know task(s) no_such_task" in capsys.readouterr().err and not (tmp_path / "r2").exists()
