"""Worker functions for the multi-process tests (real gloo process groups on 127.0.0.1)."""
