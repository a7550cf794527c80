# syntax=docker/dockerfile:1
# stagedoor: the sidecar image. Build from the repository root:
#   docker build -t stagedoor:0.1.0 .
# Runs `stagedoor run` as an unprivileged user; policies and config are mounted, not baked in
# (docs/deploy.md). Ports: 7007 proxy, 9464 admin (/healthz, /readyz, /metrics).

ARG PYTHON_IMAGE=python:3.12-slim-bookworm

# -- build: install the hash-locked runtime dependencies (no test extras), then stagedoor ----------
# requirements.lock pins every package with its sha256 hashes (refresh: ./run.sh lock); the
# project itself goes in with --no-deps so nothing unlocked can slip in.
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
COPY requirements.lock ./
RUN python -m venv /opt/stagedoor \
    && /opt/stagedoor/bin/pip install --require-hashes --no-deps -r requirements.lock
COPY pyproject.toml README.md ./
COPY stagedoor ./stagedoor
COPY addons ./addons
RUN /opt/stagedoor/bin/pip install --no-deps --no-build-isolation . \
    && /opt/stagedoor/bin/pip check \
    && /opt/stagedoor/bin/stagedoor --help > /dev/null

# -- runtime: the venv, a non-root user, nothing else -------------------------------------------
FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="stagedoor" \
      org.opencontainers.image.description="Policy-driven sidecar proxy for Backstage-style plugin APIs" \
      org.opencontainers.image.licenses="Apache-2.0"

RUN groupadd --system --gid 10001 stagedoor \
    && useradd --system --no-log-init --uid 10001 --gid stagedoor \
       --home-dir /home/stagedoor --create-home --shell /usr/sbin/nologin stagedoor \
    && mkdir -p /etc/stagedoor/config /etc/stagedoor/policies /home/stagedoor/.mitmproxy \
    && chown stagedoor:stagedoor /home/stagedoor/.mitmproxy

COPY --from=build /opt/stagedoor /opt/stagedoor
COPY deploy/docker/container.yaml /usr/local/share/stagedoor/container.yaml

# HOME/.mitmproxy must be writable: mitmproxy creates its CA there at start, even in reverse
# mode (mount an emptyDir there when the root filesystem is read-only).
ENV PATH=/opt/stagedoor/bin:$PATH \
    HOME=/home/stagedoor \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    STAGEDOOR_LISTEN=0.0.0.0:7007 \
    STAGEDOOR_ADMIN_LISTEN=0.0.0.0:9464

USER 10001:10001
WORKDIR /home/stagedoor
EXPOSE 7007 9464

# The admin listener's liveness endpoint, with the interpreter the image already has (no curl).
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; port = os.environ.get('STAGEDOOR_ADMIN_LISTEN', '0.0.0.0:9464').rpartition(':')[2]; urllib.request.urlopen(f'http://127.0.0.1:{port}/healthz', timeout=2)"]

ENTRYPOINT ["stagedoor", "run"]
CMD ["--config", "/etc/stagedoor/config/app-config.yaml", \
     "--config", "/usr/local/share/stagedoor/container.yaml", \
     "--policies", "/etc/stagedoor/policies"]
