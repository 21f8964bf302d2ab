"""Studies: each a Config, a run (computes, writes nothing) and a write (stages and publishes files)."""
