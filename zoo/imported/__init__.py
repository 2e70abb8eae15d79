"""Published checkpoints of other projects, loaded into mmzoo's own modules through key tables kept as data."""
