"""Training beyond one process: ``mot launch`` on Ray Train (the driver and its workers),
``mot train --process-group`` in a torch.distributed group without Ray, ``mot sweep`` trials on
Ray Tune, the tokenize job on Ray Data, and checkpoint storage reached by URI. Each starts its
runs through ``mot_core.runs.start_run`` with a runtime composed of its own parts."""
