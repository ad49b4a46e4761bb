-- wrk script for bench/run.py.
--
-- BENCH_BODY_BYTES (environment): when above zero, every request is a POST with a body of
-- that many bytes (the 64 KiB POST workload); otherwise wrk's plain GET.
-- BENCH_CLOSE=1: every request says "Connection: close", so wrk connects again for each
-- one (the new-connection workload).
--
-- done() prints one line, "BENCH-JSON {...}", with wrk's exact counts and latency
-- percentiles in microseconds, so the harness does not parse wrk's rounded text.

local bodyBytes = tonumber(os.getenv("BENCH_BODY_BYTES") or "0") or 0
if bodyBytes > 0 then
   wrk.method = "POST"
   wrk.body = string.rep("x", bodyBytes)
   wrk.headers["Content-Type"] = "application/octet-stream"
end
if os.getenv("BENCH_CLOSE") == "1" then
   wrk.headers["Connection"] = "close"
end

function done(summary, latency, requests)
   local errors = summary.errors
   io.write(string.format(
      'BENCH-JSON {"requests": %.0f, "duration_us": %.0f, "bytes": %.0f, '
      .. '"connect_errors": %.0f, "read_errors": %.0f, "write_errors": %.0f, '
      .. '"status_errors": %.0f, "timeouts": %.0f, "p50_us": %.1f, "p99_us": %.1f}\n',
      summary.requests, summary.duration, summary.bytes,
      errors.connect, errors.read, errors.write, errors.status, errors.timeout,
      latency:percentile(50), latency:percentile(99)))
end
