# One image for every lorafaas service (gateway, controlplane, worker, migrate).
# CPU torch by default; a CUDA image would swap the index URL below.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# torch first, in its own layer: it is by far the largest download and changes least.
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu

WORKDIR /app
COPY . /app
# Editable, so alembic.ini and migrations/ stay beside the code for `lorafaas migrate`.
RUN pip install -e .

# Non-root; the worker's adapter cache lives in a directory it owns (mount a volume there).
RUN useradd --create-home --uid 10001 lorafaas \
    && mkdir -p /var/lib/lorafaas/cache \
    && chown -R lorafaas:lorafaas /var/lib/lorafaas
ENV LORAFAAS_WORKER__CACHE_DIR=/var/lib/lorafaas/cache
USER lorafaas

EXPOSE 8080 8081
CMD ["lorafaas", "--help"]
