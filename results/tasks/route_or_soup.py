"""Out of domain, on TRAIN prompts only: can a prompt's similarity profile tell when routing beats the soup?

For each fold of eval_finetuned_retriever_ood.sh, its retriever routes 30 train prompts per task of
the other fold (prompts 10-39, not the ones tune_finetuned_ood.sh used), own LoRA removed; each
prompt is generated with its top-3 mixture and with AdapterSoup and scored. Then: routing only above
a top-1 similarity quantile, and a logistic "routing beats the soup" on (top-1, margin) fitted on one
fold's outcomes and applied to the other's.

Usage (from the repository root, after eval_finetuned_retriever_ood.sh; ~10 CPU minutes):
    python results/tasks/route_or_soup.py collect a 30 10   # then b
    python results/tasks/route_or_soup.py analyse
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

OUT = "results/tasks/tuning/route_or_soup"
WORK = "/tmp/loraretriever-bigbench-retriever"


def collect(fold: str, per_task: int, offset: int) -> None:
    from loraretriever.engine.routing import Routing
    from loraretriever.evaluation.retrieval import read_task_names
    from loraretriever.evaluation.tasks import score
    from loraretriever.retrieval.queries import load_queries
    from loraretriever.serving.routed_lm import RoutedLM

    other = "b" if fold == "a" else "a"
    tasks = set(read_task_names(f"results/tasks/finetuned_retriever/fold_{other}.txt"))
    by_task: dict[str, list[dict]] = {}
    for query in load_queries("data/bigbench", "train"):
        if query["task"] in tasks:
            by_task.setdefault(query["task"], []).append(query)
    queries = [q for task in sorted(by_task) for q in by_task[task][offset : offset + per_task]]
    lm = RoutedLM.from_pretrained(None, pool_dir=f"{WORK}/pool_{fold}", embedder=f"{WORK}/embedder_{fold}")
    texts, own = [q["inputs"] for q in queries], [[q["task"]] for q in queries]
    routed = lm.route(texts, top_k=3, weighting="softmax", routing_temperature=0.02, exclude=own)
    profiles = lm.route(texts, top_k=10, uncertain="keep", exclude=own)
    soup = [Routing.pinned([n for n in lm.pool.names if n != q["task"]], mode="fusion") for q in queries]
    rows = [
        {"task": q["task"], "sims": list(p.similarities), "adapters": list(r.adapters)}
        for q, r, p in zip(queries, routed, profiles, strict=True)
    ]
    for name, routings in (("route", routed), ("soup", soup)):
        results = lm.generate_routed(texts, routings, max_new_tokens=16, chat_template=True)
        for row, q, result in zip(rows, queries, results, strict=True):
            row[name] = score(q["metric"], result.text.strip(), q["targets"])
    lm.close()
    Path(f"{OUT}/{fold}.json").write_text(json.dumps(rows))


def analyse() -> None:
    from sklearn.linear_model import LogisticRegression

    summary = {}
    folds = {}
    for fold in "ab":
        rows = json.loads(Path(f"{OUT}/{fold}.json").read_text())
        features = np.array([[r["sims"][0], r["sims"][0] - r["sims"][1]] for r in rows])
        route, soup = np.array([r["route"] for r in rows]), np.array([r["soup"] for r in rows])
        folds[fold] = features, route, soup
        entry = {
            "n": len(rows),
            "route": round(route.mean(), 4),
            "adaptersoup": round(soup.mean(), 4),
            "route_wins": int((route > soup).sum()),
            "soup_wins": int((soup > route).sum()),
        }
        for q in (0.5, 0.7, 0.8, 0.9, 0.95):
            threshold = np.quantile(features[:, 0], q)
            entry[f"route_above_top1_quantile_{q}"] = round(
                np.where(features[:, 0] >= threshold, route, soup).mean(), 4
            )
        summary[fold] = entry
    for fit, apply in (("a", "b"), ("b", "a")):
        x, route, soup = folds[fit]
        decided = route != soup
        mean, scale = x.mean(0), x.std(0)
        model = LogisticRegression().fit((x[decided] - mean) / scale, route[decided] > soup[decided])
        x, route, soup = folds[apply]
        routes = model.predict_proba((x - mean) / scale)[:, 1] >= 0.5
        summary[f"learned_{fit}_to_{apply}"] = {
            "routed_share": round(routes.mean(), 3),
            "score": round(np.where(routes, route, soup).mean(), 4),
            "adaptersoup": round(soup.mean(), 4),
        }
    Path(f"{OUT}/summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    if sys.argv[1] == "collect":
        collect(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    else:
        analyse()
