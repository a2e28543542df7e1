"""Studies: many runs of one recipe over a space of settings and seeds (sweep), and
their statistics by point (study)."""
