"""Starting and restarting the workers: ``local`` (torchrun standalone on this machine) and
``launch`` (the container entrypoint, rendezvous from ``PET_*``), both through torchrun's agent run
in-process (``agent``), which reports each failure in one line and stops a stopped worker at once.
Config mistakes are caught here, before any worker starts (``launch.preflight``)."""
