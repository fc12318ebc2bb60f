"""The napari plugin (optional extra `cryoves[napari]`): a reader for cryoves output folders and MRC tomograms,
a widget that segments the open tomogram, and a widget that saves vesicles corrected by hand.

napari, magicgui and Qt are imported in this package only; `napari.yaml` is its npe2 manifest.
"""
