# syntax=docker/dockerfile:1
# sijnode: the DICOM node, its workers and its CLI in one image (research use only).
#
#   docker build -t sijnode .
#   docker compose up -d            # node, worker, PostgreSQL, Redis: see compose.yaml
#
# Configuration comes only from SIJNODE_* environment variables (docs/configuration.md).
# No DCMTK: the node speaks DICOM through pynetdicom; DCMTK is needed only by the tests.
# Torch's CUDA libraries come from its wheels; the NVIDIA container toolkit adds the driver.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

# The dependencies first, in their own layer: a change to the code does not reinstall torch.
# Only the package's __init__.py is needed for that (it holds the version).
WORKDIR /src
COPY pyproject.toml constraints.txt README* ./
COPY sijnode/__init__.py sijnode/__init__.py
RUN pip install -c constraints.txt . \
 && pip uninstall -y sijnode

COPY sijnode sijnode
RUN pip install --no-deps -c constraints.txt . \
 && sijnode --version \
 && cd / && rm -rf /src

# A non-root user owns the state: named volumes mounted on /data/spool and /models start
# with this ownership.
RUN useradd --system --uid 10001 --user-group --home-dir /data --no-create-home sijnode \
 && mkdir -p /data/spool /models \
 && chown -R sijnode:sijnode /data /models

# Container defaults; compose.yaml points the database at PostgreSQL and adds a broker.
ENV HOME=/data \
    SIJNODE_DATA_DIR=/data \
    SIJNODE_STORAGE__SPOOL_DIR=/data/spool \
    SIJNODE_DATABASE__URL=sqlite:////data/sijnode.db \
    SIJNODE_METRICS__BIND_ADDRESS=0.0.0.0

USER sijnode
WORKDIR /data

# DICOM listener (node.port) and Prometheus metrics (metrics.port).
EXPOSE 11112 9108

# Healthy when the DICOM listener accepts TCP connections (a bare connect opens no
# association and writes no audit row). Workers override this in compose.yaml.
HEALTHCHECK --interval=30s --timeout=10s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, socket; h = os.environ.get('SIJNODE_NODE__BIND_ADDRESS', '0.0.0.0'); h = '127.0.0.1' if h in ('0.0.0.0', '::', '') else h; socket.create_connection((h, int(os.environ.get('SIJNODE_NODE__PORT', '11112'))), timeout=5).close()"]

CMD ["sijnode", "serve"]
