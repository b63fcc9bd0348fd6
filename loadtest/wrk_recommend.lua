-- wrk script: POST KServe v2 JSON requests for `recommend` to /v2/models/recommend/infer.
--
--   wrk -t1 -c8 -d10s --timeout 10s -s loadtest/wrk_recommend.lua http://127.0.0.1:8000 -- USERS_FILE [K]
--
-- USERS_FILE has one request a line: "USER_ID" or "USER_ID HOUR WEEKDAY" (bench_serving.py writes the
-- same requests it gives perf_analyzer). Without arguments the file and k come from the environment
-- variables WRK_USERS_FILE and WRK_K (default 10). Each wrk thread walks the whole list, from its own
-- starting point, one request after another. The same script drives Triton's HTTP endpoint and the
-- FastAPI baseline (loadtest/baseline_service.py): same bodies, same path.
--
-- done() prints one machine-readable line, parsed by bench_serving.py:
--   WRK_JSON {"requests":N,"duration_s":S,"non2xx":N,"connect_errors":N,"read_errors":N,"write_errors":N,
--             "timeouts":N,"p50_ms":X,"p90_ms":X,"p99_ms":X,"mean_ms":X,"max_ms":X,"bytes":N}
-- requests counts every completed response; non2xx are those with an HTTP status >= 400 (wrk's "status"
-- errors). Latencies are wrk's (µs in its histogram, printed in ms), over all completed responses.

local PATH = "/v2/models/recommend/infer"
local HEADERS = {["Content-Type"] = "application/json"}

local prepared = {}   -- per thread: the raw HTTP requests, built once in init()
local position = 0
local thread_count = 0

local function tensor(name, datatype, value)
  return string.format('{"name":"%s","shape":[1,1],"datatype":"%s","data":[%s]}', name, datatype, value)
end

local function integer(text, what, line)
  if text == nil or not string.match(text, "^%-?%d+$") then
    error(string.format("wrk_recommend.lua: line %d: %s %q is not an integer", line, what, tostring(text)))
  end
  return text
end

function body_for(user, k, hour, weekday)
  local parts = {tensor("user_id", "INT64", user), tensor("k", "INT32", k)}
  if hour ~= nil then
    parts[#parts + 1] = tensor("hour", "INT64", hour)
    parts[#parts + 1] = tensor("weekday", "INT64", weekday)
  end
  -- the two outputs every server measured here returns (Triton's recommend can also send source, propensity
  -- and version; a client asks for what it reads)
  return '{"inputs":[' .. table.concat(parts, ",") .. '],"outputs":[{"name":"item_ids"},{"name":"scores"}]}'
end

function setup(thread)
  thread:set("thread_index", thread_count)
  thread_count = thread_count + 1
end

function init(args)
  local file = args[1] or os.getenv("WRK_USERS_FILE")
  local k = integer(args[2] or os.getenv("WRK_K") or "10", "k", 0)
  if file == nil or file == "" then
    error("wrk_recommend.lua: give the users file: wrk ... -s wrk_recommend.lua URL -- USERS_FILE [K]")
  end
  local n = 0
  for line in io.lines(file) do
    n = n + 1
    local fields = {}
    for field in string.gmatch(line, "%S+") do
      fields[#fields + 1] = field
    end
    if #fields == 1 or #fields == 3 then
      local user = integer(fields[1], "user id", n)
      local hour, weekday = nil, nil
      if #fields == 3 then
        hour, weekday = integer(fields[2], "hour", n), integer(fields[3], "weekday", n)
      end
      prepared[#prepared + 1] = wrk.format("POST", PATH, HEADERS, body_for(user, k, hour, weekday))
    elseif #fields ~= 0 then
      error(string.format("wrk_recommend.lua: %s line %d: expected USER_ID [HOUR WEEKDAY]", file, n))
    end
  end
  if #prepared == 0 then
    error("wrk_recommend.lua: no requests in " .. file)
  end
  -- threads start far apart in the list
  position = math.floor((thread_index or 0) * #prepared / 7) % #prepared
end

function request()
  position = position % #prepared + 1
  return prepared[position]
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRK_JSON {"requests":%d,"duration_s":%.6f,"bytes":%d,"non2xx":%d,"connect_errors":%d,"read_errors":%d,' ..
    '"write_errors":%d,"timeouts":%d,"p50_ms":%.4f,"p90_ms":%.4f,"p99_ms":%.4f,"mean_ms":%.4f,"max_ms":%.4f}\n',
    summary.requests, summary.duration / 1e6, summary.bytes, e.status, e.connect, e.read, e.write, e.timeout,
    latency:percentile(50) / 1000, latency:percentile(90) / 1000, latency:percentile(99) / 1000,
    latency.mean / 1000, latency.max / 1000))
end
