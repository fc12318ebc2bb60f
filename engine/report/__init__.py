"""Quality-control reports over an output folder: one PNG per tomogram (`tomogram`) and a sortable
run-level `index.html` (`index`), both read from what `write_outputs` left, so they can be rebuilt."""
