"""Discrete-event cluster simulator that runs the production scheduler (``controlplane.scheduler``).

``python -m benchmarks.cluster_sim --help``. Modules: ``profile`` (calibration profiles),
``engine_model`` (step and move costs), ``workload`` (trace -> functions), ``sim`` (the event
core and simulated workers), ``systems`` (lorafaas and the baselines), ``runner`` (one run,
goodput and devices-needed searches), ``plots``, ``calibrate`` (this machine's profile).
"""
