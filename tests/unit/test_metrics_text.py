"""The Prometheus text rendering of blueprint/metrics.py: escaping, histograms, failing readings."""

from __future__ import annotations

from microvm_blueprint.blueprint.metrics import Counter, Histogram, Reading, Registry


def test_counter_histogram_and_escaping() -> None:
    reg = Registry()
    c = reg.add(Counter("x_total", "a\\b\nc"))
    assert isinstance(c, Counter)
    c.inc((("job", 'a"b\\c\nd'),))
    c.inc((("job", 'a"b\\c\nd'),), 2)
    h = Histogram("t", "time", (0.1, 1.0))
    reg.add(h)
    h.observe(0.05)
    h.observe(0.5)
    h.observe(5)
    assert reg.render() == (
        "# HELP x_total a\\\\b c\n# TYPE x_total counter\n"
        'x_total{job="a\\"b\\\\c\\nd"} 3\n'
        "# HELP t time\n# TYPE t histogram\n"
        't_bucket{le="0.1"} 1\nt_bucket{le="1"} 2\nt_bucket{le="+Inf"} 3\nt_sum 5.55\nt_count 3\n'
    )
    assert h.count() == 3 and c.total() == 3


def test_a_failing_reading_is_left_out() -> None:
    reg = Registry()

    def broken() -> dict[tuple[tuple[str, str], ...], float]:
        raise RuntimeError("store closed")

    reg.add(Reading("g", "gauge", "gauge", broken))
    reg.add(Reading("h", "gauge", "gauge", lambda: {(): 2.5}))
    assert reg.render() == "# HELP g gauge\n# TYPE g gauge\n# HELP h gauge\n# TYPE h gauge\nh 2.5\n"
