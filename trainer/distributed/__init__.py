"""A worker's place in the job and its process life: ``runtime`` joins the process group (device,
backend, the checkpoint group, collective timeout), ``preemption`` turns SIGTERM/SIGINT into a stop
every rank agrees on, and ``failure_file`` carries the agent's account of the last failure to the
workers it restarts. Plain helpers: the checkpoint engine builds on them, they import nothing above."""
