"""Packaging for sidecar: the package, its twistd plugin and its console scripts."""

from setuptools import find_packages, setup

setup(
    name="sidecar",
    version="0.1.0",
    description="A service-mesh sidecar proxy on Twisted, in the spirit of Istio's Envoy sidecar.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["sidecar", "sidecar.*"]) + ["twisted.plugins"],
    install_requires=[
        "twisted[tls]>=26.10",
        "treq>=24.9",
        "service-identity>=24.1",
        "pyopenssl>=24.2",
        "cryptography>=42",
        "attrs>=23.1",
        "httptools>=0.6.4",
        "prometheus_client>=0.20",
        "PyYAML>=6.0",
        "h2>=4.1",
    ],
    entry_points={
        "console_scripts": [
            "sidecar-certs = sidecar.certs:main",
            "sidecar-inject = sidecar.inject:main",
        ]
    },
)
