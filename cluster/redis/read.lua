-- Reads a feed's meta and the entries after a position, in one snapshot.
-- KEYS: meta, log. ARGV: the first id to read, count, age limit in
-- milliseconds (0: no limit).
-- Returns {epoch or false, term, last seq, entries}; an entry is
-- {seq-0, {'id', id, 'key', key, 'data', data, 't', ms}}. Entries older
-- than the age limit are left out, except the newest.
local meta = redis.call('HMGET', KEYS[1], 'epoch', 'term', 'seq')
if not meta[1] then
	return {false, 0, 0, {}}
end
local entries = redis.call('XRANGE', KEYS[2], ARGV[1], '+', 'COUNT', ARGV[2])
local maxAge = tonumber(ARGV[3])
if maxAge > 0 and #entries > 0 then
	local now = redis.call('TIME')
	local oldest = now[1] * 1000 + math.floor(now[2] / 1000) - maxAge
	local newest = meta[3] .. '-0'
	local fresh = {}
	for _, e in ipairs(entries) do
		if tonumber(e[2][8]) >= oldest or e[1] == newest then
			fresh[#fresh + 1] = e
		end
	end
	entries = fresh
end
return {meta[1], meta[2], meta[3], entries}
