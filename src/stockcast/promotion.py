"""From an export to the champion: the fingerprint that ties a model to its walk-forward evidence,
that evidence (run now if missing or stale), and the version registered and promoted through the
gate (train.py's last step)."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

from stockcast.gate import RULES, evidence_problem
from stockcast.registry import RegistryError, locked, promote, read_evidence, register
from stockcast.registry import champion as registry_champion
from stockcast.tracking import Run
from stockcast.training import RunError

log = logging.getLogger(__name__)

# what does not change the learned model: logging, progress, checkpoint file names, data location
UNLEARNED = {"data": {"end", "val", "test", "source", "snapshot", "cache_dir", "on_suspicious"},
             "trainer": {"enable_progress_bar", "enable_model_summary", "log_every_n_steps",
                         "default_root_dir"},
             "callbacks": {"dirpath", "filename", "auto_insert_metric_name", "save_top_k", "verbose"}}
LEARNING_CODE = ("data.py", "model.py")  # the windows, the network and its loss


def fingerprint(cfg: DictConfig) -> str:
    """sha256 of what decides the learned model: the data settings but their date range and splits,
    the model, trainer and callbacks, the early-stopping fraction of the served model's fit, the
    seeds averaged, and the source of data.py and model.py. A backtest is evidence for a trained
    model only when the two fingerprints match."""
    def keep(section: str, tree: dict) -> dict:
        return {k: keep(section, v) if isinstance(v, dict) else v for k, v in tree.items()
                if k not in UNLEARNED.get(section, ())}

    what = {k: keep(k, OmegaConf.to_container(cfg[k], resolve=True))
            for k in ("data", "model", "trainer", "callbacks") if cfg.get(k) is not None}
    what["refit"] = {"enabled": bool(cfg.refit.enabled), "val": float(cfg.refit.val)}
    what["seeds"] = int((cfg.get("backtest") or {}).get("seeds") or 1)  # an ensemble is another model
    here = Path(__file__).parent
    what["code"] = {f: hashlib.sha256((here / f).read_bytes()).hexdigest() for f in LEARNING_CODE}
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()


def evidence(cfg: DictConfig) -> dict | None:
    """The walk-forward report the gate judges on (cfg.gate.evidence), if there is one."""
    path = Path(cfg.gate.evidence)
    if not path.exists():
        return None
    try:
        return read_evidence(path)
    except RegistryError as err:
        raise RunError(f"{err}: run backtest.py again") from None


def gate_evidence(cfg: DictConfig, meta: dict) -> dict | None:
    """The walk-forward report the gate judges `meta`'s model on: cfg.gate.evidence, or with
    gate.backtest=auto (and no gate.force) a backtest run now, to the model's last close, when that
    file is missing, of another config or code, or older than the model's data."""
    found = evidence(cfg)
    rules = {k: cfg.gate.get(k) for k in RULES if cfg.gate.get(k) is not None}
    if (cfg.gate.get("force") or cfg.gate.get("backtest", "auto") != "auto"
            or (found is not None and evidence_problem(meta, found, {**RULES, **rules}) is None)):
        return found
    from stockcast.backtest import backtest  # it imports this module

    walk = cfg.copy()
    with open_dict(walk):
        walk.data.end = cfg.refit.end if cfg.refit.enabled else cfg.data.end
        walk.paths.output_dir = str(Path(cfg.paths.output_dir) / "backtest")
        walk.backtest.until = None
        walk.backtest.out_dir = str(Path(cfg.gate.evidence).parent)
    log.info(f"the gate needs a walk-forward backtest of this config: running it now "
             f"(gate.backtest=auto; {Path(cfg.gate.evidence)})")
    backtest(walk)
    return evidence(cfg)


def publish_version(cfg: DictConfig, name: str, folder: Path, run: Run) -> dict:
    """Register the export as a version and make it the champion if the gate passes (or
    cfg.gate.force gives a reason); artifacts/<name> follows the champion."""
    artifacts = Path(cfg.paths.artifacts_dir) / name
    walk_forward = gate_evidence(cfg, json.loads((folder / "meta.json").read_text()))
    with locked(cfg.paths.artifacts_dir, name):
        rules = {k: cfg.gate.get(k) for k in RULES}
        version = register(run.client, name, folder, run.id, walk_forward, **rules)
        decision = promote(run.client, name, version, artifacts, walk_forward, cfg.gate.get("force"), **rules)
    run.tag("stockcast.version", version)
    if decision.passed or cfg.gate.get("force"):
        how = "" if decision.passed else f" FORCED past the gate ({cfg.gate.force}): "
        log.info(f"version {version} is the champion:{how} {decision}")
        log.info(f"artifacts: {artifacts}  (run folder: {cfg.paths.output_dir})")
    else:
        kept = registry_champion(run.client, name)
        log.warning(f"version {version} NOT promoted, {decision}. "
                    + (f"Champion stays version {kept} ({artifacts})." if kept else
                       f"There is no champion: {artifacts} is left as it was.")
                    + f" The version's files: {folder}."
                    + f" Override: gate.force='<reason>' or python -m stockcast.registry promote {name} "
                      f"{version} --force '<reason>'")
    promoted = decision.passed or bool(cfg.gate.get("force"))
    return {"version": version, "gate": str(decision), "promoted": promoted}
