r"""Saved records of the DW-4 fine-tuning comparison (:mod:`boltzlab.finetune.compare`), for chapter 08.

The comparison takes tens of minutes of CPU, so the chapter loads its records under the smoke and
laptop budgets: ``boltzlab/data/records/finetune_compare_dw4.json`` is the ``records.json`` that
``python -m boltzlab.finetune.compare --size small`` wrote (several runs over disjoint seeds may be
joined with :func:`merge_payloads`). Nothing here imports the checkpoint or runs a sampler.

- :func:`load_comparison` reads a saved payload and checks that it is complete;
- :func:`final_table` gives one row per (task, method): mean and standard deviation over seeds of the
  final reward, path KL, objective E[r] - alpha KL and gap alpha log Z - objective, the extremes over
  seeds, and what fine-tuning spent;
- :func:`curves` gives each seed's (KL, reward) curve of one method, in the order it was measured.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path

from boltzlab.finetune._checks import FinetuneInputError

RECORDS_NAME = "finetune_compare_dw4.json"
_FINAL_KEYS = ("reward", "kl", "objective", "gap")
_COST_KEYS = ("score_rows", "reward_evals", "sampler_steps_per_sample", "wall_s")


def records_path(name: str = RECORDS_NAME) -> Path:
    """Where the package keeps the saved comparison ``name`` (in ``boltzlab/data/records``)."""
    return Path(str(resources.files("boltzlab") / "data" / "records" / name))


def load_comparison(path: str | Path | None = None) -> dict:
    """The payload of a finished comparison: the package's saved one, or the ``records.json`` at ``path``.

    Raises :class:`~boltzlab.finetune.FinetuneInputError` if the file is missing or holds an
    interrupted run (``"complete": false``) or no records.
    """
    file = records_path() if path is None else Path(path)
    if not file.is_file():
        raise FinetuneInputError(f"no comparison records at {file}")
    payload = json.loads(file.read_text())
    if not payload.get("complete", False):
        raise FinetuneInputError(f"{file} holds an interrupted comparison (complete = false): rerun it")
    if not payload.get("records"):
        raise FinetuneInputError(f"{file} holds no records")
    return payload


def merge_payloads(payloads: Sequence[Mapping]) -> dict:
    """Join comparisons run with the same sizes and tasks on disjoint seeds into one payload.

    The tasks (their optimum, the pretrained pool) do not depend on the seed, so the first payload's
    task entries stand for all; sizes, kT, pair scale and each task's optimum must agree exactly.
    """
    if not payloads:
        raise FinetuneInputError("nothing to merge")
    first = payloads[0]
    seeds: list[int] = []
    records: list[dict] = []
    for p in payloads:
        for key in ("size", "sizes", "kT", "pair_scale"):
            if p[key] != first[key]:
                raise FinetuneInputError(f"cannot merge comparisons whose {key!r} differ: {p[key]!r} vs {first[key]!r}")
        for name, task in p["tasks"].items():
            if task["optimum"] != first["tasks"][name]["optimum"]:
                raise FinetuneInputError(f"task {name!r} has a different optimum in one payload: not the same task")
        overlap = set(seeds) & set(p["seeds"])
        if overlap:
            raise FinetuneInputError(f"seeds {sorted(overlap)} appear in two payloads")
        if not p.get("complete", False):
            raise FinetuneInputError("one payload holds an interrupted comparison")
        seeds += list(p["seeds"])
        records += list(p["records"])
    merged = {key: value for key, value in first.items() if key not in ("records", "summary", "seeds", "wall_s")}
    merged.update(seeds=sorted(seeds), records=records, complete=True,
                  wall_s=sum(float(p["wall_s"]) for p in payloads))
    return merged


def final_table(payload: Mapping) -> list[dict]:
    """One row per (task, method), in the records' order: ``seeds``; for each of reward, kl, objective
    and gap its mean, sample standard deviation (``_sd``), minimum and maximum over seeds; the mean of
    score_rows, reward_evals, sampler_steps_per_sample and wall_s; and ``diverged``, the number of
    seeds whose final numbers are not finite."""
    groups: dict[tuple[str, str], list[Mapping]] = {}
    for rec in payload["records"]:
        groups.setdefault((rec["task"], rec["method"]), []).append(rec)
    rows = []
    for (task, method), recs in groups.items():
        finite = [r for r in recs if all(math.isfinite(r["final"][k]) for k in _FINAL_KEYS)]
        row: dict = {"task": task, "method": method, "seeds": len(recs), "diverged": len(recs) - len(finite)}
        for key in _FINAL_KEYS:
            values = [r["final"][key] for r in finite]
            row[key] = statistics.fmean(values) if values else math.nan
            row[f"{key}_sd"] = statistics.stdev(values) if len(values) > 1 else 0.0
            row[f"{key}_min"] = min(values, default=math.nan)
            row[f"{key}_max"] = max(values, default=math.nan)
        for key in _COST_KEYS:
            row[key] = statistics.fmean(float(r[key]) for r in recs)
        rows.append(row)
    return rows


def curves(payload: Mapping, task: str, method: str) -> list[tuple[list[float], list[float]]]:
    """Each seed's curve of ``method`` on ``task`` as (path KL values, mean rewards), in measurement order.

    Fine-tuning runs start at the pretrained sampler (KL 0) where their curve does not already; best-of-N's
    curve runs over N. Raises :class:`~boltzlab.finetune.FinetuneInputError` if there is no such run.
    """
    recs = [r for r in payload["records"] if r["task"] == task and r["method"] == method]
    if not recs:
        raise FinetuneInputError(f"no records of method {method!r} on task {task!r}")
    # reward-weighted regression's first curve point is the pretrained sampler measured with the same
    # evaluation chains as every method's curve (common random numbers): the fairest common start
    starts = {r["seed"]: r["curve"][0] for r in payload["records"]
              if r["task"] == task and r["method"] == "rwr" and r["curve"] and r["curve"][0]["kl"] == 0.0}
    starts_final = {r["seed"]: r["final"] for r in payload["records"] if r["task"] == task and r["method"] == "pretrained"}
    out = []
    for rec in sorted(recs, key=lambda r: r["seed"]):
        kl = [float(p["kl"]) for p in rec["curve"]]
        reward = [float(p["reward"]) for p in rec["curve"]]
        start = starts.get(rec["seed"], starts_final.get(rec["seed"]))
        if method not in ("pretrained", "best_of_n") and kl[0] > 0 and start is not None:
            kl, reward = [0.0] + kl, [float(start["reward"])] + reward
        out.append((kl, reward))
    return out
