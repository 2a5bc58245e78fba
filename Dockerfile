# syntax=docker/dockerfile:1
# One image for every tierq service: the tier workers, Flower, the HTTP API and the simulator.
#   docker build -t tierq:local .
#   docker run --rm tierq:local tiers
# No secret is baked in: ANTHROPIC_API_KEY, TIERQ_FLOWER_BASIC_AUTH and TIERQ_API_TOKENS come from
# the runtime environment (docker-compose.yml, or the Kubernetes Secret in deploy/k8s/).

ARG PYTHON_IMAGE=python:3.11-slim

# ---- build: install the project and its dependencies into a virtualenv ----
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
# dependencies first, exactly as uv.lock pins them (with their hashes), so a code-only change reuses
# this layer; the image runs the workers, Flower, the API and the simulator (tierq[sim,api]): not the
# demo's bundled Redis. uv only exports the lock; pip installs it.
COPY pyproject.toml uv.lock README.md ./
RUN pip install --upgrade pip 'uv==0.13.10' \
    && uv export --frozen --no-emit-project --no-dev --extra sim --extra api -o /tmp/requirements.txt \
    && pip install --require-hashes -r /tmp/requirements.txt \
    && pip uninstall --yes uv
# then the project itself
COPY tierq ./tierq
RUN pip install --no-deps '.' \
    && tierq --help >/dev/null

# ---- runtime ----
FROM ${PYTHON_IMAGE} AS runtime
LABEL org.opencontainers.image.title="tierq" \
      org.opencontainers.image.description="Latency-tiered Celery workers calling Claude"
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PATH=/opt/venv/bin:$PATH \
    TIERQ_LOG_FORMAT=json
RUN groupadd --system --gid 10001 tierq \
    && useradd --system --uid 10001 --gid tierq --home-dir /app --create-home \
       --shell /usr/sbin/nologin tierq
COPY --from=build /opt/venv /opt/venv
WORKDIR /app
USER 10001:10001
# 9808 worker /metrics, 5555 Flower, 8765 simulator, 8080 the HTTP API
EXPOSE 9808 5555 8765 8080
# SIGTERM is Celery's warm shutdown: running jobs finish, nothing new is taken
STOPSIGNAL SIGTERM
ENTRYPOINT ["tierq"]
CMD ["--help"]
