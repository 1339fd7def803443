"""A custom resource's schema out of its CRD, small enough to keep in the repo.

    git -C KSERVE show v0.20.0:config/crd/full/serving.kserve.io_inferenceservices.yaml > crd.yaml
    python deploy/kserve/schema/extract.py crd.yaml KServe v0.20.0 COMMIT \\
        config/crd/full/serving.kserve.io_inferenceservices.yaml \\
        > deploy/kserve/schema/inferenceservice-v1beta1.json

(deploy/k8s/components/servicemonitor/schema/ the same way, from prometheus-operator.) Keeps the
stored version's `openAPIV3Schema` without `status` (never written by us) and without descriptions,
and moves every subschema that occurs more than once (KServe's PodSpec and Container schemas repeat
in predictor, transformer, explainer, ...) into `$defs`, referenced by `$ref`: the same
constraints; inlined back they give the CRD's schema exactly (checked before anything is written).
"""

from __future__ import annotations

import collections
import hashlib
import json
import sys
from pathlib import Path

import yaml

MIN_SIZE = 1000  # characters of compact JSON: smaller repeats are not worth a $ref


def compact(node) -> str:
    return json.dumps(node, sort_keys=True, separators=(",", ":"))


def subtrees(node, path=()):
    """(path, dict) for every dict below `node`, depth first."""
    if isinstance(node, dict):
        yield path, node
        for k, v in node.items():
            yield from subtrees(v, (*path, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from subtrees(v, (*path, i))


def replace(node, text: str, ref: dict):
    if isinstance(node, dict):
        return ref if compact(node) == text else {k: replace(v, text, ref) for k, v in node.items()}
    if isinstance(node, list):
        return [replace(v, text, ref) for v in node]
    return node


def inline(node, defs: dict):
    if isinstance(node, dict):
        if set(node) == {"$ref"}:
            return inline(defs[node["$ref"].rsplit("/", 1)[1]], defs)
        return {k: inline(v, defs) for k, v in node.items()}
    if isinstance(node, list):
        return [inline(v, defs) for v in node]
    return node


def deduplicate(schema: dict) -> dict:
    body, defs = schema, {}
    while True:
        seen = collections.Counter()
        first: dict[str, tuple] = {}
        for tree in (body, *defs.values()):
            for path, sub in subtrees(tree):
                text = compact(sub)
                seen[text] += 1
                first.setdefault(text, path)
        repeated = [t for t, n in seen.items() if n > 1 and len(t) >= MIN_SIZE]
        if not repeated:
            return {**body, "$defs": dict(sorted(defs.items()))}
        text = max(repeated, key=len)
        names = [p for p in first[text] if isinstance(p, str) and p not in ("properties", "items")]
        name = names[-1] if names else "def"
        while name in defs:
            name += "_"
        ref = {"$ref": f"#/$defs/{name}"}
        body = replace(body, text, ref)
        defs = {k: replace(v, text, ref) for k, v in defs.items()}
        defs[name] = json.loads(text)


def undescribed(node):
    """`node` without the schemas' description strings (a property named description stays)."""
    if isinstance(node, dict):
        return {k: undescribed(v) for k, v in node.items() if not (k == "description" and isinstance(v, str))}
    if isinstance(node, list):
        return [undescribed(v) for v in node]
    return node


def main() -> None:
    crd_path, project, tag, commit, source = sys.argv[1:6]
    raw = Path(crd_path).read_bytes()
    crd = yaml.safe_load(raw)
    (version,) = [v for v in crd["spec"]["versions"] if v.get("storage")]
    schema = undescribed(version["schema"]["openAPIV3Schema"])
    schema = {**schema, "properties": {k: v for k, v in schema["properties"].items() if k != "status"}}
    small = deduplicate(schema)
    assert inline({k: v for k, v in small.items() if k != "$defs"}, small.get("$defs", {})) == schema
    if not small["$defs"]:
        del small["$defs"]
    kind, group = crd["spec"]["names"]["kind"], crd["spec"]["group"]
    header = {"$comment": f"openAPIV3Schema of {kind} {group}/{version['name']} from {project} {tag} "
              f"(commit {commit}), {source}, sha256 {hashlib.sha256(raw).hexdigest()}; without "
              "status and descriptions, repeated subschemas moved to $defs (deploy/kserve/schema/extract.py)"}
    json.dump({**header, **small}, sys.stdout, indent=1)
    sys.stdout.write("\n")

if __name__ == "__main__":
    main()
