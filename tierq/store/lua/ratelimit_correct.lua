-- KEYS[1]: the model's hash. ARGV: per kind (3) the API's remaining (or ''), then per kind its
-- limit (or ''). Lowers each level to the API's remaining; learns the limits.
local kinds = {'requests', 'input_tokens', 'output_tokens'}
for i, kind in ipairs(kinds) do
  local limit = tonumber(ARGV[3 + i])
  if limit and limit > 0 then redis.call('HSET', KEYS[1], 'limit:' .. kind, tostring(limit)) end
  local remaining = tonumber(ARGV[i])
  if remaining then
    local level = tonumber(redis.call('HGET', KEYS[1], kind))
    if level == nil or remaining < level then
      redis.call('HSET', KEYS[1], kind, tostring(remaining))
    end
  end
end
if redis.call('HEXISTS', KEYS[1], 'at') == 0 then
  local t = redis.call('TIME')
  redis.call('HSET', KEYS[1], 'at', tostring(tonumber(t[1]) + tonumber(t[2]) / 1000000))
end
redis.call('EXPIRE', KEYS[1], 3600)
return 1
