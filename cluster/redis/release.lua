-- Gives up a feed's lease if holder holds it with term.
-- KEYS: lease, meta. ARGV: holder, term.
-- Returns 1 if the lease was released, else 0.
if redis.call('GET', KEYS[1]) == ARGV[1] and redis.call('HGET', KEYS[2], 'term') == ARGV[2] then
	return redis.call('DEL', KEYS[1])
end
return 0
