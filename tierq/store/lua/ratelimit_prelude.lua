-- What the reserve and peek scripts start from: Redis's clock, the kinds, when the model's buckets
-- were last brought up to date, and until when a 429 holds it.
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local kinds = {'requests', 'input_tokens', 'output_tokens'}
local at = tonumber(redis.call('HGET', KEYS[1], 'at')) or now
local blocked = tonumber(redis.call('HGET', KEYS[1], 'blocked_until')) or 0
