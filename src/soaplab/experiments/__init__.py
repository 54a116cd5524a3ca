"""soaplab.experiments (being written)."""
