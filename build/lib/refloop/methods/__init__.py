"""The papers' methods, each a thin loop over the shared core."""
