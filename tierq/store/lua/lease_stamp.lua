-- Score members of a lease index with Redis's own clock (never a worker's: another host compares
-- them). KEYS[1]: the index (a sorted set). ARGV[1]: 'XX' to renew only members still there (a
-- delivery acknowledged meanwhile is not brought back), '-' to add; ARGV[2..]: the members.
-- Returns the time used, as a string.
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
for i = 2, #ARGV do
  if ARGV[1] == 'XX' then
    redis.call('ZADD', KEYS[1], 'XX', now, ARGV[i])
  else
    redis.call('ZADD', KEYS[1], now, ARGV[i])
  end
end
return tostring(now)
