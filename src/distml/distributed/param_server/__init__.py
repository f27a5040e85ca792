"""Parameter servers and asynchronous training over a work queue (``strategy:
parameter_server``).

The design, module by module:

- Roles (``strategy``): ranks 0..num_servers-1 are servers, the rest workers, on torchrun's
  process group as for any strategy. The parameters are one flat vector cut into equal byte
  ranges, one per server (``layout``); each server applies the configured optimizer to its
  range; workers hold the whole model and compute gradients only.
- Transport (``protocol``, ``sockets``): request and reply between a worker and each
  server over a TCP socket (each server listens on its node's address and publishes it in
  the job's store; payloads go from and into the tensors' own memory), between servers
  over torch.distributed point-to-point send/recv on gloo; CPU tensors. Never a collective
  while training: a collective needs every rank, and a worker may be dead. Not
  torch.distributed.rpc (in maintenance upstream).
- Work (``work``): the training split cut into items (slices of partitions); server 0
  hands them out on request, so faster workers take more; a dead worker's item is
  re-queued; every item of an epoch is completed exactly once, and the record of who
  completed what is checkpointed and reported.
- Modes (``server``): async, ssp (Ho et al. 2013: a worker may be at most ``staleness``
  steps ahead of the slowest) and sync (Chen et al. 2016: a step takes the first
  workers - backup_workers gradients). The staleness of every applied gradient (server
  version at apply minus the version the worker pulled) and, for ssp, the lead each pull
  was granted are recorded.
- Worker deaths (``keeper``, ``server``): a worker rank runs under a keeper process, so the
  launcher (torchrun's agent, which ends or restarts every process when one fails) sees
  nothing fail; the servers see the dropped connection at once (its socket ends) or, for a
  hung worker, the lease it renews in the c10d store run out, and go on without it: its
  item is re-queued, and it no longer counts for ssp's slowest or sync's quorum.
- Server deaths (``checkpoint``): fatal to the attempt. At the end of each epoch, when
  nothing is in flight, each server writes its shard, optimizer state and version with
  torch.distributed.checkpoint (no collective), server 0 the progress and the queue's
  record; with ``train.max_restarts``, the launcher restarts every process and training
  resumes from the last complete checkpoint.
- The loop (``distml.training.ps_trainer``): server 0 coordinates epochs, follows the updates
  for the callbacks, evaluates and checkpoints; ``Strategy.train_step`` is one lock-step
  synchronous step, which ``distml verify`` certifies against one process (ps-sync).

- Workers that join and leave (``distml.training.ps_join``, ``distml ps-worker``): while a
  candidate trains, server 0 writes its servers' addresses in the candidate's folder; a new
  worker connects, is given a fresh id by server 0 (never reused) and takes items until the
  end; SIGTERM makes it leave after its current item (BYE: the servers stop counting it).
  Joins, leaves and losses are membership events in the run's record.

Limits: a dead rank does not come back as itself (a new worker joins in its place); a
joiner renews no lease, so a hung joiner is not declared dead; a click model's sparse
tables take no joiner; when one torchrun
job trains several candidates, one after another, a candidate after the death needs the
dead rank and waits for it: train a parameter-server candidate in its own job
(``--candidate``), as ``distml train`` does.
"""
