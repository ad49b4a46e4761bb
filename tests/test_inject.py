# -*- test-case-name: tests.test_inject -*-
"""
Tests for L{sidecar.inject}, the C{sidecar-inject} command.
"""

from __future__ import annotations

import io
import json
import os
import re
import sys
from typing import Any

import yaml
from twisted.internet.address import IPv4Address
from twisted.internet.defer import inlineCallbacks
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.internet.utils import getProcessOutputAndValue
from twisted.python.filepath import FilePath
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase

from sidecar.drain import DRAINING
from sidecar.inject import (
    DOWNWARD_ENV,
    INIT_NAME,
    PROXY_NAME,
    InjectionError,
    InjectionSettings,
    PROBERS_ENV,
    injectObject,
    injectStream,
    main,
    protocolName,
)
from sidecar.metrics import MeshLabels, workloadLabels
from sidecar.admin import healthSite
from sidecar.probes import appProbers, probePaths, probeResource
from tests.test_admin import AdminSiteMixin
from tests.test_pod_netns import ROOT
from tests.support import subprocessEnv

# The proxy's environment as Kubernetes gives it: these variables, these pod
# fields. sidecar.metrics reads these names.
EXPECTED_ENV = [
    ("POD_NAME", "metadata.name"),
    ("POD_NAMESPACE", "metadata.namespace"),
    ("SERVICE_ACCOUNT", "spec.serviceAccountName"),
    ("APP", "metadata.labels['app']"),
    ("APP_VERSION", "metadata.labels['version']"),
]

# The fieldRef paths the API server accepts in a container's env (the
# description of EnvVarSource.fieldRef in the Kubernetes API; the JSON schemas
# do not check them, the API server does). Labels and annotations take one key.
ENV_FIELD_PATHS = re.compile(
    r"^(metadata\.(name|namespace|uid)|spec\.(nodeName|serviceAccountName)"
    r"|status\.(hostIP|hostIPs|podIP|podIPs)"
    r"|metadata\.(labels|annotations)\['[A-Za-z0-9]([-A-Za-z0-9_./]*[A-Za-z0-9])?'\])$"
)


def proxyEnv(proxy: dict[str, Any]) -> list[tuple[str, str]]:
    """
    @param proxy: the proxy container.
    @return: its environment as (variable, pod field) pairs, checking that
        each is a plain C{fieldRef} of API version C{v1}.
    """
    result = []
    for var in proxy["env"]:
        assert set(var) == {"name", "valueFrom"}, var
        assert set(var["valueFrom"]) == {"fieldRef"}, var
        assert var["valueFrom"]["fieldRef"]["apiVersion"] == "v1", var
        result.append((var["name"], var["valueFrom"]["fieldRef"]["fieldPath"]))
    return result


def resolveEnv(pod: dict[str, Any], proxy: dict[str, Any]) -> dict[str, str]:
    """
    What the kubelet sets the proxy's downward API variables to.

    @param pod: a Pod, as the API server holds it.
    @param proxy: its proxy container.
    @return: the environment; a missing label gives an empty value, as in
        Kubernetes.
    """
    environ = {}
    for name, path in proxyEnv(proxy):
        label = re.match(r"^metadata\.labels\['(.+)'\]$", path)
        if label:
            value = pod["metadata"].get("labels", {}).get(label.group(1), "")
        elif path == "spec.serviceAccountName":
            value = pod["spec"].get("serviceAccountName", "default")
        else:
            section, field = path.split(".")
            value = pod[section][field]
        environ[name] = value
    return environ

POD_SPEC = """
      containers:
      - name: app
        image: example/app:1
        ports:
        - name: metrics
          containerPort: 9125
          protocol: UDP
        - name: http
          containerPort: 8080
        - name: grpc
          containerPort: 9090
"""


def workload(kind: str, apiVersion: str, spec: str = POD_SPEC, annotations: str = "") -> str:
    """
    One workload of a kind, with a pod template.

    @param kind: its kind.
    @param apiVersion: its API version.
    @param spec: the pod spec, indented for a template.
    @param annotations: pod template annotations, indented for a template.
    @return: the YAML document.
    """
    template = f"""
    metadata:
      labels:
        app: web
{annotations}    spec:
{spec.strip(chr(10))}
"""
    if kind == "Pod":
        body = "\n".join(line[4:] for line in template.strip("\n").splitlines())
        return f"apiVersion: {apiVersion}\nkind: Pod\n{body.replace('metadata:', 'metadata:' + chr(10) + '  name: web', 1)}\n"
    if kind == "CronJob":
        inner = "\n".join("    " + line for line in template.strip("\n").splitlines())
        return f"""apiVersion: {apiVersion}
kind: CronJob
metadata:
  name: web
spec:
  schedule: "*/5 * * * *"
  jobTemplate:
    spec:
      template:
{inner.replace("    spec:" + chr(10), "    spec:" + chr(10) + "          restartPolicy: Never" + chr(10), 1)}
"""
    extra = ""
    if kind in ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet"):
        extra = "  selector:\n    matchLabels:\n      app: web\n"
    if kind == "StatefulSet":
        extra += "  serviceName: web\n"
    if kind == "Job":
        template = template.replace("    spec:\n", "    spec:\n      restartPolicy: Never\n", 1)
    return f"""apiVersion: {apiVersion}
kind: {kind}
metadata:
  name: web
spec:
{extra}  template:
{template.strip(chr(10))}
"""


WORKLOADS = {
    "Pod": "v1",
    "Deployment": "apps/v1",
    "StatefulSet": "apps/v1",
    "DaemonSet": "apps/v1",
    "ReplicaSet": "apps/v1",
    "Job": "batch/v1",
    "CronJob": "batch/v1",
}

OTHERS = """
apiVersion: v1
kind: Service
metadata:
  name: web
spec:
  selector: {app: web}
  ports:
  - port: 80
    targetPort: 8080
---
apiVersion: v1
kind: ConfigMap
metadata:
  name: web
data:
  containers: "not a pod"
"""


def podSpecOf(obj: dict[str, Any]) -> dict[str, Any]:
    """
    @param obj: an injected workload.
    @return: its pod spec.
    """
    if obj["kind"] == "Pod":
        return obj["spec"]
    if obj["kind"] == "CronJob":
        return obj["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    return obj["spec"]["template"]["spec"]


def injectOne(text: str, settings: InjectionSettings | None = None) -> dict[str, Any]:
    """
    @param text: one YAML document.
    @param settings: the injection settings, default ones if L{None}.
    @return: the injected object.
    """
    output, notes = injectStream(text, settings or InjectionSettings())
    [obj] = yaml.safe_load_all(output)
    return obj


def container(spec: dict[str, Any], name: str) -> dict[str, Any]:
    """
    @param spec: a pod spec.
    @param name: a container name.
    @return: that init container or container.
    """
    for c in spec.get("initContainers", []) + spec["containers"]:
        if c["name"] == name:
            return c
    raise AssertionError(f"no container {name} in {spec}")


class InjectTests(TestCase):
    """
    L{injectStream} and L{injectObject}.
    """

    def test_everyWorkloadKind(self) -> None:
        """
        Pods, Deployments, StatefulSets, DaemonSets, ReplicaSets, Jobs and
        CronJobs get the init container first and the proxy second among the
        init containers, the proxy as a native sidecar, and their own
        containers unchanged.
        """
        for kind, apiVersion in WORKLOADS.items():
            spec = podSpecOf(injectOne(workload(kind, apiVersion)))
            self.assertEqual([c["name"] for c in spec["initContainers"]], [INIT_NAME, PROXY_NAME], kind)
            self.assertEqual(spec["initContainers"][1]["restartPolicy"], "Always")
            self.assertEqual([c["name"] for c in spec["containers"]], ["app"], kind)

    def test_outputValidates(self) -> None:
        """
        The injected workloads of every kind validate strictly against the
        Kubernetes API schemas of 1.29 and of the newest release known.
        """
        try:
            import kubernetes_validate
        except ImportError:
            raise SkipTest("needs the kubernetes-validate package (pip install -r requirements-test.txt)")
        for kind, apiVersion in WORKLOADS.items():
            for settings in (InjectionSettings(), InjectionSettings(tlsSecret="certs"),
                             InjectionSettings(nativeSidecar=False)):
                obj = injectOne(workload(kind, apiVersion), settings)
                for version in ("1.29", kubernetes_validate.latest_version()):
                    try:
                        kubernetes_validate.validate(obj, version, strict=True)
                    except kubernetes_validate.ValidationError as e:
                        self.fail(f"{kind} with {settings}: invalid for {version}: {e.message}")

    def test_otherKindsUntouched(self) -> None:
        """
        Objects that have no pod template pass through unchanged, whatever
        their fields are called.
        """
        output, notes = injectStream(OTHERS, InjectionSettings())
        self.assertEqual(list(yaml.safe_load_all(output)), list(yaml.safe_load_all(OTHERS)))
        self.assertEqual(notes, [])

    def test_list(self) -> None:
        """
        The items of a C{List}, as C{kubectl get -o yaml} prints them, are
        injected one by one.
        """
        items = [yaml.safe_load(workload("Deployment", "apps/v1")), *yaml.safe_load_all(OTHERS)]
        text = yaml.safe_dump({"apiVersion": "v1", "kind": "List", "items": items})
        result = injectOne(text)
        self.assertEqual([i["kind"] for i in result["items"]], ["Deployment", "Service", "ConfigMap"])
        self.assertIn("initContainers", podSpecOf(result["items"][0]))
        self.assertEqual(result["items"][1:], items[1:])

    def test_idempotent(self) -> None:
        """
        Injecting the output again gives the same text, for every kind.
        """
        for kind, apiVersion in WORKLOADS.items():
            once, _ = injectStream(workload(kind, apiVersion) + "---\n" + OTHERS, InjectionSettings())
            twice, _ = injectStream(once, InjectionSettings())
            self.assertEqual(twice, once, kind)

    def test_reinjectionReplaces(self) -> None:
        """
        Injecting an injected workload with other settings replaces the two
        containers (and the certificates volume) rather than adding more, and
        keeps the workload's own init containers after them.
        """
        spec = POD_SPEC.replace(
            "      containers:\n",
            "      initContainers:\n      - name: migrate\n        image: example/migrate:1\n"
            "      containers:\n",
        )
        first, _ = injectStream(workload("Deployment", "apps/v1", spec), InjectionSettings(tlsSecret="a"))
        second = injectOne(first, InjectionSettings(proxyPort=9000, nativeSidecar=False))
        spec2 = podSpecOf(second)
        self.assertEqual([c["name"] for c in spec2["initContainers"]], [INIT_NAME, "migrate"])
        self.assertEqual([c["name"] for c in spec2["containers"]], ["app", PROXY_NAME])
        self.assertNotIn("volumes", spec2)
        proxy = container(spec2, PROXY_NAME)
        self.assertEqual(proxy["args"][:2], ["--listen", "9000"])
        self.assertEqual(proxyEnv(proxy), EXPECTED_ENV)
        self.assertEqual(proxy["livenessProbe"]["httpGet"]["path"], "/stats/prometheus")

    def test_reinjectionReplacesTheProxysEnvironment(self) -> None:
        """
        A proxy container edited after injection (an environment variable
        added, a downward API path changed, the liveness probe pointed at
        C{/healthz/ready}) is replaced whole on re-injection: the environment is the
        injector's, each variable once.
        """
        once = yaml.safe_load(injectStream(workload("Deployment", "apps/v1"), InjectionSettings())[0])
        proxy = container(podSpecOf(once), PROXY_NAME)
        proxy["env"].append({"name": "EXTRA", "value": "1"})
        proxy["env"][0]["valueFrom"]["fieldRef"]["fieldPath"] = "metadata.uid"
        proxy["livenessProbe"]["httpGet"]["path"] = "/healthz/ready"
        again = container(podSpecOf(injectOne(yaml.safe_dump(once))), PROXY_NAME)
        self.assertEqual(proxyEnv(again), EXPECTED_ENV)
        self.assertEqual(again["livenessProbe"]["httpGet"]["path"], "/stats/prometheus")

    def test_servicePortIsTheFirstTCPPort(self) -> None:
        """
        The proxy forwards to the first TCP container port (UDP ports are not
        HTTP), and the init container captures that port alone.
        """
        spec = podSpecOf(injectOne(workload("Deployment", "apps/v1")))
        proxy = container(spec, PROXY_NAME)
        self.assertEqual(proxy["args"][proxy["args"].index("--upstream") + 1], "8080")
        self.assertEqual(
            container(spec, INIT_NAME)["args"],
            ["-p", "8000", "-b", "8080", "-a", "15000", "-t", "8443", "-d", "15021"],
        )

    def test_annotations(self) -> None:
        """
        The pod template's annotations choose the service port, the captured
        ports (a list, or C{*}, which makes the proxy's upstream C{original})
        and the ports never captured.
        """
        annotations = (
            "      annotations:\n"
            "        sidecar/service-port: \"9090\"\n"
            "        sidecar/inbound-ports: \"*\"\n"
            "        sidecar/exclude-inbound-ports: \"22, 9125\"\n"
        )
        spec = podSpecOf(injectOne(workload("Deployment", "apps/v1", annotations=annotations)))
        proxy = container(spec, PROXY_NAME)
        # Every port captured: each connection goes to the port it was dialled on.
        self.assertEqual(proxy["args"][proxy["args"].index("--upstream") + 1], "original")
        self.assertEqual(
            container(spec, INIT_NAME)["args"],
            ["-p", "8000", "-b", "*", "-a", "15000", "-t", "8443", "-d", "15021,22,9125"],
        )

    def test_portsFromAnnotationWithoutContainerPorts(self) -> None:
        """
        A pod that declares no port is injected when its template names the
        service port in an annotation.
        """
        spec = "      containers:\n      - name: app\n        image: example/app:1\n"
        annotations = "      annotations:\n        sidecar/service-port: \"3000\"\n        sidecar/inbound-ports: \"3000,3001\"\n"
        injected = podSpecOf(injectOne(workload("Deployment", "apps/v1", spec, annotations)))
        self.assertEqual(container(injected, INIT_NAME)["args"][2:4], ["-b", "3000,3001"])

    def test_leftAlone(self) -> None:
        """
        A template that says C{sidecar/inject: "false"}, a pod on the host's
        network and a pod with no port to proxy are left unchanged, each with
        a note saying why.
        """
        optOut = workload("Deployment", "apps/v1", annotations="      annotations:\n        sidecar/inject: \"false\"\n")
        hostNetwork = workload("DaemonSet", "apps/v1", "      hostNetwork: true\n" + POD_SPEC.lstrip("\n"))
        noPorts = workload("Job", "batch/v1", "      containers:\n      - name: app\n        image: example/app:1\n")
        for text, reason in ((optOut, "annotation"), (hostNetwork, "host's network"), (noPorts, "no TCP container port")):
            output, notes = injectStream(text, InjectionSettings())
            self.assertEqual(list(yaml.safe_load_all(output)), [yaml.safe_load(text)])
            [note] = notes
            self.assertIn(reason, note)

    def test_portConflict(self) -> None:
        """
        A container port that the proxy needs is refused with a sentence that
        names the workload, the container and the port.
        """
        text = workload("Deployment", "apps/v1", POD_SPEC.replace("8080", "15000"))
        with self.assertRaises(InjectionError) as caught:
            injectStream(text, InjectionSettings())
        self.assertIn("Deployment/web: container app uses port 15000", str(caught.exception))

    def test_badAnnotation(self) -> None:
        """
        An annotation that is not a port is refused with a sentence naming it.
        """
        text = workload("Deployment", "apps/v1", annotations="      annotations:\n        sidecar/service-port: http\n")
        with self.assertRaises(InjectionError) as caught:
            injectStream(text, InjectionSettings())
        self.assertIn("sidecar/service-port", str(caught.exception))

    def test_ordinaryContainer(self) -> None:
        """
        Without native sidecars the proxy is the last ordinary container, with
        no C{restartPolicy}, for clusters older than Kubernetes 1.29.
        """
        spec = podSpecOf(injectOne(workload("Deployment", "apps/v1"), InjectionSettings(nativeSidecar=False)))
        self.assertEqual([c["name"] for c in spec["initContainers"]], [INIT_NAME])
        self.assertEqual([c["name"] for c in spec["containers"]], ["app", PROXY_NAME])
        self.assertNotIn("restartPolicy", spec["containers"][1])

    def test_downwardEnvironment(self) -> None:
        """
        In every kind, native sidecar or not, plain or mutual TLS, the proxy
        gets C{POD_NAME}, C{POD_NAMESPACE}, C{SERVICE_ACCOUNT}, C{APP} and
        C{APP_VERSION} from the pod's name, namespace, service account and
        C{app} and C{version} labels, as C{fieldRef}s whose paths the API
        server accepts in an environment variable.
        """
        self.assertEqual(list(DOWNWARD_ENV), EXPECTED_ENV)
        for name, path in EXPECTED_ENV:
            self.assertRegex(path, ENV_FIELD_PATHS, name)
        for kind, apiVersion in WORKLOADS.items():
            for settings in (InjectionSettings(), InjectionSettings(tlsSecret="certs"),
                             InjectionSettings(nativeSidecar=False)):
                spec = podSpecOf(injectOne(workload(kind, apiVersion), settings))
                self.assertEqual(proxyEnv(container(spec, PROXY_NAME)), EXPECTED_ENV, kind)
                self.assertNotIn("env", container(spec, INIT_NAME))
                self.assertNotIn("env", container(spec, "app"))

    def test_environmentFillsTheMetricsLabels(self) -> None:
        """
        The environment the kubelet makes of the injected variables gives the
        metrics the destination workload, namespace, app, version, service and
        SPIFFE principal; a pod without a C{version} label reports it
        C{unknown}.
        """
        pod = yaml.safe_load(workload("Pod", "v1"))
        pod["metadata"].update(name="web-7d4b9c8f5-x2k9z", namespace="shop")
        pod["metadata"]["labels"]["version"] = "v2"
        pod["spec"]["serviceAccountName"] = "web-sa"
        injected = injectOne(yaml.safe_dump(pod))
        environ = resolveEnv(injected, container(injected["spec"], PROXY_NAME))
        self.assertEqual(
            workloadLabels(environ),
            MeshLabels(
                workload="web", namespace="shop", app="web", version="v2",
                service="web.shop.svc.cluster.local",
                principal="spiffe://cluster.local/ns/shop/sa/web-sa", cluster="unknown",
            ),
        )
        del injected["metadata"]["labels"]["version"]
        environ = resolveEnv(injected, container(injected["spec"], PROXY_NAME))
        self.assertEqual(environ["APP_VERSION"], "")
        self.assertEqual(workloadLabels(environ).version, "unknown")

    def test_probes(self) -> None:
        """
        The proxy's startup and readiness probes ask the health port's
        C{/healthz/ready} (the admin port is loopback only, out of the
        kubelet's reach); its liveness probe asks C{/stats/prometheus} on the
        health port, never C{/healthz/ready} (503 while draining), and
        tolerates a few slow answers: at least 30 s of failures before a
        restart, more than the default 1 s per answer. The health port follows
        the settings, and is a container port of the proxy; the admin port is
        not.
        """
        for settings in (InjectionSettings(), InjectionSettings(healthPort=15020),
                         InjectionSettings(nativeSidecar=False), InjectionSettings(tlsSecret="certs")):
            proxy = container(podSpecOf(injectOne(workload("Deployment", "apps/v1"), settings)), PROXY_NAME)
            health = settings.healthPort
            for probe in ("startupProbe", "readinessProbe"):
                self.assertEqual(proxy[probe]["httpGet"], {"path": "/healthz/ready", "port": health})
            self.assertIn({"name": "sidecar-health", "containerPort": health}, proxy["ports"])
            self.assertNotIn(settings.adminPort, [p["containerPort"] for p in proxy["ports"]])
            liveness = proxy["livenessProbe"]
            self.assertEqual(liveness["httpGet"], {"path": "/stats/prometheus", "port": health})
            self.assertGreaterEqual(liveness["periodSeconds"] * liveness["failureThreshold"], 30)
            self.assertGreater(liveness["timeoutSeconds"], 1)
            self.assertLessEqual(liveness["timeoutSeconds"], liveness["periodSeconds"])
            self.assertNotIn("initialDelaySeconds", liveness)

    def test_mutualTLS(self) -> None:
        """
        With a TLS Secret, the proxy serves mutual TLS only, from the Secret
        mounted read-only, and captured traffic goes to the TLS port; a pod
        C{fsGroup} already set is kept.
        """
        spec = POD_SPEC.replace("      containers:\n", "      securityContext:\n        fsGroup: 2000\n      containers:\n")
        injected = podSpecOf(injectOne(workload("Deployment", "apps/v1", spec), InjectionSettings(tlsSecret="web-certs")))
        proxy = container(injected, PROXY_NAME)
        self.assertEqual(proxy["args"][:4], ["--listen", "none", "--tls-listen", "8443"])
        self.assertEqual(proxy["volumeMounts"][0]["mountPath"], "/etc/sidecar/certs")
        self.assertEqual(injected["volumes"], [{"name": "sidecar-certs", "secret": {"secretName": "web-certs", "defaultMode": 0o440}}])
        self.assertEqual(injected["securityContext"], {"fsGroup": 2000})
        self.assertEqual(container(injected, INIT_NAME)["args"][:2], ["-p", "8443"])

    def test_inputNotChanged(self) -> None:
        """
        L{injectObject} returns a new object and leaves its argument alone.
        """
        obj = yaml.safe_load(workload("Deployment", "apps/v1"))
        before = yaml.safe_dump(obj)
        injectObject(obj, InjectionSettings())
        self.assertEqual(yaml.safe_dump(obj), before)

    def test_readableOutput(self) -> None:
        """
        The output is block-style YAML with each object's keys in their
        original order, the init containers just before the containers, and
        C{---} before every document; each container's arguments are one line,
        as a command line reads; what the input wrote in flow style stays so.
        """
        output, _ = injectStream(workload("Pod", "v1") + "---\n" + OTHERS, InjectionSettings())
        self.assertEqual(output.count("---\n"), 3)
        self.assertTrue(output.startswith("---\napiVersion: v1\nkind: Pod\nmetadata:\n"))
        self.assertNotIn("{", output.split("---\n")[1])
        self.assertIn('    args: ["--listen", "8000", "--upstream", "8080", "--log-format", "text",'
                      ' "--access-log", "-"]\n', output)
        self.assertIn("  selector: {app: web}\n", output)
        spec = yaml.safe_load(output.split("---\n")[1])["spec"]
        self.assertEqual(list(spec), ["initContainers", "containers"])

    def test_commentsKept(self) -> None:
        """
        The input's comments stay where they were, those before the first
        C{---} included, and a second injection keeps them once.
        """
        text = (
            "# Before the stream.\n---\n# The shop's front end.\n"
            + workload("Deployment", "apps/v1").replace(
                "      - name: app\n", "      # Our own service.\n      - name: app  # port 8080\n")
            + "---\n# A ConfigMap.\n" + OTHERS.split("---\n")[1]
        )
        once, _ = injectStream(text, InjectionSettings())
        for comment in ("# Before the stream.\n---\n# The shop's front end.\napiVersion",
                        "      # Our own service.\n      - name: app  # port 8080\n",
                        "---\n# A ConfigMap.\n"):
            self.assertEqual(once.count(comment), 1, comment)
        self.assertIn(PROXY_NAME, once)
        twice, _ = injectStream(once, InjectionSettings())
        self.assertEqual(twice, once)

    def test_resources(self) -> None:
        """
        The proxy gets Istio's default requests (100m, 128Mi) and limits
        (2000m, 1Gi); Istio's C{sidecar.istio.io/proxyCPU}, C{proxyMemory},
        C{proxyCPULimit} and C{proxyMemoryLimit} annotations override each;
        the init container and the workload's containers get none.
        """
        spec = podSpecOf(injectOne(workload("Deployment", "apps/v1")))
        self.assertEqual(container(spec, PROXY_NAME)["resources"], {
            "requests": {"cpu": "100m", "memory": "128Mi"},
            "limits": {"cpu": "2000m", "memory": "1Gi"},
        })
        self.assertNotIn("resources", container(spec, INIT_NAME))
        self.assertNotIn("resources", container(spec, "app"))
        annotations = (
            "      annotations:\n"
            "        sidecar.istio.io/proxyCPU: \"0.25\"\n"
            "        sidecar.istio.io/proxyMemory: 64Mi\n"
            "        sidecar.istio.io/proxyCPULimit: \"1\"\n"
            "        sidecar.istio.io/proxyMemoryLimit: 256M\n"
        )
        spec = podSpecOf(injectOne(workload("Deployment", "apps/v1", annotations=annotations)))
        self.assertEqual(container(spec, PROXY_NAME)["resources"], {
            "requests": {"cpu": "0.25", "memory": "64Mi"},
            "limits": {"cpu": "1", "memory": "256M"},
        })

    def test_badResources(self) -> None:
        """
        A resource annotation that is not a quantity, or a request above its
        limit (which the API server would refuse), is refused with a sentence
        naming the workload and the annotation.
        """
        for annotations, words in (
            ("sidecar.istio.io/proxyCPU: lots", "Deployment/web's sidecar.istio.io/proxyCPU annotation must be"),
            ("sidecar.istio.io/proxyMemory: 2Gi",
             "Deployment/web: the proxy's memory request 2Gi (from Deployment/web's"
             " sidecar.istio.io/proxyMemory annotation) is above its limit 1Gi (from --proxy-memory-limit)."),
            ("sidecar.istio.io/proxyCPULimit: 50m", "cpu request 100m (from --proxy-cpu) is above its limit 50m"),
            ("sidecar.istio.io/proxyMemoryLimit: \"0\"", "must be above zero"),
        ):
            text = workload("Deployment", "apps/v1", annotations=f"      annotations:\n        {annotations}\n")
            with self.assertRaises(InjectionError) as caught:
                injectStream(text, InjectionSettings())
            self.assertIn(words, str(caught.exception))

    def test_scrapeAnnotations(self) -> None:
        """
        The pod template gets Prometheus' scrape annotations for the proxy's
        metrics on the health port; a template with its own scrape
        annotations keeps them; an earlier injection's follow the health port.
        """
        for kind, apiVersion in WORKLOADS.items():
            obj = injectOne(workload(kind, apiVersion))
            template = obj if kind == "Pod" else (
                obj["spec"]["jobTemplate"]["spec"]["template"] if kind == "CronJob" else obj["spec"]["template"])
            self.assertEqual(template["metadata"]["annotations"], {
                "prometheus.io/scrape": "true", "prometheus.io/port": "15021",
                "prometheus.io/path": "/stats/prometheus",
            }, kind)
            self.assertEqual(template["metadata"]["labels"], {"app": "web"})
        own = "      annotations:\n        prometheus.io/scrape: \"true\"\n        prometheus.io/port: \"9102\"\n"
        obj = injectOne(workload("Deployment", "apps/v1", annotations=own))
        self.assertEqual(obj["spec"]["template"]["metadata"]["annotations"],
                         {"prometheus.io/scrape": "true", "prometheus.io/port": "9102"})
        once, _ = injectStream(workload("Deployment", "apps/v1"), InjectionSettings())
        again = injectOne(once, InjectionSettings(healthPort=15090))
        self.assertEqual(again["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"], "15090")

    def test_logFormat(self) -> None:
        """
        The proxy logs one C{text} line per request to its standard output
        unless told otherwise; the admin and health flags are left to the
        proxy's defaults (admin on loopback) unless the ports differ.
        """
        proxy = container(podSpecOf(injectOne(workload("Deployment", "apps/v1"))), PROXY_NAME)
        self.assertEqual(proxy["args"], ["--listen", "8000", "--upstream", "8080",
                                         "--log-format", "text", "--access-log", "-"])

    def test_healthPortConflict(self) -> None:
        """
        A container port equal to the health port is refused: the proxy needs
        it.
        """
        text = workload("Deployment", "apps/v1", POD_SPEC.replace("9090", "15021"))
        with self.assertRaises(InjectionError) as caught:
            injectStream(text, InjectionSettings())
        self.assertIn("container app uses port 15021", str(caught.exception))

    def test_unparseable(self) -> None:
        """
        YAML that cannot be parsed is refused with the problem and its line.
        """
        with self.assertRaises(InjectionError) as caught:
            injectStream("kind: Pod\nspec: [\n", InjectionSettings())
        self.assertIn("not valid YAML", str(caught.exception))
        self.assertIn("line 3", str(caught.exception))


class ProbePathTests(AdminSiteMixin, SynchronousTestCase):
    """
    The injected probes' paths against the proxy's real health site (the
    health port's), on a memory reactor.
    """

    def setUp(self) -> None:
        super().setUp()
        self.site = healthSite(self.fixture.collector, self.lifecycle, self.harness.reactor)

    def test_appProbesOnTheHealthPort(self) -> None:
        """
        The app's probes the injector rewrites are served by the health site
        built with the probers it hands the proxy: the rewritten tcpSocket
        probe makes the proxy connect to the app's port on 127.0.0.1, and
        answers 200 once connected, 503 when the app refuses.
        """
        spec = (
            "      containers:\n      - name: app\n        image: example/app:1\n        ports:\n"
            "        - containerPort: 8080\n        livenessProbe:\n          tcpSocket:\n            port: 8080\n"
        )
        pod = podSpecOf(injectOne(workload("Deployment", "apps/v1", spec)))
        probe = container(pod, "app")["livenessProbe"]["httpGet"]
        self.assertEqual(probe["port"], 15021)
        env = {v["name"]: v["value"] for v in container(pod, PROXY_NAME)["env"] if "value" in v}
        reactor = self.harness.reactor
        resource = probeResource(appProbers(None, env), reactor)
        self.site = healthSite(self.fixture.collector, self.lifecycle, reactor, more=probePaths(resource))
        for connected, status in ((True, 200), (False, 503)):
            transport = StringTransport(peerAddress=IPv4Address("TCP", "10.0.0.1", 40000))
            channel = self.site.buildProtocol(None)
            channel.makeConnection(transport)
            channel.dataReceived(f"GET {probe['path']} HTTP/1.1\r\nHost: pod\r\n\r\n".encode())
            host, port, factory, _, _ = reactor.tcpClients[-1]
            self.assertEqual((host, port), ("127.0.0.1", 8080))
            if connected:
                factory.buildProtocol(None).makeConnection(StringTransport())
            else:
                factory.clientConnectionFailed(reactor.connectors[-1], Failure(ConnectionRefusedError()))
            self.assertTrue(transport.value().startswith(f"HTTP/1.1 {status} ".encode()), transport.value())

    def probe(self, kind: str) -> int:
        """
        @param kind: C{readinessProbe} or C{livenessProbe}.
        @return: the status the health site gives that probe of an injected
            proxy now.
        """
        proxy = container(podSpecOf(injectOne(workload("Deployment", "apps/v1"))), PROXY_NAME)
        return self.request("GET", proxy[kind]["httpGet"]["path"]).status

    def test_drainingProxyStaysAlive(self) -> None:
        """
        While the proxy serves, both probes pass; once it drains, the
        readiness probe fails (the pod leaves its Services) and the liveness
        probe still passes (the kubelet does not kill the draining proxy).
        """
        self.assertEqual((self.probe("readinessProbe"), self.probe("livenessProbe")), (200, 200))
        self.lifecycle.startDrain()
        self.assertEqual(self.lifecycle.state, DRAINING)
        self.assertEqual((self.probe("readinessProbe"), self.probe("livenessProbe")), (503, 200))


class CommandTests(TestCase):
    """
    L{main}, the C{sidecar-inject} command line.
    """

    def inject(self, argv: list[str], stdin: str = "") -> tuple[int, str, str]:
        """
        @param argv: the arguments.
        @param stdin: the standard input.
        @return: exit status, standard output and standard error.
        """
        out, err = io.StringIO(), io.StringIO()
        try:
            code = main(argv, io.StringIO(stdin), out, err)
        except SystemExit as e:
            code = e.code  # type: ignore[assignment]
        return code, out.getvalue(), err.getvalue()

    def test_stdinToStdout(self) -> None:
        """
        With no file arguments it reads standard input and writes standard
        output.
        """
        code, out, err = self.inject([], workload("Pod", "v1"))
        self.assertEqual((code, err), (0, ""))
        self.assertIn(PROXY_NAME, out)

    def test_files(self) -> None:
        """
        C{-f} reads a file and C{-o} writes one; the flags set the images and
        ports.
        """
        source = FilePath(self.mktemp())
        source.setContent(workload("Deployment", "apps/v1").encode())
        target = FilePath(self.mktemp())
        code, out, err = self.inject(
            ["-f", source.path, "-o", target.path, "--proxy-image", "registry/proxy:2",
             "--init-image", "registry/init:2", "--proxy-port", "15001", "--health-port", "15020",
             "--admin-port", "15019", "--log-format", "json", "--proxy-cpu", "250m",
             "--proxy-memory-limit", "512Mi"]
        )
        self.assertEqual((code, out, err), (0, "", ""))
        spec = podSpecOf(yaml.safe_load(target.getContent()))
        proxy = container(spec, PROXY_NAME)
        self.assertEqual(proxy["image"], "registry/proxy:2")
        self.assertEqual(container(spec, INIT_NAME)["image"], "registry/init:2")
        self.assertEqual(proxy["readinessProbe"]["httpGet"]["port"], 15020)
        self.assertEqual(proxy["livenessProbe"]["httpGet"], {"path": "/stats/prometheus", "port": 15020})
        self.assertEqual(
            proxy["args"],
            ["--listen", "15001", "--upstream", "8080", "--admin", "tcp:15019:interface=127.0.0.1",
             "--health", "15020", "--log-format", "json", "--access-log", "-"])
        self.assertEqual(container(spec, INIT_NAME)["args"],
                         ["-p", "15001", "-b", "8080", "-a", "15019", "-t", "8443", "-d", "15020"])
        self.assertEqual(proxy["resources"], {"requests": {"cpu": "250m", "memory": "128Mi"},
                                              "limits": {"cpu": "2000m", "memory": "512Mi"}})

    def test_notes(self) -> None:
        """
        What was left alone is said on standard error; the exit status is 0.
        """
        text = workload("Job", "batch/v1", "      containers:\n      - name: app\n        image: example/app:1\n")
        code, out, err = self.inject([], text)
        self.assertEqual(code, 0)
        self.assertEqual(err, "sidecar-inject: left Job/web alone: it has no TCP container port and no"
                              " sidecar/service-port annotation, so there is nothing to proxy.\n")

    def test_empty(self) -> None:
        """
        Empty input gives empty output.
        """
        self.assertEqual(self.inject([], ""), (0, "", ""))

    def test_badInput(self) -> None:
        """
        Unparseable YAML, a missing file, an unknown flag, a bad flag value and
        a workload that cannot be injected each give one sentence on standard
        error and a non-zero exit status, and no output.
        """
        conflict = workload("Pod", "v1", POD_SPEC.replace("8080", "8000"))
        cases = [
            ([], "a: [", 1, "not valid YAML"),
            (["-f", "/nonexistent/pods.yaml"], "", 1, "cannot read /nonexistent/pods.yaml"),
            (["--bogus"], "", 2, "unrecognized arguments: --bogus"),
            (["--proxy-port", "http"], "", 2, "--proxy-port"),
            (["--log-format", "xml"], "", 2, "--log-format"),
            (["--proxy-cpu", "lots"], "", 2, "--proxy-cpu"),
            (["--proxy-memory", "1Gi", "--proxy-memory-limit", "512Mi"], workload("Pod", "v1"), 1,
             "memory request 1Gi (from --proxy-memory) is above its limit 512Mi"),
            ([], conflict, 1, "uses port 8000"),
        ]
        for argv, stdin, status, words in cases:
            code, out, err = self.inject(argv, stdin)
            self.assertEqual((code, out), (status, ""), argv)
            self.assertTrue(err.startswith("sidecar-inject: "), err)
            self.assertTrue(err.endswith(".\n") and err.count("\n") == 1, err)
            self.assertIn(words, err)

    @inlineCallbacks
    def test_module(self):
        """
        C{python -m sidecar.inject} runs the same command, exiting non-zero on
        bad input.
        """
        ok = yield getProcessOutputAndValue(
            sys.executable, ("-m", "sidecar.inject", "-f", ROOT.child("kube").child("httpbin-pod.yaml").path),
            env=subprocessEnv(), path=ROOT.path,
        )
        self.assertEqual(ok[2], 0, ok[1])
        self.assertIn(b"kind: Pod", ok[0])
        bad = yield getProcessOutputAndValue(
            sys.executable, ("-m", "sidecar.inject", "--bogus"), env=subprocessEnv(), path=ROOT.path
        )
        self.assertEqual(bad[2], 2)


FIXTURES = ROOT.child("tests").child("fixtures")


def injectFixture(name: str, settings: InjectionSettings | None = None) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """
    Inject one of the fixtures modelled on public manifests.

    @param name: its file name in C{tests/fixtures}.
    @param settings: the injection settings, default ones if L{None}.
    @return: each workload's pod spec by its name, and the notes.
    """
    output, notes = injectStream(FIXTURES.child(name).getContent().decode(), settings or InjectionSettings())
    specs = {doc["metadata"]["name"]: podSpecOf(doc) for doc in yaml.safe_load_all(output)
             if doc["kind"] in WORKLOADS}
    return specs, notes


def protocolFlags(spec: dict[str, Any]) -> list[str]:
    """
    @param spec: an injected pod spec.
    @return: the proxy's C{--port-protocol} and C{--opaque-ports} arguments.
    """
    args = container(spec, PROXY_NAME)["args"]
    found = []
    for i, arg in enumerate(args):
        if arg in ("--port-protocol", "--opaque-ports"):
            found += [arg, args[i + 1]]
    return found


def probers(spec: dict[str, Any]) -> dict[str, Any] | None:
    """
    @param spec: an injected pod spec.
    @return: the proxy's C{ISTIO_KUBE_APP_PROBERS}, parsed, or L{None}.
    """
    for var in container(spec, PROXY_NAME)["env"]:
        if var["name"] == PROBERS_ENV:
            assert set(var) == {"name", "value"}, var
            return json.loads(var["value"])
    return None


def validate(case: TestCase, text: str) -> None:
    """
    Check every object of a YAML stream strictly against the Kubernetes API
    schemas of 1.29 and the newest known.
    """
    try:
        import kubernetes_validate
    except ImportError:
        raise SkipTest("needs the kubernetes-validate package (pip install -r requirements-test.txt)")
    for doc in yaml.safe_load_all(text):
        for version in ("1.29", kubernetes_validate.latest_version()):
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as e:
                case.fail(f"{doc['kind']}/{doc['metadata']['name']} invalid for {version}: {e.message}")


def serviceAndPod(servicePorts: str, containerPorts: str, annotations: str = "", selector: str = "app: web",
                  extra: str = "") -> str:
    """
    A Service and a Deployment of C{app: web}.

    @param servicePorts: the Service's C{ports} entries, indented by 2.
    @param containerPorts: the container's C{ports} entries, indented by 8.
    @param annotations: pod template annotations, indented for a template.
    @param selector: the Service's selector, one line.
    @param extra: more of the Service's C{metadata}, indented by 2.
    @return: the YAML stream.
    """
    spec = f"      containers:\n      - name: app\n        image: example/app:1\n        ports:\n{containerPorts}"
    return (f"apiVersion: v1\nkind: Service\nmetadata:\n  name: web\n{extra}spec:\n  selector:\n    {selector}\n"
            f"  ports:\n{servicePorts}---\n" + workload("Deployment", "apps/v1", spec, annotations))


class ProtocolTests(TestCase):
    """
    Protocol selection as Istio does it, and the proxy's C{--port-protocol}
    and C{--opaque-ports}.
    """

    def test_protocolName(self) -> None:
        """
        A port's protocol is its C{appProtocol} when that names one, else its
        name up to the first hyphen (C{grpc-web} whole), in any case; other
        names (C{httpbin}, C{metrics}, C{udp}) declare nothing.
        """
        for name, appProtocol, expected in (
            ("grpc", None, "grpc"), ("grpc-web", None, "grpc-web"), ("GRPC-api", None, "grpc"),
            ("http2-x", None, "http2"), ("https", None, "https"), ("tcp-redis", None, "tcp"),
            ("redis", None, "redis"), ("mongo-db", None, "mongo"), ("mysql", None, "mysql"),
            ("tls-passthrough", None, "tls"), ("http", None, "http"), ("http-metrics", None, "http"),
            ("httpbin", None, None), ("metrics", None, None), ("udp-dns", None, None), (None, None, None),
            ("web", "kubernetes.io/h2c", "http2"), ("grpc", "http", "http"), ("x", "HTTP2", "http2"),
            ("tcp", "example.com/custom", "tcp"), ("web", "kubernetes.io/wss", "tls"),
        ):
            self.assertEqual(protocolName(name, appProtocol), expected, (name, appProtocol))

    def test_microservicesDemo(self) -> None:
        """
        Google's microservices-demo: the gRPC services' captured ports are
        declared grpc from their Service port names (emailservice's Service
        port 5000 names the container's 8080), redis-cart's 6379 is opaque
        (Service port C{tcp-redis}), the frontend's HTTP port is left to
        detection; nothing is noted.
        """
        specs, notes = injectFixture("microservices-demo.yaml")
        self.assertEqual(notes, [])
        self.assertEqual({name: protocolFlags(spec) for name, spec in specs.items()}, {
            "emailservice": ["--port-protocol", "8080=grpc"],
            "frontend": [],
            "cartservice": ["--port-protocol", "7070=grpc"],
            "redis-cart": ["--opaque-ports", "6379"],
        })
        self.assertEqual(container(specs["redis-cart"], PROXY_NAME)["args"][:6],
                         ["--listen", "8000", "--upstream", "6379", "--opaque-ports", "6379"])

    def test_guestbook(self) -> None:
        """
        The Kubernetes guestbook: the Redis leader and followers, whose
        Service ports have no name, are opaque on 6379, the well-known Redis
        port; the PHP frontend is left to detection.
        """
        specs, notes = injectFixture("guestbook.yaml")
        self.assertEqual(notes, [])
        self.assertEqual({name: protocolFlags(spec) for name, spec in specs.items()}, {
            "redis-leader": ["--opaque-ports", "6379"],
            "redis-follower": ["--opaque-ports", "6379"],
            "frontend": [],
        })

    def test_bookinfo(self) -> None:
        """
        Istio's bookinfo: every Service port is named C{http}, so no port is
        declared to the proxy (HTTP/1.1 is detected from its first bytes), no
        probe is rewritten; its own prometheus.io annotations are kept.
        """
        specs, notes = injectFixture("bookinfo.yaml")
        self.assertEqual(notes, [])
        self.assertEqual(sorted(specs), ["details-v1", "productpage-v1", "reviews-v2"])
        for name, spec in specs.items():
            self.assertEqual(protocolFlags(spec), [], name)
            self.assertIsNone(probers(spec), name)
            self.assertEqual(container(spec, INIT_NAME)["args"][2:4], ["-b", "9080"])

    def test_fixturesValidate(self) -> None:
        """
        The three fixtures, injected plain, with mutual TLS and with outbound
        capture, validate strictly against the Kubernetes API schemas.
        """
        for name in ("bookinfo.yaml", "microservices-demo.yaml", "guestbook.yaml"):
            source = FIXTURES.child(name).getContent().decode()
            validate(self, source)
            for settings in (InjectionSettings(), InjectionSettings(tlsSecret="certs"),
                             InjectionSettings(outbound=True)):
                validate(self, injectStream(source, settings)[0])

    def test_targetPortByName(self) -> None:
        """
        A Service's C{targetPort} may name a container port; the protocol is
        the Service port's, for that container port's number.
        """
        text = serviceAndPod("  - name: grpc-api\n    port: 80\n    targetPort: api\n",
                             "        - name: api\n          containerPort: 9000\n")
        spec = podSpecOf(injectOne(text.split("---\n")[1], InjectionSettings()))
        self.assertEqual(protocolFlags(spec), [])
        output, _ = injectStream(text, InjectionSettings())
        spec = podSpecOf(list(yaml.safe_load_all(output))[1])
        self.assertEqual(protocolFlags(spec), ["--port-protocol", "9000=grpc"])

    def test_onlySelectingServices(self) -> None:
        """
        Only Services that select the pod count: not one whose selector
        differs, one in another namespace, or one without a selector.
        """
        ports = "  - name: redis\n    port: 9000\n"
        containerPorts = "        - containerPort: 9000\n"
        for selector, extra in (("app: other", ""), ("app: web", "  namespace: elsewhere\n"),
                                ("{}", "")):
            text = serviceAndPod(ports, containerPorts, selector=selector, extra=extra)
            text = text.replace("kind: Deployment\nmetadata:\n", "kind: Deployment\nmetadata:\n  namespace: shop\n")
            output, _ = injectStream(text, InjectionSettings())
            self.assertEqual(protocolFlags(podSpecOf(list(yaml.safe_load_all(output))[1])), [], (selector, extra))
        text = serviceAndPod(ports, containerPorts, extra="  namespace: shop\n")
        text = text.replace("kind: Deployment\nmetadata:\n", "kind: Deployment\nmetadata:\n  namespace: shop\n")
        output, _ = injectStream(text, InjectionSettings())
        self.assertEqual(protocolFlags(podSpecOf(list(yaml.safe_load_all(output))[1])), ["--opaque-ports", "9000"])

    def test_precedence(self) -> None:
        """
        A Service's C{appProtocol} beats its port name, the Service beats the
        container port's name, and anything declared beats a well-known port:
        a Service that says C{http} on 6379 leaves it to detection.
        """
        cases = (
            ("  - name: tcp\n    port: 9000\n    appProtocol: kubernetes.io/h2c\n",
             "        - name: redis\n          containerPort: 9000\n", ["--port-protocol", "9000=http2"]),
            ("  - name: other\n    port: 9000\n", "        - name: mongo\n          containerPort: 9000\n",
             ["--opaque-ports", "9000"]),
            ("  - name: http\n    port: 6379\n", "        - containerPort: 6379\n", []),
            ("  - name: web\n    port: 80\n    targetPort: 5432\n", "        - containerPort: 5432\n",
             ["--opaque-ports", "5432"]),
            ("  - name: web\n    port: 3306\n    targetPort: 9000\n", "        - containerPort: 9000\n",
             ["--opaque-ports", "9000"]),
        )
        for servicePorts, containerPorts, expected in cases:
            output, _ = injectStream(serviceAndPod(servicePorts, containerPorts), InjectionSettings())
            self.assertEqual(protocolFlags(podSpecOf(list(yaml.safe_load_all(output))[1])), expected, servicePorts)

    def test_containerPortNames(self) -> None:
        """
        Without a Service, the container port's name declares the protocol;
        only captured ports are declared to the proxy (with C{*}, every one
        but the excluded), in ascending order, opaque ones on one flag.
        """
        spec = (
            "      containers:\n      - name: app\n        image: example/app:1\n        ports:\n"
            "        - {name: http, containerPort: 8080}\n        - {name: grpc, containerPort: 9090}\n"
            "        - {name: redis, containerPort: 7000}\n        - {name: mysql, containerPort: 3306}\n"
            "        - {name: tls, containerPort: 9443}\n"
        )
        plain = podSpecOf(injectOne(workload("Deployment", "apps/v1", spec)))
        self.assertEqual(protocolFlags(plain), [])
        every = "      annotations:\n        sidecar/inbound-ports: \"*\"\n        sidecar/exclude-inbound-ports: \"9443\"\n"
        spec2 = podSpecOf(injectOne(workload("Deployment", "apps/v1", spec, every)))
        self.assertEqual(protocolFlags(spec2), ["--port-protocol", "9090=grpc", "--opaque-ports", "3306,7000"])

    def test_disagreeingServices(self) -> None:
        """
        Two Services that give one port different protocols: the first in the
        stream is used, and a note says so.
        """
        text = serviceAndPod("  - name: grpc\n    port: 9000\n", "        - containerPort: 9000\n")
        other = text.split("---\n")[0].replace("name: web\n", "name: web-tcp\n", 1).replace("- name: grpc", "- name: tcp")
        output, notes = injectStream(text + "---\n" + other, InjectionSettings())
        self.assertEqual(protocolFlags(podSpecOf(list(yaml.safe_load_all(output))[1])), ["--port-protocol", "9000=grpc"])
        self.assertEqual(notes, ["Deployment/web: port 9000 is grpc for Service/web port grpc but tcp for"
                                 " Service/web-tcp port tcp; the first is used"])

    def test_list(self) -> None:
        """
        Services inside a C{List} count, for workloads in the same C{List}.
        """
        docs = list(yaml.safe_load_all(serviceAndPod("  - name: tcp-x\n    port: 9000\n", "        - containerPort: 9000\n")))
        result = injectOne(yaml.safe_dump({"apiVersion": "v1", "kind": "List", "items": docs}))
        self.assertEqual(protocolFlags(podSpecOf(result["items"][1])), ["--opaque-ports", "9000"])


class ProbeRewriteTests(TestCase):
    """
    The app containers' probes, pointed at the proxy's C{/app-health} paths
    where the kubelet could not reach the application itself.
    """

    SPEC = (
        "      containers:\n      - name: app\n        image: example/app:1\n        ports:\n"
        "        - {name: http, containerPort: 8080}\n        - {name: admin, containerPort: 9901}\n"
        "        readinessProbe:\n          initialDelaySeconds: 5\n          httpGet:\n            path: /ready\n"
        "            port: http\n          periodSeconds: 3\n"
        "        livenessProbe:\n          tcpSocket:\n            port: 8080\n          timeoutSeconds: 4\n"
        "        startupProbe:\n          httpGet:\n            path: /started\n            port: 9901\n"
        "            scheme: HTTPS\n"
        "      - name: sidecar-tool\n        image: example/tool:1\n"
        "        livenessProbe:\n          exec:\n            command: [\"true\"]\n"
        "        readinessProbe:\n          tcpSocket:\n            port: 9901\n"
    )

    def test_mutualTLS(self) -> None:
        """
        Under mutual TLS, the app's httpGet probes (any port) and its
        tcpSocket probes of the captured port ask the health port's
        C{/app-health/<container>/readyz|livez|startupz}, keeping their other
        fields in place; the proxy gets the originals in
        C{ISTIO_KUBE_APP_PROBERS}, named ports resolved, the scheme and the
        timeout said. A tcpSocket probe of a port that is not captured, and
        an exec probe, are left alone.
        """
        spec = podSpecOf(injectOne(workload("Deployment", "apps/v1", self.SPEC), InjectionSettings(tlsSecret="c")))
        app = container(spec, "app")
        self.assertEqual(app["readinessProbe"], {
            "initialDelaySeconds": 5,
            "httpGet": {"path": "/app-health/app/readyz", "port": 15021, "scheme": "HTTP"},
            "periodSeconds": 3,
        })
        self.assertEqual(list(app["readinessProbe"]), ["initialDelaySeconds", "httpGet", "periodSeconds"])
        self.assertEqual(app["livenessProbe"], {
            "httpGet": {"path": "/app-health/app/livez", "port": 15021, "scheme": "HTTP"}, "timeoutSeconds": 4})
        self.assertEqual(app["startupProbe"]["httpGet"]["path"], "/app-health/app/startupz")
        self.assertEqual(probers(spec), {
            "/app-health/app/readyz": {"httpGet": {"path": "/ready", "port": 8080, "scheme": "HTTP"},
                                       "timeoutSeconds": 1},
            "/app-health/app/livez": {"tcpSocket": {"port": 8080}, "timeoutSeconds": 4},
            "/app-health/app/startupz": {"httpGet": {"path": "/started", "port": 9901, "scheme": "HTTPS"},
                                         "timeoutSeconds": 1},
        })
        tool = container(spec, "sidecar-tool")
        self.assertEqual(tool["livenessProbe"], {"exec": {"command": ["true"]}})
        self.assertEqual(tool["readinessProbe"], {"tcpSocket": {"port": 9901}})
        self.assertEqual(proxyEnv({"env": container(spec, PROXY_NAME)["env"][:-1]}), EXPECTED_ENV)

    def test_plainObjects(self) -> None:
        """
        L{injectObject} rewrites probes of plain dicts (as C{yaml.safe_load}
        gives them) the same way, each handler in its place, and leaves its
        argument alone.
        """
        obj = yaml.safe_load(workload("Deployment", "apps/v1", self.SPEC))
        before = yaml.safe_dump(obj)
        injected, notes = injectObject(obj, InjectionSettings(tlsSecret="c"))
        self.assertEqual((yaml.safe_dump(obj), notes), (before, []))
        app = container(podSpecOf(injected), "app")
        self.assertEqual(list(app["readinessProbe"].items()), [
            ("initialDelaySeconds", 5),
            ("httpGet", {"path": "/app-health/app/readyz", "port": 15021, "scheme": "HTTP"}),
            ("periodSeconds", 3),
        ])
        self.assertEqual(sorted(probers(podSpecOf(injected)) or {}),
                         ["/app-health/app/livez", "/app-health/app/readyz", "/app-health/app/startupz"])

    def test_plain(self) -> None:
        """
        Without mutual TLS, httpGet probes reach the application through the
        plain proxy and are left alone; a tcpSocket probe of a captured port
        is still rewritten (the proxy would accept its connect whatever the
        application's state).
        """
        spec = podSpecOf(injectOne(workload("Deployment", "apps/v1", self.SPEC)))
        app = container(spec, "app")
        self.assertEqual(app["readinessProbe"]["httpGet"], {"path": "/ready", "port": "http"})
        self.assertEqual(app["startupProbe"]["httpGet"]["port"], 9901)
        self.assertEqual(app["livenessProbe"]["httpGet"]["path"], "/app-health/app/livez")
        self.assertEqual(probers(spec), {"/app-health/app/livez": {"tcpSocket": {"port": 8080}, "timeoutSeconds": 4}})

    def test_istioAnnotation(self) -> None:
        """
        Istio's C{sidecar.istio.io/rewriteAppHTTPProbers}: C{"false"} leaves
        every probe alone, even under mutual TLS (and the proxy gets no
        probers); C{"true"} rewrites httpGet probes of a plain pod too.
        """
        off = "      annotations:\n        sidecar.istio.io/rewriteAppHTTPProbers: \"false\"\n"
        spec = podSpecOf(injectOne(workload("Deployment", "apps/v1", self.SPEC, off), InjectionSettings(tlsSecret="c")))
        self.assertEqual(container(spec, "app")["livenessProbe"], {"tcpSocket": {"port": 8080}, "timeoutSeconds": 4})
        self.assertIsNone(probers(spec))
        self.assertEqual(proxyEnv(container(spec, PROXY_NAME)), EXPECTED_ENV)
        on = off.replace('"false"', '"true"')
        spec = podSpecOf(injectOne(workload("Deployment", "apps/v1", self.SPEC, on)))
        self.assertEqual(sorted(probers(spec) or {}), ["/app-health/app/livez", "/app-health/app/readyz",
                                                       "/app-health/app/startupz"])
        bad = off.replace('"false"', "maybe")
        with self.assertRaises(InjectionError) as caught:
            injectOne(workload("Deployment", "apps/v1", self.SPEC, bad))
        self.assertIn("sidecar.istio.io/rewriteAppHTTPProbers annotation must be \"true\" or \"false\"",
                      str(caught.exception))

    def test_microservicesDemo(self) -> None:
        """
        microservices-demo: redis-cart's tcpSocket probes of 6379 and the
        gRPC services' grpc probes of their captured ports go to the proxy's
        health port in every pod; the frontend's httpGet probes, with their
        Cookie header, are rewritten as its Istio annotation asks.
        """
        specs, _ = injectFixture("microservices-demo.yaml")
        self.assertEqual(probers(specs["redis-cart"]), {
            "/app-health/redis/livez": {"tcpSocket": {"port": 6379}, "timeoutSeconds": 1},
            "/app-health/redis/readyz": {"tcpSocket": {"port": 6379}, "timeoutSeconds": 1},
        })
        self.assertEqual(probers(specs["frontend"])["/app-health/server/readyz"], {
            "httpGet": {"path": "/_healthz", "port": 8080, "scheme": "HTTP",
                        "httpHeaders": [{"name": "Cookie", "value": "shop_session-id=x-readiness-probe"}]},
            "timeoutSeconds": 1,
        })
        for settings in (InjectionSettings(), InjectionSettings(tlsSecret="c")):
            specs, _ = injectFixture("microservices-demo.yaml", settings)
            self.assertEqual(probers(specs["cartservice"]), {
                "/app-health/server/livez": {"grpc": {"port": 7070}, "timeoutSeconds": 1},
                "/app-health/server/readyz": {"grpc": {"port": 7070}, "timeoutSeconds": 1},
            })
            self.assertEqual(container(specs["cartservice"], "server")["readinessProbe"], {
                "initialDelaySeconds": 15,
                "httpGet": {"path": "/app-health/server/readyz", "port": 15021, "scheme": "HTTP"}})
            self.assertEqual(probers(specs["emailservice"]), {
                "/app-health/server/livez": {"grpc": {"port": 8080}, "timeoutSeconds": 1},
                "/app-health/server/readyz": {"grpc": {"port": 8080}, "timeoutSeconds": 1},
            })

    def test_proxyParsesThem(self) -> None:
        """
        Every prober the injector writes for the fixtures, plain or mutual
        TLS, is one the proxy's C{--app-probers} parser accepts, path for path.
        """
        from sidecar.probes import parseProbers

        for name in ("bookinfo.yaml", "microservices-demo.yaml", "guestbook.yaml"):
            for settings in (InjectionSettings(), InjectionSettings(tlsSecret="c")):
                specs, _ = injectFixture(name, settings)
                for spec in specs.values():
                    written = probers(spec) or {}
                    self.assertEqual(sorted(parseProbers(json.dumps(written))),
                                     sorted(p.encode() for p in written))

    def test_reinjection(self) -> None:
        """
        Injecting an injected workload again gives the same text; injecting
        it without mutual TLS puts back the original httpGet probes (their
        ports as numbers) from the old proxy's probers.
        """
        once, _ = injectStream(workload("Deployment", "apps/v1", self.SPEC), InjectionSettings(tlsSecret="c"))
        twice, _ = injectStream(once, InjectionSettings(tlsSecret="c"))
        self.assertEqual(twice, once)
        spec = podSpecOf(injectOne(once))
        app = container(spec, "app")
        self.assertEqual(app["readinessProbe"]["httpGet"], {"path": "/ready", "port": 8080, "scheme": "HTTP"})
        self.assertEqual(app["startupProbe"]["httpGet"], {"path": "/started", "port": 9901, "scheme": "HTTPS"})
        self.assertEqual(probers(spec), {"/app-health/app/livez": {"tcpSocket": {"port": 8080}, "timeoutSeconds": 4}})

    def test_undeclaredNamedPort(self) -> None:
        """
        A probe naming a port that its container does not declare is refused
        with a sentence naming the workload, the container and the port.
        """
        spec = self.SPEC.replace("port: http\n", "port: web\n")
        with self.assertRaises(InjectionError) as caught:
            injectOne(workload("Deployment", "apps/v1", spec), InjectionSettings(tlsSecret="c"))
        self.assertEqual(str(caught.exception), "Deployment/web: container app's readinessProbe names port 'web',"
                                                " which the container does not declare.")


class OutboundTests(TestCase):
    """
    Outbound capture: off unless asked for.
    """

    def test_offByDefault(self) -> None:
        """
        By default the init container captures inbound traffic only, and the
        proxy has no outbound listener.
        """
        spec = podSpecOf(injectOne(workload("Deployment", "apps/v1")))
        self.assertNotIn("-o", container(spec, INIT_NAME)["args"])
        self.assertNotIn("--outbound-listen", container(spec, PROXY_NAME)["args"])

    def test_on(self) -> None:
        """
        With outbound capture, the init script redirects the pod's outgoing
        TCP to the proxy's outbound listener (C{-o 15001}), exempting the
        proxy's own user (C{-u 1337}, the user it runs as) and never capturing
        15001 inbound; the proxy listens there (C{--outbound-listen 15001}).
        """
        spec = podSpecOf(injectOne(workload("Deployment", "apps/v1"), InjectionSettings(outbound=True)))
        self.assertEqual(container(spec, INIT_NAME)["args"], [
            "-p", "8000", "-b", "8080", "-a", "15000", "-t", "8443", "-d", "15021,15001", "-o", "15001", "-u", "1337"])
        proxy = container(spec, PROXY_NAME)
        self.assertEqual(proxy["args"][4:6], ["--outbound-listen", "15001"])
        self.assertEqual(proxy["securityContext"]["runAsUser"], 1337)

    def test_annotations(self) -> None:
        """
        C{sidecar/outbound} turns it on or off for one pod template, whatever
        the flag; Istio's C{traffic.sidecar.istio.io/includeOutboundIPRanges},
        C{excludeOutboundIPRanges} and C{excludeOutboundPorts} become the
        init script's C{-i}, C{-x} and C{-q}; bad values are refused with a
        sentence naming the annotation.
        """
        on = ("      annotations:\n        sidecar/outbound: \"true\"\n"
              "        traffic.sidecar.istio.io/includeOutboundIPRanges: \"10.0.0.0/8, fd00::/8\"\n"
              "        traffic.sidecar.istio.io/excludeOutboundIPRanges: 169.254.169.254/32\n"
              "        traffic.sidecar.istio.io/excludeOutboundPorts: \"5432, 6379\"\n")
        spec = podSpecOf(injectOne(workload("Deployment", "apps/v1", annotations=on)))
        self.assertEqual(container(spec, INIT_NAME)["args"][10:], [
            "-o", "15001", "-u", "1337", "-i", "10.0.0.0/8,fd00::/8", "-x", "169.254.169.254/32",
            "-q", "5432,6379"])
        off = "      annotations:\n        sidecar/outbound: \"false\"\n"
        spec = podSpecOf(injectOne(workload("Deployment", "apps/v1", annotations=off), InjectionSettings(outbound=True)))
        self.assertNotIn("-o", container(spec, INIT_NAME)["args"])
        for annotation, words in (
            ("sidecar/outbound: sometimes", "Deployment/web's sidecar/outbound annotation must be \"true\" or \"false\""),
            ("traffic.sidecar.istio.io/excludeOutboundIPRanges: 10.0.0.0/33",
             "excludeOutboundIPRanges annotation must be comma-separated CIDRs such as 10.0.0.0/8 or *;"
             " '10.0.0.0/33' is not one."),
            ("traffic.sidecar.istio.io/excludeOutboundPorts: http", "excludeOutboundPorts annotation must be a port"),
        ):
            text = workload("Deployment", "apps/v1",
                            annotations=f"      annotations:\n        {annotation}\n")
            with self.assertRaises(InjectionError) as caught:
                injectStream(text, InjectionSettings(outbound=True))
            self.assertIn(words, str(caught.exception))

    def test_portConflict(self) -> None:
        """
        A container port equal to the outbound listener is refused when the
        pod's outgoing traffic is captured, and allowed when it is not.
        """
        text = workload("Deployment", "apps/v1", POD_SPEC.replace("9090", "15001"))
        injectStream(text, InjectionSettings())
        with self.assertRaises(InjectionError) as caught:
            injectStream(text, InjectionSettings(outbound=True))
        self.assertIn("container app uses port 15001, which the proxy needs", str(caught.exception))

    @inlineCallbacks
    def test_initScriptAcceptsThem(self):
        """
        The init script's dry run accepts the outbound arguments the injector
        writes and redirects outgoing TCP to the outbound listener, exempting
        the proxy's user.
        """
        from tests.test_iptables_script import STUB, STUB_NAMES
        from tests.test_pod_netns import SCRIPT

        stubs = FilePath(self.mktemp())
        stubs.makedirs()
        for stubName in STUB_NAMES:
            stubs.child(stubName).setContent(STUB.encode())
            stubs.child(stubName).chmod(0o755)
        env = {k: v for k, v in os.environ.items() if not k.startswith("SIDECAR_")}
        env.update(PATH=stubs.path + os.pathsep + env.get("PATH", "/usr/bin:/bin"), STUB_LOG=os.devnull,
                   SIDECAR_IPV6="off")
        on = ("      annotations:\n        traffic.sidecar.istio.io/excludeOutboundIPRanges: 169.254.169.254/32\n"
              "        traffic.sidecar.istio.io/excludeOutboundPorts: \"5432\"\n")
        spec = podSpecOf(injectOne(workload("Deployment", "apps/v1", annotations=on), InjectionSettings(outbound=True)))
        out, err, code = yield getProcessOutputAndValue(
            "/bin/sh", (SCRIPT.path, "-n", *container(spec, INIT_NAME)["args"]), env=env)
        self.assertEqual(code, 0, err)
        text = out.decode()
        self.assertIn("-j REDIRECT --to-ports 15001", text)
        self.assertIn("--uid-owner 1337", text)
        self.assertIn("169.254.169.254/32", text)
        self.assertIn("--dport 5432 -j RETURN", text)

    def test_command(self) -> None:
        """
        C{--outbound} and C{--outbound-port} on the command line.
        """
        out, err = io.StringIO(), io.StringIO()
        code = main(["--outbound", "--outbound-port", "15006"], io.StringIO(workload("Pod", "v1")), out, err)
        self.assertEqual((code, err.getvalue()), (0, ""))
        spec = yaml.safe_load(out.getvalue())["spec"]
        self.assertEqual(container(spec, INIT_NAME)["args"][-4:], ["-o", "15006", "-u", "1337"])
        self.assertIn("--outbound-listen", container(spec, PROXY_NAME)["args"])
