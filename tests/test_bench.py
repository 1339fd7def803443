"""Reading wrk's report (a real one, captured from a slow TorchServe run)."""

from __future__ import annotations

import pytest

from stockcast.bench import parse_wrk, to_ms

REPORT = """Running 5s test @ http://127.0.0.1:41625/predictions/lstm
  1 threads and 16 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   774.64ms  599.47ms   1.76s    72.41%
    Req/Sec    32.91     32.76   100.00     81.82%
  Latency Distribution
     50%  430.05ms
     75%    1.56s 
     90%    1.66s 
     99%    1.76s 
  87 requests in 5.01s, 39.25KB read
  Socket errors: connect 0, read 2, write 0, timeout 3
  Non-2xx or 3xx responses: 4
Requests/sec:     17.37
Transfer/sec:      7.84KB
"""


def test_parse_wrk_reads_rate_percentiles_and_errors():
    assert parse_wrk(REPORT) == {"requests_per_s": 17.37, "p50_ms": 430.05, "p90_ms": 1660.0,
                                 "p99_ms": 1760.0, "errors": 5, "non_2xx": 4}


@pytest.mark.parametrize(("text", "ms"), [("812.00us", 0.812), ("4.50ms", 4.5), ("1.20s", 1200.0)])
def test_to_ms(text, ms):
    assert to_ms(text) == pytest.approx(ms)
