-- KEYS[1]: the model's hash. ARGV[1]: seconds. Holds the model until then (never shortens a hold).
local t = redis.call('TIME')
local until_ = tonumber(t[1]) + tonumber(t[2]) / 1000000 + tonumber(ARGV[1])
local current = tonumber(redis.call('HGET', KEYS[1], 'blocked_until')) or 0
if until_ > current then redis.call('HSET', KEYS[1], 'blocked_until', tostring(until_)) end
redis.call('EXPIRE', KEYS[1], 3600)
return 1
