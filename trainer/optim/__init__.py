"""The optimisation schedule: AdamW's learning rate (warm-up, then cosine), re-based on resume on
this run's settings, with each change that moves the trajectory reported."""
