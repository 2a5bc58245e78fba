-- Park a job for a batch once: a redelivered message finds its record and adds nothing.
-- KEYS[1]: the job's parked record; KEYS[2]: the tier's parked set (by score); KEYS[3]: the tier's
-- payload hash. ARGV: the record, its TTL (s), the score, the job id, the payload. Returns 1 when parked.
if redis.call('set', KEYS[1], ARGV[1], 'NX', 'EX', ARGV[2]) then
  redis.call('zadd', KEYS[2], ARGV[3], ARGV[4])
  redis.call('hset', KEYS[3], ARGV[4], ARGV[5])
  return 1
end
return 0
