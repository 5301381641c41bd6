-- wrk script: a fixed-body POST, optional per-thread request limit, JSON summary on stdout.
-- Environment: BENCH_BODY_FILE (request body), BENCH_PATH (default /v1/chat/completions),
-- BENCH_LIMIT (requests per thread; 0 = run for wrk's -d duration only).
local f = assert(io.open(os.getenv("BENCH_BODY_FILE"), "rb"))
local body = f:read("*a")
f:close()
wrk.method = "POST"
wrk.path = os.getenv("BENCH_PATH") or "/v1/chat/completions"
wrk.body = body
wrk.headers["Content-Type"] = "application/json"

local limit = tonumber(os.getenv("BENCH_LIMIT") or "0")
if limit > 0 then
  local done_count = 0
  function response(status, headers, body)
    done_count = done_count + 1
    if done_count >= limit then
      wrk.thread:stop()
    end
  end
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCHJSON {"requests":%d,"duration_us":%d,"bytes":%d,"connect":%d,"read":%d,"write":%d,' ..
    '"status":%d,"timeout":%d,"p50":%d,"p90":%d,"p95":%d,"p99":%d,"p999":%d,"mean":%f,"max":%d}\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(95), latency:percentile(99),
    latency:percentile(99.9), latency.mean, latency.max))
end
