"""Experiments: train and compare optimizers on real data, one command to a report.

``data/`` (Shakespeare, photos) and ``models/`` (nanoGPT, U-Net) feed ``tasks.py``; ``loop.py``
is the one training loop; ``compare.py`` runs optimizers × frequencies × lrs × seeds and
``report.py`` writes the table and plots; ``commands.py`` is ``soaplab compare``; ``ddp.py``
runs all of it under torchrun.
"""
