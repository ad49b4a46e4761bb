# -*- test-case-name: tests.test_request -*-
"""
What the console scripts share: an argument parser whose errors are one sentence.
"""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn, TextIO


class OneSentenceParser(argparse.ArgumentParser):
    """
    An argument parser whose errors are one sentence on a given stream.

    @ivar errors: where errors go (standard error when C{None}).
    """

    errors: TextIO | None = None

    def error(self, message: str) -> NoReturn:
        """
        Say what is wrong in one sentence and exit with status 2.

        @param message: argparse's description of the problem.
        """
        (self.errors or sys.stderr).write(f"{self.prog}: {message} (see {self.prog} --help).\n")
        raise SystemExit(2)
