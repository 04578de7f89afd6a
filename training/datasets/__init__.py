"""Reference data at several levels of theory: geometries, labellers, splits, data cards.

``geometry`` makes the configurations (molecules, bulk crystals, slabs with adsorbates:
rattled, strained and short molecular dynamics), ``levels`` names the electronic-structure
methods that label them, ``pipeline`` ties both into data sets on disk with a data card
each (``cards``). ``crossfield data make`` is the command line (``training/data_cli.py``).
"""
