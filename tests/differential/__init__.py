# -*- test-case-name: tests.test_differential -*-
"""
The differential test's corpus, its reference configurations and its harness.
"""
