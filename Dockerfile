# The proxy image: `twistd -n sidecar`, as a non-root user, for the pod's
# sidecar-proxy container (kube/ and sidecar-inject use it as sidecar-proxy:latest).
#
#   docker build -t sidecar-proxy:latest .
#   docker run --rm -p 8000:8000 sidecar-proxy:latest --upstream host.docker.internal:80
#
# Arguments after the image name replace the default CMD below, so Kubernetes'
# `args:` configure the proxy; see `twistd sidecar --help` for every flag.
#
# The base is pinned to a Python patch release on Debian 12 (the Python the
# constraints were frozen with); the Python packages to image-constraints.txt.
FROM python:3.11.14-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

WORKDIR /src
COPY pyproject.toml README.md LICENSE image-constraints.txt ./
COPY sidecar ./sidecar
COPY twisted ./twisted
# Install the package with every dependency at its pinned version, then build
# Twisted's plugin cache while still root, so the non-root proxy never needs to
# write into site-packages; the sources go.
RUN pip install --no-cache-dir --constraint image-constraints.txt . \
    && python -c "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))" \
    && rm -rf /src

# Any non-root UID works; 1337 is the one the manifests' securityContext names.
USER 1337:1337
WORKDIR /tmp

# 8000: plain HTTP; 8443: mutual TLS (--tls-listen); 15021: health (/healthz/ready,
# /stats/prometheus). The admin server (15000) listens on loopback only: reach it
# with `docker exec CONTAINER sidecar-request GET /stats`.
EXPOSE 8000 8443 15021

# The health port's readiness, asked from inside the container (the image has no
# curl): 503 while the proxy starts or drains, then unhealthy.
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD ["sidecar-request", "--port", "15021", "--timeout", "2", "GET", "/healthz/ready"]

# --pidfile= writes no pid file, so the root filesystem can be read-only.
ENTRYPOINT ["twistd", "--nodaemon", "--pidfile=", "sidecar"]
CMD ["--listen", "8000", "--upstream", "80", "--access-log", "-"]
