"""The labeling engine: F features x R label rows in one pool, one step, one loop, one scorer."""
