"""Model versions: every exported model is an immutable version in MLflow's model registry; the
promotion gate decides which one becomes the champion, the version `make package` archives, whose
files artifacts/<name>/ holds.

    python -m stockcast.registry list petr4
    python -m stockcast.registry promote petr4 7 [--force "why"]
    python -m stockcast.registry rollback petr4
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path

from stockcast.export import META_FILE, publish, sha256
from stockcast.gate import Decision, gate
from stockcast.tracking import client

CHAMPION = "champion"  # the registered model's alias for the served version
STACK = "champion_stack"  # registered-model tag: JSON list of promoted versions, newest last
EVIDENCE = "backtest.json"  # the walk-forward report a version is judged on, kept with its files


class RegistryError(RuntimeError):
    """A registry action that cannot be done (no such version, nothing to roll back to)."""


@contextlib.contextmanager
def locked(artifacts_dir: str | Path, name: str):
    """One registration or promotion of `name` at a time (two trainings may finish together)."""
    path = Path(artifacts_dir).resolve() / f".{name}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def version_tags(meta: dict, decision: Decision, evidence: dict | None) -> dict[str, str]:
    """What `list` shows and a reader searches by: data range, commit, checksums, the gate; the
    walk-forward figures only of a backtest of this version's config."""
    tags = {"ticker": meta["ticker"], "data_through": meta["data"]["through"],
            "git_commit": str(meta.get("git_commit")), "fingerprint": meta["fingerprint"],
            "gate": "passed" if decision.passed else "refused", "gate_reasons": "; ".join(decision.reasons),
            **{f"sha256_{k}": v for k, v in meta["sha256"].items()}}
    if evidence and evidence.get("fingerprint") == meta["fingerprint"]:
        tags.update({k: f"{evidence[k]:.4g}" for k in ("rmse_ratio", "rmse_ratio_drift", "dm_p_persistence",
                                                          "dm_p_drift", "n_test") if k in evidence})
    return tags


def register(mlflow_client, name: str, folder: Path, run_id: str, evidence: dict | None, **rules) -> str:
    """Register `folder` (an export: model files, meta.json) as the next version of `name`: its
    files are copied to the run's artifact store with meta.json's "version" set; return that id."""
    meta_path = Path(folder) / META_FILE
    meta = json.loads(meta_path.read_text())
    with contextlib.suppress(Exception):  # exists after the first version
        mlflow_client.create_registered_model(name, description=f"stockcast forecaster for {meta['ticker']}")
    run = mlflow_client.get_run(run_id)
    tags = version_tags(meta, gate(meta, evidence, **rules), evidence)
    created = mlflow_client.create_model_version(name, source=f"{run.info.artifact_uri}/model", run_id=run_id,
                                                 tags=tags)
    try:
        meta["version"] = str(created.version)
        meta_path.write_text(json.dumps(meta, indent=2))
        if evidence is not None:
            (Path(folder) / EVIDENCE).write_text(json.dumps(evidence, indent=2))
        mlflow_client.log_artifacts(run_id, str(folder), "model")
    except BaseException:  # no version without its files
        mlflow_client.delete_model_version(name, created.version)
        raise
    return str(created.version)


def stack(mlflow_client, name: str) -> list[str]:
    return json.loads(mlflow_client.get_registered_model(name).tags.get(STACK, "[]"))


def champion(mlflow_client, name: str) -> str | None:
    with contextlib.suppress(Exception):  # no such model, or no alias yet
        return str(mlflow_client.get_model_version_by_alias(name, CHAMPION).version)
    return None


def fetch(mlflow_client, name: str, version: str, dest: Path) -> Path:
    """Download version `version`'s files into `dest`/model and check them against its checksums."""
    from mlflow.artifacts import download_artifacts

    found = mlflow_client.get_model_version(name, version)
    folder = Path(download_artifacts(artifact_uri=found.source, dst_path=str(dest)))
    for key, expected in found.tags.items():
        if key.startswith("sha256_") and sha256(folder / key.removeprefix("sha256_")) != expected:
            raise RegistryError(f"{name} version {version}: {key.removeprefix('sha256_')} does not match "
                                "its registered checksum")
    return folder


def make_champion(mlflow_client, name: str, version: str, folder: Path, artifacts: Path, promoted: list[str],
                  reason: str) -> None:
    """Make `version` (its fetched files in `folder`) the champion: the promotion list first (what
    rollback follows), then the files in artifacts/<name> (what make package archives), then the
    alias (what `list` shows). A crash in between is repaired by running the same command again.
    The caller holds locked(artifacts_dir, name)."""
    mlflow_client.set_registered_model_tag(name, STACK, json.dumps(promoted))
    publish(folder, artifacts)
    mlflow_client.set_registered_model_alias(name, CHAMPION, version)
    mlflow_client.set_model_version_tag(name, version, "champion_since",
                                        f"{datetime.now(UTC):%Y-%m-%dT%H:%M:%SZ} ({reason})")


def promote(mlflow_client, name: str, version: str, artifacts: Path, evidence: dict | None = None,
            force: str | None = None, **rules) -> Decision:
    """Judge `version` by the gate, on `evidence` (a backtest.json record) or the one registered with
    it, and make it the champion if it passes, or anyway with `force` (the reason is recorded)."""
    with tempfile.TemporaryDirectory(dir=artifacts.parent) as tmp:
        folder = fetch(mlflow_client, name, version, Path(tmp))
        meta = json.loads((folder / META_FILE).read_text())
        if evidence is None and (folder / EVIDENCE).exists():
            evidence = json.loads((folder / EVIDENCE).read_text())
        decision = gate(meta, evidence, **rules)
        for key, value in version_tags(meta, decision, evidence).items():
            if not key.startswith("sha256_"):
                mlflow_client.set_model_version_tag(name, version, key, value)
        if not decision.passed and not force:
            return decision
        if not decision.passed:
            mlflow_client.set_model_version_tag(name, version, "forced", force)
        promoted = [v for v in stack(mlflow_client, name) if v != str(version)] + [str(version)]
        make_champion(mlflow_client, name, str(version), folder, artifacts, promoted,
                      "gate passed" if decision.passed else f"forced: {force}")
    return decision


def rollback(mlflow_client, name: str, artifacts: Path) -> tuple[str, str]:
    """Restore the champion before the current one (the alias, else the promotion list's last);
    return (from, to)."""
    promoted = stack(mlflow_client, name)
    current = champion(mlflow_client, name) or (promoted[-1] if promoted else None)
    earlier = promoted[: promoted.index(current)] if current in promoted else promoted
    if not earlier:
        raise RegistryError(f"{name}: no earlier champion to roll back to (promoted: {promoted or 'none'})")
    previous = earlier[-1]
    with tempfile.TemporaryDirectory(dir=artifacts.parent) as tmp:
        folder = fetch(mlflow_client, name, previous, Path(tmp))
        make_champion(mlflow_client, name, previous, folder, artifacts, earlier,
                      f"rollback from version {current}")
    mlflow_client.set_model_version_tag(name, current, "rolled_back",
                                        f"{datetime.now(UTC):%Y-%m-%dT%H:%M:%SZ}")
    return current, previous


def listing(mlflow_client, name: str) -> str:
    versions = sorted(mlflow_client.search_model_versions(f"name = '{name}'"), key=lambda v: int(v.version))
    if not versions:
        raise RegistryError(f"no registered versions of {name!r} in {mlflow_client.tracking_uri}")
    best = champion(mlflow_client, name)
    lines = [f"{'':2}{'version':>7}  {'data through':12}  {'wf ratio':>8}  {'vs drift':>8}  gate"]
    for v in versions:
        t = v.tags
        mark = "* " if str(v.version) == best else "  "
        lines.append(f"{mark}{v.version:>7}  {t.get('data_through', '?'):12}  {t.get('rmse_ratio', '-'):>8}  "
                     f"{t.get('rmse_ratio_drift', '-'):>8}  {t.get('gate', '?')}"
                     f"{' (forced: ' + t['forced'] + ')' if 'forced' in t else ''}")
    return "\n".join(lines + ["* champion: the version artifacts/<name> holds and make package archives"])


def read_evidence(path: Path) -> dict:
    try:
        record = json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise RegistryError(f"{path}: not a readable walk-forward report ({err})") from None
    if not isinstance(record, dict):
        raise RegistryError(f"{path}: not a walk-forward report (a JSON object from backtest.py)")
    return record


def default_root() -> Path:
    """STOCKCAST_ROOT, else the current folder if it is a checkout (as for train.py run there),
    else the checkout this package is installed from, else the current folder."""
    if os.environ.get("STOCKCAST_ROOT"):
        return Path(os.environ["STOCKCAST_ROOT"])
    for checkout in (Path.cwd(), Path(__file__).resolve().parents[2]):
        if (checkout / "configs" / "train.yaml").exists():
            return checkout
    return Path.cwd()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m stockcast.registry", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["list", "champion", "promote", "rollback"])
    parser.add_argument("name", help="the experiment's name: petr4, vale3, ...")
    parser.add_argument("version", nargs="?", help="promote: the version to make champion")
    parser.add_argument("--force", metavar="REASON", help="promote although the gate refused it (recorded)")
    parser.add_argument("--evidence", type=Path, help="the walk-forward report to judge a version on "
                        "(default: artifacts/backtest/<name>/backtest.json if it exists, else the one "
                        "registered with the version)")
    parser.add_argument("--root", type=Path, default=default_root(),
                        help="the project folder (its mlruns.db and artifacts/)")
    args = parser.parse_args()
    artifacts = args.root.resolve() / "artifacts" / args.name
    try:
        mlflow_client = client(args.root)
        if args.command == "list":
            print(listing(mlflow_client, args.name))
        elif args.command == "champion":
            print(champion(mlflow_client, args.name) or sys.exit(f"{args.name}: no champion"))
        elif args.command == "promote":
            if not args.version:
                parser.error("promote needs a version")
            path = args.evidence or args.root.resolve() / "artifacts" / "backtest" / args.name / EVIDENCE
            evidence = read_evidence(path) if args.evidence or path.exists() else None
            with locked(artifacts.parent, args.name):
                decision = promote(mlflow_client, args.name, args.version, artifacts, evidence, args.force)
            if not decision.passed and not args.force:
                print(f"{args.name} version {args.version} not promoted: {decision}; "
                      "--force REASON overrides", file=sys.stderr)
                sys.exit(3)  # as train.py's refusal
            print(f"{args.name}: version {args.version} is the champion, in {artifacts} "
                  "(make package archives it)")
        else:
            with locked(artifacts.parent, args.name):
                current, previous = rollback(mlflow_client, args.name, artifacts)
            print(f"{args.name}: champion rolled back from version {current} to {previous}, in {artifacts} "
                  "(make package archives it)")
    except RegistryError as err:
        sys.exit(f"error: {err}")
    except Exception as err:  # MLflow's own: no such model or version
        if type(err).__name__ != "MlflowException":
            raise
        sys.exit(f"error: {' '.join(str(err).split())[:300]}")


if __name__ == "__main__":
    main()
