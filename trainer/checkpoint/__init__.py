"""DCP checkpoints: layout and commit markers, integrity, the writer, the job lock, the manager."""
