# syntax=docker/dockerfile:1.7
#
# Three images from one file (docs/service.md, "Docker"):
#   api         the HTTP API and the one-shot migration: no torch, no CUDA libraries
#   worker-gpu  a Celery worker with torch and its CUDA libraries (PyPI's torch wheel)
#   worker-cpu  a Celery worker with the CPU build of torch
# The install commands are the ones docs/service.md gives for a machine without Docker.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS source
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN useradd --create-home --uid 10001 cdi && mkdir -p /data && chown cdi /data
WORKDIR /srv/cdi
COPY pyproject.toml alembic.ini ./
COPY README.md* ./
COPY cdi ./cdi
COPY app ./app
COPY worker ./worker
COPY migrations ./migrations

# --- api: the package without torch ---------------------------------------------------------
FROM source AS api
# The API imports no torch: install the project without its dependencies, then the service's
# dependencies, the report's (the web page's figures) and the library's light ones
# (everything but the model stack).
RUN python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
heavy = {'torch', 'diffusers', 'transformers', 'safetensors'}; \
name = lambda d: d.split(';')[0].split('[')[0].split('=')[0].split('>')[0].split('<')[0].strip().lower(); \
print('\n'.join([d for d in p['dependencies'] if name(d) not in heavy] + p['optional-dependencies']['service'] \
+ p['optional-dependencies']['report']))" \
    > /tmp/requirements-api.txt \
 && pip install -r /tmp/requirements-api.txt \
 && pip install --no-deps . \
 && python -c "import app.main, sys; assert 'torch' not in sys.modules"
USER cdi
ENV CDI_ENVIRONMENT=production CDI_BLOB_DIR=/data/blobs CDI_LOG_FORMAT=json
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
  CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"
CMD ["uvicorn", "app.main:create_app", "--factory", "--host", "0.0.0.0", "--port", "8000", "--proxy-headers"]

# --- worker-gpu: torch with CUDA (PyPI's Linux wheel carries its CUDA libraries) ------------
FROM source AS worker-gpu
RUN pip install ".[service,report]"
USER cdi
ENV CDI_ENVIRONMENT=production CDI_BLOB_DIR=/data/blobs CDI_LOG_FORMAT=json CDI_WORKER_DEVICE=cuda
HEALTHCHECK --interval=30s --timeout=20s --start-period=60s --retries=3 \
  CMD celery -A worker.celery_app:celery inspect ping --timeout 10 -d "worker@$HOSTNAME" >/dev/null
CMD ["cdi", "worker", "--hostname", "worker@%h"]

# --- worker-cpu: the CPU build of torch ----------------------------------------------------
FROM source AS worker-cpu
RUN pip install --index-url https://download.pytorch.org/whl/cpu "torch==2.13.0" \
 && pip install ".[service,report]"
USER cdi
ENV CDI_ENVIRONMENT=production CDI_BLOB_DIR=/data/blobs CDI_LOG_FORMAT=json CDI_WORKER_DEVICE=cpu
HEALTHCHECK --interval=30s --timeout=20s --start-period=60s --retries=3 \
  CMD celery -A worker.celery_app:celery inspect ping --timeout 10 -d "worker@$HOSTNAME" >/dev/null
CMD ["cdi", "worker", "--hostname", "worker@%h"]
