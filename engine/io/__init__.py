"""Reading and writing: MRC volumes, IMOD models, Pyto label files, Parquet tables, atomic writes and
the per-tomogram outputs with their run record."""
