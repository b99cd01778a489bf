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
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
FROM ${PYTHON_IMAGE}

ARG VARIANT=cuda
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 \
    DO_NOT_TRACK=1 GX_ANALYTICS_ENABLED=false PROTEIN_CACHE_DIR=/var/cache/protein

# git: the deployments' pull step clones the deployed commit.
RUN apt-get update && apt-get install -y --no-install-recommends git ca-certificates \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/protein
# Dependencies first (a layer that changes only with pyproject.toml), then the code.
COPY pyproject.toml README.md ./
RUN case "$VARIANT" in \
      cpu)  pip install torch==2.14.1 torchvision==0.29.1 --index-url https://download.pytorch.org/whl/cpu ;; \
      cuda) pip install torch==2.14.1 torchvision==0.29.1 ;; \
      *)    echo "VARIANT must be cpu or cuda, not $VARIANT" >&2; exit 2 ;; \
    esac
COPY protein ./protein
COPY tasks ./tasks
COPY flows ./flows
COPY deployments ./deployments
# The worker's own integrations: a kubernetes or docker pool's worker runs this image too.
RUN pip install . prefect-kubernetes prefect-docker \
    && useradd --uid 10001 --create-home protein && mkdir -p /var/cache/protein \
    && chown protein /var/cache/protein

USER protein
ENTRYPOINT ["prefect", "worker", "start"]
CMD ["--pool", "gpu", "--limit", "1"]
