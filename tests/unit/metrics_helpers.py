"""Reading the daemon's Prometheus exposition in tests (``prometheus_client.parser``)."""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

from fission.server.metrics import ServiceMetrics


@dataclass(frozen=True)
class Scrape:
    """One exposition: every sample by name and labels, and every family's name and type."""

    samples: dict[tuple[str, frozenset[tuple[str, str]]], float]
    families: dict[str, str]

    def value(self, name: str, **labels: str) -> float:
        """The sample ``name`` with exactly ``labels`` (0 when absent: a counter not yet moved)."""
        return self.samples.get((name, frozenset(labels.items())), 0.0)

    def total(self, name: str, **labels: str) -> float:
        """The sum of the samples ``name`` whose labels include ``labels``."""
        wanted = set(labels.items())
        return sum(v for (n, ls), v in self.samples.items() if n == name and wanted <= ls)

    def label_values(self) -> set[str]:
        """Every label value of every sample."""
        return {value for (_, labels) in self.samples for _, value in labels}


def parse(text: str) -> Scrape:
    """Parse an exposition."""
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    families: dict[str, str] = {}
    for family in text_string_to_metric_families(text):
        families[family.name] = family.type
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return Scrape(samples, families)


async def scrape(metrics: ServiceMetrics) -> Scrape:
    """Scrape ``metrics`` as ``/metrics`` would."""
    return parse((await metrics.exposition()).decode())


def sample_names(families: dict[str, str]) -> set[str]:
    """The sample names a query may use for these families (``_total``, ``_bucket``...)."""
    suffixes = {
        "counter": ("_total", "_created"),
        "histogram": ("_bucket", "_count", "_sum", "_created"),
        "gauge": ("",),
    }
    return {name + suffix for name, kind in families.items() for suffix in suffixes[kind]}
