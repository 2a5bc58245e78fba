"""tierq's benchmark harness: ``python -m bench SCENARIO [--runs N] [--quick] [--json PATH] [--png PATH]``.

Scenarios (``all`` runs each): ``overhead`` (tierq vs raw Celery enqueue latency), ``isolation``
(fast tier under a slow-tier backlog), ``streaming`` (producer TTFT vs the simulator's),
``concurrency`` (in-flight calls in one worker process) and ``cost`` (worker CPU per job vs
raw Celery + the SDK's stream parsing). Named only: ``http`` (the HTTP API), ``ratelimit`` (the
shared rate limit under a burst) and ``dollars`` (what a mix of jobs costs with and without Message
Batches and the prompt cache). Everything runs locally: an embedded Redis, the simulator
and worker subprocesses, all stopped when the scenario ends.
"""
