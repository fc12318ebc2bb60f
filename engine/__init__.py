"""Pipeline stages as plain functions over arrays and tables, plus I/O, model and metrics."""
