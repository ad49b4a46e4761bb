# -*- test-case-name: tests.test_packaging -*-
"""
Packaging: C{pip install .} in a fresh virtualenv, as the proxy image does it,
gives a C{twistd} that lists and runs the sidecar plugin, the console scripts,
the type information and the license; and every declared dependency is one the
package imports.
"""

from __future__ import annotations

import ast
import os
import re
import sys
import tomllib

from twisted.internet import defer
from twisted.internet.utils import getProcessOutputAndValue
from twisted.python.filepath import FilePath
from twisted.trial import unittest

from tests.support import ROOT

# The module each declared distribution is imported as.
IMPORT_NAMES = {
    "twisted": "twisted", "treq": "treq", "pyopenssl": "OpenSSL", "cryptography": "cryptography",
    "attrs": "attrs", "httptools": "httptools", "prometheus-client": "prometheus_client",
    "ruamel-yaml": "ruamel.yaml", "cattrs": "cattrs", "pyjwt": "jwt", "h2": "h2", "hyperframe": "hyperframe",
    "hpack": "hpack", "cffi": "cffi",
}


def canonical(name: str) -> str:
    """
    @param name: a distribution's name.
    @return: its normalized form (PEP 503).
    """
    return re.sub(r"[-_.]+", "-", name).lower()


def pyproject() -> dict:
    """
    @return: the parsed C{pyproject.toml}.
    """
    return tomllib.loads(FilePath(ROOT).child("pyproject.toml").getContent().decode())


class MetadataTests(unittest.SynchronousTestCase):
    """
    C{pyproject.toml} against the source tree, without installing anything.
    """

    def test_everyDependencyIsImported(self) -> None:
        """
        Each declared dependency is imported by a module of the package (not
        only by the tests), and each third-party import of the package is
        declared, directly or through C{twisted[tls]} (C{service_identity},
        C{idna}) or Twisted itself (C{zope.interface}).
        """
        declared = {}
        for requirement in pyproject()["project"]["dependencies"]:
            name = canonical(re.split(r"[\[<>=!~ ]", requirement, maxsplit=1)[0])
            declared[name] = IMPORT_NAMES[name]
        imported = set()
        for path in FilePath(ROOT).child("sidecar").globChildren("*.py"):
            for node in ast.walk(ast.parse(path.getContent(), path.path)):
                if isinstance(node, ast.Import):
                    imported.update(alias.name for alias in node.names)
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    imported.add(node.module)
        for name, module in declared.items():
            self.assertTrue(any(i == module or i.startswith(module + ".") for i in imported),
                            f"{name} is declared and no module of sidecar imports {module}")
        stdlib = set(sys.stdlib_module_names)
        allowed = set(declared.values()) | {"sidecar", "zope", "service_identity", "idna"}
        for module in imported:
            top = module.split(".")[0]
            if top not in stdlib and top != "__future__":
                self.assertTrue(module in allowed or top in allowed or
                                any(module.startswith(a + ".") for a in allowed),
                                f"sidecar imports {module}, which is not declared")

    def test_metadata(self) -> None:
        """
        The project has its version from C{sidecar.__version__}, the Apache 2.0
        license with its file, classifiers, URLs, and ships C{py.typed}.
        """
        project = pyproject()["project"]
        self.assertEqual(project["license"], "Apache-2.0")
        self.assertEqual(project["license-files"], ["LICENSE"])
        self.assertIn("Apache License", FilePath(ROOT).child("LICENSE").getContent().decode()[:200])
        self.assertIn("version", project["dynamic"])
        self.assertIn("Typing :: Typed", project["classifiers"])
        self.assertTrue(project["urls"])
        self.assertTrue(FilePath(ROOT).child("sidecar").child("py.typed").exists())
        self.assertEqual(set(project["scripts"]), {"sidecar-certs", "sidecar-inject", "sidecar-request"})
        self.assertFalse(FilePath(ROOT).child("twisted").child("__init__.py").exists())
        self.assertFalse(FilePath(ROOT).child("twisted").child("plugins").child("__init__.py").exists())


class FreshVirtualenvTests(unittest.TestCase):
    """
    The package as a user (and the proxy image) installs it.
    """

    timeout = 600

    @defer.inlineCallbacks
    def test_twistdListsSidecar(self):
        """
        After C{pip install --constraint image-constraints.txt .} in a new
        virtualenv (the image's install), nothing but the pinned packages is
        installed and their requirements hold; C{twistd --help} lists
        C{sidecar}, C{twistd sidecar --help} shows its flags, a bad flag fails
        with one sentence, C{sidecar-certs}, C{sidecar-inject} and
        C{sidecar-request} run, C{py.typed} and the license are installed.
        """
        venv = os.path.abspath(self.mktemp())
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
        out, err, code = yield getProcessOutputAndValue(sys.executable, ["-m", "venv", venv], env=env)
        self.assertEqual(code, 0, err)
        pip = os.path.join(venv, "bin", "pip")
        constraints = os.path.join(ROOT, "image-constraints.txt")
        out, err, code = yield getProcessOutputAndValue(
            pip, ["install", "-q", "--constraint", constraints, ROOT], env=env, path="/")
        self.assertEqual(code, 0, err)
        out, err, code = yield getProcessOutputAndValue(
            pip, ["freeze", "--exclude", "sidecar"], env=env, path="/")
        self.assertEqual(code, 0, err)
        pinned = sorted(line for line in FilePath(constraints).getContent().decode().splitlines()
                        if line and not line.startswith("#"))
        self.assertEqual(sorted(out.decode().splitlines()), pinned)
        out, err, code = yield getProcessOutputAndValue(pip, ["check"], env=env, path="/")
        self.assertEqual(code, 0, out + err)

        twistd = os.path.join(venv, "bin", "twistd")
        out, err, code = yield getProcessOutputAndValue(twistd, ["--help"], env=env, path="/")
        self.assertEqual(code, 0, err)
        self.assertRegex(out.decode(), r"\n\s+sidecar\s+A service-mesh sidecar proxy")
        out, err, code = yield getProcessOutputAndValue(twistd, ["sidecar", "--help"], env=env, path="/")
        self.assertEqual(code, 0, err)
        for flag in ("--listen", "--upstream", "--server-header", "--access-log", "--log-format",
                     "--upstream-timeout", "--connect-timeout", "--engine"):
            self.assertIn(flag, out.decode())
        out, err, code = yield getProcessOutputAndValue(
            twistd, ["-n", "sidecar", "--upstream", "nope"], env=env, path="/")
        self.assertNotEqual(code, 0)
        self.assertIn(b"--upstream: 'nope' is not PORT or HOST:PORT", out + err)
        for script in ("sidecar-certs", "sidecar-inject", "sidecar-request"):
            out, err, code = yield getProcessOutputAndValue(
                os.path.join(venv, "bin", script), ["--help"], env=env, path="/")
            self.assertEqual(code, 0, err)
            self.assertIn(b"usage:", out.lower())
        python = os.path.join(venv, "bin", "python")
        out, err, code = yield getProcessOutputAndValue(python, ["-c", (
            "import importlib.metadata as m, importlib.resources as r;"
            "d = m.distribution('sidecar');"
            "print(d.metadata['License-Expression'], d.version,"
            " r.files('sidecar').joinpath('py.typed').is_file(),"
            " any(f.name == 'LICENSE' for f in d.files))"
        )], env=env, path="/")
        self.assertEqual(code, 0, err)
        from sidecar import __version__
        self.assertEqual(out.decode().split(), ["Apache-2.0", __version__, "True", "True"])
