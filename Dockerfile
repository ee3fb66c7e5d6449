# One image for every tidemq service and client program:
#   docker run tidemq python -m tidemq coordinator ...   (or broker, proxy, certs, ...)
# docker-compose.yml runs the same argvs as `tide up` (tests/ops/test_containers.py).
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# Dependencies and the package first (cached while only examples change).
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip install --no-cache-dir . \
    && rm -rf src build

COPY examples ./examples

# Non-root: the services write only to /data and the certificate service to /tls.
RUN useradd --system --uid 10001 --user-group --home-dir /app --no-create-home tide \
    && mkdir -p /data /tls \
    && chown tide:tide /data /tls

USER 10001:10001

EXPOSE 7000-7003

# Probes $TIDE_HEALTH_URL/healthz with the TIDE_* certificate (set per service).
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
    CMD ["tide", "health"]

CMD ["python", "-m", "tidemq", "--help"]
