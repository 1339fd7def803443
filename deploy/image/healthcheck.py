"""Exit 0 iff a worker of the model is READY: the image's HEALTHCHECK and Kubernetes' exec probes.

    python /home/model-server/healthcheck.py        # in the image; ~0.1 s, standard library only

TorchServe's /ping says Healthy even with every worker scaled to 0, so this asks the management API
for the model's workers, with the management key from the key_file.json TorchServe writes to its
working directory at each start. No key file: a server started with token authorization off (or
one still starting, which then refuses the keyless request). Any error, a refused key or no READY
worker: exit 1, with the reason on stderr (docker inspect and kubectl describe show it).
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.request
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8081", help="TorchServe's management API")
    parser.add_argument("--key-file", type=Path, default=Path("/home/model-server/key_file.json"))
    parser.add_argument("--model", default="lstm")
    # under a probe's 1 s default timeout the kubelet would kill a slower check anyway
    parser.add_argument("--timeout", type=float, default=0.9, help="seconds")
    args = parser.parse_args(argv)
    headers = {}
    try:
        if args.key_file.exists():
            key = json.loads(args.key_file.read_text())["management"]["key"]
            headers["Authorization"] = f"Bearer {key}"
        request = urllib.request.Request(f"{args.url}/models/{args.model}", headers=headers)
        with urllib.request.urlopen(request, timeout=args.timeout) as response:
            states = [w["status"] for w in json.load(response)[0]["workers"]]
    except Exception as err:  # refused key (HTTP 400), not listening, timeout, unexpected body
        print(f"unhealthy: {type(err).__name__}: {err}", file=sys.stderr)
        return 1
    if "READY" not in states:
        print(f"unhealthy: no {args.model} worker is READY ({states})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
