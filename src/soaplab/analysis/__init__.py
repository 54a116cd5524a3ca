"""soaplab.analysis (being written)."""
