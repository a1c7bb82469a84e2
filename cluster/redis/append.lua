-- Appends entries to a feed's log if the epoch and term are current, stores
-- the upstream state, trims the log to its limits and publishes a wake-up.
-- KEYS: meta, log.
-- ARGV: epoch, term, count limit, bytes limit, age limit in milliseconds
-- (0: no limit), wake channel, state, then four per entry: seq, id, key, data.
-- Returns {0, last seq}, {1} for another epoch, {2} for another term, or
-- {3, last seq} when the first new entry does not follow the last one.
local meta = redis.call('HMGET', KEYS[1], 'epoch', 'term', 'seq', 'bytes')
if meta[1] ~= ARGV[1] then
	return {1}
end
if meta[2] ~= ARGV[2] then
	return {2}
end
local last, bytes = tonumber(meta[3]), tonumber(meta[4])
local now = redis.call('TIME')
local ms = now[1] * 1000 + math.floor(now[2] / 1000)

local added = 0
for i = 8, #ARGV, 4 do
	local seq = tonumber(ARGV[i])
	-- Entries up to last are stored already: this is a retry.
	if seq > last then
		if seq ~= last + 1 then
			return {3, last}
		end
		redis.call('XADD', KEYS[2], ARGV[i] .. '-0',
			'id', ARGV[i + 1], 'key', ARGV[i + 2], 'data', ARGV[i + 3], 't', ms)
		last = seq
		bytes = bytes + #ARGV[i + 3]
		added = added + 1
	end
end

-- Trim the oldest entries while over a limit, keeping the newest, as the
-- local log does. The fields of an entry are id, key, data, t.
local count, maxBytes, maxAge = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local len = redis.call('XLEN', KEYS[2])
local keep = len
local from = '-'
-- As many entries go as came, usually: look at one more than that first.
local step = added + 1
while keep > 1 and (maxAge > 0 or count > 0 and keep > count or maxBytes > 0 and bytes > maxBytes) do
	local batch = redis.call('XRANGE', KEYS[2], from, '+', 'COUNT', step)
	step = math.min(step * 2, 1024)
	local over = true
	for _, e in ipairs(batch) do
		over = keep > 1 and (count > 0 and keep > count
			or maxBytes > 0 and bytes > maxBytes
			or maxAge > 0 and ms - tonumber(e[2][8]) > maxAge)
		if not over then
			break
		end
		bytes = bytes - #e[2][6]
		keep = keep - 1
		from = '(' .. e[1]
	end
	if not over or #batch == 0 then
		break
	end
end
if keep < len then
	redis.call('XTRIM', KEYS[2], 'MAXLEN', keep)
end

redis.call('HSET', KEYS[1], 'seq', last, 'bytes', bytes, 'state', ARGV[7])
if added > 0 then
	redis.call('PUBLISH', ARGV[6], last)
end
return {0, last}
