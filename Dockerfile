# The proxy image: `twistd -n sidecar`, as a non-root user, for the pod's
# sidecar-proxy container (kube/ and sidecar-inject use it as sidecar-proxy:latest).
#
#   docker build -t sidecar-proxy:latest .
#   docker run --rm -p 8000:8000 sidecar-proxy:latest --upstream host.docker.internal:80
#
# Arguments after the image name replace the default CMD below, so Kubernetes'
# `args:` configure the proxy; see `twistd sidecar --help` for every flag.
FROM python:3.12-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
COPY setup.py README.md ./
COPY sidecar ./sidecar
COPY twisted ./twisted
# Install the package, then build Twisted's plugin cache while still root, so the
# non-root proxy never needs to write into site-packages.
RUN pip install . \
    && python -c "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))" \
    && cd / && rm -rf /src

# Any non-root UID works; 1337 is the one the manifests' securityContext names.
USER 1337:1337
WORKDIR /tmp

# 8000: plain HTTP; 8443: mutual TLS (--tls-listen); 15000: admin (/ready, /stats).
EXPOSE 8000 8443 15000

# --pidfile= writes no pid file, so the root filesystem can be read-only.
ENTRYPOINT ["twistd", "--nodaemon", "--pidfile=", "sidecar"]
CMD ["--listen", "8000", "--upstream", "80", "--log-format", "seed", "--access-log", "-"]
