-- KEYS[1]: the model's hash; KEYS[2] (optional): the tier's fair-share hash for the model. ARGV:
-- need per kind (3), floor fraction, limit per kind (3, the configured ones: the hash's learned ones
-- win); with KEYS[2]: the producer, its weight, then the usage half-life, the seconds a producer
-- counts as active (since its last reserve) and as waiting (since its last refusal), the wait a
-- producer over its share is given, and how many producers are kept apart. Returns {granted 0|1,
-- seconds to wait as a string} (-1: the need exceeds a limit, it never fits).
-- (runs after ratelimit_prelude.lua: now, kinds, at, blocked)
local floor = tonumber(ARGV[4])
local level, limit = {}, {}
local wait, fits = 0, true
for i, kind in ipairs(kinds) do
  limit[i] = tonumber(redis.call('HGET', KEYS[1], 'limit:' .. kind)) or tonumber(ARGV[4 + i])
  local stored = tonumber(redis.call('HGET', KEYS[1], kind)) or limit[i]
  level[i] = math.min(limit[i], stored + math.max(0, now - at) * limit[i] / 60)
  local need = tonumber(ARGV[i])
  if need > limit[i] * (1 - floor) then
    return {0, '-1'}
  end
  local room = level[i] - floor * limit[i]
  if need > room then
    fits = false
    wait = math.max(wait, (need - room) * 60 / limit[i])
  end
end
if blocked > now then
  fits = false
  wait = math.max(wait, blocked - now)
end
local held_back, spread, horizon_key = false, 1, 'horizon:' .. ARGV[4]
if KEYS[2] then
  -- weighted fair share between the tier's producers: each producer's grants decay with a
  -- half-life; one that holds more than its weight's share of the active producers' usage is
  -- held back while another producer waits (was refused lately)
  local me, weight = ARGV[8], tonumber(ARGV[9])
  if redis.call('HEXISTS', KEYS[2], me) == 0 and redis.call('HLEN', KEYS[2]) >= tonumber(ARGV[14]) then
    me = '-'  -- past the producers a tier keeps apart (a sender names its own): share the anonymous one
  end
  local half_life, active_s = tonumber(ARGV[10]), tonumber(ARGV[11])
  local waiting_s, fair_wait = tonumber(ARGV[12]), tonumber(ARGV[13])
  local used, denied = 0, 0
  local total_w, total_u, others_wait, waiting_w = weight, 0, false, weight
  local raw = redis.call('HGETALL', KEYS[2])
  for i = 1, #raw, 2 do
    local u, t0, w, seen, refused = string.match(raw[i + 1], '^([^,]+),([^,]+),([^,]+),([^,]+),([^,]+)$')
    if u then
      local decayed = tonumber(u) * math.pow(0.5, math.max(0, now - tonumber(t0)) / half_life)
      if raw[i] == me then
        used, denied = decayed, tonumber(refused)
        total_u = total_u + decayed
      elseif tonumber(seen) >= now - active_s then
        total_w = total_w + tonumber(w)
        total_u = total_u + decayed
        -- waiting: refused lately, or holding appointments still to come round
        local ahead = tonumber(redis.call('HGET', KEYS[1], horizon_key .. ':' .. raw[i])) or 0
        if tonumber(refused) >= now - waiting_s or ahead > now then
          others_wait, waiting_w = true, waiting_w + tonumber(w)
        end
      elseif tonumber(seen) < now - 600 then
        redis.call('HDEL', KEYS[2], raw[i])
      end
    end
  end
  -- held back only where it matters: the grant would leave no room for a waiting one's request
  local scarce = false
  for i = 1, 3 do
    if level[i] - floor * limit[i] < 2 * tonumber(ARGV[i]) then scarce = true end
  end
  if fits and scarce and others_wait and total_u > 0 and used + 1 > total_u * weight / total_w + 1 then
    fits, held_back = false, true
    wait = math.max(wait, fair_wait)
  end
  if fits then used = used + 1 else denied = now end
  -- each producer's appointments are spaced by its share of the producers waiting now: waiting
  -- producers' jobs come back interleaved, and a producer alone is spaced by what it needs
  spread, horizon_key = waiting_w / weight, horizon_key .. ':' .. me
  redis.call('HSET', KEYS[2], me, string.format('%.4f,%.6f,%.3f,%.6f,%.6f', used, now, weight, now, denied))
  redis.call('EXPIRE', KEYS[2], 3600)
end
if not fits and not held_back then
  -- an appointment: the refused of one floor (and producer) are spaced by what each needs, so a
  -- backlog comes back one by one as the buckets refill instead of all at the first refill
  local spacing = 0
  for i = 1, 3 do spacing = math.max(spacing, tonumber(ARGV[i]) * 60 / limit[i]) end
  local horizon = tonumber(redis.call('HGET', KEYS[1], horizon_key)) or 0
  local appointment = now + wait
  if horizon > now then appointment = math.max(appointment, horizon + spacing * spread) end
  redis.call('HSET', KEYS[1], horizon_key, tostring(appointment))
  wait = appointment - now
end
for i, kind in ipairs(kinds) do
  if fits then level[i] = level[i] - tonumber(ARGV[i]) end
  redis.call('HSET', KEYS[1], kind, tostring(level[i]))
end
redis.call('HSET', KEYS[1], 'at', tostring(now))
redis.call('EXPIRE', KEYS[1], 3600)
if fits then return {1, '0'} end
return {0, tostring(wait)}
