-- KEYS[1]: the model's hash. ARGV: amount per kind (3) to give back. Levels never pass the limits.
local kinds = {'requests', 'input_tokens', 'output_tokens'}
for i, kind in ipairs(kinds) do
  local amount = tonumber(ARGV[i])
  local level = tonumber(redis.call('HGET', KEYS[1], kind))
  local limit = tonumber(redis.call('HGET', KEYS[1], 'limit:' .. kind)) or tonumber(ARGV[3 + i])
  if amount > 0 and level then
    redis.call('HSET', KEYS[1], kind, tostring(math.min(limit, level + amount)))
  end
end
return 1
