# Two images from one file:
#   --target service  migrate, gateway, control plane: no torch, no model stack
#   --target worker   the GPU worker: the service image plus torch, transformers and peft
# CPU torch by default; a CUDA image would swap the index URL in the worker stage.
FROM python:3.11-slim AS service

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
COPY . /app
# Editable, so alembic.ini and migrations/ stay beside the code for `lorafaas migrate`.
RUN pip install -e .

# Non-root; the worker's adapter cache lives in a directory it owns (mount a volume there).
RUN useradd --create-home --uid 10001 lorafaas \
    && mkdir -p /var/lib/lorafaas/cache \
    && chown -R lorafaas:lorafaas /var/lib/lorafaas
USER lorafaas
EXPOSE 8080 8081
CMD ["lorafaas", "--help"]

FROM service AS worker
USER root
# torch first and pinned, in its own layer: by far the largest download, and it changes least.
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu \
    && pip install -e ".[worker]"
ENV LORAFAAS_WORKER__CACHE_DIR=/var/lib/lorafaas/cache
USER lorafaas
CMD ["lorafaas", "worker"]
