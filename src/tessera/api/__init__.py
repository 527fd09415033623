"""What users call: runs, artifacts, browsing. Re-exported by ``tessera``."""
