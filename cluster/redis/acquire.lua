-- Takes, keeps or renews a feed's lease.
-- KEYS: lease, meta, log.
-- ARGV: holder, term (0 to take or keep, else the term to renew), ttl in
-- milliseconds, the epoch to start if the feed has no meta (when taking).
-- Returns {epoch, term, last seq, state or false, 1 if holder holds the lease else 0}.
local holder, term, ttl = ARGV[1], ARGV[2], ARGV[3]
local meta = redis.call('HMGET', KEYS[2], 'epoch', 'term', 'seq', 'state')
if not meta[1] then
	if term ~= '0' then
		return {false, 0, 0, false, 0}
	end
	-- First use, or the store lost the feed: a new epoch. A lease or log
	-- left over belongs to no epoch.
	redis.call('DEL', KEYS[1], KEYS[3])
	redis.call('HSET', KEYS[2], 'epoch', ARGV[4], 'term', 0, 'seq', 0, 'bytes', 0)
	meta = {ARGV[4], '0', '0', false}
end
local owner = redis.call('GET', KEYS[1])
local held = 0
if owner == holder and (term == '0' or term == meta[2]) then
	redis.call('PEXPIRE', KEYS[1], ttl)
	held = 1
elseif not owner and term == '0' then
	meta[2] = tostring(redis.call('HINCRBY', KEYS[2], 'term', 1))
	redis.call('SET', KEYS[1], holder, 'PX', ttl)
	held = 1
end
return {meta[1], meta[2], meta[3], meta[4], held}
