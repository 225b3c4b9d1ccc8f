"""Benchmarks: scripts that print figures (speed, scores); no sweepcls code in the reference loop."""
