"""Bundled data: evaluation prose, prompt set, and a recorded replay file."""
