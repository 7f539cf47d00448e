"""The machinery of a run: its folder's rules (lock, resume, log), atomic writes, trackers, a subject's
presets and the default weight and data locations."""
