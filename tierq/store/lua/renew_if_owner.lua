-- Extend a lock's TTL if it is still ours. KEYS[1]: the lock; ARGV: our token, the TTL in ms.
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) end
return 0
