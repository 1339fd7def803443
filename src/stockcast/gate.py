"""The promotion gate: may an exported model serve? It must have trained, its exported files must
reproduce the network, and enough of its walk-forward backtest (same config and code, up to about
its last close) must not be significantly worse than persistence or drift, nor its intervals than
EWMA volatility's."""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime

from stockcast.evaluation import BASELINES, SIGNIFICANT


@dataclass
class Decision:
    passed: bool
    reasons: list[str]  # why it was refused, or what it passed

    def __str__(self) -> str:
        return ("passed: " if self.passed else "refused: ") + "; ".join(self.reasons)


# how much walk-forward evidence the gate wants (gate.* in configs/train.yaml; these are its defaults)
RULES = {"alpha": SIGNIFICANT, "min_forecasts": 250, "min_folds": 4, "max_age_days": 31}
NEEDED = ("fingerprint", "n_test", "folds", "data_end", "rmse_ratio", "rmse_ratio_drift",
          *(f"dm_{x}_{b}" for b in BASELINES for x in ("stat", "p")))


def evidence_problem(meta: dict, evidence: dict, rules: dict) -> str | None:
    """Why `evidence` (a backtest.json record) cannot judge the model of `meta`, or None."""
    name = meta.get("name", "<name>")
    rerun = f"run `python backtest.py experiment={name}` with the same overrides"
    numbers = [evidence.get(k) for k in NEEDED if k not in ("fingerprint", "folds", "data_end")]
    if any(k not in evidence for k in NEEDED) or not all(
            isinstance(x, (int, float)) and math.isfinite(x) for x in numbers):
        return f"the walk-forward report is malformed (missing or non-finite figures): {rerun}"
    try:
        end = datetime.fromisoformat(evidence["data_end"])
    except (TypeError, ValueError):
        return f"the walk-forward report's data_end is not a date: {rerun}"
    if evidence["fingerprint"] != meta.get("fingerprint"):
        theirs, ours = (str(x.get("fingerprint"))[:12] for x in (evidence, meta))
        return (f"the walk-forward backtest is of another config or code (fingerprint {theirs}, this "
                f"model {ours}): {rerun}")
    if evidence.get("until"):
        return (f"a model-selection backtest (backtest.until={evidence['until']}) is not evidence for the "
                f"served model: {rerun} without backtest.until")
    if evidence["n_test"] < rules["min_forecasts"] or len(evidence["folds"]) < rules["min_folds"]:
        return (f"too little walk-forward evidence: {evidence['n_test']} forecasts in "
                f"{len(evidence['folds'])} folds (the gate wants >= {rules['min_forecasts']} in "
                f">= {rules['min_folds']})")
    through = meta.get("data", {}).get("through")
    age = (datetime.fromisoformat(through) - end).days if through else 0
    if age > rules["max_age_days"]:
        return (f"the backtest ends {evidence['data_end']} but the model saw closes to {through}: "
                f"{rerun} on today's data")
    return None


def model_intervals(evidence: dict) -> dict[str, dict]:
    """{"model": its interval scores, "model_closes_only": ...} from a backtest.json record."""
    found = evidence.get("intervals") or {}
    return {k: v for k, v in found.items() if k.startswith("model") and isinstance(v, dict)}


def gate(meta: dict, evidence: dict | None, **rules) -> Decision:
    """May this exported model serve? It trained (it has a val-best checkpoint), its exported
    files reproduce the network, and enough of its walk-forward backtest (same config and code,
    `evidence`, up to about the model's last close) is not significantly worse than persistence or
    drift, nor are its intervals (a quantile model's) than EWMA's. `rules` override RULES."""
    rules = {**RULES, **{k: v for k, v in rules.items() if v is not None}}
    refused = []
    if not meta.get("checkpoint"):
        refused.append("it did not train (no val-best checkpoint)")
    checks = meta.get("checks") or {}
    if not checks.get("passed"):
        refused.append(f"export checks failed: {checks.get('failures') or 'not run'}")
    if evidence is None:
        refused.append(f"no walk-forward backtest of this config: run `python backtest.py "
                       f"experiment={meta.get('name', '<name>')}` with the same overrides")
    elif problem := evidence_problem(meta, evidence, rules):
        refused.append(problem)
    else:
        worse = [f"{b} (RMSE ratio {evidence[f'rmse_ratio{suffix}']:.4f}, DM p {evidence[f'dm_p_{b}']:.3g})"
                 for b, suffix in zip(BASELINES, ("", "_drift"), strict=True)
                 if evidence[f"dm_stat_{b}"] > 0 and evidence[f"dm_p_{b}"] < rules["alpha"]]
        # a quantile model's intervals, and a range model's answers to closes alone, against EWMA's
        for method, scores in model_intervals(evidence).items():
            keys = sorted(k[: -len("_dm_stat_ewma")] for k in scores
                          if k.startswith("score_") and k.endswith("_dm_stat_ewma"))
            if meta.get("levels") and not (keys and all(
                    isinstance(scores.get(f"{key}_{x}_ewma"), (int, float))
                    and math.isfinite(scores[f"{key}_{x}_ewma"]) for key in keys for x in ("dm_stat", "dm_p", "ratio"))):
                refused.append(f"the walk-forward report has no finite interval scores for {method}: "
                               f"run `python backtest.py experiment={meta.get('name', '<name>')}` again")
                continue
            worse += [f"EWMA's {key[len('score_'):]}% intervals{'' if method == 'model' else ' (closes alone)'} "
                      f"(interval score ratio {scores[f'{key}_ratio_ewma']:.3f}, DM p {scores[f'{key}_dm_p_ewma']:.3g})"
                      for key in keys
                      if scores[f"{key}_dm_stat_ewma"] > 0 and scores[f"{key}_dm_p_ewma"] < rules["alpha"]]
        if meta.get("levels") and not model_intervals(evidence):
            refused.append("the walk-forward report has no intervals of this quantile model: run "
                           f"`python backtest.py experiment={meta.get('name', '<name>')}` again")
        if worse:
            refused.append("walk-forward significantly worse than " + " and ".join(worse))
    if refused:
        return Decision(False, refused)
    intervals = model_intervals(evidence).get("model", {})
    also = (f"; interval score {intervals['score_80_ratio_ewma']:.3f}x / {intervals['score_95_ratio_ewma']:.3f}x "
            "EWMA's (80% / 95%), not significantly worse"
            if {"score_80_ratio_ewma", "score_95_ratio_ewma"} <= set(intervals) else "")
    return Decision(True, [f"walk-forward {evidence['n_test']} forecasts in {len(evidence['folds'])} folds "
                           f"{evidence['test_start']}..{evidence['test_end']}: RMSE ratio "
                           f"{evidence['rmse_ratio']:.4f} vs persistence "
                           f"(DM p {evidence['dm_p_persistence']:.2f}), "
                           f"{evidence['rmse_ratio_drift']:.4f} vs drift (p {evidence['dm_p_drift']:.2f}), "
                           "not significantly worse" + also])
