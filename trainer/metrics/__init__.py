"""What a run reports: ``records`` writes ``metrics.jsonl`` (one JSON line per logged step and per
start, eval, preemption and end) and reads it back, ``progress`` turns steps into log lines or a
progress bar, ``phases`` times each start-up phase and says what a start recovered from, and
``tensorboard`` mirrors the records as event files."""
