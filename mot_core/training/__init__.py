"""Training: the loop (build state, train step, loop), checkpoints, the runtime it runs in
(composed of parallelism, a checkpoint store and a reporter), the rules of a resume,
evaluation, experiment trackers and the memory check. A run is started through
``mot_core.runs.start_run``, never by calling the loop directly."""
