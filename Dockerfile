# Edge gateway image: slim Python, the project installed from its own pyproject, run as a non-root user.
# Build:  docker build -t gateway .
# Run:    docker run -p 8080:8080 -p 9090:9090 -v $PWD/gateway.yaml:/etc/gateway/gateway.yaml:ro gateway
# The mounted config must set `admin.listen: 0.0.0.0:9090` for the admin port to be reachable from outside.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    GATEWAY_KEY_STORE=/var/lib/gateway/signing-keys.json

# A fixed uid so Kubernetes `runAsUser`/`runAsNonRoot` and volume ownership agree with the image.
RUN groupadd --system --gid 10001 gateway \
 && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/gateway --shell /usr/sbin/nologin gateway \
 && mkdir -p /etc/gateway /var/lib/gateway \
 && chown gateway:gateway /var/lib/gateway

WORKDIR /src
# Only what the package build needs: the layer is rebuilt when the code changes, not on every file.
COPY pyproject.toml README.md ./
COPY gateway/ ./gateway/
RUN pip install . && rm -rf /src
WORKDIR /var/lib/gateway

USER 10001:10001

EXPOSE 8080 9090

# No curl in the slim image: the standard library is enough. /healthz is liveness only (process alive);
# readiness (/readyz) is left to the orchestrator, which must not restart a pod waiting on its JWKS.
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
  CMD ["python", "-c", "import sys, urllib.request; r = urllib.request.urlopen('http://127.0.0.1:9090/healthz', timeout=2); sys.exit(0 if r.status == 200 else 1)"]

ENTRYPOINT ["gateway", "run", "-c", "/etc/gateway/gateway.yaml"]
