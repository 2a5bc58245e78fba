-- Delete a lock if it is still ours. KEYS[1]: the lock; ARGV[1]: our token. Returns 1 when deleted.
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end
return 0
