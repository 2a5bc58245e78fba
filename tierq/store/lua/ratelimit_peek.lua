-- KEYS[1]: the model's hash. ARGV: limit per kind (3, the configured ones), an appointments field.
-- Returns, without changing anything, per kind the level now (refilled) and the limit, then the
-- seconds the model is held for and until that field's last appointment, all as strings.
-- (runs after ratelimit_prelude.lua: now, kinds, at, blocked)
local out = {}
for i, kind in ipairs(kinds) do
  local limit = tonumber(redis.call('HGET', KEYS[1], 'limit:' .. kind)) or tonumber(ARGV[i])
  local stored = tonumber(redis.call('HGET', KEYS[1], kind)) or limit
  out[i] = tostring(math.min(limit, stored + math.max(0, now - at) * limit / 60))
  out[3 + i] = tostring(limit)
end
out[7] = tostring(math.max(0, blocked - now))
out[8] = tostring(math.max(0, (tonumber(redis.call('HGET', KEYS[1], ARGV[4])) or 0) - now))
return out
