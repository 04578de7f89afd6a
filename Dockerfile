# Crossfield inference server on one CUDA GPU.
#
#   docker build -t crossfield:0.1.0 .
#   docker run --gpus all -p 50051:50051 -p 9090:9090 -v /srv/models:/models:ro crossfield:0.1.0
#
# The base image is plain Python; torch comes from PyPI at the version the test suite runs
# (TORCH_VERSION, the README's `pip install torch==...`; tests/test_deploy_config.py keeps
# them equal). PyPI's Linux torch wheel is its CUDA build and brings the CUDA runtime and
# cuDNN as nvidia-* wheels, so no CUDA base image is needed: the driver is the host's
# (docker run --gpus). torch is then a constraint, so the server's dependencies can never
# replace it with another wheel. See deploy/README.md.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
FROM ${PYTHON_IMAGE}
ARG TORCH_VERSION=2.13.0

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Only what the wheel is built from (.dockerignore keeps the rest out of the context).
WORKDIR /tmp/crossfield-src
COPY pyproject.toml README.md ./
COPY crossfield/ crossfield/
COPY model/ model/
COPY training/ training/
COPY server/ server/
COPY client/ client/
COPY proto/ proto/

RUN python -m pip install --no-cache-dir "torch==${TORCH_VERSION}" \
    && python -c 'import torch; print(f"torch=={torch.__version__}")' > /tmp/torch-constraint.txt \
    && python -m pip install --no-cache-dir --constraint /tmp/torch-constraint.txt ".[server]" \
    && python -c 'import crossfield.server.app, grpc_health.v1.health' \
    && rm -rf /tmp/crossfield-src /tmp/torch-constraint.txt

# A fixed numeric uid so that Kubernetes' runAsNonRoot can verify it.
RUN groupadd --gid 10001 crossfield \
    && useradd --uid 10001 --gid crossfield --create-home --shell /usr/sbin/nologin crossfield \
    && install -d -o root -g root -m 0755 /models \
    && install -d -o 10001 -g 10001 -m 0700 /cache

COPY --chmod=0755 deploy/healthcheck.py /usr/local/bin/crossfield-healthcheck

WORKDIR /home/crossfield
USER 10001:10001

# The model repository (<repo>/<model>/<version>/{model.pt, meta.json}); mount it read-only.
VOLUME ["/models"]
# Compiled artefacts of --backend compile/script ($XDG_CACHE_HOME/crossfield): mount
# a persistent volume here (writable by uid 10001) so that a restarted container does not
# compile its models again.
ENV XDG_CACHE_HOME=/cache

# gRPC (crossfield.v1.Inference, health, reflection) and Prometheus metrics.
EXPOSE 50051 9090

# Through the gRPC health service, as load balancers see it; the start period covers
# loading and warming the models. A server with TLS needs CROSSFIELD_HEALTH_CA etc.
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "/usr/local/bin/crossfield-healthcheck"]

ENTRYPOINT ["crossfield", "serve", "--repo", "/models"]
CMD ["--port", "50051", "--metrics-port", "9090"]
