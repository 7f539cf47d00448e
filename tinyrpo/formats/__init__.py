"""Model files and where they come from: the layouts and their rename rules, the one loader, the fine-tuned
checkpoint and LoRA files, the exported formats, A1111's infotext, and the pinned downloads."""
