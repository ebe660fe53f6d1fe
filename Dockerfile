# wsproxy container image.
#
#   podman build -t wsproxy:0.1.0 .        (or docker build)
#   podman run --rm wsproxy:0.1.0 version
#
# Two stages on the same slim Python base: `build` installs wsproxy and its
# dependencies (binary wheels) into a virtualenv at /opt/wsproxy; the final stage copies
# only that virtualenv, so pip's caches and build dependencies stay behind. The process
# runs as an unprivileged user and writes nothing outside /tmp, so it works with a
# read-only root filesystem (the Helm chart mounts an emptyDir at /tmp).
#
# PYTHON_IMAGE must be a Debian-based image with python3 (>= 3.11) and its venv module
# on PATH; both stages use it, since the virtualenv links to the base's interpreter.
ARG PYTHON_IMAGE=docker.io/library/python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python3 -m venv /opt/wsproxy
WORKDIR /src
COPY pyproject.toml README.md ./
COPY wsproxy ./wsproxy
# pip compiles the .py files to .pyc here, so the read-only image never needs to.
RUN /opt/wsproxy/bin/pip install --no-cache-dir . \
    && /opt/wsproxy/bin/pip uninstall --yes pip setuptools \
    && /opt/wsproxy/bin/wsproxy version

FROM ${PYTHON_IMAGE}
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="wsproxy" \
      org.opencontainers.image.description="WebSocket keep-alive sidecar: pings clients, enforces pong and write deadlines, relays everything else verbatim." \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.documentation="docs/deploy.md"
RUN groupadd --system --gid 10001 wsproxy \
    && useradd --system --uid 10001 --gid wsproxy --no-create-home \
       --home-dir /nonexistent --shell /usr/sbin/nologin wsproxy
COPY --from=build /opt/wsproxy /opt/wsproxy
# A complete, valid example (the api-manager sidecar case); Kubernetes mounts the real
# config.yaml over /etc/wsproxy.
COPY config.example.yaml /etc/wsproxy/config.yaml
ENV PATH=/opt/wsproxy/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
USER 10001:10001
WORKDIR /tmp
# 8080: clients (listen); 9081: admin (/healthz, /readyz, /metrics), see admin.listen.
EXPOSE 8080 9081
# Exec form, no shell in between: SIGTERM reaches wsproxy, which drains and exits 0.
ENTRYPOINT ["wsproxy"]
CMD ["run", "--config", "/etc/wsproxy/config.yaml"]
