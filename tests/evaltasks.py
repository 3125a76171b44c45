"""Local lm-evaluation-harness tasks for the tests and bench/eval.py: a JSONL data file beside a YAML task file, read
by lm-eval's own loader (nothing downloads). A multiple-choice task of corpus snippets whose right answers are the
ones a given model finds most likely (so that model scores 100% and another one about chance), and a perplexity
task."""

from __future__ import annotations

import json
import random
from pathlib import Path

OFFLINE_ENV = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def write_task(root: Path, name: str, docs: list[dict], body: str) -> Path:
    """`root/NAME.jsonl` (the documents) and `root/NAME.yaml` (the task: `body` after its data source)."""
    root.mkdir(parents=True, exist_ok=True)
    data = root / f"{name}.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    (root / f"{name}.yaml").write_text(f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
                                       f"    test: {data}\ntest_split: test\n{body}")
    return root


MULTIPLE_CHOICE = """output_type: multiple_choice
doc_to_text: "{{context}}"
doc_to_choice: "{{choices}}"
doc_to_target: "{{gold}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""

PERPLEXITY = """output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{text}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
"""

GENERATION = """output_type: generate_until
doc_to_text: "{{context}}"
doc_to_target: "{{target}}"
generation_kwargs:
  until: ["\\n\\n"]
  max_gen_toks: 12
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""


def choice_docs(engine, texts: list[str], corpus: str, n_choices: int = 4, tokens: int = 4, seed: int = 0
                ) -> list[dict]:
    """One document per context in `texts` with `n_choices` snippets of `corpus` of `tokens` tokens each as its
    choices; the right one is the first until `label_with` picks it."""
    ids = engine.encode(corpus[:50_000])
    rng = random.Random(seed)
    docs = []
    for context in texts:
        choices: list[str] = []
        while len(choices) < n_choices:
            start = rng.randrange(len(ids) - tokens)
            snippet = engine.tokenizer.decode(ids[start:start + tokens])
            if snippet.strip() and snippet not in choices:
                choices.append(snippet)
        docs.append({"context": context, "choices": choices, "gold": 0})
    return docs


def label_with(engine, root: Path, name: str) -> list[int]:
    """Make each document's right choice the one `engine` finds most likely, as lm-eval scores it (so `engine`
    scores 100% and another model about 1 in the number of choices); rewrites the task's data, returns the
    labels."""
    from moe_platform.serving.evaluation import simple_evaluate
    from moe_platform.serving.lm_eval_backend import EngineLM

    results = simple_evaluate(EngineLM(engine), [name], str(root), None, bootstrap_iters=0, log_samples=True)
    samples = sorted(results["samples"][name], key=lambda s: s["doc_id"])
    data = root / f"{name}.jsonl"
    docs = [json.loads(line) for line in data.read_text().splitlines()]
    labels = []
    for doc, sample in zip(docs, samples, strict=True):
        scores = [r[0] for r in sample["filtered_resps"]]
        doc["gold"] = max(range(len(scores)), key=scores.__getitem__)
        labels.append(doc["gold"])
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    return labels


def contexts(text: str, n: int, chars: int = 60, seed: int = 0) -> list[str]:
    """`n` different slices of `text`, `chars` characters each, cut at a word start."""
    rng = random.Random(seed)
    out: list[str] = []
    while len(out) < n:
        start = rng.randrange(len(text) - 2 * chars)
        start = text.find(" ", start) + 1
        piece = text[start:start + chars].rstrip()
        if piece.strip() and piece not in out:
            out.append(piece)
    return out
