"""Measuring and showing results: DreamBench's scores of a subject, the comparison of methods, and the
report pages with their charts and labelled grids."""
