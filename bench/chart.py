# -*- test-case-name: bench.test_bench -*-
"""
The benchmark's chart: one PNG with the small GET's CPU per request and requests per
second across the connection sweep, and every workload's CPU per request against
Envoy's at the first connection count.  Needs matplotlib (C{requirements-test.txt}).
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

from bench.measure import WORKLOADS, Measurement


def chartSeries(sweep: Sequence[tuple[int, Mapping[tuple[str, str], Measurement]]], peers: Sequence[str],
                workload: str, metric: str) -> dict[str, list[float | None]]:
    """
    One value per connection count of the sweep for each peer: C{metric} of
    C{workload}, or L{None} where it was not measured.
    """
    series: dict[str, list[float | None]] = {}
    for peer in peers:
        values = []
        for _, results in sweep:
            cell = results.get((peer, workload))
            values.append(None if cell is None else getattr(cell, metric))
        if any(value is not None for value in values):
            series[peer] = values
    return series


def ratiosToEnvoy(results: Mapping[tuple[str, str], Measurement], peers: Sequence[str],
                  workloads: Sequence[str]) -> dict[str, list[float | None]]:
    """
    Each peer's CPU per request over Envoy's, per workload (L{None} where either is
    missing).
    """
    out: dict[str, list[float | None]] = {}
    for peer in peers:
        values: list[float | None] = []
        for workload in workloads:
            ours, envoy = results.get((peer, workload)), results.get(("envoy", workload))
            if (ours is None or envoy is None or ours.cpuMicrosecondsPerRequest is None
                    or not envoy.cpuMicrosecondsPerRequest):
                values.append(None)
            else:
                values.append(ours.cpuMicrosecondsPerRequest / envoy.cpuMicrosecondsPerRequest)
        if any(value is not None for value in values):
            out[peer] = values
    return out


def _bars(axes, groups: Sequence[str], series: Mapping[str, Sequence[float | None]],
          colours: Mapping[str, str]) -> None:
    width = 0.8 / max(1, len(series))
    for index, (peer, values) in enumerate(series.items()):
        xs = [group + (index - (len(series) - 1) / 2) * width for group in range(len(groups))]
        heights = [0.0 if value is None else value for value in values]
        axes.bar(xs, heights, width, label=peer, color=colours[peer])
    axes.set_xticks(range(len(groups)))
    axes.set_xticklabels(groups)


def drawChart(path: Path, sweep: Sequence[tuple[int, Mapping[tuple[str, str], Measurement]]],
              peers: Sequence[str], environment: Mapping[str, object]) -> None:
    """
    Draw the chart into C{path}.

    @param sweep: C{(connections, results)} for each session of the run, the first with
        every workload.
    @param peers: the peers, in running order.
    @param environment: the run's facts (date, CPUs, load), for the title.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    connections = [str(count) for count, _ in sweep]
    palette = plt.get_cmap("tab10")
    colours = {peer: palette(index % 10) for index, peer in enumerate(peers)}
    figure, (cpu, rate, ratio) = plt.subplots(1, 3, figsize=(17, 5.5))
    _bars(cpu, connections, chartSeries(sweep, peers, "small", "cpuMicrosecondsPerRequest"), colours)
    cpu.set_title("GET 13 B: proxy CPU µs per request (lower is better)")
    cpu.set_xlabel("connections")
    rate.set_title("GET 13 B: requests per second")
    _bars(rate, connections, chartSeries(sweep, peers, "small", "requestsPerSecond"), colours)
    rate.set_xlabel("connections")
    first, results = sweep[0]
    workloads = [name for name in WORKLOADS if any(key[1] == name for key in results)]
    _bars(ratio, [WORKLOADS[name].description for name in workloads], ratiosToEnvoy(results, peers, workloads), colours)
    ratio.axhline(1.0, color="black", linewidth=0.8)
    ratio.set_title(f"CPU per request ÷ Envoy's, {first} connections (lower is better)")
    for axes in (cpu, rate, ratio):
        axes.grid(axis="y", alpha=0.3)
    rate.legend(fontsize=8)
    load = environment.get("loadAverage")
    loadText = f", load {load[0]:.1f}" if isinstance(load, (list, tuple)) and load else ""
    figure.suptitle(f"sidecar benchmark, {environment.get('date', '')}, {environment.get('cpus', '?')} CPUs"
                    f"{loadText}; wrk and nginx on CPU 0, each proxy alone on CPU 1 (ours-workers unpinned)")
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)
