# TorchServe image of the PETR4 LSTM: docker compose up --build   (or: docker build -t stockcast .)
# Both stages pin Debian 12: the plain 3.11-slim tag follows Debian 13, which has no openjdk-17.

FROM python:3.11-slim-bookworm AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH
RUN python -m venv /opt/venv
WORKDIR /build
# torch pinned as TORCH in the Makefile; the CPU index keeps the GBs of CUDA packages out
RUN pip install --no-cache-dir torch==2.13.0+cpu --index-url https://download.pytorch.org/whl/cpu
COPY pyproject.toml README.md ./
COPY src/ src/
# the pin again, so resolving the project's dependencies cannot swap in another torch
RUN pip install --no-cache-dir torch==2.13.0+cpu .

COPY configs/ configs/
COPY data/ data/
COPY handlers/ handlers/
COPY train.py backtest.py ./
# on the bundled snapshot (a build has no business downloading prices): the walk-forward backtest
# the promotion gate judges on, the training run (refused: the build fails), then the archive,
# with the same torch-model-archiver call `make package` makes
RUN python backtest.py experiment=petr4 data.source=csv \
    && python train.py experiment=petr4 data.source=csv \
    && python -m stockcast.package artifacts/petr4 model_store

FROM python:3.11-slim-bookworm
# TorchServe's frontend is Java. The man1 folder: slim images drop /usr/share/man, and the JRE's
# postinst has failed on them when it could not link its man pages there.
RUN mkdir -p /usr/share/man/man1 \
    && apt-get update \
    && apt-get install -y --no-install-recommends openjdk-17-jre-headless \
    && rm -rf /var/lib/apt/lists/*
# a numeric uid, so a runtime (Kubernetes runAsNonRoot) can tell it is not root without /etc/passwd
RUN useradd --uid 10001 --user-group --create-home --home-dir /home/model-server \
    --shell /usr/sbin/nologin model-server

# OMP_NUM_THREADS=1: one thread per worker, as the handler sets; more oversubscribes the cores
ENV PATH=/opt/venv/bin:$PATH \
    OMP_NUM_THREADS=1 \
    PYTHONUNBUFFERED=1
COPY --from=build /opt/venv /opt/venv
WORKDIR /home/model-server
# root-owned and read-only to the server: it can write its logs and key_file.json here, not the model
COPY --from=build /build/model_store/lstm.mar model-store/
COPY handlers/config.docker.properties config.properties
COPY handlers/metrics.yaml metrics.yaml
# production log levels: nothing per request but errors (TorchServe's default: ~4 KB per request)
COPY handlers/log4j2.xml log4j2.xml

USER 10001:10001
EXPOSE 8080 8081 8082
# Healthy only while a worker of lstm is READY: /ping says Healthy even with the workers scaled
# to 0, so this asks the management API (its key is in key_file.json, which TorchServe writes to
# its working directory at each start). Any error, refused key or no READY worker: exit 1.
HEALTHCHECK --interval=30s --timeout=5s --start-period=90s --retries=3 \
    CMD ["python", "-c", "import json, urllib.request as r; key = json.load(open('/home/model-server/key_file.json'))['management']['key']; workers = json.load(r.urlopen(r.Request('http://127.0.0.1:8081/models/lstm', headers={'Authorization': 'Bearer ' + key}), timeout=4))[0]['workers']; raise SystemExit(0 if any(w['status'] == 'READY' for w in workers) else 1)"]
CMD ["torchserve", "--foreground", "--ts-config", "/home/model-server/config.properties", \
     "--log-config", "/home/model-server/log4j2.xml", \
     "--model-store", "/home/model-server/model-store", "--models", "lstm=lstm.mar"]
