"""
The differential test's corpus, its reference configurations and its harness.
"""
