"""Experiments: train and compare optimizers on real data, one command to a report.

``data/`` (Shakespeare, photos) and ``models/`` (nanoGPT, U-Net) feed ``tasks.py``, which
describes each task once; ``loop.py`` is the one training loop and ``run_folder.py`` its files;
``compare.py`` runs optimizers × frequencies × lrs × seeds and calls ``report.py`` for the
table and plots; ``commands.py`` is ``soaplab compare``. ``soaplab.torchrun`` runs all of it
under torchrun.
"""
