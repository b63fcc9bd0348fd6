-- The front door's request check, run by nginx (lua-nginx-module, LuaJIT, lua-cjson) before a body reaches Triton.
--
-- Triton 2.51's HTTP frontend recurses on nested JSON (a 400 KB body of brackets kills the server), allocates
-- for the declared shape before comparing it with the data (shape [1e9, 1] cost 7.6 GB), answers 500 to malformed
-- JSON and wraps integers that overflow their type. This module accepts only what the serving spec declares for
-- the public models (the contract rendered by recserve/serving/frontdoor.py) and answers everything else with a
-- 400 that names the field. It checks structure, names, datatypes, shapes against data, and integer ranges of the
-- dtype; the models check the values' meaning (unknown user, k, hour) themselves.

local cjson = require "cjson.safe"

cjson.decode_max_depth(8)            -- a KServe request is 4 levels deep; data may nest one more per dim
cjson.decode_invalid_numbers(false)  -- no NaN / Infinity literals

local M = {}

local BYTES = { INT64 = 8, INT32 = 4, FP32 = 4 }
-- integers a double holds exactly, which is what JSON numbers are; larger ids go over gRPC or the binary extension
local INT_LIMIT = { INT64 = 2 ^ 53, INT32 = 2 ^ 31 }

local function reject(status, message)
    ngx.status = status
    ngx.header["Content-Type"] = "application/json"
    ngx.say(cjson.encode({ error = message }))
    return ngx.exit(status)
end
M.reject = reject

local function is_int(v)
    return type(v) == "number" and v == v and v ~= math.huge and v ~= -math.huge and math.floor(v) == v
end

local function shape_text(shape)
    local parts = {}
    for i = 1, #shape do parts[i] = tostring(shape[i]) end
    return "[" .. table.concat(parts, ", ") .. "]"
end

-- flatten nested data lists into out; false when it holds something that is not a number or a list
local function flatten(data, out, limit, depth)
    if depth > 6 then return false end
    for i = 1, #data do
        local v = data[i]
        if type(v) == "table" then
            if not flatten(v, out, limit, depth + 1) then return false end
        elseif type(v) == "number" then
            out[#out + 1] = v
            if #out > limit then return true end   -- too many values: the count check names it
        else
            return false
        end
    end
    return true
end

local function check_values(model, name, dtype, values)
    if dtype == "FP32" then
        for i = 1, #values do
            local v = values[i]
            if v ~= v or v == math.huge or v == -math.huge or math.abs(v) > 3.4e38 then
                return reject(400, "input '" .. name .. "' of " .. model .. " holds a number outside FP32: send finite values")
            end
        end
        return
    end
    local limit = INT_LIMIT[dtype]
    for i = 1, #values do
        local v = values[i]
        if not is_int(v) then
            return reject(400, "input '" .. name .. "' of " .. model .. " holds " .. tostring(v) .. ": " .. dtype ..
                " values must be whole numbers")
        end
        if v >= limit or v < -limit then
            return reject(400, "input '" .. name .. "' of " .. model .. " holds " .. string.format("%.0f", v) ..
                ", which does not fit " .. dtype .. (dtype == "INT64" and " exactly in JSON (at most 2^53; send larger ids over gRPC or as binary data)" or ""))
        end
    end
end

-- one input tensor of the request; returns its batch size and its binary byte count (0 for JSON data)
local function check_input(model, c, t)
    if type(t) ~= "table" or type(t.name) ~= "string" then
        return reject(400, "each entry of 'inputs' must be an object with a 'name'")
    end
    local name = t.name
    local want = c.inputs[name]
    if not want then
        return reject(400, "unknown input '" .. name .. "': " .. model .. " takes " .. c.input_list)
    end
    if t.datatype ~= want.dtype then
        return reject(400, "input '" .. name .. "' of " .. model .. " must have datatype " .. want.dtype ..
            ", got " .. tostring(t.datatype))
    end
    local shape = t.shape
    if type(shape) ~= "table" or #shape ~= #want.dims + 1 then
        return reject(400, "input '" .. name .. "' of " .. model .. " must have shape [batch, " ..
            table.concat(want.dims_text, ", ") .. "]")
    end
    for i = 1, #shape do
        if not is_int(shape[i]) or shape[i] < 0 then
            return reject(400, "input '" .. name .. "' has shape " .. tostring(cjson.encode(shape)) ..
                ": dimensions are whole numbers >= 0")
        end
    end
    local batch = shape[1]
    if batch < 1 or batch > c.max_batch then
        return reject(400, "input '" .. name .. "' has a batch of " .. batch .. " rows: " .. model .. " takes 1.." ..
            c.max_batch .. " per request")
    end
    local count = batch
    for d = 1, #want.dims do
        local w, got = want.dims[d], shape[d + 1]
        if w >= 0 and got ~= w then
            return reject(400, "input '" .. name .. "' has shape " .. shape_text(shape) .. ": dimension " .. d ..
                " must be " .. w)
        end
        if w < 0 and (got < 1 or got > want.max_width) then
            return reject(400, "input '" .. name .. "' has shape " .. shape_text(shape) .. ": dimension " .. d ..
                " must be 1.." .. want.max_width)
        end
        count = count * got
    end
    local params = t.parameters
    local binary = type(params) == "table" and params.binary_data_size or nil
    if binary ~= nil then
        local need = count * BYTES[want.dtype]
        if binary ~= need then
            return reject(400, "input '" .. name .. "' declares binary_data_size " .. tostring(binary) ..
                " but shape " .. shape_text(shape) .. " of " .. want.dtype .. " needs " .. need .. " bytes")
        end
        return batch, need
    end
    if type(t.data) ~= "table" then
        return reject(400, "input '" .. name .. "' of " .. model .. " has no 'data' list")
    end
    local values = {}
    if not flatten(t.data, values, count, 1) then
        return reject(400, "input '" .. name .. "' has 'data' that is not a (nested) list of numbers")
    end
    if #values ~= count then
        return reject(400, "input '" .. name .. "' has " .. (#values > count and "more than " .. count or #values) ..
            " values but shape " .. shape_text(shape) .. " needs " .. count)
    end
    check_values(model, name, want.dtype, values)
    return batch, 0
end

-- A/B split (`recserve ab start`): a request to `recommend` that names no version goes to arm b's version when
-- crc32(salt .. ":" .. user_id) % 10000 < share * 10000 (the first row's user: a batch goes to one arm), else to
-- arm a's; `recserve.ab.arm` computes the same in Python. user_id is read from JSON data or from the binary part.
local ffi = require "ffi"
local int64 = ffi.new("int64_t[1]")

local function first_user(inputs, binary)
    local offset = 0
    for i = 1, #inputs do
        local t = inputs[i]
        local size = type(t.parameters) == "table" and t.parameters.binary_data_size or nil
        if t.name == "user_id" then
            if size then
                if #binary < offset + 8 then return nil end
                ffi.copy(int64, binary:sub(offset + 1, offset + 8), 8)
                return tonumber(int64[0])
            elseif type(t.data) == "table" then
                local first = {}
                flatten(t.data, first, 1, 1)
                return first[1]
            end
        end
        offset = offset + (size or 0)
    end
end

local function ab_route(model, inputs, binary)
    local ab = CONTRACT.ab
    if not ab or model ~= ab.model or ngx.var.uri:find("/versions/", 1, true) then return end
    local user = first_user(inputs, binary)
    local arm = "a"
    if user and ngx.crc32_long(ab.salt .. ":" .. string.format("%d", user)) % 10000 < ab.cut then arm = "b" end
    if ab.share > 0 then ngx.var.recserve_arm = arm end   -- share 0: pinned to one version while a split changes
    ngx.req.set_uri("/v2/models/" .. model .. "/versions/" .. ab[arm] .. "/infer")
end

-- access phase of POST /v2/models/<model>[/versions/<n>]/infer
function M.infer(model)
    local c = CONTRACT.models[model]
    if not c then
        return reject(404, "model '" .. model .. "' is not served on this port; public models: " .. CONTRACT.public)
    end
    ngx.req.read_body()
    local body = ngx.req.get_body_data()
    if not body or #body == 0 then
        return reject(400, "empty request body: send a KServe v2 inference request, {\"inputs\": [...]}")
    end
    local header, binary_len = body, 0
    local hlen = ngx.var.http_inference_header_content_length
    if hlen then
        local n = tonumber(hlen)
        if not is_int(n) or n < 1 or n > #body then
            return reject(400, "Inference-Header-Content-Length is " .. hlen .. " but the body has " .. #body .. " bytes")
        end
        header, binary_len = body:sub(1, n), #body - n
    end
    local req, err = cjson.decode(header)
    if type(req) ~= "table" then
        return reject(400, "the request body is not valid JSON (" .. tostring(err or "not an object") ..
            "): send {\"inputs\": [{\"name\": ..., \"shape\": ..., \"datatype\": ..., \"data\": ...}]}")
    end
    local inputs = req.inputs
    if type(inputs) ~= "table" or #inputs == 0 then
        return reject(400, "the request has no 'inputs' list: " .. model .. " takes " .. c.input_list)
    end
    local seen, batch, declared = {}, nil, 0
    for i = 1, #inputs do
        local b, bytes = check_input(model, c, inputs[i])
        local name = inputs[i].name
        if seen[name] then return reject(400, "input '" .. name .. "' is given twice") end
        seen[name] = true
        if batch and b ~= batch then
            return reject(400, "inputs disagree on the batch size: '" .. name .. "' has " .. b .. " rows, others " .. batch)
        end
        batch, declared = b, declared + bytes
    end
    for _, name in ipairs(c.required) do
        if not seen[name] then
            return reject(400, "missing input '" .. name .. "': " .. model .. " takes " .. c.input_list)
        end
    end
    if declared ~= binary_len then
        return reject(400, "the inputs declare " .. declared .. " bytes of binary data but the body carries " .. binary_len)
    end
    ab_route(model, inputs, binary_len > 0 and body:sub(#header + 1) or "")
    local outputs = req.outputs
    if outputs ~= nil then
        if type(outputs) ~= "table" then return reject(400, "'outputs' must be a list") end
        for i = 1, #outputs do
            local o = outputs[i]
            if type(o) ~= "table" or not c.outputs[o.name] then
                return reject(400, "unknown output '" .. tostring(type(o) == "table" and o.name or o) .. "': " ..
                    model .. " returns " .. c.output_list)
            end
        end
    end
end

-- access phase of GET /v2/models/<model>[...]: metadata, readiness and config of public models only
function M.public(model)
    if not CONTRACT.models[model] then
        return reject(404, "model '" .. model .. "' is not served on this port; public models: " .. CONTRACT.public)
    end
end

-- GET /v2/health/ready: not ready while the supervisor restores a model or the server drains
function M.ready()
    local state = ngx.shared.recserve:get("state") or "starting"
    if state ~= "ready" then
        return reject(503, "not ready: " .. state)
    end
end

-- gRPC ServerReady: UNAVAILABLE while not ready (a trailers-only answer, as nginx's gRPC error pages give)
function M.grpc_ready()
    local state = ngx.shared.recserve:get("state") or "starting"
    if state ~= "ready" then
        ngx.header["Content-Type"] = "application/grpc"
        ngx.header["grpc-status"] = "14"
        ngx.header["grpc-message"] = ("not ready: " .. state):gsub("[^%w%s%.,:;_%-()]", "")
        return ngx.exit(204)
    end
end

-- POST /state on the control socket (the `recserve serve` supervisor only)
function M.set_state()
    ngx.req.read_body()
    local state = ngx.req.get_body_data() or ""
    ngx.shared.recserve:set("state", state)
    ngx.say(state)
end

-- prepare the contract once per worker: lists for messages, required names
function M.init(contract)
    if contract.ab then
        contract.ab.cut = math.floor(contract.ab.share * 10000 + 0.5)
        contract.ab.a, contract.ab.b = tostring(contract.ab.a), tostring(contract.ab.b)
    end
    local names = {}
    for model, c in pairs(contract.models) do
        names[#names + 1] = model
        local list, required, outputs = {}, {}, {}
        for name, t in pairs(c.inputs) do
            list[#list + 1] = name .. (t.optional and " (optional)" or "")
            if not t.optional then required[#required + 1] = name end
            t.dims_text = {}
            for d = 1, #t.dims do t.dims_text[d] = tostring(t.dims[d]) end
        end
        table.sort(list)
        table.sort(required)
        c.input_list, c.required = table.concat(list, ", "), required
        for i = 1, #c.output_names do outputs[c.output_names[i]] = true end
        c.outputs, c.output_list = outputs, table.concat(c.output_names, ", ")
    end
    table.sort(names)
    contract.public = table.concat(names, ", ")
    CONTRACT = contract
end

return M
