"""Training: typed config and presets, schedules, checkpoints, the loop, reports."""
