"""Data: sources (built-in package datasets, CSV/TSV/JSONL, HF `datasets`), tasks, collators."""
