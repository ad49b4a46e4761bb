# -*- test-case-name: bench.test_bench -*-
"""
The project's benchmark: no proxy, the stock twisted.web proxy, Envoy and our two front
doors, all in front of the same nginx, measured by the same wrk in one session.

Run it with C{make bench} or C{python3 bench/run.py}; see C{bench/README.md}.
"""
