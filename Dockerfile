# The worker image: the project and its dependencies, the entrypoint `prefect worker start`.
#
#   docker build --build-arg VARIANT=cuda -t registry.example.com/protein-worker:1.4.0-cuda .
#   docker build --build-arg VARIANT=cpu  -t registry.example.com/protein-worker:1.4.0-cpu .
#   docker run --gpus all -e PREFECT_API_URL=... registry.example.com/protein-worker:1.4.0-cuda --pool gpu
#
# VARIANT=cuda installs PyPI's default Linux torch wheel, which carries the CUDA runtime itself:
# the host needs only the NVIDIA driver and the container toolkit, no CUDA base image.
# VARIANT=cpu installs torch from PyTorch's CPU index (no CUDA libraries, a much smaller image).
# Flow-run containers started from this image by the kubernetes/docker pools
# (deployments/pools/) replace the entrypoint and run `python -m prefect.engine` (the deployments'
# command: one process that clones the deployed commit and runs the flow).
# Pin the result by tag or digest in PROTEIN_WORKER_IMAGE (`python -m deployments.pools`).
# The base image by tag here; a production build pins it by digest too
# (--build-arg PYTHON_IMAGE=python:3.11-slim-bookworm@sha256:<digest>), as the worker image is pinned.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
FROM ${PYTHON_IMAGE}

ARG VARIANT=cuda
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 \
    DO_NOT_TRACK=1 GX_ANALYTICS_ENABLED=false PROTEIN_CACHE_DIR=/var/cache/protein

# git: the deployments' pull step clones the deployed commit.
RUN apt-get update && apt-get install -y --no-install-recommends git ca-certificates \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/protein
# Dependencies first (a layer that changes only with the lock), then the code. Every library comes
# from requirements.lock, pinned and hash-checked (deployments/worker_lock.py): the versions the CPU
# host and CI run, the same in every build of a tag. The lock holds the dev tools too (pytest, moto,
# ruff: about 100 MB): one lock for every host is worth more than a smaller image.
COPY requirements.lock deployments/worker_lock.py ./
RUN case "$VARIANT" in \
      cpu)  pip install --no-deps torch==2.14.1 torchvision==0.29.1 --index-url https://download.pytorch.org/whl/cpu ;; \
      cuda) ;; \
      *)    echo "VARIANT must be cpu or cuda, not $VARIANT" >&2; exit 2 ;; \
    esac \
    && python worker_lock.py "$VARIANT" < requirements.lock > /tmp/worker.lock \
    && pip install --require-hashes --no-deps -r /tmp/worker.lock && rm /tmp/worker.lock
COPY pyproject.toml README.md ./
COPY protein ./protein
COPY tasks ./tasks
COPY flows ./flows
COPY deployments ./deployments
# The project alone: its dependencies, the worker's integrations (prefect-kubernetes, prefect-docker)
# and the build backend are all in the lock, installed above.
RUN pip install --no-deps --no-build-isolation . \
    && useradd --uid 10001 --create-home protein && mkdir -p /var/cache/protein \
    && chown protein /var/cache/protein

USER protein
ENTRYPOINT ["prefect", "worker", "start"]
CMD ["--pool", "gpu", "--limit", "1"]
